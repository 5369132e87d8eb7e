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

import jax.numpy as jnp

from shared.args import fraction, int_list, positive_int
from shared.errors import ZooError, check_choice
from shared.layouts import Layout, Renamed, Split, chw_rows_to_hwc, reshape

STYLES = ("jax", "flax", "nnx", "haiku", "equinox")
KINDS = ("classifier", "vae", "lm")
# (height, width, channels) images; (length,) token sequences for a language model.
InShape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its name in the API, its default, and its command-line flag."""

    name: str
    default: Any
    help: str
    # argparse ``type=``: text -> value, raising ArgumentTypeError; None for a switch (--x / --no-x)
    parse: Callable[[str], Any] | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything about one model that is not in its model files."""

    name: str
    class_name: str  # the class in zoo/{flax,nnx,haiku,equinox}/NAME.py
    kind: str  # "classifier" (logits), "vae" (logits, mean, logvar; has generate) or "lm" (logits per token)
    description: str
    constructor: Callable[[InShape, int, Mapping[str, Any]], dict[str, Any]]
    hparams: tuple[HParam, ...] = ()
    # The smallest hyperparameters that still take every layer kind and every code path (a
    # projecting and a plain residual block; one attention block): the size the parity tests
    # check at, where a compile costs a fraction of the full model's and proves the same.
    small: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "constant"  # the learning-rate schedule: constant, warmup_cosine or linear_warmup
    warmup_steps: int = 0
    # Constructor arguments that Linen and Haiku infer from the first call.
    inferred: tuple[str, ...] = ()
    # How the forward pass is called. ``labels``: it sees the labels (the
    # conditional VAE). ``rng``: the name of the randomness it draws ("noise",
    # "dropout"), which is also the NNX Rngs stream and the Linen rngs
    # collection; None when it draws none. ``rng_argument``: Linen takes the
    # key as the forward pass's last argument (Flax's VAE example's ``z_rng``)
    # rather than through ``rngs``. ``train_mode``: it behaves differently in
    # training and evaluation (dropout, BatchNorm). ``state``: it keeps state
    # besides its parameters (BatchNorm's running statistics).
    labels: bool = False
    rng: str | None = None
    rng_argument: bool = False
    train_mode: bool = False
    state: bool = False
    # The Equinox version takes one CHW image rather than one HWC image (and an
    # ``in_shape`` of (C, H, W)), as its convolutions do.
    channels_first: bool = False
    # Converter rules beyond each style's per-leaf conventions (transposes,
    # Haiku's (1, 1, 1, C) statistics), for a style, by the canonical path the
    # native leaf's own path gives: a Layout (a CHW flatten), a Renamed leaf
    # (Haiku's attention output "linear" is the canonical "out") or a Split
    # (an LSTM's gates in one matrix).
    layouts: Callable[[str, InShape, Mapping[str, Any]], dict[str, Layout | Renamed | Split]] | None = None
    # The styles that lower to the reference's very XLA ops for this model, and
    # so agree with it bitwise; the others sum in another order (Equinox's
    # (out, in) weights and CHW convolutions, Haiku's concatenated LSTM matmul).
    bitwise: tuple[str, ...] = ("flax", "nnx", "haiku")
    # Matrix work a style's own layers do beyond the reference's, by style: (why, the
    # multiply-adds it adds to the compiled train step at a batch size). zoo bench accepts
    # a FLOPs difference from the reference only when the products differ by exactly this.
    extra_work: Mapping[str, tuple[str, Callable[[int, InShape, Mapping[str, Any]], int]]] = \
        dataclasses.field(default_factory=dict)
    # Why a style's step does other elementwise work around the very same convolutions and
    # matrix products (its framework's own layers): zoo bench explains a FLOPs difference with
    # it only when the linear algebra is identical op for op.
    elementwise_work: str | None = None
    # The reference's step scans over time (a recurrent lax.scan): zoo bench prices each style's
    # own scan idiom against it. While loops in a compiled step do not say so alone: XLA's CPU
    # backend draws random bits (threefry) in rolled loops too.
    scans: bool = False
    # The decay of the running averages, for frameworks that debias them
    # (Haiku, Equinox): the state converters need it.
    ema_decay: Callable[[Mapping[str, Any]], float] | None = None
    # Canonical prefixes whose parameters have a leading layer axis (blocks run by a scan), for
    # the hyperparameters: the converters change their layouts layer by layer.
    stacked: Callable[[Mapping[str, Any]], tuple[str, ...]] | None = None
    # The dataset the tools use when none is named.
    dataset: str = "digits"
    # Every style declares its parameters' logical axes ("embed", "heads", "mlp", ...), its framework's
    # own way: the model can be sharded with --strategy fsdp, tp or fsdp+tp (shared.parallel).
    parallel: bool = False

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


def _cnn_rows(style: str, in_shape: InShape, hparams: Mapping[str, Any]) -> dict[str, Layout]:
    # Equinox flattens a CHW feature map, so dense1's rows come in CHW order.
    height, width, _ = in_shape
    return {"dense1/kernel": chw_rows_to_hwc(height // 4, width // 4, 64)} if style == "equinox" else {}


# LSTM gates. The canonical layout is Linen's: per gate g in (i, f, g, o) an
# input kernel ``i{g}`` (in, hidden) without bias and a hidden kernel ``h{g}``
# (hidden, hidden) with the bias.
GATES = ("i", "f", "g", "o")
HAIKU_GATE_ORDER = ("i", "g", "f", "o")  # hk.LSTM splits its one linear's output so


def _lstm_rules(style: str, in_shape: InShape, hparams: Mapping[str, Any]) -> dict[str, Layout | Renamed | Split]:
    features, hidden = in_shape[1] * in_shape[2], hparams["hidden"]
    cell = "lstm/cell"
    inputs = tuple(f"{cell}/i{g}/kernel" for g in GATES)
    hiddens = tuple(f"{cell}/h{g}/kernel" for g in GATES)
    biases = tuple(f"{cell}/h{g}/bias" for g in GATES)
    if style == "nnx":  # `if` is a Python keyword: NNX's attribute is `if_`
        return {f"{cell}/if_/kernel": Renamed(f"{cell}/if/kernel")}
    if style == "haiku":
        # One Linear over [x, h]: rows are the input's then the hidden state's, columns the
        # gates in order i, g, f, o; the cell adds 1 to the forget gate's pre-activation.
        order = [HAIKU_GATE_ORDER.index(g) for g in GATES]
        return {
            "lstm/linear/kernel": Split(
                f"rows [x, h], columns gates i, g, f, o -> a kernel per gate ({features} + {hidden} rows)",
                inputs + hiddens,
                lambda w: [part for rows in (w[:features], w[features:])
                           for part in (jnp.split(rows, 4, axis=1)[k] for k in order)],
                lambda parts: jnp.concatenate(
                    [jnp.concatenate([parts[GATES.index(g)] for g in HAIKU_GATE_ORDER], axis=1),
                     jnp.concatenate([parts[4 + GATES.index(g)] for g in HAIKU_GATE_ORDER], axis=1)], axis=0)),
            "lstm/linear/bias": Split(
                "gates i, g, f, o -> a bias per gate; the forget gate's is the canonical one minus 1",
                biases,
                lambda b: [jnp.split(b, 4)[k] for k in order],
                lambda parts: jnp.concatenate([parts[GATES.index(g)] for g in HAIKU_GATE_ORDER]),
                offsets={f"{cell}/hf/bias": 1.0}),
        }
    if style == "equinox":
        # PyTorch's layout: weight_ih (4 * hidden, in), weight_hh (4 * hidden, hidden), gates i, f, g, o.
        def by_gate(note: str, parts: tuple[str, ...], transpose: bool) -> Split:
            return Split(note, parts,
                         lambda w: [p.T if transpose else p for p in jnp.split(w, 4, axis=0)],
                         lambda ps: jnp.concatenate([p.T if transpose else p for p in ps], axis=0))
        return {"lstm/weight_ih": by_gate("rows gates i, f, g, o, each (out, in) -> a kernel per gate, transposed",
                                          inputs, True),
                "lstm/weight_hh": by_gate("rows gates i, f, g, o, each (out, in) -> a kernel per gate, transposed",
                                          hiddens, True),
                "lstm/bias": by_gate("gates i, f, g, o -> a bias per gate", biases, False)}
    return {}


def _vit_kwargs(in_shape: InShape, num_classes: int, hp: Mapping[str, Any]) -> dict[str, Any]:
    height, width, _ = in_shape
    patch = hp["patch_size"] or (2 if max(height, width) <= 16 else 4)
    if height % patch or width % patch:
        raise ZooError(f"vit: patch size {patch} does not divide {height}x{width} images; "
                       "choose --patch-size among the common divisors of the image sides")
    if hp["width"] % hp["num_heads"]:
        raise ZooError(f"vit: {hp['num_heads']} heads do not divide width {hp['width']}; "
                       "choose --num-heads dividing --width")
    return {"in_shape": in_shape, "num_classes": num_classes, "patch_size": patch, "width": hp["width"],
            "depth": hp["depth"], "num_heads": hp["num_heads"], "mlp_dim": hp["mlp_dim"],
            "dropout_rate": hp["dropout"]}


def _attention_rules(style: str, blocks: list[tuple[str, str]], width: int, heads: int) -> dict[str, Renamed]:
    """Attention kernels: the canonical (Linen's) ``(in, heads, head_dim)`` and ``(heads, head_dim, out)``
    from Haiku's and Equinox's ``(in, heads * head_dim)`` (Equinox's transposed), and their names.
    ``blocks``: (the native path of a block, its canonical path)."""
    head_dim = width // heads
    qkv, out = ("query", "key", "value"), {"haiku": "linear", "equinox": "output_proj"}.get(style)
    if out is None:
        return {}
    rules: dict[str, Renamed] = {}
    for native_block, block in blocks:
        attn, native_attn = f"{block}/attn", f"{native_block}/attn"
        for name in qkv:
            native = name if style == "haiku" else f"{name}_proj"
            kernel = reshape((width, heads * head_dim), (width, heads, head_dim))
            bias = reshape((heads * head_dim,), (heads, head_dim))
            rules[f"{native_attn}/{native}/kernel"] = Renamed(f"{attn}/{name}/kernel", kernel)
            rules[f"{native_attn}/{native}/bias"] = Renamed(f"{attn}/{name}/bias", bias)
        rules[f"{native_attn}/{out}/kernel"] = Renamed(f"{attn}/out/kernel",
                                                       reshape((heads * head_dim, width), (heads, head_dim, width)))
        rules[f"{native_attn}/{out}/bias"] = Renamed(f"{attn}/out/bias")
    return rules


def _vit_rules(style: str, in_shape: InShape, hparams: Mapping[str, Any]) -> dict[str, Layout | Renamed]:
    """The attention's layouts (:func:`_attention_rules`); Equinox's one-example class token and position
    embeddings."""
    kwargs = _vit_kwargs(in_shape, 10, hparams)
    width = kwargs["width"]
    patches = (in_shape[0] // kwargs["patch_size"]) * (in_shape[1] // kwargs["patch_size"])
    blocks = [(f"blocks_{i}", f"blocks_{i}") for i in range(kwargs["depth"])]
    rules: dict[str, Layout | Renamed] = dict(_attention_rules(style, blocks, width, kwargs["num_heads"]))
    if style == "equinox":  # one example's class token and position embeddings: no batch axis
        rules["cls"] = reshape((1, width), (1, 1, width))
        rules["pos_embedding"] = reshape((patches + 1, width), (1, patches + 1, width))
    return rules


def _gpt_kwargs(in_shape: InShape, num_classes: int, hp: Mapping[str, Any]) -> dict[str, Any]:
    if hp["width"] % hp["num_heads"]:
        raise ZooError(f"gpt: {hp['num_heads']} heads do not divide width {hp['width']}; "
                       "choose --num-heads dividing --width")
    return {"vocab_size": num_classes, "block_size": in_shape[0], "width": hp["width"], "depth": hp["depth"],
            "num_heads": hp["num_heads"], "mlp_dim": hp["mlp_dim"], "dropout_rate": hp["dropout"],
            "scan_layers": hp["scan_layers"]}


# The blocks' parameters, and each block's leaves, by the path each style's own tree gives them.
GPT_BLOCK_LEAVES = ("norm1/scale", "norm1/bias", "norm2/scale", "norm2/bias", "mlp1/kernel", "mlp1/bias",
                    "mlp2/kernel", "mlp2/bias")


def _gpt_rules(style: str, in_shape: InShape, hparams: Mapping[str, Any]) -> dict[str, Layout | Renamed]:
    """The attention's layouts (:func:`_attention_rules`, per layer when scanned); Haiku's ``embeddings``
    and Equinox's ``weight`` are the canonical ``embedding``; Equinox's token embedding lives in the
    ``eqx.nn.Shared`` that ties it to the logits layer; Haiku's scanned blocks live in a
    ``hk.layer_stack`` named ``blocks`` holding one ``block``."""
    scanned = hparams["scan_layers"]
    native_stack = "blocks/block" if style == "haiku" else "blocks"
    blocks = [(native_stack, "blocks")] if scanned else [(f"blocks_{i}", f"blocks_{i}")
                                                          for i in range(hparams["depth"])]
    rules: dict[str, Layout | Renamed] = dict(_attention_rules(style, blocks, hparams["width"],
                                                               hparams["num_heads"]))
    if style == "haiku":
        rules.update({f"{name}/embeddings": Renamed(f"{name}/embedding") for name in ("embed", "pos_embed")})
    if style == "equinox":  # eqx.nn.Shared keeps the (embedding, head) pair; the head's weight is the embedding's
        rules["embed/pytree_0/kernel"] = Renamed("embed/embedding")
        rules["pos_embed/kernel"] = Renamed("pos_embed/embedding")
    if style == "haiku" and scanned:
        rules.update({f"blocks/block/{leaf}": Renamed(f"blocks/{leaf}") for leaf in GPT_BLOCK_LEAVES})
    return rules


_REGISTRY = (
    ModelSpec(
        name="mlp", class_name="MLP", kind="classifier",
        description="Flatten, then Dense → ReLU per hidden size (default 128, 128), then Dense logits.",
        constructor=lambda in_shape, num_classes, hp: {
            "in_features": math.prod(in_shape), "hidden_sizes": tuple(hp["hidden_sizes"]),
            "num_classes": num_classes},
        hparams=(HParam("hidden_sizes", (128, 128), "hidden layer sizes, comma separated", int_list),),
        small={"hidden_sizes": (16,)}, epochs=20, inferred=("in_features",),
    ),
    ModelSpec(
        name="cnn", class_name="CNN", kind="classifier",
        description="The CNN of Flax's MNIST example: conv 32 → ReLU → avg pool → conv 64 → ReLU → "
                    "avg pool → dense 256 → ReLU → dense 10, for any input size.",
        constructor=lambda in_shape, num_classes, hp: {"in_shape": in_shape, "num_classes": num_classes},
        epochs=40, inferred=("in_shape",), channels_first=True, layouts=_cnn_rows,
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
        small={"latents": 4, "hidden": 32}, epochs=30, labels=True, rng="noise", rng_argument=True,
        elementwise_work=("each framework's own derivation of the noise's key (fold_in, a key sequence, one "
                          "key per example) and its random bits"),
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
        small={"stage_sizes": (1, 1), "width": 4}, epochs=30, inferred=("in_channels",), rng="dropout",
        train_mode=True, state=True,
        channels_first=True, ema_decay=lambda hp: hp["bn_momentum"],
        # Linen, NNX and Haiku keep BatchNorm's statistics as (1, 1, 1, C) arrays and Haiku's dropout
        # multiplies by its mask: XLA fuses the reductions otherwise, and now and then a gradient's
        # last bit differs (measured: the first in step 13 of 50 for Linen).
        bitwise=(),
        elementwise_work=("the framework's own BatchNorm statistics and debiasing, step counters, and its own "
                          "derivation of the dropout key (fold_in, a key sequence, one key per example)"),
    ),
    ModelSpec(
        name="lstm", class_name="LSTM", kind="classifier",
        description="Reads the image row by row (8 steps of 8 pixels on digits, 28 of 28 on MNIST): one LSTM "
                    "layer of 128 units, its last hidden state into a dense head.",
        constructor=lambda in_shape, num_classes, hp: {
            "in_features": in_shape[1] * in_shape[2], "num_classes": num_classes, "hidden": hp["hidden"]},
        hparams=(HParam("hidden", 128, "hidden width", positive_int),),
        small={"hidden": 16}, epochs=30, lr=3e-3, inferred=("in_features",), layouts=_lstm_rules, scans=True,
        # Haiku's one matmul over [x, h] sums in another order than the two per gate.
        bitwise=("flax", "nnx"),
        extra_work={"haiku": (
            "hk.LSTM's one matmul over [x, h] also computes the gradient of the input rows, which the "
            "per-gate products never need (batch x row features x 4 hidden, in the scan's body)",
            lambda batch, in_shape, hp: batch * in_shape[1] * in_shape[2] * 4 * hp["hidden"])},
    ),
    ModelSpec(
        name="vit", class_name="ViT", kind="classifier",
        description="A small Vision Transformer: patch embedding (a strided conv), class token, learned "
                    "position embeddings, 4 pre-LayerNorm encoder blocks (width 64, 4 heads, MLP 128, GELU), "
                    "dropout, a dense head on the class token.",
        constructor=_vit_kwargs,
        hparams=(HParam("patch_size", None, "patch side (default: 2 for images up to 16 pixels, else 4)",
                        positive_int),
                 HParam("width", 64, "embedding width", positive_int),
                 HParam("depth", 4, "encoder blocks", positive_int),
                 HParam("num_heads", 4, "attention heads", positive_int),
                 HParam("mlp_dim", 128, "hidden width of each block's MLP", positive_int),
                 HParam("dropout", 0.1, "dropout rate on the embeddings, attention output and MLP", fraction)),
        # A transformer on 1,437 digits: a warmup and cosine decay, as ViTs are trained, and batches
        # of 64 (measured, plain JAX, seeds 0 and 1: 97.8 and 96.1% against 95.0 and 96.4% with
        # batches of 128, and 93.1 to 93.9% with a constant 1e-3 or 3e-3 for 30 to 60 epochs).
        small={"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32},
        epochs=60, batch_size=64, lr=3e-3, schedule="warmup_cosine", warmup_steps=100,
        inferred=("in_shape",), rng="dropout", train_mode=True, channels_first=True, parallel=True,
        layouts=_vit_rules,
        # Linen's and NNX's LayerNorm take the variance in one pass (E[x^2] - E[x]^2), Haiku's takes the
        # mean twice (jnp.mean, then jnp.var), Equinox's and NNX's attention round in their own order.
        bitwise=(),
        elementwise_work=("each framework derives its dropout keys its own way (make_rng's folds, fold_in, a "
                          "key sequence, one key per example); hk.dropout multiplies by its mask where the "
                          "others select; Linen's and NNX's LayerNorm take the variance in one pass, Haiku's "
                          "and Equinox's in two (jnp.var), Equinox's also clamps it at 0"),
    ),
    ModelSpec(
        name="gpt", class_name="GPT", kind="lm",
        description="A small GPT (GPT-2's pre-LayerNorm decoder): token and learned position embeddings, 3 "
                    "causal self-attention blocks (width 64, 4 heads, MLP 256, GELU), the logits through the "
                    "token embedding (tied); KV-cache generation, and the blocks under a scan with "
                    "--scan-layers.",
        constructor=_gpt_kwargs,
        hparams=(HParam("width", 64, "embedding width", positive_int),
                 HParam("depth", 3, "transformer blocks", positive_int),
                 HParam("num_heads", 4, "attention heads", positive_int),
                 HParam("mlp_dim", 256, "hidden width of each block's MLP", positive_int),
                 HParam("dropout", 0.1, "dropout rate on the embeddings, attention output and MLP", fraction),
                 HParam("scan_layers", False, "run the blocks under one scan (parameters stacked on a "
                                              "leading layer axis): one compiled layer", None)),
        small={"width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32},
        # 3-digit addition, 50,000 training problems: 4 epochs are 1,560 steps of 128.
        epochs=4, batch_size=128, lr=1e-3, rng="dropout", train_mode=True, layouts=_gpt_rules,
        stacked=lambda hp: ("blocks",) if hp["scan_layers"] else (), dataset="addition", parallel=True,
        # Linen's and NNX's LayerNorm take the variance in one pass, NNX's attention hands over to
        # jax.nn.dot_product_attention, Haiku's scales the logits after the product.
        bitwise=(),
        elementwise_work=("each framework derives its dropout keys its own way (make_rng's folds, fold_in, a "
                          "key sequence, one key per example); hk.dropout multiplies by its mask where the "
                          "others select; Linen's and NNX's LayerNorm take the variance in one pass, Haiku's "
                          "and Equinox's in two; Haiku scales the attention logits after the product, the "
                          "others the query before it"),
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _REGISTRY}
# A language model's example input where an image model's is an image shape (the site's parameter
# tables, zoo copy's check): its default dataset's sequences, 3-digit addition's 9 tokens, 10 of them.
TOKENS_EXAMPLE = (9,)


def example_shape(name: str, images: InShape) -> InShape:
    """``images`` for an image model; :data:`TOKENS_EXAMPLE` for a language model."""
    return TOKENS_EXAMPLE if get(name).kind == "lm" else images
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
        if hparam.parse is None:
            parser.add_argument(hparam.flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{', '.join(models)}: {hparam.help} (default {defaults})")
        else:
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
