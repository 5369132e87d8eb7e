"""What the parity tests share: the models at their small size, their common start, compiled
steps kept per worker, and the recording and replaying of random draws.

Every check runs the registry's ``small`` hyperparameters (``ModelSpec.small``:
every layer kind and code path, a fraction of the compile time) on the digits
images, 8x8, or for a language model on 3-digit addition (9 tokens, made here
as the dataset makes them, without building it). A program is compiled once per worker and reused by every test
that needs it (``functools.cache``); the persistent compile cache keeps it for
the next run.

Randomness: :func:`recording` replaces ``jax.random.bernoulli`` and
``jax.random.normal`` (what every framework's dropout and the VAEs' noise call)
by themselves plus a host callback that keeps each draw, as a batch (one
callback per draw site, also under Equinox's ``jax.vmap``). :func:`replaying`
makes the same functions return given draws in order, so the reference can be
run on another style's draws.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax

from shared import data as data_lib
from shared import styles as styles_lib
from shared import tasks
from shared.draws import midpoint_key
from shared.layouts import flatten_canonical, nest_canonical
from shared.registry import MODELS, STYLES, ModelSpec

IN_SHAPE = (8, 8, 1)
DIGITS = 3  # a language model's addition: sequences of 3 * DIGITS tokens, a vocabulary of 10
TOKENS_SHAPE = (3 * DIGITS,)


# A model with a --scan-layers switch is also checked scanned, as "MODEL:scan": its blocks under
# each framework's own scan, from the same canonical start, against the same unrolled reference.
SCANNED = tuple(f"{name}:scan" for name, spec in MODELS.items() if "scan_layers" in spec.defaults)


def spec(model: str) -> ModelSpec:
    """The registry's entry of ``model`` (or of the model a ``:scan`` variant scans)."""
    return MODELS[model.partition(":")[0]]


def variant(model: str) -> dict[str, Any]:
    return {"scan_layers": True} if model.endswith(":scan") else {}


def in_shape(model: str) -> tuple[int, ...]:
    return TOKENS_SHAPE if spec(model).kind == "lm" else IN_SHAPE


@functools.cache
def addition(examples: int = 2048) -> data_lib.Split:
    """The first ``examples`` problems of the addition dataset's order, as its training split holds them."""
    return data_lib.token_split(data_lib.addition_sequences(data_lib.addition_order(DIGITS, examples), DIGITS),
                                data_lib.addition_masked(DIGITS))


def train_split(model: str, digits: data_lib.Dataset) -> data_lib.Split:
    """What ``model`` trains on here: digits' training images, or addition problems."""
    return addition() if spec(model).kind == "lm" else digits.train
OTHERS = tuple(s for s in STYLES if s != "jax")
DRAWN = ("bernoulli", "normal")  # the jax.random functions the models' randomness goes through


@functools.cache
def build(model: str, style: str, precision: str = "float32", **overrides: Any) -> styles_lib.Model:
    """``model`` in ``style`` at its small size (``overrides`` on top), built once per process."""
    return fresh(model, style, precision, **overrides)


def fresh(model: str, style: str, precision: str = "float32", **overrides: Any) -> styles_lib.Model:
    """:func:`build`, built anew: its ``init`` (a ``jax.jit``) has traced nothing yet, so a spy on a
    layer's ``__call__`` sees every call."""
    return styles_lib.build(spec(model).name, style, in_shape=in_shape(model), precision=precision,
                            **{**spec(model).small, **variant(model), **overrides})


@functools.cache
def _compiled_init(model: str, style: str):
    return styles_lib.compile_low_opt(jax.jit(build(model, style).init).lower(jax.random.key(0)))


def quick_init(model: str, style: str, key: jax.Array) -> tuple[Any, Any]:
    """``build(model, style).init(key)``, compiled once at a low optimisation level: initialisers are
    many small random programs that cost seconds to compile fully and nothing to run."""
    return _compiled_init(model, style)(key)


@functools.cache
def start(model: str) -> tuple[dict, dict]:
    """The reference's initial parameters and state (canonical by definition): a scanned variant starts
    where its unrolled model does."""
    if variant(model):
        return start(spec(model).name)
    return quick_init(model, "jax", jax.random.key(42))


@functools.cache
def _from_canonical(model: str, style: str, updates: int) -> Callable:
    net = build(model, style)
    return jax.jit(lambda params, state: (net.from_canonical(params), net.state_from_canonical(state, updates)))


def native(model: str, style: str, canonical: tuple[dict, dict] | None = None, updates: int = 0):
    """The common start (or ``canonical``) in ``style``'s trees: one compiled conversion per style, where
    converting leaf by leaf would compile a small program for every reshape and transpose."""
    return _from_canonical(model, style, updates)(*(canonical or start(model)))


def moved(tree: Any, direction: float) -> Any:
    """Every leaf moved by one ulp towards ``direction`` (on the host: nothing to compile)."""
    return jax.tree.map(lambda x: np.nextafter(np.asarray(x), np.asarray(direction, np.asarray(x).dtype)), tree)


def batch(digits: data_lib.Dataset, size: int = 64, model: str | None = None) -> dict[str, np.ndarray]:
    """The first training batch of digits or, for a language model, of addition problems."""
    split = train_split(model, digits) if model else digits.train
    return data_lib.train_batches(split, size, seed=0, epoch=0)[0]


# --------------------------------------------------------------------------- deterministic paths


@functools.cache
def deterministic(model: str, style: str, precision: str = "float32") -> Callable:
    """One program for every deterministic path of a style on a batch: the eval-mode outputs (with the
    given state), and with every draw the midpoint (``shared.draws``) the train-mode outputs, the new
    state and the loss's gradients, these two canonical and flat (``"blocks_0/bn1/bias"``).
    ``fn(params, state, eval_state, images, labels) -> dict``, on the style's own trees."""
    net = build(model, style, precision)
    key = midpoint_key()

    def loss(params, state, images, labels):
        outputs, new_state = net.apply(params, state, images, labels, key, True)
        return tasks.per_example(net.kind, outputs, {"image": images, "label": labels})["loss"].mean(), \
            (outputs, new_state)

    def fn(params, state, eval_state, images, labels):
        (loss_value, (outputs, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(
            params, state, images, labels)
        evaluated, _ = net.apply(params, eval_state, images, labels, key, False)
        return {"train": outputs, "eval": evaluated, "loss": loss_value,
                "state": flatten_canonical(net.state_to_canonical(new_state)),
                "grads": flatten_canonical(net.converter.to_canonical(grads, offsets=False))}

    return jax.jit(fn)


# --------------------------------------------------------------------------- training


@functools.cache
def _adam(model: str, precision: str) -> tuple[Any, Callable]:
    """optax's Adam at the model's own learning rate, on flat canonical trees: one update program per
    model and precision, whichever style's gradients it is given."""
    optimizer = optax.adam(spec(model).lr)

    def update(params, grads, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return optimizer, jax.jit(update)


def train_losses(model: str, style: str, digits: data_lib.Dataset, steps: int = 50,
                 precision: str = "float32", canonical: tuple[dict, dict] | None = None
                 ) -> tuple[np.ndarray, dict, dict]:
    """``steps`` Adam steps from the common start (or ``canonical``) on digits batches of 64, every draw
    the midpoint: the losses and the final canonical parameters and state, flat. Each step is the style's
    :func:`deterministic` program (its loss, gradients and new state) and optax's Adam on the canonical
    gradients, so a style compiles nothing more for training. float64 runs need x64 mode around them."""
    fn = deterministic(model, style, precision)
    optimizer, update = _adam(model, precision)
    params, state = canonical or start(model)
    if precision == "float64":
        params, state = jax.tree.map(lambda x: np.asarray(x, np.float64), (params, state))
    flat = flatten_canonical(params)
    opt_state = optimizer.init(flat)
    losses, epoch = [], 0
    while len(losses) < steps:
        batches = data_lib.train_batches(train_split(model, digits), 64, seed=0, epoch=epoch)
        for i in range(min(len(batches), steps - len(losses))):
            native_params, native_state = native(model, style, (nest_canonical(flat), state))
            out = fn(native_params, native_state, native_state, batches[i]["image"], batches[i]["label"])
            flat, opt_state = update(flat, out["grads"], opt_state)
            state = nest_canonical(out["state"])
            losses.append(float(out["loss"]))
        epoch += 1
    return np.asarray(losses), {k: np.asarray(v) for k, v in flat.items()}, flatten_canonical(state)


# --------------------------------------------------------------------------- draws

_DRAWN: dict[int, list[np.ndarray]] = {}  # what the last recorded call drew, by site, call after call


def _shape_of(name: str, args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The shape a ``jax.random.bernoulli(key, p, shape)`` or ``normal(key, shape, dtype)`` call asks for."""
    if name == "bernoulli":
        shape = kwargs.get("shape", args[1] if len(args) > 1 else None)
    else:
        shape = kwargs.get("shape", args[0] if args else ())
    return tuple(shape) if shape is not None else None


@contextlib.contextmanager
def _patched(make: Callable[[str, Callable], Callable]) -> Iterator[None]:
    originals = {name: getattr(jax.random, name) for name in DRAWN}
    try:
        for name in DRAWN:
            setattr(jax.random, name, make(name, originals[name]))
        yield
    finally:
        for name, fn in originals.items():
            setattr(jax.random, name, fn)


def _recording() -> contextlib.AbstractContextManager:
    """While a program is traced, every draw also goes to the host (a callback per draw site, the sites
    numbered in the order of the trace); an Equinox model's per-example draws arrive stacked over the
    batch, as a batch framework's do."""
    sites = [0]

    def make(name, original):
        def draw(key, *args, **kwargs):
            out = original(key, *args, **kwargs)
            site = sites[0]
            sites[0] += 1

            def keep(value):  # once per call: a site inside a scan is called once per layer
                _DRAWN.setdefault(site, []).append(np.asarray(value))
                return value
            return jax.pure_callback(keep, jax.ShapeDtypeStruct(out.shape, out.dtype), out,
                                     vmap_method="expand_dims")
        return draw
    return _patched(make)


@functools.cache
def recorder(model: str, style: str, train: bool = True, **overrides: Any) -> Callable:
    """``run(params, state, images, labels, key) -> (outputs, draws)``: ``style``'s forward pass and the
    list of what it drew, site by site (empty in a pass that draws nothing)."""
    net = build(model, style, **overrides)
    fn = jax.jit(lambda p, s, x, y, k: net.apply(p, s, x, y, k, train)[0])

    def run(*args):
        _DRAWN.clear()
        with _recording():  # at the first call, while the program is traced
            out = jax.block_until_ready(fn(*args))
        return out, [draw for site in sorted(_DRAWN) for draw in _DRAWN[site]]
    return run


@functools.cache
def replayer(model: str, **overrides: Any) -> Callable:
    """``run(params, state, images, labels, draws) -> outputs``: the reference's train-mode forward pass
    with its draws, in order, replaced by ``draws`` (each of the shape it asks for)."""
    net = build(model, "jax", **overrides)

    def fn(params, state, images, labels, draws):
        queue = list(draws)

        def make(name, original):
            def draw(key, *args, **kwargs):
                assert queue, "the reference draws more than the style did"
                value = queue.pop(0)
                assert value.shape == _shape_of(name, args, kwargs), (name, value.shape)
                return value
            return draw
        with _patched(make):
            out = net.apply(params, state, images, labels, midpoint_key(), True)[0]
        assert not queue, f"the reference drew {len(draws) - len(queue)} times, the style {len(draws)}"
        return out
    return jax.jit(fn)
