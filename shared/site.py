"""``zoo site``: a static HTML catalogue, one page per model with every style side by side.

Everything on the pages is taken from the code when the site is built: the
files themselves (aligned by :func:`shared.catalogue.align`, highlighted by
pygments), each style's parameter tree (``jax.eval_shape`` of its ``init``)
and its mapping to the canonical layout (the converter's rules), each style's
default initialiser (measured on a fresh ``init``), the frameworks' padding
defaults (their signatures), and the results under ``runs/`` that
``zoo compare``, ``zoo bench`` and ``zoo train`` wrote. Every row of the table
of differences names the tests that check it, and the page quotes those tests.

The pages are plain HTML and CSS (jinja2 templates in ``shared/templates``):
no server, no JavaScript; open ``index.html`` from the file system.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib
import inspect
import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import equinox as eqx
import flax.linen as linen
import haiku as hk
import jax
import jinja2
import pygments
from flax import nnx
from markupsafe import Markup, escape
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from shared import catalogue, files, registry
from shared import styles as styles_lib
from shared.args import choice_list, path_arg
from shared.catalogue import ALIGN_ORDER, ANCHOR, REFERENCE, TITLES
from shared.errors import ZooError
from shared.files import write_text
from shared.layouts import flatten_canonical
from shared.registry import LAYOUT_EXAMPLE, MODELS, NAMES, STYLES

IN_SHAPE = (28, 28, 1)  # parameter tables are shown for MNIST-sized inputs
# Distinct header colours per style; the browser test finds each of them in the screenshot.
COLOURS = {"jax": "#3b5bdb", "flax": "#2b8a3e", "nnx": "#0b7285", "haiku": "#c92a2a", "equinox": "#862e9c"}
DESCRIPTIONS = {name: spec.description for name, spec in MODELS.items()}


# --------------------------------------------------------------------------- initialisers


def truncated_normal_std(cut: float = 2.0) -> float:
    """Standard deviation of a standard normal truncated to ``[-cut, cut]``."""
    mass = math.erf(cut / math.sqrt(2))
    density = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi)
    return math.sqrt(1 - 2 * cut * density / mass)


@dataclasses.dataclass(frozen=True)
class Initialiser:
    name: str
    detail: str
    spread: float  # std * sqrt(fan_in)
    bound: float  # max |w| * sqrt(fan_in) the distribution can reach


TRUNCATED = truncated_normal_std(2.0)
KNOWN_INITIALISERS = (
    Initialiser("LeCun normal", "normal truncated at ±2σ, rescaled to std 1/√fan_in", 1.0, 2 / TRUNCATED),
    Initialiser("truncated normal", f"stddev 1/√fan_in cut at ±2σ: real std {TRUNCATED:.4f}/√fan_in",
                TRUNCATED, 2.0),
    Initialiser("uniform", "uniform in ±1/√fan_in: std 1/√(3·fan_in)", 1 / math.sqrt(3), 1.0),
)
SPREAD_RTOL = 0.05  # the known spreads differ by 12% or more; pooled estimates are within 1%
TOO_FEW = 64  # fewer draws than this (a 10-unit head's bias alone) estimate a spread within ~25% only


@dataclasses.dataclass(frozen=True)
class Measured:
    """One style's initialiser for one kind of leaf, measured over every such leaf of a model."""

    spread: float  # std of w * sqrt(fan_in), pooled
    bound: float  # max |w| * sqrt(fan_in)
    count: int

    @property
    def initialiser(self) -> Initialiser | None:
        if self.spread == 0.0:
            return Initialiser("zeros", "all zero", 0.0, 0.0)
        for known in KNOWN_INITIALISERS:
            if abs(self.spread / known.spread - 1) <= SPREAD_RTOL and self.bound <= known.bound * 1.001:
                return known
        return None

    @property
    def label(self) -> str:
        known = self.initialiser
        if known is None and self.count < TOO_FEW:
            return f"too few draws to tell ({self.count})"
        return known.name if known else f"unrecognised (std·√fan_in {self.spread:.3f})"


def _own_initialiser(rule: Any, kernel_shape: tuple[int, ...], alone: Measured) -> bool:
    """A leaf drawn by its layer's own initialiser rather than the framework's dense/conv default,
    left out of the pooled measurement: a split leaf (an LSTM's gates, drawn over the
    concatenation), an attention projection (renamed or reshaped to its heads), a kernel that is
    neither ``(in, out)`` nor HWIO, or a large leaf that on its own matches no known default (an
    orthogonal recurrent kernel)."""
    return (rule.split is not None or rule.renamed or len(kernel_shape) not in (2, 4)
            or (alone.count >= 1024 and alone.initialiser is None))


def _fan_in(shape: tuple[int, ...]) -> int:
    """Inputs per output unit of a canonical kernel: ``(in, out)`` or HWIO."""
    return int(math.prod(shape[:-1]))


# --------------------------------------------------------------------------- parameters


@dataclasses.dataclass
class Leaf:
    native: str
    shape: tuple[int, ...]
    dtype: str
    canonical: str
    canonical_shape: tuple[int, ...]
    layout: str
    kind: str  # "kernel" or "bias"
    spread: float | None  # this leaf's std * sqrt(fan_in), when measured
    init: str = ""


@dataclasses.dataclass
class StyleParams:
    style: str
    leaves: list[Leaf]
    measured: dict[str, Measured]  # "kernel"/"bias" -> pooled measurement
    total: int
    # The model state as the framework holds it: (native path, shape, dtype); and its canonical paths.
    state: list[tuple[str, tuple[int, ...], str]] = dataclasses.field(default_factory=list)
    state_canonical: tuple[str, ...] = ()


def _fresh_inits(nets: dict[tuple[str, str], Any]) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """Every model's canonical parameters from a fresh ``init``, drawn in one compiled call.

    One jit for all of them, compiled at a low optimisation level: compiling the
    random initialisers is what costs here (seconds each at the default level,
    and hundreds of small compilations if run eagerly), not running them. The
    key is an ``unsafe_rbg`` key: XLA's own bit generator, for the draws and
    for splitting keys, compiles in a fraction of threefry's time (every
    model's inits on 2 CPU cores: about 170 s with threefry, 43 s with
    ``rbg``, whose splits are still threefry, 35 s with ``unsafe_rbg``) and
    draws from the same distributions, which is all that is measured here
    (std·√fan_in). Its split keys are not guaranteed independent; that cannot
    move a leaf's spread, and the draws themselves are never shown.
    """
    def inits(key):
        return {f"{m}/{s}": flatten_canonical(net.to_canonical(net.init_params(key))) for (m, s), net in nets.items()}

    key = jax.random.key(0, impl="unsafe_rbg")
    out = jax.device_get(styles_lib.compile_low_opt(jax.jit(inits).lower(key))(key))
    return {(m, s): {k: np.asarray(v, np.float64) for k, v in out[f"{m}/{s}"].items()} for m, s in nets}


def parameter_trees(models: Sequence[str], styles: Sequence[str] = STYLES, *,
                    in_shape: tuple[int, int, int] = IN_SHAPE,
                    measure: bool = True) -> dict[tuple[str, str], StyleParams]:
    """Each style's parameter tree, its canonical mapping and (``measure``) its
    default initialiser, all from the code: ``jax.eval_shape`` of ``init``, the
    converter's rules, and a fresh ``init``."""
    nets = {(m, s): styles_lib.build(m, s, in_shape=registry.example_shape(m, in_shape)) for m in models
            for s in styles}
    values = _fresh_inits(nets) if measure else {}
    out = {}
    for (m, s), net in nets.items():
        template, state = jax.eval_shape(net.init, jax.random.key(0))
        canonical_shapes = {k: tuple(v.shape) for k, v in
                            flatten_canonical(jax.eval_shape(net.to_canonical, template)).items()}
        leaves, pooled = [], {}
        for rule, leaf in zip(net.converter.rules, jax.tree.leaves(template)):
            kind = rule.parts[0].rpartition("/")[2]
            spreads, init = [], None
            for part in rule.parts:  # one, or a split leaf's several (an LSTM's gates)
                parent = part.rpartition("/")[0]
                kernel = f"{parent}/kernel" if parent else "kernel"
                if measure and kernel in canonical_shapes:  # a layer's weights: scaled by its fan-in
                    spreads.append(values[m, s][part].ravel() * math.sqrt(_fan_in(canonical_shapes[kernel])))
                elif measure:  # a normalisation's scale or offset, a class token: a constant, or drawn
                    drawn = values[m, s][part].ravel()
                    init = f"constant {drawn[0]:g}" if np.all(drawn == drawn[0]) else f"drawn, std {drawn.std():.3g}"
            spread = float(np.concatenate(spreads).std()) if spreads else None
            if spreads:
                scaled = np.concatenate(spreads)
                alone = Measured(float(scaled.std()), float(np.abs(scaled).max()), scaled.size)
                if _own_initialiser(rule, canonical_shapes[kernel], alone):
                    init = f"the layer's own (std·√fan_in {alone.spread:.3f})"
                else:
                    pooled.setdefault(kind, []).append(scaled)
            shapes = set(rule.part_shapes)
            leaves.append(Leaf(rule.native, tuple(leaf.shape), str(leaf.dtype), rule.canonical,
                               rule.canonical_shape if len(shapes) == 1 else rule.part_shapes,
                               rule.layout.note, kind, spread))
            leaves[-1].init = init
        measured = {}
        for kind, parts in pooled.items():
            both = np.concatenate(parts)
            measured[kind] = Measured(float(both.std()), float(np.abs(both).max()), both.size)
        for leaf in leaves:
            if leaf.init is None:
                leaf.init = measured[leaf.kind].label if leaf.kind in measured else ""
        state_leaves = [(jax.tree_util.keystr(path), tuple(leaf.shape), str(leaf.dtype))
                        for path, leaf in jax.tree_util.tree_leaves_with_path(state)]
        out[m, s] = StyleParams(s, leaves, measured, sum(math.prod(leaf.shape) for leaf in leaves),
                                state_leaves, net.state_converter.paths)
    return out


def pool(analyses: Iterable[StyleParams]) -> dict[str, dict[str, Measured]]:
    """Per style and kind, the measurements of several models pooled (weighted by count)."""
    out: dict[str, dict[str, list[Measured]]] = {}
    for a in analyses:
        for kind, m in a.measured.items():
            out.setdefault(a.style, {}).setdefault(kind, []).append(m)
    pooled: dict[str, dict[str, Measured]] = {}
    for style, kinds in out.items():
        for kind, ms in kinds.items():
            n = sum(m.count for m in ms)
            spread = math.sqrt(sum(m.spread ** 2 * m.count for m in ms) / n)  # the means are ~0
            pooled.setdefault(style, {})[kind] = Measured(spread, max(m.bound for m in ms), n)
    return pooled


# --------------------------------------------------------------------------- differences


@dataclasses.dataclass
class Difference:
    """One row of the porting table: what each style does, and the tests that hold it to that."""

    topic: str
    cells: dict[str, str]  # style -> text; `code` in backticks
    tests: tuple[str, ...]


def _default(fn: Any, param: str) -> str:
    """The default of ``param`` in ``fn``'s signature, as code, or a note that there is none."""
    target = fn.__init__ if isinstance(fn, type) else fn
    parameter = inspect.signature(target).parameters[param]
    if parameter.default is inspect.Parameter.empty:
        return "no default: must be given"
    return f"`{param}={parameter.default!r}`"


def _takes(fn: Any, names: set[str]) -> list[str]:
    target = fn.__init__ if isinstance(fn, type) else fn
    return [p for p in inspect.signature(target).parameters if p in names]


def differences(measured: dict[str, dict[str, Measured]],
                layouts: dict[str, StyleParams] | None = None) -> list[Difference]:
    """The rows of the porting table: initialisers from ``measured`` (see :func:`pool`),
    layouts from the CNN's parameter trees (``layouts``, per style; built here at
    :data:`IN_SHAPE` when not given), defaults from the frameworks' signatures."""
    params = layouts or {s: p for (_, s), p in parameter_trees([LAYOUT_EXAMPLE], measure=False).items()}
    rules = {s: {l.canonical: l for l in p.leaves} for s, p in params.items()}

    def init_cell(style: str, kind: str) -> str:
        m = measured[style][kind]
        known = m.initialiser
        if known is None:
            return m.label
        if known.name == "zeros":
            return "zeros"
        return f"{known.name}: {known.detail} (measured std·√fan_in {m.spread:.3f})"

    def layout_cell(style: str, path: str, canonical: str) -> str:
        leaf = rules[style][path]
        shape = ", ".join(map(str, leaf.shape))
        if leaf.layout == "same layout":
            return f"`({shape})`: {canonical}, as canonical"
        return f"`({shape})`: {leaf.layout}"

    def inputs_cell(style: str) -> str:
        spec = MODELS[LAYOUT_EXAMPLE]
        module = importlib.import_module(f"zoo.{style}.{spec.name}")
        entry = module.init if style == "jax" else getattr(module, spec.class_name)
        given = _takes(entry, set(spec.inferred))
        if given:
            return f"given up front: `{given[0]}`"
        return "inferred from an example batch at `init`"

    padding = {
        "jax": f"`lax.conv_general_dilated`: {_default(jax.lax.conv_general_dilated, 'padding')}",
        "flax": f"`nn.Conv`: {_default(linen.Conv, 'padding')}",
        "nnx": f"`nnx.Conv`: {_default(nnx.Conv, 'padding')}",
        "haiku": f"`hk.Conv2D`: {_default(hk.Conv2D, 'padding')}",
        "equinox": f"`eqx.nn.Conv2d`: {_default(eqx.nn.Conv2d, 'padding')} (no padding)",
    }
    pooling = {
        "jax": f"`lax.reduce_window`: {_default(jax.lax.reduce_window, 'padding')}",
        "flax": f"`nn.avg_pool`: {_default(linen.avg_pool, 'padding')}",
        "nnx": f"`nnx.avg_pool`: {_default(nnx.avg_pool, 'padding')}",
        "haiku": f"`hk.avg_pool`: {_default(hk.avg_pool, 'padding')}",
        "equinox": f"`eqx.nn.AvgPool2d`: {_default(eqx.nn.AvgPool2d, 'padding')} (no padding)",
    }
    example = {s: f"`{rules[s]['conv1/kernel'].native}`" for s in STYLES}
    return [
        Difference("Default kernel initialiser", {s: init_cell(s, "kernel") for s in STYLES},
                   ("zoo/test_initialisers.py::test_default_initialiser",)),
        Difference("Default bias initialiser", {s: init_cell(s, "bias") for s in STYLES},
                   ("zoo/test_initialisers.py::test_default_initialiser",)),
        Difference("Dense kernels", {s: layout_cell(s, "dense2/kernel", "(in, out)") for s in STYLES},
                   ("tests/test_convert.py::test_layout_notes_describe_equinox_leaves",
                    "zoo/test_parity.py::test_round_trip_is_exact")),
        Difference("Conv kernels", {s: layout_cell(s, "conv1/kernel", "HWIO") for s in STYLES},
                   ("tests/test_convert.py::test_layout_notes_describe_equinox_leaves",
                    "zoo/test_parity.py::test_every_deterministic_path_matches_the_reference")),
        Difference("Conv biases", {s: layout_cell(s, "conv1/bias", "(out,)") for s in STYLES},
                   ("tests/test_convert.py::test_layout_notes_describe_equinox_leaves",)),
        Difference("Images", {s: ("one `CHW` image, and `in_shape` is `(C, H, W)`: `jax.vmap` over the batch"
                                  if s == "equinox" else "`NHWC` batches") for s in STYLES},
                   ("zoo/test_parity.py::test_every_deterministic_path_matches_the_reference",)),
        Difference("First dense layer after a flatten",
                   {s: layout_cell(s, "dense1/kernel", "rows in HWC order") for s in STYLES},
                   ("tests/test_convert.py::test_a_wrong_flatten_permutation_is_caught",)),
        Difference("Input sizes", {s: inputs_cell(s) for s in STYLES},
                   ("zoo/test_parity.py::test_parameter_and_state_trees_map_one_to_one",)),
        Difference("Conv padding default", padding, ("zoo/test_parity.py::test_every_deterministic_path_matches_the_reference",)),
        Difference("Pooling padding default", pooling, ("zoo/test_parity.py::test_every_deterministic_path_matches_the_reference",)),
        Difference("Randomness: how the step's key reaches the model", {
            "jax": "an argument: `apply(params, x, labels, key)`, split by hand (`jax.random.split`) for each "
                   "layer that draws",
            "flax": "the VAE's noise: an argument (`z_rng`, as Flax's VAE example); dropout: "
                    "`apply(..., rngs={'dropout': key})`, and each `nn.Dropout` draws with `self.make_rng`, "
                    "which folds the module's path and a count into the key",
            "nnx": "`model(x, rngs=nnx.Rngs(dropout=key))` at call time: the n-th draw on the stream uses "
                   "`fold_in(key, n)`",
            "haiku": "`apply(params, key, ...)`; the modules draw `hk.next_rng_key()`, the next key of "
                     "`hk.PRNGSequence(key)`, never `key` itself",
            "equinox": "a `key=` argument per example, `jax.random.split(key, batch)` under `jax.vmap`, split "
                       "by hand for each layer: the batch frameworks draw one mask for the batch",
        }, ("zoo/test_randomness.py::test_how_each_framework_derives_the_dropout_key",
            "zoo/test_randomness.py::test_the_same_draws_give_the_same_outputs",
            "zoo/test_randomness.py::test_the_vae_noise_by_its_law")),
        Difference("Randomness: the same key, other numbers", {
            "jax": "the reference draws from the key as given",
            "flax": "other masks than the reference's (the path is folded in); the VAE's noise is the "
                    "reference's (the key arrives as the argument)",
            "nnx": "other masks and noise: `fold_in(key, n)`",
            "haiku": "other masks and noise: the sequence's keys",
            "equinox": "other masks and noise: one key per example",
        }, ("zoo/test_randomness.py::test_the_same_draws_give_the_same_outputs",
            "zoo/test_randomness.py::test_dropout_draws_by_its_law",
            "tests/test_cli.py::test_compare_says_which_runs_drew_their_own_numbers")),
        *normalisation_rows(),
        *attention_rows(),
        *language_model_rows(),
        *sharding_rows(),
        *recurrence_rows(),
        Difference("Float64 parameters (`--precision float64`, x64 mode)", {
            "jax": "the reference's initialisers name `jnp.float32`: the adapter widens the parameters once, "
                   "after `init`",
            "flax": "`param_dtype=jnp.float64` in every layer (the default stays float32 under x64); "
                    "`nn.BatchNorm` creates `batch_stats` in float32 whatever `param_dtype` says",
            "nnx": "`param_dtype=jnp.float64` in every layer; `nnx.BatchNorm` creates its `BatchStat`s in "
                   "float32 whatever `param_dtype` says",
            "haiku": "parameters take the dtype of the example input given to `init`: float32 pixels give "
                     "float32 parameters even under x64",
            "equinox": "layers are created in float64 under x64 (`default_floating_dtype`), but "
                       "convolutions refuse a float32 input instead of promoting it: cast the images too",
        }, ("zoo/test_parity.py::test_float64_dtypes_as_each_framework_makes_them",
            "zoo/test_parity.py::test_fifty_float64_adam_steps_match_the_reference_to_1e_10")),
        Difference("Parameters and state", {
            "jax": f"a nested dict you build and pass: {example['jax']}",
            "flax": f"`init` returns `{{'params': ...}}`; the module holds none: {example['flax']}",
            "nnx": f"the module object holds them; `nnx.split` gives (graphdef, state): {example['nnx']}",
            "haiku": f"`hk.transform` gives pure `init`/`apply`; a flat dict by module path: "
                     f"{example['haiku']}",
            "equinox": f"the module is the pytree; `eqx.partition` splits out the arrays, which the "
                       f"adapter keeps in a flat dict by attribute path (cheap for `jax.jit` to flatten; "
                       f"`Model.as_module` rebuilds the module): {example['equinox']}",
        }, ("zoo/test_parity.py::test_parameter_and_state_trees_map_one_to_one",
            "zoo/test_parity.py::test_round_trip_is_exact")),
    ]


def normalisation_rows() -> list[Difference]:
    """BatchNorm and dropout: where state lives, how eval mode is chosen, how the key arrives."""
    resnet = "zoo/test_resnet.py::"
    return [
        Difference("BatchNorm: initial running statistics", {
            "jax": "mean 0, variance 1 (the canonical state)",
            "flax": "`batch_stats`: mean 0, variance 1",
            "nnx": "`nnx.BatchStat` variables: mean 0, variance 1",
            "haiku": "two `ExponentialMovingAverage` states, `hidden` 0 for the mean *and* the variance, "
                     "and a `counter`; canonical variance = `hidden + decay**counter`",
            "equinox": "`mode=\"batch\"`: hidden mean 0, variance 1, and a counter",
        }, (resnet + "test_running_statistics_start_at_mean_0_and_variance_1",
            resnet + "test_haiku_running_averages_start_at_zero_with_a_counter",
            "zoo/test_parity.py::test_state_round_trip")),
        Difference("BatchNorm: decay and epsilon", {
            "jax": "`momentum * old + (1 - momentum) * batch`; eps 1e-5",
            "flax": f"`nn.BatchNorm`: {_default(linen.BatchNorm, 'momentum')}, "
                    f"{_default(linen.BatchNorm, 'epsilon')}",
            "nnx": f"`nnx.BatchNorm`: {_default(nnx.BatchNorm, 'momentum')}, {_default(nnx.BatchNorm, 'epsilon')}",
            "haiku": f"`hk.BatchNorm`: `decay_rate` {_default(hk.BatchNorm, 'decay_rate')}, "
                     f"{_default(hk.BatchNorm, 'eps')}",
            "equinox": f"`eqx.nn.BatchNorm`: {_default(eqx.nn.BatchNorm, 'momentum')}, "
                       f"{_default(eqx.nn.BatchNorm, 'eps')}; its default mode `\"ema\"` normalises "
                       "training batches with the running averages: use `mode=\"batch\"`",
        }, (resnet + "test_every_framework_is_configured_with_the_same_decay_and_epsilon",)),
        Difference("BatchNorm: debiasing at eval", {
            "jax": "none: the running statistics as they are",
            "flax": "none", "nnx": "none",
            "haiku": "divides by `1 - decay**t`: eval outputs differ by O(1) after one update, "
                     "< 1e-4 once `decay**t` is negligible",
            "equinox": "divides mean and variance by `1 - decay**t` (the variance having started at 1): "
                       "the same gap, vanishing the same way",
        }, (resnet + "test_debiased_eval_differs_then_vanishes",
            resnet + "test_linen_and_nnx_eval_has_no_debiasing_gap",
            "zoo/test_parity.py::test_every_deterministic_path_matches_the_reference")),
        Difference("BatchNorm: batch variance", {
            "jax": "`E[x²] - E[x]²`, clamped at 0 (Linen's order of operations)",
            "flax": "`E[x²] - E[x]²` clamped at 0 (`use_fast_variance=True`)",
            "nnx": "as Linen",
            "haiku": "`E[x²] - E[x]²`, not clamped; gradients differ in the last bit (summation order)",
            "equinox": "`E[(x - E[x])²]`, clamped: a two-pass variance, more FLOPs",
        }, ("zoo/test_parity.py::test_every_deterministic_path_matches_the_reference",
            "tests/test_bench.py::test_batchnorm_flops_are_explained_only_by_identical_linear_algebra")),
        Difference("BatchNorm under bfloat16 (`--precision bfloat16`)", {
            "jax": "the statistics are taken in float32 and the running averages stay float32 (the state is "
                   "never cast)",
            "flax": "`dtype=bfloat16` computes in bfloat16, the statistics in float32 "
                    "(`force_float32_reductions`); `batch_stats` stay float32",
            "nnx": "as Linen",
            "haiku": "a jmp policy per module class (`hk.mixed_precision.push_policy`; `hk.LayerNorm` needs "
                     "one too, or it takes its statistics in bfloat16): the model's bfloat16 "
                     "policy alone reaches `hk.BatchNorm`, whose running averages then come back bfloat16; the "
                     "zoo gives `hk.BatchNorm` a float32 policy, as Haiku's ImageNet example does",
            "equinox": "the adapter casts the module's arrays to bfloat16; `eqx.nn.BatchNorm` normalises eval "
                       "batches with the running statistics as they are, so in evaluation the adapter casts those "
                       "too, or float32 would reach the next bfloat16 layer; in training they stay float32",
        }, (resnet + "test_haiku_batchnorm_keeps_float32_statistics_in_a_bfloat16_run",
            "zoo/test_features.py::test_bfloat16_forward_matches_reference",
            "tests/test_reliability.py::test_compare_in_bfloat16_with_batchnorm")),
        Difference("Where state lives", {
            "jax": "a second dict you pass in and get back: `apply(params, state, ...) -> (out, state)`",
            "flax": "the `batch_stats` collection: `apply(..., mutable=['batch_stats'])` returns it",
            "nnx": "inside the module, updated in place; `nnx.split(model, nnx.Param, nnx.BatchStat)`",
            "haiku": "`hk.transform_with_state`: `apply(params, state, rng, ...) -> (out, state)`",
            "equinox": "an `eqx.nn.State` from `eqx.nn.make_with_state`, threaded through every call "
                       "(and invalidated once used)",
        }, ("zoo/test_parity.py::test_parameter_and_state_trees_map_one_to_one",
            "tests/test_checkpoint.py::test_a_haiku_checkpoint_resumes_in_equinox_with_the_same_running_statistics")),
        Difference("Eval mode", {
            "jax": "a `train` argument",
            "flax": "`use_running_average=not train` and `deterministic=not train`, passed at call time",
            "nnx": "`model.eval()` / `model.train()`: static attributes, so one graphdef per mode",
            "haiku": "an `is_training` argument",
            "equinox": "`eqx.nn.inference_mode(model)`: a field, so one static part per mode",
        }, (resnet + "test_eval_mode_is_selected_in_each_framework_s_own_way",)),
        Difference("Dropout: how the key reaches the layer", {
            "jax": "`dropout(key, rate, x)`: a key argument per call",
            "flax": "`nn.Dropout(rate)(x, deterministic=not train)` draws `self.make_rng('dropout')` from "
                    "`apply(..., rngs={'dropout': key})`",
            "nnx": "`self.dropout(x, rngs=rngs)` with `nnx.Rngs(dropout=key)` given at call time (or the layer "
                   "keeps an RNG stream of its own)",
            "haiku": "`hk.dropout(hk.next_rng_key(), rate, x)`: a function, not a module",
            "equinox": "`self.dropout(x, key=key)`, one key per example under `jax.vmap`",
        }, ("zoo/test_randomness.py::test_how_each_framework_derives_the_dropout_key",
            "zoo/test_randomness.py::test_dropout_draws_by_its_law")),
        Difference("Dropout: rate and the deterministic flag", {
            "jax": "`rate`: the probability to drop",
            "flax": f"`nn.Dropout(rate)`; {_default(linen.Dropout, 'deterministic')}, given at call time",
            "nnx": "`nnx.Dropout(rate)`; `deterministic` set by `model.eval()`",
            "haiku": "`hk.dropout(rng, rate, x)`; no flag: do not call it in eval",
            "equinox": f"`eqx.nn.Dropout(p)`; {_default(eqx.nn.Dropout, 'inference')}",
        }, ("zoo/test_randomness.py::test_dropout_draws_by_its_law",)),
    ]


def language_model_rows() -> list[Difference]:
    """The GPT: the causal mask, the key/value cache, tying, where the logits are scaled, scanned layers."""
    gpt = "zoo/test_gpt.py::"
    return [
        Difference("Causal mask", {
            "jax": "`key_position <= query_position`, then `jnp.where(mask, logits, finfo.min)`",
            "flax": "`nn.make_causal_mask(tokens)`, `(batch, 1, len, len)`, as `mask=`; none when decoding "
                    "(the cache masks itself)",
            "nnx": "`nnx.make_causal_mask(tokens)`, or `is_causal=True` (the same outside decoding); never "
                   "`is_causal` when decoding: it then attends to the first position only (flax#5591)",
            "haiku": "`jnp.tril(jnp.ones((1, 1, len, len)))`: the mask must have the logits' rank",
            "equinox": "`jnp.tril(jnp.ones((len, len), bool))`, exactly `(q, k)` (or `(heads, q, k)`), per "
                       "example",
        }, (gpt + "test_nnx_is_causal_during_decode_attends_to_the_first_position_only",
            gpt + "test_haiku_needs_a_four_dimensional_mask",
            gpt + "test_cached_decoding_gives_the_full_forward_logits")),
        Difference("Key/value cache: where it lives, its layout and position", {
            "jax": "a dict per layer `{key, value}`, `(batch, max_len, heads, head_dim)`, passed in and "
                   "returned, written at the `index` given",
            "flax": "`decode=True`: the `cache` collection, `cached_key`/`cached_value` `(batch, max_len, heads, "
                    "head_dim)` and a scalar `cache_index` it advances itself; made by an `init` at full "
                    "length, then one token per `apply(..., mutable=['cache'])` (flax#1317); the position "
                    "embedding gets the positions",
            "nnx": "`model.init_cache(batch, max_len)`: `nnx.Cache` variables of the same layout in each "
                   "attention; `decode=True`, one token per call",
            "haiku": "none built in: a `hk.MultiHeadAttention` subclass with the same parameters keeps the "
                     "keys and values in `hk.get_state`/`hk.set_state` (`transform_with_state`), written at "
                     "the positions given; a whole prompt can go in at once",
            "equinox": "none built in (equinox #343, #690, #704 closed): the model takes and returns a "
                       "`(keys, values)` pair per layer, `(max_len, heads, head_dim)` per example, written at "
                       "`index`, using the attention's own projections",
        }, (gpt + "test_each_frameworks_cache_layout", gpt + "test_cached_decoding_gives_the_full_forward_logits",
            gpt + "test_greedy_generations_are_the_same_in_every_style")),
        Difference("Tied token embedding and logits", {
            "jax": "`x @ params['embed']['embedding'].T`",
            "flax": "`self.embed.attend(x)` (`nn.Embed`)",
            "nnx": "`self.embed.attend(x)` (`nnx.Embed`)",
            "haiku": "`x @ self.embed.embeddings.T`: `hk.Embed.embeddings` gets the parameter again",
            "equinox": "`eqx.nn.Shared((embedding, head), where, get)`: the head's weight is a placeholder "
                       "that `shared()` fills with the embedding's; its gradient lands on the embedding",
        }, (gpt + "test_the_logits_are_tied_to_the_token_embedding",
            "zoo/test_parity.py::test_parameter_and_state_trees_map_one_to_one")),
        Difference("Where the attention logits are scaled", {
            "jax": "the query by `1/sqrt(head_dim)` before the product (Linen's order)",
            "flax": "the query before the product; masked with `finfo.min`; the softmax in the computation dtype",
            "nnx": "without attention-weight dropout, `jax.nn.dot_product_attention`: the logits after the "
                   "product, the softmax in float32",
            "haiku": "the logits after the product; masked with `-1e30`",
            "equinox": "the query before the product; the softmax in float32 at least",
        }, ("zoo/test_parity.py::test_every_deterministic_path_matches_the_reference",
            "zoo/test_parity.py::test_fifty_float64_adam_steps_match_the_reference_to_1e_10")),
        Difference("Scan over layers: the stacked axis (`--scan-layers`)", {
            "jax": "`jax.lax.scan` over `params['blocks']`, every leaf with a leading layer axis",
            "flax": "`nn.scan(Block, variable_axes={'params': 0, 'cache': 0}, split_rngs={'params': True, "
                    "'dropout': True}, in_axes=nn.broadcast, length=depth, metadata_params=...)`: "
                    "`params/blocks/...`",
            "nnx": "`nnx.split_rngs` + `nnx.vmap` build the stacked blocks, `nnx.scan` runs them (inside "
                   "`nnx.split_rngs` when the dropout `rngs` come at call time); the `nnx.Cache` stacks too",
            "haiku": "`hk.layer_stack(depth, name='blocks')`: `gpt/blocks/block/~/...`; its `init` returns "
                     "the state after one apply (zero a cache made by it)",
            "equinox": "`eqx.filter_vmap(Block)(keys)`, then `jax.lax.scan` over the arrays of "
                       "`eqx.partition`, `eqx.combine` inside",
        }, ("zoo/test_parity.py::test_round_trip_is_exact", gpt + "test_scanned_and_unrolled_are_the_same_network",
            "zoo/test_randomness.py::test_dropout_draws_by_its_law")),
        Difference("Default embedding initialiser", {
            "jax": "none: the GPT draws N(0, 0.02), GPT-2's, in every style",
            "flax": "`nn.Embed`: variance scaling 1, fan-in, normal: N(0, 1/features)",
            "nnx": "`nnx.Embed`: as Linen",
            "haiku": "`hk.Embed`: truncated normal, stddev 1 (cut at 2: std 0.88)",
            "equinox": "`eqx.nn.Embedding`: N(0, 1)",
        }, ("zoo/test_initialisers.py::test_default_embedding_initialiser",)),
    ]


def sharding_rows() -> list[Difference]:
    """Model parallelism: where each framework says where a parameter lives, and how to read it back."""
    parallel = "tests/test_parallel.py::"
    return [
        Difference("Sharding: where a parameter names its axes", {
            "jax": "nowhere on the array: a `PartitionSpec` tree beside `init` (`logical_axes`), "
                   "`('embed', 'heads', 'kv')` for a query kernel",
            "flax": "`nn.with_logical_partitioning(init, names)` on each initialiser: `init` returns "
                    "`LogicallyPartitioned` boxes (`nn.unbox` them); `nn.get_partition_spec` reads the names, "
                    "`nn.logical_axis_rules` maps them to the mesh",
            "nnx": "`nnx.with_partitioning(init, names)`: the variable's `out_sharding` metadata (called "
                   "`sharding` before 0.12.4); by default each variable is sharded as it is made, which needs "
                   "a mesh and a rule for every name: the files pass `eager_sharding=False` and the model is "
                   "placed afterwards (`nnx.get_partition_spec` under `nnx.logical_axis_rules`, `nnx.update`)",
            "haiku": "no metadata (declined, dm-haiku#481): rules by module path, `('/attn/query/w$', "
                     "('embed', 'heads'))`, over `hk.data_structures.map`; heads and head width are one axis",
            "equinox": "no metadata (equinox#825): rules by attribute path over the module's arrays, for "
                       "`eqx.filter_shard`; weights are `(out, in)`, so a query weight is `('heads', 'embed')`",
        }, (parallel + "test_every_style_places_every_parameter_where_the_reference_does",
            parallel + "test_sharded_on_four_devices")),
        Difference("Sharding: the layer axis of a scanned stack", {
            "jax": "the spec tree gets a leading `'layers'` under `params['blocks']`",
            "flax": "`nn.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})` prepends it to every box",
            "nnx": "`transform_metadata={nnx.PARTITION_NAME: 'layers'}` on the `nnx.vmap` that builds the "
                   "stack and on every `nnx.scan` over it, or a layer's spec loses or misplaces the axis "
                   "(flax#5112)",
            "haiku": "`hk.layer_stack` adds the axis silently: the rules see a leaf of one more dimension",
            "equinox": "`eqx.filter_vmap` adds the axis silently: the rules see a leaf of one more dimension",
        }, (parallel + "test_every_style_places_every_parameter_where_the_reference_does",
            parallel + "test_two_processes_shard_as_one_process_with_four_devices")),
        Difference("Sharding: what changes in training and checkpoints", {
            "jax": "nothing in the model: the loop puts the parameters and Adam's moments (`optax.tree_map_params`) "
                   "where the specs say and `jax.jit` keeps them there; XLA inserts the collectives. A "
                   "checkpoint holds whole canonical arrays (gathered from the devices, and from every host): "
                   "any style resumes it on any mesh",
            "flax": "as plain JAX, from the boxes' names; checkpoints as plain JAX's",
            "nnx": "as plain JAX, from the variables' metadata; checkpoints as plain JAX's",
            "haiku": "as plain JAX, from the rules; checkpoints as plain JAX's",
            "equinox": "as plain JAX, from the rules; checkpoints as plain JAX's",
        }, (parallel + "test_sharded_on_four_devices", parallel + "test_compare_on_a_two_by_two_mesh")),
    ]


def attention_rows() -> list[Difference]:
    """Attention, LayerNorm and GELU: layouts, bias defaults, masks and keys, batch or example."""
    vit = "zoo/test_vit.py::"
    return [
        Difference("Attention: kernel layout and biases", {
            "jax": "query/key/value kernels `(in, heads, head_dim)` and biases `(heads, head_dim)`, output "
                   "`(heads, head_dim, out)` (Linen's)",
            "flax": f"`nn.MultiHeadDotProductAttention`: as canonical; biases on "
                    f"({_default(linen.MultiHeadDotProductAttention, 'use_bias')})",
            "nnx": f"`nnx.MultiHeadAttention`: as Linen ({_default(nnx.MultiHeadAttention, 'use_bias')})",
            "haiku": f"`hk.MultiHeadAttention`: `(in, heads·key_size)`, reshaped; the output projection is "
                     f"named `linear`; {_default(hk.MultiHeadAttention, 'with_bias')}; no default `w_init` "
                     "(it raises)",
            "equinox": f"`eqx.nn.MultiheadAttention`: `query_proj.weight (heads·qk_size, in)`, transposed and "
                       f"reshaped; `output_proj`; no biases unless asked "
                       f"({_default(eqx.nn.MultiheadAttention, 'use_query_bias')})",
        }, (vit + "test_attention_kernel_layouts_and_bias_defaults",
            vit + "test_a_wrong_head_split_is_caught",
            "zoo/test_parity.py::test_round_trip_is_exact")),
        Difference("Attention: a batch or one example", {
            "jax": "a batch `(batch, seq, features)`",
            "flax": "a batch", "nnx": "a batch", "haiku": "a batch",
            "equinox": "one example `(seq, features)`: `jax.vmap` it (a batch fails to unpack)",
        }, (vit + "test_attention_takes_a_batch_or_one_example",)),
        Difference("Attention: the mask and the dropout key", {
            "jax": "no mask in the ViT; dropout on the sublayer's output, none on the attention weights "
                   "(ViT's default)",
            "flax": "`mask=` broadcastable to `(batch, heads, q, k)`; weight dropout from `dropout_rng=` with "
                    f"`deterministic`, one mask shared by the whole batch by default "
                    f"({_default(linen.MultiHeadDotProductAttention, 'broadcast_dropout')})",
            "nnx": "`mask=` as Linen; `rngs=` and `deterministic`; `decode` must be given; without weight "
                   "dropout its default `attention_fn` hands over to `jax.nn.dot_product_attention`, which "
                   "scales after the product and takes the softmax in float32 even under x64 (the zoo's float64 "
                   "runs give it Flax's own formula as `attention_fn`: `styles.float64_attention`)",
            "haiku": "`mask` with as many dimensions as its logits, `(batch, heads, q, k)`; query, key and value "
                     "all given; logits scaled after the product; no dropout on the attention weights at all",
            "equinox": "`mask` `(q, k)` per example; `key=`, split once per head, with `dropout_p` and `inference`",
        }, (vit + "test_how_the_mask_reaches_the_attention",
            vit + "test_how_the_dropout_key_reaches_the_attention",
            vit + "test_nnx_default_attention_loses_float64",
            "zoo/test_randomness.py::test_dropout_draws_by_its_law")),
        Difference("GELU", {
            "jax": "`jax.nn.gelu(x, approximate=False)`: the exact erf form, PyTorch's default",
            "flax": f"`nn.gelu`: {_default(linen.gelu, 'approximate')}, the tanh form, up to 4.7e-4 off",
            "nnx": f"`nnx.gelu`: {_default(nnx.gelu, 'approximate')}",
            "haiku": f"`jax.nn.gelu`: {_default(jax.nn.gelu, 'approximate')}",
            "equinox": f"`jax.nn.gelu`: {_default(jax.nn.gelu, 'approximate')}",
        }, (vit + "test_gelu_defaults_to_the_tanh_approximation",)),
        Difference("LayerNorm: epsilon and variance", {
            "jax": "eps 1e-6, two-pass variance `E[(x - E[x])²]`; the ViT gives every style eps 1e-6 and "
                   "leaves each framework its own variance (the same value, rounded otherwise)",
            "flax": f"`nn.LayerNorm`: {_default(linen.LayerNorm, 'epsilon')}, "
                    f"{_default(linen.LayerNorm, 'use_fast_variance')} (`E[x²] - E[x]²`)",
            "nnx": f"`nnx.LayerNorm`: {_default(nnx.LayerNorm, 'epsilon')}, "
                   f"{_default(nnx.LayerNorm, 'use_fast_variance')}",
            "haiku": f"`hk.LayerNorm`: {_default(hk.LayerNorm, 'eps')}, two-pass; `axis`, `create_scale` and "
                     "`create_offset` have no defaults",
            "equinox": f"`eqx.nn.LayerNorm`: {_default(eqx.nn.LayerNorm, 'eps')}, two-pass, on one token: "
                       "`jax.vmap` it over the sequence",
        }, (vit + "test_layernorm_epsilon_and_variance_defaults",)),
    ]


def recurrence_rows() -> list[Difference]:
    """LSTM cells and scans: gate layouts, biases, Haiku's forget offset, carries, scan idioms."""
    lstm = "zoo/test_lstm.py::"
    return [
        Difference("LSTM: gate layout and order", {
            "jax": "a kernel per gate i, f, g, o: input `i*` (in, hidden), hidden `h*` (hidden, hidden)",
            "flax": "`nn.LSTMCell`: a `Dense` per gate, `ii`, `if`, `ig`, `io` and `hi`, `hf`, `hg`, `ho`, as "
                    "canonical (`OptimizedLSTMCell` keeps these names but fuses the matmuls: not bitwise)",
            "nnx": "`nnx.LSTMCell`: as Linen, but the forget gate's input kernel is `if_` (`if` is a keyword)",
            "haiku": "`hk.LSTM`: one `Linear` over `[x, h]`, `(in + hidden, 4·hidden)`, columns in gate order "
                     "**i, g, f, o**; its one matmul sums in another order (rounding, not bitwise)",
            "equinox": "`eqx.nn.LSTMCell`: PyTorch's `weight_ih (4·hidden, in)`, `weight_hh (4·hidden, hidden)`, "
                       "rows in gate order i, f, g, o",
        }, (lstm + "test_gate_layouts_as_each_framework_makes_them",
            lstm + "test_gate_order_haiku_i_g_f_o_equinox_i_f_g_o",
            lstm + "test_a_wrong_gate_order_or_a_missing_offset_is_caught")),
        Difference("LSTM: bias placement and forget-gate offset", {
            "jax": "a bias on the hidden side only: `x @ W_ix + (h @ W_hx + b_x)`",
            "flax": "the hidden `Dense`s `h*` carry the bias, the input ones none",
            "nnx": "as Linen",
            "haiku": "one bias on the concatenated `Linear`, and the cell computes `sigmoid(f + 1)`: the "
                     "converter stores the forget bias as the canonical one minus 1 (for parameters, not "
                     "gradients or Adam moments; one rounding each way)",
            "equinox": "one bias added after both matmuls (PyTorch's two, `b_ih + b_hh`, would be summed)",
        }, (lstm + "test_haiku_adds_one_to_the_forget_gate",
            lstm + "test_a_wrong_gate_order_or_a_missing_offset_is_caught",
            "zoo/test_parity.py::test_round_trip_is_exact")),
        Difference("LSTM: the carry", {
            "jax": "`(c, h)`, zeros",
            "flax": "`(c, h)`; `nn.RNN` builds it with `initialize_carry` (zeros in `param_dtype`)",
            "nnx": "`(c, h)`; `nnx.RNN` keeps an RNG stream for its carry unless `rngs=False`, and then needs "
                   "`initial_carry`",
            "haiku": "`LSTMState(hidden, cell)`: h first; `initial_state` is float32 whatever the input's dtype",
            "equinox": "`(h, c)`: the reverse of Flax's",
        }, (lstm + "test_carry_order_differs",)),
        Difference("Recurrent scan idiom", {
            "jax": "`jax.lax.scan` over time-major rows",
            "flax": "`nn.RNN(cell)`: batch-major `(batch, time, features)`, scans axis 1",
            "nnx": "`nnx.RNN(cell)`: batch-major, as Linen",
            "haiku": "`hk.dynamic_unroll(core, x, state)`: **time-major** unless `time_major=False`",
            "equinox": "no RNN layer: the cell is one step on one example; `jax.lax.scan` it yourself",
        }, (lstm + "test_scan_idioms_are_the_reference_scan",
            "zoo/test_parity.py::test_fifty_adam_steps_match_reference")),
    ]


# --------------------------------------------------------------------------- code


def code_view(model: str) -> dict[str, Any]:
    """The aligned, highlighted rows of every style's file, with the lines that
    differ from the reference and from the anchor's line on the same row marked."""
    sources = {s: catalogue.source_path(model, s).read_text() for s in STYLES}
    lines = {s: text.splitlines() for s, text in sources.items()}
    formatter = HtmlFormatter(nowrap=True)
    html = {s: [Markup(pygments.format(t, formatter).rstrip("\n")) for t in catalogue.token_lines(text)]
            for s, text in sources.items()}
    from_reference = {s: (catalogue.differs_from_reference(lines[s], lines[REFERENCE]) if s != REFERENCE
                          else set()) for s in STYLES}
    rows = []
    counts = {s: {"lines": len(lines[s]), "ref": len(from_reference[s]), "row": 0} for s in STYLES}
    for row in catalogue.align({s: lines[s] for s in ALIGN_ORDER}, ANCHOR):
        anchor_text = lines[ANCHOR][row[ANCHOR]].strip() if ANCHOR in row else None
        cells = []
        for s in STYLES:
            if s not in row:
                cells.append({"style": s, "pad": True})
                continue
            i = row[s]
            text = lines[s][i].strip()
            off_row = s != ANCHOR and bool(text) and text != anchor_text
            counts[s]["row"] += off_row
            cells.append({"style": s, "pad": False, "number": i + 1, "html": html[s][i],
                          "ref": i in from_reference[s], "row": off_row})
        rows.append(cells)
    return {"rows": rows, "counts": counts}


# --------------------------------------------------------------------------- results


def _mtime(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


# What the pages read of each kind of result; a file without it is refused, not half shown.
COMPARE_ROW_KEYS = ("style", "params", "train_loss", "test_loss", "test_accuracy", "step_ms", "step_ratio",
                    "max_param_diff")


def _read_json(path: Path, what: str, valid: Callable[[Any], str | None]) -> Any:
    """The JSON in ``path`` (None when there is no such file), checked by ``valid``, which
    says what is wrong; a file that is not what ``what`` writes is refused in one line."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        problem = f"not valid JSON ({str(error).splitlines()[0][:120]})"
    else:
        problem = valid(data)
        if problem is None:
            return data
    raise ZooError(f"--runs: {path} is {problem}; it is not what {what} writes: move it away, or run "
                   f"{what} again")


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value))


def _fields_problem(row: dict[str, Any], strings: Sequence[str], numbers: Sequence[str]) -> str | None:
    for key in strings:
        if key in row and not isinstance(row[key], str):
            return f"a row whose {key} is {type(row[key]).__name__}, not text"
    for key in numbers:
        if key in row and not _number_or_null(row[key]):
            return f"a row whose {key} is {row[key]!r:.40}, not a finite number or null"
    return None


def _compare_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not data["rows"]:
        return "not an object with a non-empty list of rows"
    for row in data["rows"]:
        if not isinstance(row, dict) or not set(COMPARE_ROW_KEYS) <= set(row):
            missing = sorted(set(COMPARE_ROW_KEYS) - set(row)) if isinstance(row, dict) else ["everything"]
            return f"a row without {', '.join(missing)}"
        problem = _fields_problem(row, ("style",), [k for k in COMPARE_ROW_KEYS if k != "style"])
        if problem:
            return problem
    if not isinstance(data.get("config", {}), dict):
        return "an object whose config is not an object"
    for key in ("dataset", "precision"):
        if not isinstance(data.get(key, ""), str):
            return f"an object whose {key} is not text"
    return None


def _bench_problem(data: Any) -> str | None:
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r and "style" in r
                                             for r in rows):
        return "not a list of rows, each with a model and a style"
    for row in rows:
        problem = _fields_problem(row, ("model", "style", "pattern", "api", "device", "precision"),
                                  ("batch_size", "step_ms", "step_ratio", "compile_s"))
        if problem:
            return problem
        if "flops_equal" in row and not isinstance(row["flops_equal"], (bool, type(None))):
            return "a row whose flops_equal is not true, false or null"
    return None


def _metrics_problem(data: Any) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("final", {}), dict):
        return "not an object with a final object of metrics"
    if not all(isinstance(k, str) and _number_or_null(v) for k, v in data.get("final", {}).items()):
        return "an object whose final metrics are not all finite numbers or null"
    if not isinstance(data.get("dataset", ""), str):
        return "an object whose dataset is not text"
    return None


class Assets:
    """The images a page shows, copied into the site so that it stands alone.

    :meth:`copy` only notes a file and returns its name in the site; :meth:`write`
    copies them all, once every result has been read and found whole.
    """

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}

    def copy(self, src: Path, name: str) -> str:
        self.files[name] = src
        return f"img/{name}"

    def write(self, out: Path) -> None:
        for name, src in self.files.items():
            (out / "img").mkdir(exist_ok=True)
            shutil.copyfile(src, out / "img" / name)


def results(model: str, runs: Path, assets: Assets) -> dict[str, Any]:
    """What ``zoo compare``, ``zoo bench`` and ``zoo train`` left under ``runs`` for ``model``."""
    compares = []
    for path in sorted(runs.glob(f"compare-{model}-*.json")):
        data = _read_json(path, f"zoo compare {model}", _compare_problem)
        if data is not None:
            compares.append({"file": path.name, "when": _mtime(path), "dataset": data.get("dataset", "?"),
                             "precision": data.get("precision", "?"), "config": data.get("config") or {},
                             "rows": data["rows"]})
    bench_dir = runs / "bench"
    bench_rows = _read_json(bench_dir / "bench.json", "zoo bench", _bench_problem)
    bench = None
    if isinstance(bench_rows, dict):
        bench_rows = bench_rows.get("rows")
    if isinstance(bench_rows, list):
        rows = [r for r in bench_rows if isinstance(r, dict) and r.get("model") == model]
        if rows:
            bench = {"rows": rows, "when": _mtime(bench_dir / "bench.json"),
                     "device": rows[0].get("device", ""), "image": None, "markdown": None}
            if (bench_dir / "bench.png").is_file():
                bench["image"] = assets.copy(bench_dir / "bench.png", "bench.png")
            if (bench_dir / "bench.md").is_file():
                bench["markdown"] = assets.copy(bench_dir / "bench.md", "bench.md")
    trained = []
    for style in STYLES:
        for folder in sorted(runs.glob(f"{model}-{style}-*")):
            if not folder.is_dir():
                continue
            metrics = _read_json(folder / "metrics.json", f"zoo train {model} --style {style}", _metrics_problem)
            if metrics is None:
                continue
            entry = {"style": style, "folder": folder.name, "dataset": metrics.get("dataset", "?"),
                     "final": metrics.get("final") or {}, "when": _mtime(folder / "metrics.json"),
                     "curves": None, "samples": None}
            if (folder / "curves.png").is_file():
                entry["curves"] = assets.copy(folder / "curves.png", f"{folder.name}-curves.png")
            if (folder / "samples.png").is_file():
                entry["samples"] = assets.copy(folder / "samples.png", f"{folder.name}-samples.png")
            trained.append(entry)
    return {"compare": compares, "bench": bench, "trained": trained}


# --------------------------------------------------------------------------- tests cited


def repo_root() -> Path:
    return catalogue.source_path(NAMES[0], STYLES[0]).parents[2]


def _shape_text(shape: tuple) -> str:
    """``(8, 128)``; a split leaf's parts of several shapes, ``(8, 128) ×4, (128, 128) ×4``."""
    if shape and isinstance(shape[0], tuple):
        runs: list[list] = []
        for part in shape:
            if runs and runs[-1][0] == part:
                runs[-1][1] += 1
            else:
                runs.append([part, 1])
        return ", ".join(_shape_text(p) + (f" ×{n}" if n > 1 else "") for p, n in runs)
    return f"({', '.join(map(str, shape))})"


def test_source(name: str) -> str | None:
    """The source of the test ``path::function``; None when the file is not here (an
    installed package has ``zoo/`` but not ``tests/``). A test named on the page
    that its file lacks is an error: the page would cite a check that does not exist."""
    path, _, function = name.partition("::")
    file = repo_root() / path
    if not file.is_file():
        return None
    text = file.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            return "\n".join(text.splitlines()[start - 1:node.end_lineno])
    raise ValueError(f"the site cites {name}, but {path} has no function {function}")


def test_anchor(name: str) -> str:
    return "test-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


# --------------------------------------------------------------------------- building


def _environment():
    env = jinja2.Environment(loader=jinja2.PackageLoader("shared", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)

    def ticks(text: str) -> Markup:
        parts = str(text).split("`")
        return Markup("").join(escape(p) if k % 2 == 0 else Markup("<code>") + escape(p) + Markup("</code>")
                               for k, p in enumerate(parts))

    def number(value: Any, spec: str = ".4f") -> str:
        if value is None or isinstance(value, jinja2.Undefined):  # a column an older zoo did not write
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "no"
        try:
            return format(value, spec)
        except (TypeError, ValueError):
            return str(value)

    env.filters.update(ticks=ticks, number=number, anchor=test_anchor, shape=_shape_text)
    env.globals.update(TITLES=TITLES, COLOURS=COLOURS, STYLES=STYLES, MODELS=NAMES, ANCHOR=ANCHOR,
                       REFERENCE=REFERENCE, DESCRIPTIONS=DESCRIPTIONS)
    return env


def _cited(rows: Sequence[Difference]) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(t for row in rows for t in row.tests))
    cited = []
    for name in names:
        source = test_source(name)
        html = Markup(pygments.highlight(source, PythonLexer(), HtmlFormatter(nowrap=True))) if source else None
        cited.append({"name": name, "html": html})
    return cited




def build(out: str | Path = "site", runs: str | Path = "runs", models: Sequence[str] = NAMES, *,
          force: bool = False) -> list[Path]:
    """Write ``index.html``, one page per model, the CSS and the images; return the pages. An earlier
    site in ``out`` is replaced only with ``force``; a folder holding anything else, never."""
    given = files.output_dir(out, "--out")
    # A link to a folder: the new site replaces the folder it points to, and the link stays.
    out = given.resolve() if given.is_symlink() else given
    if out.exists() and Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ZooError(f"--out {given} is the current folder or holds it, and building replaces the whole "
                       "folder; give a folder for the site, e.g. --out site")
    runs = Path(runs)
    if runs.exists() and not runs.is_dir():
        raise ZooError(f"--runs {runs} is a file; give the folder zoo compare, bench and train write to")
    if runs.exists():
        files.input_path(runs, "--runs", folder=True)
    strangers = sorted(p.name for p in out.iterdir() if not _site_entry(p)) if out.is_dir() else []
    strangers += sorted(f"img/{p.name}" for p in (out / "img").iterdir() if not _image_entry(p)) \
        if (out / "img").is_dir() and not (out / "img").is_symlink() else []
    if strangers:
        raise ZooError(f"--out {given} holds files the site does not write ({', '.join(strangers[:3])}"
                       f"{', ...' if len(strangers) > 3 else ''}), and building replaces the whole folder; "
                       "give an empty or new folder, or the folder of an earlier zoo site")
    earlier = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    # The lock beside the folder: building replaces the folder itself.
    with files.claimed(out, "--out", force=force, writes=earlier, lock=out.parent / f".{out.name}{files.LOCK_NAME}"):
        assets = Assets()
        found = {model: results(model, runs, assets) for model in models}  # every result file read and checked
        # Everything is written into a new folder beside OUT, which takes OUT's place only once
        # complete: a failure half-way (a full disk) leaves the earlier site as it was.
        with files.atomic_folder(out) as tmp:
            pages = _write_site(tmp, runs, models, found, assets)
    return [out / page.relative_to(tmp) for page in pages]


def _site_entry(path: Path) -> bool:
    """Whether ``path`` (in --out) is one of the files a build writes: a page, the CSS, the images."""
    if path.is_symlink():
        return False
    return ((path.name in ("index.html", "site.css") and path.is_file()) or (path.name == "img" and path.is_dir())
            or (path.suffix == ".html" and path.stem in NAMES and path.is_file()))


def _image_entry(path: Path) -> bool:
    """Whether ``path`` (in --out/img) is a file :class:`Assets` writes."""
    return (path.is_file() and not path.is_symlink()
            and (path.name in ("bench.png", "bench.md") or path.name.endswith(("-curves.png", "-samples.png"))))


def _write_site(out: Path, runs: Path, models: Sequence[str], found: dict[str, dict[str, Any]],
                assets: Assets) -> list[Path]:
    env = _environment()
    assets.write(out)
    built = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    css = (env.loader.get_source(env, "site.css")[0] + "\n/* pygments */\n"
           + HtmlFormatter(style="default").get_style_defs([".code td.src", "pre.hl"]))
    write_text(out / "site.css", css)
    trees = parameter_trees(models)
    layouts = ({s: trees[LAYOUT_EXAMPLE, s] for s in STYLES} if LAYOUT_EXAMPLE in models
               else {s: p for (_, s), p in parameter_trees([LAYOUT_EXAMPLE], measure=False).items()})
    common = {"built": built, "runs": str(runs), "models": list(models)}
    pages = []
    for model in models:
        params = {s: trees[model, s] for s in STYLES}
        rows = differences(pool(params.values()), layouts)
        page = env.get_template("model.html").render(
            model=model, code=code_view(model), params=params, differences=rows, cited=_cited(rows),
            results=found[model], in_shape=registry.example_shape(model, IN_SHAPE), known=KNOWN_INITIALISERS,
            **common)
        write_text(out / f"{model}.html", page)
        pages.append(out / f"{model}.html")
    rows = differences(pool(trees.values()), layouts)
    index = env.get_template("index.html").render(differences=rows, cited=_cited(rows), **common)
    write_text(out / "index.html", index)
    return [out / "index.html", *pages]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("site", help="write the static HTML catalogue (every style side by side)",
                       description="Write a static HTML catalogue: one page per model with every style "
                                   "side by side, parameter trees, the porting differences and the latest "
                                   "results found under --runs. Open OUT/index.html in a browser.")
    p.add_argument("--out", type=path_arg, default="site",
                   help="output folder, replaced as a whole once the new site is complete (default: site)")
    p.add_argument("--runs", type=path_arg, default="runs",
                   help="where zoo compare/bench/train wrote results (default: runs)")
    p.add_argument("--models", type=choice_list(NAMES, "model"), default=NAMES, help="comma separated (default: all)")
    p.add_argument("--force", action="store_true", help="replace an earlier zoo site in --out")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    pages = build(args.out, args.runs, args.models, force=args.force)
    print(f"wrote {len(pages)} pages to {Path(args.out).resolve()}/; open {pages[0].resolve().as_uri()}")
    return 0
