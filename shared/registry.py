"""The model registry: every model is declared once, here.

A :class:`ModelSpec` says everything the tools need to know about a model that
is not in its five files: what it is trained to do (its kind), its class name,
how its constructor arguments follow from the input shape, the number of
classes and the hyperparameters, its hyperparameters with their command-line
flags and defaults, its training defaults, a one-line description, how its
forward pass is called (labels, randomness, a train/eval mode, state) and any
extra converter layouts. The style adapters, the command line, ``zoo bench``,
``zoo show``, ``zoo copy``, ``zoo site`` and the tests read it; nothing else
branches on a model's name.

Adding a model of an existing kind is five model files and one entry in
:data:`MODELS` (see ``docs/adding-a-model.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from shared.args import fraction, int_list, positive_int
from shared.errors import ZooError, check_choice
from shared.layouts import Layout, chw_rows_to_hwc

STYLES = ("jax", "flax", "nnx", "haiku", "equinox")
KINDS = ("classifier", "vae")
InShape = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its name in the API, its default, and its command-line flag."""

    name: str
    default: Any
    help: str
    parse: Callable[[str], Any]  # argparse ``type=``: text -> value, raising ArgumentTypeError

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything about one model that is not in its model files."""

    name: str
    class_name: str  # the class in zoo/{flax,nnx,haiku,equinox}/NAME.py
    kind: str  # "classifier" (logits) or "vae" (logits, mean, logvar; has generate)
    description: str
    constructor: Callable[[InShape, int, Mapping[str, Any]], dict[str, Any]]
    hparams: tuple[HParam, ...] = ()
    epochs: int = 20
    lr: float = 1e-3
    # Constructor arguments that Linen and Haiku infer from the first call.
    inferred: tuple[str, ...] = ()
    # How the forward pass is called. ``labels``: it sees the labels (the
    # conditional VAE). ``rng``: the name of the randomness it draws ("noise",
    # "dropout"), which is also the NNX Rngs stream and the Linen argument
    # prefix; None when it draws none. ``train_mode``: it behaves differently
    # in training and evaluation (dropout, BatchNorm). ``state``: it keeps
    # state besides its parameters (BatchNorm's running statistics).
    labels: bool = False
    rng: str | None = None
    train_mode: bool = False
    state: bool = False
    # The Equinox version takes one CHW image rather than one HWC image.
    channels_first: bool = False
    # Extra layout changes of the Equinox parameters beyond the per-leaf
    # conventions (transposes), by canonical path.
    equinox_layouts: Callable[[InShape, Mapping[str, Any]], dict[str, Layout]] | None = None
    # The decay of the running averages, for frameworks that debias them
    # (Haiku, Equinox): the state converters need it.
    ema_decay: Callable[[Mapping[str, Any]], float] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hparams}

    def resolve(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The full hyperparameters: ``hparams`` over the defaults, unknown names refused."""
        unknown = set(hparams) - set(self.defaults)
        if unknown:
            raise ZooError(f"{self.name} has no hyperparameter {', '.join(sorted(unknown))}; "
                           f"it takes {', '.join(sorted(self.defaults)) or 'none'}")
        resolved = {**self.defaults, **{k: v for k, v in hparams.items() if v is not None}}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()}

    def kwargs(self, in_shape: InShape, num_classes: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments, in the order the model files declare them."""
        return self.constructor(tuple(in_shape), num_classes, self.resolve(hparams))


# --------------------------------------------------------------------------- the models


def _cnn_rows(in_shape: InShape, hparams: Mapping[str, Any]) -> dict[str, Layout]:
    # Equinox flattens a CHW feature map, so dense1's rows come in CHW order.
    height, width, _ = in_shape
    return {"dense1/kernel": chw_rows_to_hwc(height // 4, width // 4, 64)}


_REGISTRY = (
    ModelSpec(
        name="mlp", class_name="MLP", kind="classifier",
        description="Flatten, then Dense → ReLU per hidden size (default 128, 128), then Dense logits.",
        constructor=lambda in_shape, num_classes, hp: {
            "in_features": math.prod(in_shape), "hidden_sizes": tuple(hp["hidden_sizes"]),
            "num_classes": num_classes},
        hparams=(HParam("hidden_sizes", (128, 128), "hidden layer sizes, comma separated", int_list),),
        epochs=20, inferred=("in_features",),
    ),
    ModelSpec(
        name="cnn", class_name="CNN", kind="classifier",
        description="The CNN of Flax's MNIST example: conv 32 → ReLU → avg pool → conv 64 → ReLU → "
                    "avg pool → dense 256 → ReLU → dense 10, for any input size.",
        constructor=lambda in_shape, num_classes, hp: {"in_shape": in_shape, "num_classes": num_classes},
        epochs=40, inferred=("in_shape",), channels_first=True, equinox_layouts=_cnn_rows,
    ),
    ModelSpec(
        name="vae", class_name="VAE", kind="vae",
        description="A class-conditional VAE (encoder and decoder see the one-hot label), 20 latents and "
                    "500 hidden units as in Flax's VAE example; loss = negative ELBO.",
        constructor=lambda in_shape, num_classes, hp: {
            "num_pixels": math.prod(in_shape), "num_classes": num_classes,
            "latents": hp["latents"], "hidden": hp["hidden"]},
        hparams=(HParam("latents", 20, "latent size", positive_int),
                 HParam("hidden", 500, "hidden width", positive_int)),
        epochs=30, labels=True, rng="noise",
    ),
    ModelSpec(
        name="resnet", class_name="ResNet", kind="classifier",
        description="A small ResNet: 3x3 conv stem, three stages of basic residual blocks (16/32/64 "
                    "channels) with BatchNorm, global average pooling, dropout, dense head.",
        constructor=lambda in_shape, num_classes, hp: {
            "in_channels": in_shape[2], "num_classes": num_classes,
            "stage_sizes": tuple(hp["stage_sizes"]), "width": hp["width"],
            "dropout_rate": hp["dropout"], "momentum": hp["bn_momentum"]},
        hparams=(HParam("stage_sizes", (1, 1, 1), "residual blocks per stage, comma separated (3 stages)",
                        int_list),
                 HParam("width", 16, "channels of the first stage (doubled per stage)", positive_int),
                 HParam("dropout", 0.1, "dropout rate before the head", fraction),
                 HParam("bn_momentum", 0.9, "BatchNorm running-average decay", fraction)),
        epochs=30, inferred=("in_channels",), rng="dropout", train_mode=True, state=True,
        channels_first=True, ema_decay=lambda hp: hp["bn_momentum"],
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _REGISTRY}
NAMES = tuple(MODELS)
# The model whose parameter trees illustrate the layout rows of the site's
# porting table (dense and conv kernels, conv biases, a flatten).
LAYOUT_EXAMPLE = "cnn"


def get(name: str) -> ModelSpec:
    check_choice("model", name, NAMES)
    return MODELS[name]


def hparam_flags() -> dict[str, tuple[HParam, list[str]]]:
    """Every hyperparameter flag, with the models that take it (a flag may serve several)."""
    flags: dict[str, tuple[HParam, list[str]]] = {}
    for spec in MODELS.values():
        for h in spec.hparams:
            if h.name in flags and flags[h.name][0].parse is not h.parse:
                raise RuntimeError(f"hyperparameter {h.name} is parsed two ways")
            flags.setdefault(h.name, (h, []))[1].append(spec.name)
    return flags


def _show_default(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_hparam_flags(parser: argparse.ArgumentParser) -> None:
    """One command-line flag per hyperparameter of any model, with each model's default in its help."""
    for name, (hparam, models) in hparam_flags().items():
        defaults = "; ".join(f"{m}: {_show_default(MODELS[m].defaults[name])}" for m in models)
        parser.add_argument(hparam.flag, dest=name, type=hparam.parse,
                            help=f"{', '.join(models)}: {hparam.help} (default {defaults})")


def given_hparams(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters of model ``name`` among parsed flags ``values`` (None: not given);
    a flag given that belongs to another model is refused in one line."""
    spec = get(name)
    given = {h.name: values[h.name] for h in spec.hparams if values.get(h.name) is not None}
    others = [hparam.flag for flag, (hparam, _) in hparam_flags().items()
              if flag not in spec.defaults and values.get(flag) is not None]
    if others:
        raise ZooError(f"{name} does not take {', '.join(others)}; its hyperparameters are "
                       f"{', '.join(h.flag for h in spec.hparams) or 'none'}")
    return given
