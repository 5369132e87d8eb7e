"""One small functional interface over every style of every model.

:func:`build` returns a :class:`Model`: pure ``init`` and ``apply`` functions
over the style's own parameter tree, and a :class:`~shared.convert.Converter`
to and from the canonical layout. The shared training loop, the parity tests
and the benchmarks see every framework only through this interface.

``apply(params, images, labels, key)`` takes NHWC float images, int labels and
a PRNG key for every model; classifiers ignore the labels and the key and
return logits, the VAE returns ``(logits, mean, logvar)``.

Each adapter uses the fastest correct pattern for its framework: plain
functions under ``jax.jit`` for every style, with NNX models split into a
static graph and a plain dict of their arrays (``nnx.split``,
``nnx.to_pure_dict``, ``nnx.merge``) and Equinox
models split into arrays and static parts (``eqx.partition``/``eqx.combine``),
rather than ``nnx.jit`` or ``eqx.filter_jit``, whose Python-side dispatch costs
time on every call (see ``zoo bench``).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shared.convert import Converter, Layout, chw_rows_to_hwc
from zoo import MODELS, STYLES

PRECISIONS = ("float32", "bfloat16")
KINDS = {"mlp": "classifier", "cnn": "classifier", "vae": "vae"}
CLASS_NAMES = {"mlp": "MLP", "cnn": "CNN", "vae": "VAE"}
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "mlp": {"hidden_sizes": (128, 128)},
    "cnn": {},
    "vae": {"latents": 20, "hidden": 500},
}


class ZooError(ValueError):
    """Bad input from a user: the message says what was wrong and how to fix it."""


def noise_key(key: jax.Array) -> jax.Array:
    """The key every style draws the VAE's noise with, for a step key ``key``.

    ``nnx.Rngs(noise=key).noise()`` gives ``fold_in(key, 0)`` on its first
    call, so that is the convention; the other adapters hand the same key to
    their framework in its own idiom.
    """
    return jax.random.fold_in(key, 0)


@dataclasses.dataclass(frozen=True)
class Model:
    """A model in one style, seen as pure functions of its native parameters."""

    name: str
    style: str
    in_shape: tuple[int, int, int]
    num_classes: int
    precision: str
    hparams: dict[str, Any]
    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array, jax.Array, jax.Array], Any]
    generate: Callable[[Any, jax.Array, jax.Array], jax.Array] | None
    converter: Converter
    module: Any  # the framework's own object: a Linen/Haiku/NNX/Equinox module, or the jax module

    @property
    def kind(self) -> str:
        return KINDS[self.name]

    def to_canonical(self, tree: Any) -> dict[str, Any]:
        return self.converter.to_canonical(tree)

    def from_canonical(self, tree: dict[str, Any]) -> Any:
        return self.converter.from_canonical(tree)


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ZooError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


def model_kwargs(name: str, in_shape: tuple[int, int, int], num_classes: int,
                 hparams: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments, in the order the model files declare them."""
    if name == "mlp":
        return {"in_features": math.prod(in_shape), "hidden_sizes": tuple(hparams["hidden_sizes"]),
                "num_classes": num_classes}
    if name == "cnn":
        return {"in_shape": tuple(in_shape), "num_classes": num_classes}
    return {"num_pixels": math.prod(in_shape), "num_classes": num_classes,
            "latents": hparams["latents"], "hidden": hparams["hidden"]}


# Linen and Haiku infer input sizes on the first call, so their constructors lack these.
INFERRED = {"in_features", "in_shape"}


def build(name: str, style: str, *, in_shape: tuple[int, int, int], num_classes: int = 10,
          precision: str = "float32", **hparams: Any) -> Model:
    """The model ``name`` written in ``style``, for images of shape ``in_shape`` (H, W, C)."""
    check_choice("model", name, MODELS)
    check_choice("style", style, STYLES)
    check_choice("precision", precision, PRECISIONS)
    in_shape = tuple(int(d) for d in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise ZooError(f"in_shape must be (height, width, channels), got {in_shape}")
    unknown = set(hparams) - set(DEFAULT_HPARAMS[name])
    if unknown:
        raise ZooError(f"{name} has no hyperparameter {sorted(unknown)}; "
                       f"it takes {sorted(DEFAULT_HPARAMS[name]) or 'none'}")
    hparams = {**DEFAULT_HPARAMS[name], **hparams}
    kwargs = model_kwargs(name, in_shape, num_classes, hparams)
    module = importlib.import_module(f"zoo.{style}.{name}")
    compute = jnp.bfloat16 if precision == "bfloat16" else None
    parts = _BUILDERS[style](name, module, kwargs, compute, in_shape)
    init, apply, generate, native = parts
    apply = _checked(apply, name, style, in_shape)
    template = jax.eval_shape(init, jax.random.key(0))
    extra: dict[str, Layout] = {}
    if style == "equinox" and name == "cnn":
        height, width, _ = in_shape
        extra["dense1/kernel"] = chw_rows_to_hwc(height // 4, width // 4, 64)
    converter = Converter(style, template, extra)
    return Model(name, style, in_shape, num_classes, precision, hparams, init, apply,
                 generate, converter, native)


def _checked(apply: Callable, name: str, style: str, in_shape: tuple[int, ...]) -> Callable:
    def checked_apply(params, images, labels, key):
        if tuple(images.shape[1:]) != in_shape:
            raise ZooError(f"{name} ({style}) was built for images of shape {in_shape}, "
                           f"got a batch of shape {tuple(images.shape)}; build it with "
                           f"in_shape={tuple(images.shape[1:])}")
        return apply(params, images, labels, key)
    return checked_apply


def _cast(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _to_float32(out: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32), out)


def _build_jax(name, module, kwargs, compute, in_shape):
    def init(key):
        return module.init(key, *kwargs.values())

    # Mixed precision in plain JAX: cast parameters and inputs explicitly.
    if name == "vae":
        def apply(params, images, labels, key):
            out = module.apply(_cast(params, compute), _cast(images, compute), labels, noise_key(key))
            return _to_float32(out)

        def generate(params, z, labels):
            return _to_float32(module.generate(_cast(params, compute), _cast(z, compute), labels))
    else:
        def apply(params, images, labels, key):
            return _to_float32(module.apply(_cast(params, compute), _cast(images, compute)))
        generate = None
    return init, apply, generate, module


def _build_flax(name, module, kwargs, compute, in_shape):
    kwargs = {k: v for k, v in kwargs.items() if k not in INFERRED}
    net = getattr(module, CLASS_NAMES[name])(**kwargs, dtype=compute)
    dummy = _dummy_inputs(in_shape)

    def init(key):
        inputs = (*dummy, key) if name == "vae" else dummy[:1]
        return net.init(key, *inputs)["params"]

    if name == "vae":
        def apply(params, images, labels, key):
            return _to_float32(net.apply({"params": params}, images, labels, noise_key(key)))

        def generate(params, z, labels):
            return _to_float32(net.apply({"params": params}, z, labels, method=net.generate))
    else:
        def apply(params, images, labels, key):
            return _to_float32(net.apply({"params": params}, images))
        generate = None
    return init, apply, generate, net


def _build_nnx(name, module, kwargs, compute, in_shape):
    from flax import nnx

    cls = getattr(module, CLASS_NAMES[name])
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(**kwargs, dtype=compute, rngs=nnx.Rngs(0))))

    def init(key):
        _, params = nnx.split(cls(**kwargs, dtype=compute, rngs=nnx.Rngs(params=key)))
        # A plain dict of arrays rather than an nnx.State: jax.jit flattens its
        # arguments on every call, about 6 us for dicts against about 60 us
        # for the Variables of an nnx.State, which shows on small models.
        return nnx.to_pure_dict(params)

    # The fast pattern: a static graphdef merged with the parameters inside the
    # traced function, instead of nnx.jit on the module.
    if name == "vae":
        def apply(params, images, labels, key):
            out = nnx.merge(graphdef, params)(images, labels, nnx.Rngs(noise=key))
            return _to_float32(out)

        def generate(params, z, labels):
            return _to_float32(nnx.merge(graphdef, params).generate(z, labels))
    else:
        def apply(params, images, labels, key):
            return _to_float32(nnx.merge(graphdef, params)(images))
        generate = None
    return init, apply, generate, cls


def _build_haiku(name, module, kwargs, compute, in_shape):
    import haiku as hk

    kwargs = {k: v for k, v in kwargs.items() if k not in INFERRED}
    cls = getattr(module, CLASS_NAMES[name])

    def under_policy(fn: Callable) -> Callable:
        """Haiku's mixed-precision idiom: a jmp policy attached to the module class.

        push_policy scopes it to this trace, so a bfloat16 model and a float32
        one can be built side by side.
        """
        if compute is None:
            return fn
        import jmp

        policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")

        def with_policy(*args):
            with hk.mixed_precision.push_policy(cls, policy):
                return fn(*args)
        return with_policy

    if name == "vae":
        forward = hk.transform(under_policy(lambda x, y: cls(**kwargs)(x, y)))
        sample = hk.transform(under_policy(lambda z, y: cls(**kwargs).generate(z, y)))
        dummy = _dummy_inputs(in_shape)

        def init(key):
            return forward.init(key, *dummy)

        def apply(params, images, labels, key):
            # A PRNGSequence state whose next key is noise_key(key): the
            # model's hk.next_rng_key() then draws with the shared key.
            return _to_float32(forward.apply(params, (key, (noise_key(key),)), images, labels))

        def generate(params, z, labels):
            return _to_float32(sample.apply(params, None, z, labels))
    else:
        forward = hk.transform(under_policy(lambda x: cls(**kwargs)(x)))
        dummy = _dummy_inputs(in_shape)

        def init(key):
            return forward.init(key, dummy[0])

        def apply(params, images, labels, key):
            return _to_float32(forward.apply(params, None, images))
        generate = None
    return init, apply, generate, forward


def _build_equinox(name, module, kwargs, compute, in_shape):
    import equinox as eqx

    cls = getattr(module, CLASS_NAMES[name])
    static = eqx.partition(eqx.filter_eval_shape(lambda: cls(**kwargs, key=jax.random.key(0))),
                           eqx.is_array)[1]

    def init(key):
        params, _ = eqx.partition(cls(**kwargs, key=key), eqx.is_array)
        return params

    # The fast pattern: arrays and static parts partitioned once, combined
    # inside the traced function, instead of eqx.filter_jit. Mixed precision
    # is explicit casting of the parameter arrays and the inputs.
    if name == "vae":
        def apply(params, images, labels, key):
            net = eqx.combine(_cast(params, compute), static)
            return _to_float32(net(_cast(images, compute), labels, key=noise_key(key)))

        def generate(params, z, labels):
            net = eqx.combine(_cast(params, compute), static)
            return _to_float32(net.generate(_cast(z, compute), labels))
    else:
        def apply(params, images, labels, key):
            net = eqx.combine(_cast(params, compute), static)
            x = _cast(images, compute)
            if name == "cnn":
                x = jnp.transpose(x, (0, 3, 1, 2))  # Equinox convolutions take CHW
            return _to_float32(jax.vmap(net)(x))
        generate = None
    return init, apply, generate, cls


def _dummy_inputs(in_shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """An example batch for Linen and Haiku, which infer shapes on the first call."""
    return jnp.zeros((1, *in_shape), jnp.float32), jnp.zeros((1,), jnp.int32)


_BUILDERS = {"jax": _build_jax, "flax": _build_flax, "nnx": _build_nnx,
             "haiku": _build_haiku, "equinox": _build_equinox}
