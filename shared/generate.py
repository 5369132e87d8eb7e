"""Text from a trained language model: ``zoo generate``.

:func:`generate` continues a batch of prompts, greedily (temperature 0) or by
sampling (a temperature, optionally the ``top_k`` likeliest tokens only). With
the key/value cache (the default) each step feeds one token to the style's own
decoder (``Model.decode``: Linen's and NNX's ``decode=True``, Haiku state,
Equinox's and plain JAX's cache in and out), the prompt one token at a time as
Linen's and NNX's caches require; without it each step runs the whole
sequence again, so its cost grows with the length (``zoo bench`` times both).
The whole loop is one ``lax.scan`` under ``jax.jit``.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shared import checkpoint, files
from shared.args import int_at_least, non_negative_float, path_arg, positive_int, seed
from shared.errors import ZooError
from shared.registry import MODELS, STYLES
from shared.styles import Model


def _pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


def _generate(model: Model, params: Any, prompt: jax.Array, key: jax.Array, *, steps: int, temperature: float,
              top_k: int | None, cached: bool) -> jax.Array:
    batch, length = prompt.shape
    total = length + steps
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :length].set(prompt)

    def put(tokens: jax.Array, logits: jax.Array, t: jax.Array) -> jax.Array:
        """The token after position ``t``: the prompt's while there is one, else the model's pick."""
        chosen = _pick(logits, jax.random.fold_in(key, t), temperature, top_k)
        given = jax.lax.dynamic_index_in_dim(tokens, jnp.minimum(t + 1, total - 1), axis=1, keepdims=False)
        chosen = jnp.where(t + 1 < length, given, chosen)
        return jax.lax.dynamic_update_index_in_dim(tokens, chosen, t + 1, axis=1)

    if cached:
        def step(carry, t):
            tokens, cache = carry
            logits, cache = model.decode(params, cache, jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), t)
            return (put(tokens, logits[:, 0], t), cache), None

        (tokens, _), _ = jax.lax.scan(step, (tokens, model.init_cache(params, batch)),
                                      jnp.arange(total - 1, dtype=jnp.int32))
        return tokens

    block = model.in_shape[0]

    def full(tokens, t):
        # The last token is never read: positions up to total - 2 are.
        padded = jnp.zeros((batch, block), jnp.int32).at[:, :min(total, block)].set(tokens[:, :block])
        logits, _ = model.apply(params, {}, padded, None, key, False)
        return put(tokens, jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), t), None

    tokens, _ = jax.lax.scan(full, tokens, jnp.arange(length - 1, total - 1, dtype=jnp.int32))
    return tokens


def generate(model: Model, params: Any, prompt: Any, steps: int, *, key: jax.Array | None = None,
             temperature: float = 0.0, top_k: int | None = None, cached: bool = True) -> np.ndarray:
    """``(batch, prompt + steps)`` tokens: each prompt (one token at least) and ``steps`` more."""
    if model.decode is None:
        raise ZooError(f"{model.name} is not a language model; zoo generate continues the gpt's text")
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.shape[1] < 1:
        raise ZooError("the prompt is empty; give at least one token")
    # The last token generated is read at no position: a block of B positions ends with token B + 1.
    if prompt.shape[1] + steps - 1 > model.in_shape[0]:
        raise ZooError(f"a prompt of {prompt.shape[1]} tokens and {steps} more need "
                       f"{prompt.shape[1] + steps - 1} positions, beyond the {model.in_shape[0]} the model was "
                       f"trained for; ask for at most {max(model.in_shape[0] + 1 - prompt.shape[1], 0)} tokens")
    if ((prompt < 0) | (prompt >= model.num_classes)).any():
        raise ZooError(f"the prompt holds tokens beyond the vocabulary of {model.num_classes}")
    key = jax.random.key(0) if key is None else key
    run = generator(model, steps, temperature=temperature, top_k=top_k, cached=cached)
    return np.asarray(run(params, jnp.asarray(prompt), key))


def generator(model: Model, steps: int, *, temperature: float = 0.0, top_k: int | None = None,
              cached: bool = True) -> Any:
    """The jitted ``run(params, prompt, key) -> tokens`` of :func:`generate`, unchecked (``zoo bench``)."""
    return jax.jit(functools.partial(_generate, model, steps=steps, temperature=float(temperature), top_k=top_k,
                                     cached=cached))


# --------------------------------------------------------------------------- addition, as people write it


def addition_prompt(text: str, digits: int) -> str:
    """``"123+45"`` as the dataset's tokens: both numbers zero-padded to ``digits`` (``"123045"``)."""
    parts = text.replace(" ", "").split("+")
    if len(parts) != 2 or not all(p.isdigit() and len(p) <= digits for p in parts):
        raise ZooError(f"--prompt {text!r}: expected A+B with numbers of at most {digits} digits "
                       f"(the checkpoint's addition), e.g. {'9' * digits}+{'1' * digits}")
    return "".join(p.zfill(digits) for p in parts)


def addition_answer(generated: str, digits: int) -> int:
    """The sum a generated answer says: its ``digits + 1`` digits come least significant first."""
    return int(generated[::-1])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained language model (the gpt)")
    p.add_argument("model", choices=[name for name, spec in MODELS.items() if spec.kind == "lm"])
    p.add_argument("--checkpoint", type=path_arg, required=True,
                   help="a checkpoint folder written by zoo train --checkpoint-dir (its newest step)")
    p.add_argument("--style", choices=STYLES,
                   help="the style to generate with (default: the one it was trained in; any style reads it)")
    p.add_argument("--prompt", default=None,
                   help="text in the model's characters; on addition A+B (e.g. 123+456). Default: the first "
                        "character of its vocabulary")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="tokens to add (default: the rest of the model's block; on addition, the answer's)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0,
                   help="0 for greedy decoding (the default), else sample from softmax(logits / T)")
    p.add_argument("--top-k", type=positive_int, help="sample only among the K likeliest tokens")
    p.add_argument("--samples", type=int_at_least(1, "a number of samples from 1 to 64", 64), default=1,
                   help="continuations to draw (default: 1)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="run the whole sequence again at every step instead of the key/value cache")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    files.input_path(args.checkpoint, "--checkpoint")
    if args.top_k is not None and args.temperature == 0:
        raise ZooError("--top-k samples, and --temperature 0 decodes greedily; give --temperature above 0")
    meta = checkpoint.read_meta(*checkpoint.resolve(args.checkpoint))
    if meta["model"] != args.model:
        raise ZooError(f"checkpoint {args.checkpoint} holds a {meta['model']}, not a {args.model}")
    vocab = meta.get("vocab")
    if not vocab:
        raise ZooError(f"checkpoint {args.checkpoint} records no vocabulary (it was imported, not trained by "
                       "zoo train): nothing to read a prompt with")
    ids = {c: i for i, c in enumerate(vocab)}
    addition = meta["dataset"] == "addition"
    digits = meta.get("dataset_options", {}).get("digits")
    text = args.prompt if args.prompt is not None else vocab[0]
    if addition and args.prompt is not None and "+" in args.prompt:
        text = addition_prompt(args.prompt, digits)
    unknown = sorted({c for c in text if c not in ids})
    if unknown or not text:
        raise ZooError(f"--prompt {args.prompt!r}: " + (f"{''.join(unknown)!r} not in the model's {len(vocab)} "
                                                        "characters" if unknown else "empty"))
    block = meta["in_shape"][0]
    steps = args.max_new_tokens or (digits + 1 if addition and len(text) == 2 * digits else block + 1 - len(text))
    model, params, _ = checkpoint.load_variables(args.checkpoint, args.style or meta["style"],
                                                 expect_model=args.model)
    prompt = np.tile(np.array([ids[c] for c in text], np.int32), (args.samples, 1))
    out = generate(model, params, prompt, steps, key=jax.random.key(args.seed), temperature=args.temperature,
                   top_k=args.top_k, cached=not args.no_cache)
    for row in out:
        continuation = "".join(vocab[i] for i in row[len(text):])
        if addition and len(text) == 2 * digits and len(continuation) == digits + 1:
            a, b = int(text[:digits]), int(text[digits:])
            said = addition_answer(continuation, digits)
            print(f"{a}+{b}={said} ({'right' if said == a + b else f'wrong: {a + b}'}; tokens {text}{continuation})")
        else:
            print(text + continuation)
    return 0
