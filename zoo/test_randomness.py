"""Randomness: what every style draws, checked by its law, and that the same draws give the same outputs.

Each model file draws the way its framework's own examples do: a key argument
(plain JAX, Linen's VAE), ``rngs={"dropout": key}`` and ``self.make_rng`` (Linen's
dropout), an ``nnx.Rngs`` stream (NNX), ``hk.next_rng_key()`` (Haiku), one key
per example under ``jax.vmap`` (Equinox). From the same step key they draw
different numbers. So, for every model that draws and every style:

- **the same draws give the same outputs**: the style's train-mode draws are
  recorded (``harness.recorder``) and the plain-JAX reference is run on them
  in place of its own (``harness.replaying``): the outputs must agree as the
  deterministic paths do (``test_parity.py``). A style that scaled its kept
  units otherwise than by ``1 / (1 - rate)``, dropped elsewhere or drew
  another number of times would not;
- **the draws follow their law**: dropout keeps a unit with probability
  ``1 - rate`` (within 5 binomial standard deviations), its masks differ
  across examples, layers and steps, the same key gives the same masks, and
  evaluation draws nothing and is the identity; the VAE's noise has mean 0
  and variance 1 (within 5 standard errors), differs from example to example
  and is uncorrelated between them;
- **how each framework derives a layer's key** is reproduced outside the
  model files, with the framework's public API (``test_how_each_framework_
  derives_the_dropout_key``): these back the porting table's rows.
"""

import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared.registry import MODELS, NAMES, STYLES
from zoo import harness
from zoo.harness import OTHERS, build, start
from zoo.test_parity import assert_close

DRAWING = [m for m in NAMES if MODELS[m].rng]
# The law holds scanned too: each layer of a scan draws its own masks (the recorder keeps every call of
# a draw site, once per layer). The same-draws check replays the reference's draws site by site, which
# a scan's one traced body cannot take layer by layer: it runs unrolled.
DROPOUT = [m for m in DRAWING + list(harness.SCANNED) if harness.spec(m).rng == "dropout"]
SIGMAS = 5  # a law holds within 5 standard errors: a false alarm about once in 3.5 million


def record(model: str, style: str, key: jax.Array, batch: dict, train: bool = True, **overrides):
    params, state = harness.native(model, style) if not overrides else _native_overridden(model, style, overrides)
    return harness.recorder(model, style, train, **overrides)(params, state, batch["image"], batch["label"], key)


def _native_overridden(model, style, overrides):
    reference = build(model, "jax", **overrides)
    params, state = reference.init(jax.random.key(1))
    net = build(model, style, **overrides)
    return net.from_canonical(params), net.state_from_canonical(state, 0)


@pytest.mark.parametrize("model,style", [(m, s) for m in DRAWING for s in OTHERS])
def test_the_same_draws_give_the_same_outputs(model, style, digits):
    batch = harness.batch(digits, model=model)
    outputs, draws = record(model, style, jax.random.key(7), batch)
    assert draws, f"{model} ({style}) drew nothing in training"
    params, state = start(model)
    expected = harness.replayer(model)(params, state, batch["image"], batch["label"], [jnp.asarray(d) for d in draws])
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(outputs)):
        assert_close(g, e, model, style, what="outputs on the same draws")
    # Not vacuous: other draws (the first one's masks inverted, or its noise negated) change the outputs.
    changed = [jnp.asarray(~d if d.dtype == bool else -d) for d in draws[:1]] + [jnp.asarray(d) for d in draws[1:]]
    other = harness.replayer(model)(params, state, batch["image"], batch["label"], changed)
    assert any(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 1e-4
               for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(outputs)))


@pytest.mark.parametrize("model,style", [(m, s) for m in DROPOUT for s in STYLES])
def test_dropout_draws_by_its_law(model, style, digits):
    rate = build(model, style).hparams["dropout"]
    batch = harness.batch(digits, model=model)
    outputs, masks = record(model, style, jax.random.key(1), batch)
    masks = [np.asarray(m, bool) for m in masks]
    if harness.variant(model):  # a scan draws once per layer, as the unrolled blocks do
        unrolled = record(harness.spec(model).name, style, jax.random.key(1), batch)[1]
        assert sorted(m.shape for m in masks) == sorted(np.shape(m) for m in unrolled)
    kept = np.concatenate([m.ravel() for m in masks])
    bound = SIGMAS * np.sqrt(rate * (1 - rate) / kept.size)
    assert abs(kept.mean() - (1 - rate)) <= bound, (kept.mean(), 1 - rate, bound)
    # Each example its own mask; each layer its own; each step (another key) its own.
    assert not all(np.array_equal(m[0], m[1]) for m in masks), "one mask for every example"
    same_shape = [(a, b) for i, a in enumerate(masks) for b in masks[i + 1:] if a.shape == b.shape]
    assert all(not np.array_equal(a, b) for a, b in same_shape), "two layers share a mask"
    step_key = jax.random.fold_in(jax.random.key(1), 1)
    _, next_masks = record(model, style, step_key, batch)
    assert all(not np.array_equal(a, np.asarray(b, bool)) for a, b in zip(masks, next_masks))
    # The same key, the same masks and outputs.
    again, again_masks = record(model, style, jax.random.key(1), batch)
    assert all(np.array_equal(a, np.asarray(b, bool)) for a, b in zip(masks, again_masks))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(outputs))
    # Evaluation draws nothing, whatever the key.
    first, eval_draws = record(model, style, jax.random.key(1), batch, train=False)
    second, _ = record(model, style, jax.random.key(2), batch, train=False)
    assert eval_draws == []
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


@pytest.mark.parametrize("style", STYLES)
def test_the_vae_noise_by_its_law(style, digits):
    """256 examples, 64 latents: 16,384 draws; mean 0 and variance 1 within 5 standard errors."""
    batch = harness.batch(digits, 256)
    _, (noise,) = record("vae", style, jax.random.key(3), batch, latents=64)
    noise = np.asarray(noise, np.float64)
    n = noise.size
    assert noise.shape == (256, 64)
    assert abs(noise.mean()) <= SIGMAS / np.sqrt(n)
    assert abs(noise.var() - 1) <= SIGMAS * np.sqrt(2 / n)
    # Each example its own draw, uncorrelated with its neighbour's.
    assert len({row.tobytes() for row in noise}) == len(noise)
    correlation = float(np.mean(noise[:-1] * noise[1:]))
    assert abs(correlation) <= SIGMAS / np.sqrt(noise[1:].size)
    # The same key, the same noise; another key, other noise.
    _, (again,) = record("vae", style, jax.random.key(3), batch, latents=64)
    _, (other,) = record("vae", style, jax.random.key(4), batch, latents=64)
    np.testing.assert_array_equal(np.asarray(again), noise.astype(np.float32))
    assert not np.allclose(np.asarray(other), noise)


def test_how_each_framework_derives_the_dropout_key(digits):
    """The ResNet's one dropout mask, from the step key ``key``, reproduced with each framework's own API
    outside the model file: plain JAX draws with ``key`` itself; Linen's ``nn.Dropout`` with
    ``make_rng("dropout")`` in its own scope (``key`` folded with the module's path and a count: a probe
    module at the same path draws the same); NNX with the first key of the ``nnx.Rngs(dropout=key)``
    stream (``fold_in(key, 0)``); Haiku with the first key of ``hk.PRNGSequence(key)``; Equinox with
    example ``i``'s key ``jax.random.split(key, batch)[i]``."""
    key = jax.random.key(11)
    batch = harness.batch(digits)
    keep = 1 - build("resnet", "jax").hparams["dropout"]
    masks = {style: np.asarray(record("resnet", style, key, batch)[1][0], bool) for style in STYLES}
    shape = masks["jax"].shape

    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return Draw(name="dropout")()

    class Draw(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("dropout")

    linen_key = Probe().apply({}, rngs={"dropout": key})
    expected = {
        "jax": key,
        "flax": linen_key,
        "nnx": nnx.Rngs(dropout=key).dropout(),
        "haiku": next(hk.PRNGSequence(key)),
    }
    for style, derived in expected.items():
        np.testing.assert_array_equal(np.asarray(jax.random.bernoulli(derived, keep, shape)), masks[style],
                                      err_msg=style)
    per_example = jax.vmap(lambda k: jax.random.bernoulli(k, keep, shape[1:]))(jax.random.split(key, shape[0]))
    np.testing.assert_array_equal(np.asarray(per_example), masks["equinox"])
    # Linen's key is not the step key itself, nor NNX's first: make_rng folds in the path.
    assert not np.array_equal(jax.random.key_data(linen_key), jax.random.key_data(key))
    assert not np.array_equal(jax.random.key_data(linen_key), jax.random.key_data(expected["nnx"]))
