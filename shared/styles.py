"""One small functional interface over every style of every model.

:func:`build` returns a :class:`Model`: pure ``init`` and ``apply`` functions
over the style's own trees, and converters to and from the canonical layout.
The shared training loop, the parity tests and the benchmarks see every
framework only through this interface.

The contract, the same for every model:

- ``init(key) -> (params, state)``: the style's own parameter tree and its
  state (BatchNorm's running statistics; ``{}`` for a stateless model).
- ``apply(params, state, images, labels, key, train) -> (outputs, state)``:
  NHWC float images (a language model's ``(batch, length)`` int tokens), int
  labels, the step's PRNG key and a Python bool, the train/eval mode.
  Classifiers return logits, the VAE ``(logits, mean, logvar)``, a language
  model logits per token. The returned state is the updated one in training
  and the same one in evaluation.
- a language model's ``init_cache(params, batch_size) -> cache`` and
  ``decode(params, cache, tokens, index) -> (logits, cache)``: generation with
  the framework's own key/value cache, one ``(batch, 1)`` token at position
  ``index`` per call (Linen's and NNX's caches take one at a time).

Randomness: the step's key reaches each framework the way its own examples
hand it over: an argument for plain JAX and for Linen's VAE (Flax's VAE
example passes ``z_rng``), ``rngs={"dropout": key}`` for Linen's dropout, an
``nnx.Rngs`` at call time for NNX, ``apply(params, key, ...)`` for Haiku (its
modules draw with ``hk.next_rng_key()``), and one key per example under
``jax.vmap`` for Equinox (``jax.random.split(key, batch)``). Each framework
derives its layers' keys in its own way, so the styles draw different masks and
noise from the same key: ``zoo/test_randomness.py`` checks every style's draws
by their law and, given the same draws, the same outputs.

Each adapter uses the fastest correct pattern for its framework: plain
functions under ``jax.jit`` for every style, with NNX models split into a
static graph and plain dicts of their arrays (``nnx.split``,
``nnx.to_pure_dict``, ``nnx.merge``) and Equinox models split into static
parts and a flat dict of their arrays keyed by attribute path
(``"blocks.0.conv1.weight"``; ``eqx.partition``/``eqx.combine``), rather than
``nnx.jit`` or ``eqx.filter_jit``, whose Python-side dispatch costs time on
every call (see ``zoo bench``). Plain dicts, because ``jax.jit`` flattens them
in C++ while modules and ``nnx.State`` are flattened node by node in Python.
``Model.as_module`` gives the framework's own module back.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as linen
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
from flax import nnx

from shared.errors import ZooError, check_choice
from shared.layouts import Canonical, Converter, _get, _set, canonical_name, check_canonical, flatten_canonical
from shared.registry import STYLES, ModelSpec, get

# float32; bfloat16 computation with float32 parameters (mixed precision); float64 everything,
# which needs JAX's x64 mode (jax.config.update("jax_enable_x64", True) before any array exists).
PRECISIONS = ("float32", "bfloat16", "float64")
# Styles whose layers take the parameters' dtype (Flax's param_dtype); the others' are cast.
PARAM_DTYPE_STYLES = ("flax", "nnx")


def use_precision(precision: str) -> None:
    """Turn on JAX's x64 mode for a float64 run (the command line calls it before any array exists)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "float64":
        jax.config.update("jax_enable_x64", True)


# XLA options for programs that are compiled to run once (random initialisers): compiling them
# fully optimised costs seconds each and buys nothing.
LOW_OPT = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_low_opt(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
    """``lowered.compile()`` at ``LOW_OPT``; as usual on an XLA without these options."""
    try:
        return lowered.compile(compiler_options=LOW_OPT)
    except Exception:  # an XLA without these options
        return lowered.compile()


@dataclasses.dataclass(frozen=True)
class StateConverter:
    """Maps one style's model state to the canonical dict and back.

    ``from_canonical`` takes the number of training updates the statistics have
    seen: Haiku and Equinox keep that count (to debias their running averages)
    where the canonical state, like Linen's, does not.
    """

    to_canonical: Callable[[Any], Canonical]
    from_canonical: Callable[[Canonical, Any], Any]
    paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Model:
    """A model in one style, seen as pure functions of its native trees."""

    spec: ModelSpec
    style: str
    in_shape: tuple[int, int, int]
    num_classes: int
    precision: str
    hparams: dict[str, Any]
    init: Callable[[jax.Array], tuple[Any, Any]]
    apply: Callable[[Any, Any, jax.Array, jax.Array, jax.Array, bool], tuple[Any, Any]]
    generate: Callable[[Any, jax.Array, jax.Array], jax.Array] | None
    converter: Converter
    state_converter: StateConverter
    module: Any  # the framework's own object: a Linen/Haiku/NNX/Equinox module, or the jax module
    # NNX and Equinox: the framework's own module holding these arrays,
    # ``as_module(params, state, train)`` (an nnx.Module; an eqx.Module and its
    # eqx.nn.State or None), for code written the framework's way. None for the
    # styles whose native trees are already what their framework takes.
    as_module: Callable[[Any, Any, bool], Any] | None = None
    # A language model's generation: ``init_cache(params, batch_size)`` (room for the model's
    # block_size positions) and ``decode(params, cache, tokens, index) -> (logits, cache)``.
    init_cache: Callable[[Any, int], Any] | None = None
    decode: Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]] | None = None
    # A model with logical axes (ModelSpec.parallel): the native parameter tree with, at each leaf, a
    # PartitionSpec of its axes' names ("embed", "heads", ...), as the framework declares them (Linen's
    # and NNX's metadata, Haiku's and Equinox's rules by path, plain JAX's tree); None for the others.
    logical_axes: Any = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def init_params(self, key: jax.Array) -> Any:
        return self.init(key)[0]

    def to_canonical(self, tree: Any) -> dict[str, Any]:
        return self.converter.to_canonical(tree)

    def from_canonical(self, tree: dict[str, Any]) -> Any:
        return self.converter.from_canonical(tree)

    def state_to_canonical(self, state: Any) -> dict[str, Any]:
        return self.state_converter.to_canonical(state)

    def state_from_canonical(self, canonical: dict[str, Any], updates: Any = 0) -> Any:
        return self.state_converter.from_canonical(canonical, updates)


def build(name: str, style: str, *, in_shape: tuple[int, ...], num_classes: int = 10,
          precision: str = "float32", **hparams: Any) -> Model:
    """The model ``name`` written in ``style``, for images of shape ``in_shape`` (H, W, C), or for a
    language model sequences of ``in_shape`` ``(length,)`` tokens of ``num_classes`` kinds."""
    spec = get(name)
    check_choice("style", style, STYLES)
    check_choice("precision", precision, PRECISIONS)
    in_shape = tuple(int(d) for d in in_shape)
    if spec.kind == "lm" and (len(in_shape) != 1 or min(in_shape) < 1):
        raise ZooError(f"{name} reads token sequences: in_shape must be (length,), got {in_shape}")
    if spec.kind != "lm" and (len(in_shape) != 3 or min(in_shape) < 1):
        raise ZooError(f"in_shape must be (height, width, channels), got {in_shape}")
    hparams = spec.resolve(hparams)
    kwargs = spec.kwargs(in_shape, num_classes, hparams)
    if precision == "float64" and not jax.config.jax_enable_x64:
        raise ZooError("float64 needs JAX's x64 mode: call jax.config.update('jax_enable_x64', True) before "
                       "anything else, or build inside `with jax.enable_x64(True):`")
    module = importlib.import_module(f"zoo.{style}.{name}")
    compute = jnp.bfloat16 if precision == "bfloat16" else None
    if precision == "float64" and style in PARAM_DTYPE_STYLES:
        kwargs = {**kwargs, "param_dtype": jnp.float64}
    init, apply, generate, native, state_converter, decoder, as_module, axes = _BUILDERS[style](
        spec, module, kwargs, hparams, compute, in_shape, precision)
    if precision == "float64":
        init, apply, generate = _in_float64(init, apply, generate)
    apply = _checked(apply, name, style, in_shape)
    init = _one_program(init)
    template, state_template = jax.eval_shape(init, jax.random.key(0))  # one trace gives both trees
    _check_fits(name, hparams, template)
    extra = spec.layouts(style, in_shape, hparams) if spec.layouts else {}
    stacked = spec.stacked(hparams) if spec.stacked else ()
    if state_converter is None:
        state_converter = _named_state(Converter(style, state_template))
    state_converter = _shape_checked(state_converter, state_template)
    converter = Converter(style, template, extra, stacked)
    logical = None
    if spec.parallel:
        logical = axes(template)
        converter.treedef.flatten_up_to(logical)  # one spec per parameter, in the parameters' tree
    return Model(spec, style, in_shape, num_classes, precision, hparams, init, apply, generate,
                 converter, state_converter, native, as_module, *(decoder or (None, None)), logical)


def build_once(name: str, style: str, *, in_shape: tuple[int, ...], num_classes: int = 10,
               precision: str = "float32", **hparams: Any) -> Model:
    """:func:`build`, built once per process for the same arguments (and x64 mode).

    For the readers of checkpoints and exported files and for ``shared.convert``, which build the same
    models for every file or tree they are given: a build traces the model's initialiser (a third of a
    second for the ViT). A
    :class:`Model` is frozen, so sharing one changes nothing for its callers. Arguments that cannot be
    a key (an unhashable value) are built afresh.
    """
    try:
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hparams.items()))
        key = (name, style, tuple(in_shape), num_classes, precision, frozen, bool(jax.config.jax_enable_x64))
        hash(key)
    except TypeError:
        return build(name, style, in_shape=in_shape, num_classes=num_classes, precision=precision, **hparams)
    return _build_once(key)


@functools.lru_cache(maxsize=64)
def _build_once(key: tuple) -> Model:
    name, style, in_shape, num_classes, precision, frozen, _ = key
    return build(name, style, in_shape=in_shape, num_classes=num_classes, precision=precision, **dict(frozen))

# Training holds the parameters, their gradients and Adam's two moments at once.
COPIES_IN_TRAINING = 4


def memory_bytes() -> int:
    """What the first device can hold: its memory limit on an accelerator, the machine's RAM on a CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_fits(name: str, hparams: dict[str, Any], template: Any) -> None:
    """Refuse, before anything is allocated, a model whose training could not fit in memory."""
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(template))
    need = COPIES_IN_TRAINING * sum(math.prod(leaf.shape) * leaf.dtype.itemsize
                                    for leaf in jax.tree.leaves(template))
    have = memory_bytes()
    if need > have:
        given = ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in hparams.items())
        raise ZooError(f"{name} with {given} has {count:,} parameters: training holds {COPIES_IN_TRAINING} "
                       f"copies ({need / 2**30:,.1f} GiB), more than the {have / 2**30:,.1f} GiB here; "
                       "choose smaller sizes")


def _one_program(init: Callable) -> Callable:
    """``init`` as one compiled program, at LOW_OPT where it is called on a concrete key.

    Run eagerly, an initialiser compiles op by op (about 90 programs, each a cache lookup even when
    warm); fully optimised, it compiles 2 to 4 times slower, to run once. Inside another trace
    (``jax.eval_shape``, a jit) it is an ordinary nested jit: XLA takes compile options only at the
    top level.
    """
    low, nested = jax.jit(init, compiler_options=LOW_OPT), jax.jit(init)

    def one_program(key):
        return nested(key) if isinstance(key, jax.core.Tracer) else low(key)
    return one_program


def _checked(apply: Callable, name: str, style: str, in_shape: tuple[int, ...]) -> Callable:
    def checked_apply(params, state, images, labels, key, train):
        if tuple(images.shape[1:]) != in_shape:
            raise ZooError(f"{name} ({style}) was built for images of shape {in_shape}, "
                           f"got a batch of shape {tuple(images.shape)}; build it with "
                           f"in_shape={tuple(images.shape[1:])}")
        return apply(params, state, images, labels, key, train)
    return checked_apply


def _in_float64(init: Callable, apply: Callable, generate: Callable | None):
    """Float64 parameters, state and inputs, in every style.

    Linen and NNX create their parameters in float64 themselves (``param_dtype``);
    plain JAX's initialisers, Haiku's (which follow the float32 example input)
    and the running statistics of Linen's and NNX's BatchNorm (always created in
    float32) are widened here, once, after initialisation. The inputs (float32
    pixels from the dataset) are widened on every call.
    """
    def init64(key):
        return _cast(init(key), jnp.float64)

    def apply64(params, state, images, labels, key, train):
        return apply(params, state, _cast(images, jnp.float64), labels, key, train)

    generate64 = None
    if generate is not None:
        def generate64(params, z, labels):
            return generate(params, _cast(z, jnp.float64), labels)
    return init64, apply64, generate64


def _cast(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def widen_to_float32(out: Any) -> Any:
    """Outputs in float32 at least: a bfloat16 computation's come back as float32, float64 stays float64."""
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), out)


def _split_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments that the function ``fn`` takes."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in names}


def _dummy_inputs(spec: ModelSpec, in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """An example batch for Linen and Haiku, which infer shapes on the first call."""
    if spec.kind == "lm":
        return jnp.zeros((1, *in_shape), jnp.int32), jnp.zeros((1, *in_shape), jnp.int32)
    return jnp.zeros((1, *in_shape), jnp.float32), jnp.zeros((1,), jnp.int32)


def _cache_dtype(compute: Any, precision: str) -> Any:
    """A key/value cache holds what the attention computes: bfloat16, float32 or float64."""
    return compute or (jnp.float64 if precision == "float64" else jnp.float32)


# --------------------------------------------------------------------------- state converters


def _named_state(converter: Converter) -> StateConverter:
    """State whose leaves are named like the canonical ones (plain JAX, Linen, NNX)."""
    return StateConverter(converter.to_canonical, lambda canonical, updates: converter.from_canonical(canonical),
                          tuple(converter.canonical_paths()))


def _shape_checked(converter: StateConverter, template: Any) -> StateConverter:
    """A state converter that refuses canonical state of other paths or shapes, in one line."""
    shapes = {path: tuple(leaf.shape) for path, leaf in
              flatten_canonical(jax.eval_shape(converter.to_canonical, template)).items()}

    def from_canonical(canonical, updates):
        check_canonical(canonical, shapes, "state")
        return converter.from_canonical(canonical, updates)

    return dataclasses.replace(converter, from_canonical=from_canonical)


def _debias(hidden: jax.Array, decay: float, count: Any) -> jax.Array:
    """A zero-debiased moving average, ``hidden / (1 - decay**count)`` (0 before the first update)."""
    scale = 1 - jnp.asarray(decay, hidden.dtype) ** count
    return jnp.where(count > 0, hidden / jnp.where(count > 0, scale, 1), jnp.zeros_like(hidden))


def _haiku_state(spec: ModelSpec, template: Any, hparams: dict[str, Any]) -> StateConverter:
    """Haiku's BatchNorm keeps two ``ExponentialMovingAverage`` states per layer.

    Each holds ``hidden`` (the running average started from zero), ``counter``
    and ``average`` (``hidden`` debiased by ``1 - decay**counter``). The
    canonical running mean starts at 0 too, so it is ``hidden`` exactly; the
    canonical running variance starts at 1, so it is ``hidden + decay**counter``
    (one rounding). ``counter`` is the number of updates and ``average``
    follows from the other two.
    """
    decay = spec.ema_decay(hparams)
    names = Converter("haiku", template)
    layers = sorted({rule.canonical.rsplit("/", 2)[0] for rule in names.rules})
    shapes = {rule.canonical: leaf.shape
              for rule, leaf in zip(names.rules, names.treedef.flatten_up_to(template))}

    def to_canonical(state):
        flat = flatten_canonical(names.to_canonical(state))
        out: Canonical = {}
        for layer in layers:
            mean, var = flat[f"{layer}/mean_ema/hidden"], flat[f"{layer}/var_ema/hidden"]
            count = flat[f"{layer}/var_ema/counter"]
            _set(out, f"{layer}/mean", mean.reshape(mean.shape[-1]))
            _set(out, f"{layer}/var", (var + jnp.asarray(decay, var.dtype) ** count).reshape(var.shape[-1]))
        return out

    def from_canonical(canonical, updates):
        flat: Canonical = {}
        count = jnp.asarray(updates, jnp.int32)
        for layer in layers:
            for stat, ema in (("mean", "mean_ema"), ("var", "var_ema")):
                value = _get(canonical, f"{layer}/{stat}").reshape(shapes[f"{layer}/{ema}/hidden"])
                hidden = value if stat == "mean" else value - jnp.asarray(decay, value.dtype) ** count
                _set(flat, f"{layer}/{ema}/hidden", hidden)
                _set(flat, f"{layer}/{ema}/counter", count)
                _set(flat, f"{layer}/{ema}/average", _debias(hidden, decay, count))
        return names.from_canonical(flat)

    return StateConverter(to_canonical, from_canonical,
                          tuple(f"{layer}/{stat}" for layer in layers for stat in ("mean", "var")))


def _dotted(path: tuple) -> str:
    """``blocks.0.conv1.weight``: a key path as the module's attribute path, PyTorch's state-dict names."""
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _equinox_state(layers: list[str]) -> StateConverter:
    """The adapter's flat Equinox state, ``{"stem_bn.mean", "stem_bn.var", "stem_bn.counter", ...}``.

    In ``mode="batch"`` an ``eqx.nn.BatchNorm`` keeps ``(mean, var)`` updated
    exactly like the canonical running statistics (from 0 and 1), and a
    counter of updates, which it uses to debias both at inference.
    """
    names = {path: canonical_name("equinox", (jax.tree_util.DictKey(path),)) for path in layers}

    def to_canonical(flat):
        out: Canonical = {}
        for path, name in names.items():
            _set(out, f"{name}/mean", flat[f"{path}.mean"])
            _set(out, f"{name}/var", flat[f"{path}.var"])
        return out

    def from_canonical(canonical, updates):
        flat = {}
        for path, name in names.items():
            flat[f"{path}.mean"] = _get(canonical, f"{name}/mean")
            flat[f"{path}.var"] = _get(canonical, f"{name}/var")
            # Equinox's counter is a weakly typed int (`jnp.array(0)`): so is a Python int's array.
            flat[f"{path}.counter"] = jnp.array(int(updates))
        return flat

    return StateConverter(to_canonical, from_canonical,
                          tuple(f"{name}/{stat}" for name in names.values() for stat in ("mean", "var")))


# --------------------------------------------------------------------------- the five adapters


def _build_jax(spec, module, kwargs, hparams, compute, in_shape, precision):
    init_kwargs = _split_kwargs(module.init, kwargs)
    apply_kwargs = _split_kwargs(module.apply, kwargs)

    def init(key):
        out = module.init(key, **init_kwargs)
        return out if spec.state else (out, {})

    # Mixed precision in plain JAX: cast parameters and inputs explicitly.
    def apply(params, state, images, labels, key, train):
        args = [_cast(params, compute)] + ([state] if spec.state else []) + [_cast(images, compute)]
        args += [labels] if spec.labels else []
        args += [key] if spec.rng else []
        args += [train] if spec.train_mode else []
        out = module.apply(*args, **apply_kwargs)
        out, state = out if spec.state else (out, state)
        if spec.kind == "lm":
            out = out[0]  # (logits, cache): no cache in training
        return widen_to_float32(out), state

    generate = decoder = None
    if spec.kind == "vae":
        def generate(params, z, labels):
            return widen_to_float32(module.generate(_cast(params, compute), _cast(z, compute), labels))
    if spec.kind == "lm":
        def init_cache(params, batch_size):
            return module.init_cache(params, batch_size, kwargs["block_size"], _cache_dtype(compute, precision))

        def decode(params, cache, tokens, index):
            logits, cache = module.apply(_cast(params, compute), tokens, None, False, cache=cache, index=index)
            return widen_to_float32(logits), cache
        decoder = (init_cache, decode)

    def axes(template):
        return module.logical_axes(**_split_kwargs(module.logical_axes, kwargs))
    return init, apply, generate, module, None, decoder, None, axes


def _build_flax(spec, module, kwargs, hparams, compute, in_shape, precision):
    cls = getattr(module, spec.class_name)
    net = cls(**_split_kwargs(cls, kwargs), dtype=compute)
    x0, y0 = _dummy_inputs(spec, in_shape)

    def call_args(images, labels, key, train):
        return ((images,) + ((labels,) if spec.labels else ()) + ((train,) if spec.train_mode else ())
                + ((key,) if spec.rng_argument else ()))

    def rngs(key, train):
        """Linen's rngs collections: the dropout stream in training; none for a key given as an argument."""
        return {spec.rng: key} if spec.rng and not spec.rng_argument and train else {}

    def init(key):
        # Parameters declared with nn.with_logical_partitioning come boxed with their axis names.
        variables = linen.unbox(net.init(key, *call_args(x0, y0, key, False)))
        return variables["params"], dict(variables.get("batch_stats", {}))

    def axes(template):
        boxed = jax.eval_shape(lambda key: net.init(key, *call_args(x0, y0, key, False)), jax.random.key(0))
        return linen.get_partition_spec(boxed)["params"]

    def apply(params, state, images, labels, key, train):
        variables = {"params": params, **({"batch_stats": state} if spec.state else {})}
        args = call_args(images, labels, key, train)
        if spec.state and train:
            out, updates = net.apply(variables, *args, rngs=rngs(key, train), mutable=["batch_stats"])
            return widen_to_float32(out), dict(updates["batch_stats"])
        return widen_to_float32(net.apply(variables, *args, rngs=rngs(key, train))), state

    generate = decoder = None
    if spec.kind == "vae":
        def generate(params, z, labels):
            return widen_to_float32(net.apply({"params": params}, z, labels, method=net.generate))
    if spec.kind == "lm":
        # Linen's decode mode: the attention keeps its keys and values in the "cache" collection,
        # made by an init at full length, then one token per apply.
        decoding = net.clone(decode=True)

        def init_cache(params, batch_size):
            tokens = jnp.zeros((batch_size, kwargs["block_size"]), jnp.int32)
            shapes = jax.eval_shape(lambda: decoding.init(jax.random.key(0), tokens, False)["cache"])
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def decode(params, cache, tokens, index):
            positions = index + jnp.arange(tokens.shape[1])
            logits, mutated = decoding.apply({"params": params, "cache": cache}, tokens, False, positions,
                                             mutable=["cache"])
            return widen_to_float32(logits), mutated["cache"]
        decoder = (init_cache, decode)
    return init, apply, generate, net, None, decoder, None, axes


def _build_nnx(spec, module, kwargs, hparams, compute, in_shape, precision):
    cls = getattr(module, spec.class_name)
    abstract = nnx.eval_shape(lambda: cls(**kwargs, dtype=compute, rngs=nnx.Rngs(0)))
    if precision == "float64":
        for _, layer in nnx.iter_graph(abstract):
            if isinstance(layer, nnx.MultiHeadAttention):
                layer.attention_fn = float64_attention
    # Training and evaluation are two graphs: model.train() / model.eval() set
    # static attributes (use_running_average, deterministic), not arrays.
    graphdefs = {}
    for train in (True, False):
        if spec.train_mode and train:
            abstract.train()
        elif spec.train_mode:
            abstract.eval()
        graphdefs[train] = nnx.split(abstract, nnx.Param, nnx.BatchStat)[0]

    def init(key):
        _, params, stats = nnx.split(cls(**kwargs, dtype=compute, rngs=nnx.Rngs(params=key)),
                                     nnx.Param, nnx.BatchStat)
        # Plain dicts of arrays rather than nnx.State: jax.jit flattens its
        # arguments on every call, about 6 us for dicts against about 60 us
        # for the Variables of an nnx.State, which shows on small models.
        return nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

    # The fast pattern: a static graphdef merged with the arrays inside the
    # traced function, instead of nnx.jit on the module.
    def apply(params, state, images, labels, key, train):
        model = nnx.merge(graphdefs[train], params, state)
        args = (images,) + ((labels,) if spec.labels else ())
        draws = spec.rng and (train or not spec.train_mode)  # eval mode draws nothing
        out = widen_to_float32(model(*args, **({"rngs": nnx.Rngs(**{spec.rng: key})} if draws else {})))
        if spec.state and train:
            state = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return out, state

    generate = decoder = None
    if spec.kind == "vae":
        def generate(params, z, labels):
            return widen_to_float32(nnx.merge(graphdefs[False], params, {}).generate(z, labels))
    if spec.kind == "lm":
        # NNX's decode mode: init_cache gives each attention nnx.Cache variables, then one token per call.
        def decoding(params, batch_size):
            model = nnx.merge(graphdefs[False], params, {})
            model.init_cache(batch_size, kwargs["block_size"], _cache_dtype(compute, precision))
            return model

        def init_cache(params, batch_size):
            return nnx.to_pure_dict(nnx.state(decoding(params, batch_size), nnx.Cache))

        def decode(params, cache, tokens, index):
            model = decoding(params, tokens.shape[0])
            state = nnx.state(model, nnx.Cache)
            nnx.replace_by_pure_dict(state, cache)
            nnx.update(model, state)
            logits = model(tokens, index + jnp.arange(tokens.shape[1]), decode=True)
            return widen_to_float32(logits), nnx.to_pure_dict(nnx.state(model, nnx.Cache))
        decoder = (init_cache, decode)

    def axes(template):
        return nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
    return (init, apply, generate, cls, None, decoder,
            lambda params, state, train: nnx.merge(graphdefs[train], params, state), axes)


def float64_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, is_causal: bool = False,
                      mask: jax.Array | None = None, module: Any = None, **kwargs: Any) -> jax.Array:
    """``nnx.MultiHeadAttention``'s ``attention_fn`` for float64 runs.

    Its default, ``nnx.dot_product_attention``, hands attention without weight
    dropout to ``jax.nn.dot_product_attention``, which takes the softmax in
    float32 whatever the inputs' dtype: a float64 run would round there as a
    float32 one does. This is Flax's own formula (``flax.linen``'s
    ``dot_product_attention``: the query scaled, the softmax in the inputs'
    dtype), which ``nnx.dot_product_attention`` itself computes otherwise.
    """
    if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return linen.dot_product_attention(query, key, value, mask=mask, **kwargs)


# Haiku's mixed precision (jmp policies on module classes): the model computes in bfloat16 with
# float32 parameters, and its normalisation layers keep float32 parameters, statistics and
# arithmetic, as Haiku's ImageNet example sets BatchNorm's, handing bfloat16 on to the next layer.
# (hk.LayerNorm would otherwise take its mean and variance in bfloat16, where Linen's, NNX's and
# Equinox's take them in float32.)
HAIKU_POLICY = "params=float32,compute=bfloat16,output=float32"
HAIKU_NORM_POLICY = "params=float32,compute=float32,output=bfloat16"


def _build_haiku(spec, module, kwargs, hparams, compute, in_shape, precision):
    cls = getattr(module, spec.class_name)
    kwargs = _split_kwargs(cls, kwargs)

    def under_policy(fn: Callable) -> Callable:
        """push_policy scopes the policies to this trace, so a bfloat16 model and a float32 one
        can be built side by side."""
        if compute is None:
            return fn

        def with_policy(*args):
            with hk.mixed_precision.push_policy(cls, jmp.get_policy(HAIKU_POLICY)), \
                    hk.mixed_precision.push_policy(hk.BatchNorm, jmp.get_policy(HAIKU_NORM_POLICY)), \
                    hk.mixed_precision.push_policy(hk.LayerNorm, jmp.get_policy(HAIKU_NORM_POLICY)):
                return fn(*args)
        return with_policy

    multi = hk.multi_transform_with_state if spec.state else hk.multi_transform

    @multi
    def forward():  # hk.multi_transform: one set of parameters for the model's methods
        model = cls(**kwargs)
        call = under_policy(model.__call__)
        return call, (call, under_policy(model.generate)) if spec.kind == "vae" else (call,)

    x0, y0 = _dummy_inputs(spec, in_shape)

    def call_args(images, labels, train):
        return (images,) + ((labels,) if spec.labels else ()) + ((train,) if spec.train_mode else ())

    def init(key):
        out = forward.init(key, *call_args(x0, y0, True))
        return out if spec.state else (out, {})

    def apply(params, state, images, labels, key, train):
        rng = key if spec.rng and (train or not spec.train_mode) else None  # eval mode draws nothing
        args = call_args(images, labels, train)
        if spec.state:
            out, new_state = forward.apply[0](params, state, rng, *args)
            return widen_to_float32(out), (new_state if train else state)
        return widen_to_float32(forward.apply[0](params, rng, *args)), state

    generate = decoder = None
    if spec.kind == "vae":
        def generate(params, z, labels):
            return widen_to_float32(forward.apply[1](params, None, z, labels))
    if spec.kind == "lm":
        # The same parameters, and the attention's key/value cache as Haiku state.
        @hk.transform_with_state
        def decoding(tokens, positions):
            return under_policy(lambda t, p: cls(**kwargs)(t, False, p, decode=True))(tokens, positions)

        def init_cache(params, batch_size):
            # Zeros of the state's shapes (hk.layer_stack's init returns its state after one apply), in
            # the dtype the attention computes in (an init traces the float32 parameters it makes).
            shapes = jax.eval_shape(lambda: decoding.init(jax.random.key(0), jnp.zeros((batch_size, 1), jnp.int32),
                                                          jnp.arange(1))[1])
            return jax.tree.map(lambda s: jnp.zeros(s.shape, _cache_dtype(compute, precision)), shapes)

        def decode(params, cache, tokens, index):
            logits, cache = decoding.apply(params, cache, None, tokens, index + jnp.arange(tokens.shape[1]))
            return widen_to_float32(logits), cache
        decoder = (init_cache, decode)
    converter = None
    if spec.state:
        template = jax.eval_shape(lambda k: init(k)[1], jax.random.key(0))
        converter = _haiku_state(spec, template, hparams)
    return init, apply, generate, forward, converter, decoder, None, getattr(module, "logical_axes", None)


def _build_equinox(spec, module, kwargs, hparams, compute, in_shape, precision):
    cls, model_file = getattr(module, spec.class_name), module
    if spec.channels_first and "in_shape" in kwargs:  # Equinox models take the CHW shape they act on
        height, width, channels = kwargs["in_shape"]
        kwargs = {**kwargs, "in_shape": (channels, height, width)}

    def make(key):
        if spec.state:
            return eqx.nn.make_with_state(cls)(**kwargs, key=key)
        return cls(**kwargs, key=key), None

    abstract, abstract_state = eqx.filter_eval_shape(lambda: make(jax.random.key(0)))
    is_abstract = lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)  # noqa: E731
    # Training and inference differ in static fields (`inference`), so each
    # mode has its own static part.
    statics = {train: eqx.partition(eqx.nn.inference_mode(abstract, value=not train)
                                    if spec.train_mode else abstract, is_abstract)[1]
               for train in (True, False)}
    # The arrays live in a flat dict keyed by attribute path ("blocks.0.conv1.weight"),
    # the trick of Equinox's "low-overhead training loops": jax.jit flattens a
    # dict of arrays in C++, where a tree of modules is flattened node by node in Python.
    abstract_arrays = eqx.partition(abstract, is_abstract)[0]
    paths = [_dotted(path) for path, _ in jax.tree_util.tree_leaves_with_path(abstract_arrays)]
    arrays_def = jax.tree_util.tree_structure(abstract_arrays)
    layers = equinox_batch_norms(abstract, abstract_state)
    if spec.state and len(jax.tree.leaves(abstract_state)) != 3 * len(layers):
        raise ValueError(f"{spec.name} (equinox): state other than BatchNorm's is not mapped")

    def flat_params(net):
        return dict(zip(paths, arrays_def.flatten_up_to(eqx.partition(net, eqx.is_array)[0])))

    def module(params, train):
        return eqx.combine(arrays_def.unflatten([params[p] for p in paths]), statics[train])

    def flat_state(state):
        if not spec.state:
            return {}
        return {f"{path}.{stat}": value for path, indices in layers
                for stat, value in zip(("mean", "var", "counter"),
                                       (*state.get(indices[0]), state.get(indices[1])))}

    def equinox_state(flat):
        if not spec.state:
            return None
        # A fresh copy of the (abstract) template: State.set invalidates the object it is called on.
        state = jax.tree_util.tree_unflatten(*reversed(jax.tree_util.tree_flatten(abstract_state)))
        for path, (statistics, counter) in layers:
            state = state.set(statistics, (flat[f"{path}.mean"], flat[f"{path}.var"]))
            state = state.set(counter, flat[f"{path}.counter"])
        return state

    def init(key):
        net, state = make(key)
        return flat_params(net), flat_state(state)

    # The fast pattern: the arrays' dict and the static parts combined inside
    # the traced function, instead of eqx.filter_jit. Mixed precision is
    # explicit casting of the parameter arrays and the inputs. The model acts
    # on one example; the batch is a jax.vmap, with one key per example and,
    # for BatchNorm, the batch axis named for its statistics.
    def apply(params, state, images, labels, key, train):
        net = module(_cast(params, compute), train)
        draws = spec.rng is not None and (train or not spec.train_mode)  # eval mode draws nothing
        # In eval, eqx.nn.BatchNorm normalises with the running statistics as they are: cast like the
        # parameters, or float32 statistics would hand float32 to a bfloat16 layer. (In training it
        # averages the batch, and its float32 running statistics stay float32.)
        eqx_state = equinox_state(state) if train else _cast(equinox_state(state), compute)
        out, new_state = equinox_batch(spec, net, _cast(images, compute), labels, eqx_state, key if draws else None)
        return widen_to_float32(out), flat_state(new_state)

    generate = decoder = None
    if spec.kind == "vae":
        def generate(params, z, labels):
            net = module(_cast(params, compute), False)
            return widen_to_float32(jax.vmap(net.generate)(_cast(z, compute), labels))
    if spec.kind == "lm":
        # The model acts on one sequence and takes its cache in and out: one cache per example.
        def init_cache(params, batch_size):
            cache = module(params, False).init_cache(kwargs["block_size"], _cache_dtype(compute, precision))
            return jax.tree.map(lambda z: jnp.broadcast_to(z, (batch_size, *z.shape)), cache)

        def decode(params, cache, tokens, index):
            net = module(_cast(params, compute), False)
            logits, cache = jax.vmap(lambda t, c: net(t, c, index))(tokens, cache)
            return widen_to_float32(logits), cache
        decoder = (init_cache, decode)
    converter = _equinox_state([path for path, _ in layers]) if spec.state else None

    def axes(template):
        specs = jax.tree.leaves(model_file.logical_axes(abstract))  # a spec where the model has an array
        if len(specs) != len(paths):
            raise ValueError(f"{spec.name} (equinox): {len(specs)} partition specs for {len(paths)} arrays")
        return dict(zip(paths, specs))
    return (init, apply, generate, cls, converter, decoder,
            lambda params, state, train: (module(params, train), equinox_state(state)), axes)


def equinox_batch_norms(model: Any, state: Any) -> list[tuple[str, tuple[Any, Any]]]:
    """Each ``eqx.nn.BatchNorm`` of ``model`` by attribute path, with its two ``eqx.nn.StateIndex``
    fields: the one holding the running ``(mean, var)`` and the update counter, told apart by what
    ``state`` holds for them (a pair of arrays, a scalar), whatever the layer calls them."""
    is_bn = lambda node: isinstance(node, eqx.nn.BatchNorm)  # noqa: E731
    is_index = lambda node: isinstance(node, eqx.nn.StateIndex)  # noqa: E731
    out = []
    for path, bn in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_bn)[0]:
        if not is_bn(bn):
            continue
        indices = [leaf for leaf in jax.tree.leaves(bn, is_leaf=is_index) if is_index(leaf)]
        pairs = [i for i in indices if isinstance(state.get(i), tuple) and len(state.get(i)) == 2]
        counters = [i for i in indices if i not in pairs and jnp.ndim(state.get(i)) == 0]
        if len(pairs) != 1 or len(counters) != 1:
            raise ValueError(f"{_dotted(path)}: an eqx.nn.BatchNorm whose state is not (mean, var) and a counter")
        out.append((_dotted(path), (pairs[0], counters[0])))
    return out


def equinox_batch(spec: ModelSpec, net: Any, images: jax.Array, labels: jax.Array, state: Any,
                  key: jax.Array | None) -> tuple[Any, Any]:
    """An Equinox model, which acts on one example, over a batch of NHWC images (or token sequences).

    ``jax.vmap`` with the batch axis named ``"batch"`` (BatchNorm's statistics),
    the state shared across the batch, and one key per example split from
    ``key`` (none when ``key`` is None: evaluation).
    """
    x = jnp.transpose(images, (0, 3, 1, 2)) if spec.channels_first else images  # Equinox convolves CHW
    args, in_axes = [x], [0]
    if spec.labels:
        args, in_axes = args + [labels], in_axes + [0]
    if spec.state:
        args, in_axes = args + [state], in_axes + [None]
    kw = {"key": jax.random.split(key, x.shape[0])} if spec.rng and key is not None else {}
    out = jax.vmap(net, in_axes=tuple(in_axes), out_axes=(0, None) if spec.state else 0,
                   axis_name="batch")(*args, **kw)
    if spec.kind == "lm":
        out = out[0]  # a language model's (logits, cache): no cache outside generation
    return out if spec.state else (out, state)


_BUILDERS = {"jax": _build_jax, "flax": _build_flax, "nnx": _build_nnx,
             "haiku": _build_haiku, "equinox": _build_equinox}
