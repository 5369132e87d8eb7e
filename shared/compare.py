"""Train one model in every style from the same start and compare the results.

Every style starts from the same canonical parameters (the plain-JAX
reference's initialiser, converted into each style), sees the same batches in
the same order and the same per-step keys.

**Draws.** Each framework derives its layers' keys from a step's key in its own
way (Linen folds in the module path, NNX counts the calls on a stream, Haiku
walks a key sequence, Equinox splits one key per example), so from the same key
the styles draw different dropout masks and noise. For a model that draws
(``ModelSpec.rng``) every style therefore runs twice:

- as asked, each framework drawing its own numbers: the losses, accuracy and
  step times of the row (``draws``: ``"own"``);
- with keys of :data:`shared.draws.MIDPOINT`, whose every draw is the middle of
  its range in every style (dropout keeps every unit, the VAE's noise is ~0):
  the parity columns and the verdict come from this run (``parity_run``:
  ``"midpoint draws"``).

A model that draws nothing runs once, and that run gives both.

**Verdict** (``parity``), for the parameters and, if any, the model state:

- ``bitwise``: no difference at all;
- ``rounding``: not above the **noise floor**, the reference's own drift when
  its start is moved by one ulp (``jnp.nextafter``); or above it but
  **confirmed in float64**: over the run's first :data:`CONFIRM_STEPS` steps,
  the reference and the style trained again in float64 from the same start
  differ by at most :data:`SHRINK` times their float32 difference after the
  same steps. Rounding shrinks with the epsilon (2^-52 / 2^-23, about 1.9e-9);
  a difference in the network (an epsilon, a layout, a mask) shows from the
  first step and does not shrink at all. The row then has ``float64_diff``;
- ``DIFFERENT`` otherwise.

**Several devices.** With a mesh of more than one device or a strategy other
than ``dp``, every run above is sharded as asked, and each style's parity run
is repeated on one device: ``one_device_diff`` is the largest difference of
its parameters from that run's, and ``one_device_parity`` its verdict, by the
same rule against the same noise floor (confirmed in float64 by the sharded and
the one-device run of the style itself).

A style that only rounds in another order does so at every step, which one
perturbation of the start does not imitate: such a style often drifts past the
floor (by 1.2x for Equinox's ViT after 5 epochs, measured), which is why a row
above it is confirmed and not condemned. The confirmation is over the first
steps because a long run amplifies even float64's rounding until it saturates
(the ViT's 1,320 steps: Equinox 4.6e-3 from the reference in float64 against
0.14 in float32), where after 100 steps it is 1e-11 against 1e-2. In a float64
run, where no higher precision is at hand, a style is ``rounding`` within
:data:`FLOAT64_MARGIN` times the float64 floor: a difference in the network
is ~1e9 times float64's rounding, and per-step rounding stays within a few
floors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from shared import data as data_lib
from shared import styles as styles_lib
from shared.draws import MIDPOINT
from shared.layouts import flatten_canonical
from shared.registry import STYLES
from shared.train import Result, TrainConfig, count_params, max_abs_diff, train, trainable_labels

ROW_KEYS = ("style", "params", "draws", "train_loss", "test_loss", "test_accuracy", "step_ms", "step_ratio",
            "parity_run", "max_param_diff", "max_state_diff", "noise_floor", "noise_floor_state", "float64_diff",
            "parity")  # and, where a row was confirmed in float64: confirm_steps, float32_diff_at_confirm
PARITIES = ("bitwise", "rounding", "DIFFERENT")
# A float32 difference that is rounding shrinks in float64 by the ratio of the epsilons, ~1.9e-9
# (measured 1.5e-9 to 3.0e-9: ViT, 5 epochs); this leaves 500 times that, and a difference of
# the network shrinks by nothing.
SHRINK = 1e-6
# The steps the float64 confirmation retrains: enough for float32's rounding to show (1e-2 in the
# ViT's parameters after 100 steps), too few for float64's to be amplified to the same (1e-11).
CONFIRM_STEPS = 100
# float64 runs: per-step rounding measured up to 1.5 times the one-ulp floor (ViT, 5 epochs).
FLOAT64_MARGIN = 100.0


def _diffs(models: dict[str, styles_lib.Model], results: dict[str, Result], style: str,
           reference: str = "jax") -> tuple[float, float | None]:
    """The largest parameter and state differences of ``style``'s run from ``reference``'s, canonical."""
    a, b = models[style], models[reference]
    params = max_abs_diff(a.to_canonical(results[style].params), b.to_canonical(results[reference].params))
    state = b.state_to_canonical(results[reference].model_state)
    if not jax.tree.leaves(state):
        return params, None
    return params, max_abs_diff(a.state_to_canonical(results[style].model_state), state)


def _build_all(model_name: str, dataset: data_lib.Dataset, styles: Sequence[str], precision: str,
               hparams: dict) -> dict[str, styles_lib.Model]:
    return {style: styles_lib.build(model_name, style, in_shape=dataset.in_shape, num_classes=dataset.num_classes,
                                    precision=precision, **hparams)
            for style in dict.fromkeys(("jax", *styles))}


def _train_all(models: dict[str, styles_lib.Model], dataset: data_lib.Dataset, config: TrainConfig,
               start: tuple[Any, Any], progress: bool, key_impl: Any = None, stop_after: int | None = None,
               snapshots: dict[str, tuple] | None = None, snapshot_at: int | None = None) -> dict[str, Result]:
    """Every model trained from ``start``; ``snapshots[style]`` gets its canonical parameters and state
    after ``snapshot_at`` steps."""
    def hook(style):
        model = models[style]

        def on_step(step, state):
            if step == snapshot_at and snapshots is not None:
                snapshots[style] = (model.to_canonical(jax.device_get(state.params)),
                                    model.state_to_canonical(jax.device_get(state.model_state)))
        return on_step
    return {style: train(model, dataset, config, init_params=model.from_canonical(start[0]),
                         init_state=model.state_from_canonical(start[1], 0), progress=progress, key_impl=key_impl,
                         stop_after=stop_after, on_step=hook(style))
            for style, model in models.items()}


def _snapshot_diffs(models, snapshots, style) -> list[float | None]:
    """``[param, state]`` differences of ``style``'s snapshot from the reference's (state None if stateless)."""
    params, state = snapshots[style]
    ref_params, ref_state = snapshots["jax"]
    return [max_abs_diff(params, ref_params),
            max_abs_diff(state, ref_state) if jax.tree.leaves(ref_state) else None]


def _float64(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def compare(model_name: str, dataset: data_lib.Dataset, config: TrainConfig,
            styles: tuple[str, ...] = STYLES, *, precision: str = "float32",
            progress: bool = True, hparams: dict | None = None,
            init_canonical: dict | None = None,
            init_canonical_state: dict | None = None,
            noise_floor: bool = True) -> tuple[list[dict], dict[str, Result]]:
    """Rows of the comparison (one per style) and each style's full result (the run as asked).

    ``max_state_diff`` is the largest difference of the model state (BatchNorm's
    running statistics) from the reference's, in the canonical layout; None
    for a stateless model. ``noise_floor=False`` skips the one-ulp run, the
    float64 confirmations and, for a model that draws, the midpoint runs: the
    rows then have ``noise_floor`` None, a ``parity`` of ``bitwise`` or None,
    and for a model that draws no differences at all (its styles' own draws
    differ, so their runs' differences say nothing).
    """
    hparams = hparams or {}
    config.validate()
    models = _build_all(model_name, dataset, styles, precision, hparams)
    spec = models["jax"].spec
    if init_canonical is None or init_canonical_state is None:  # (not drawn when given)
        init_key, _ = jax.random.split(jax.random.key(config.seed))
        start_params, start_state = models["jax"].init(init_key)
        # The reference's tree is canonical, but for blocks it stacks under a scan: converted all the same.
        init_canonical = models["jax"].to_canonical(start_params) if init_canonical is None else init_canonical
        init_canonical_state = (models["jax"].state_to_canonical(start_state) if init_canonical_state is None
                                else init_canonical_state)
    start = (init_canonical, init_canonical_state)
    draws = spec.rng is not None
    key_impl = MIDPOINT if draws else None
    confirm_at = min(CONFIRM_STEPS, len(dataset.train) // config.batch_size * config.epochs)
    snapshots: dict[str, tuple] = {}  # after confirm_at steps of the parity runs: what float64 confirms
    results = _train_all(models, dataset, config, start, progress,
                         snapshots=None if draws else snapshots, snapshot_at=confirm_at)
    parity_results = results if not draws else (
        _train_all(models, dataset, config, start, progress, key_impl, snapshots=snapshots,
                   snapshot_at=confirm_at) if noise_floor else None)
    single = dataclasses.replace(config, devices=1, mesh=None, strategy="dp")
    sharded = config.strategy != "dp" or (config.devices or len(jax.devices())) > 1  # (a mesh spans them all)
    one_device: dict[str, Result] = {}
    one_snapshots: dict[str, tuple] = {}
    if sharded and noise_floor:
        one_device = _train_all(models, dataset, single, start, progress, key_impl, snapshots=one_snapshots,
                                snapshot_at=confirm_at)
    stateful = bool(jax.tree.leaves(results["jax"].model_state))
    floor = floor_state = None
    if noise_floor:
        moved = jax.tree.map(lambda x: jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)), init_canonical)
        noisy = {"jax": train(models["jax"], dataset, config, init_params=models["jax"].from_canonical(moved),
                              init_state=models["jax"].state_from_canonical(init_canonical_state, 0),
                              progress=progress, key_impl=key_impl), "ref": parity_results["jax"]}
        floor, floor_state = _diffs({"jax": models["jax"], "ref": models["jax"]}, noisy, "jax", "ref")
    rows = []
    for style in styles:
        result = results[style]
        param_diff, state_diff = _diffs(models, parity_results, style) if parity_results else (None, None)
        row = {
            "style": style,
            "params": count_params(result.params),
            "draws": "own" if draws else None,
            "train_loss": result.history[-1]["train_loss"],
            "test_loss": result.final["test_loss"],
            "test_accuracy": result.final.get("test_accuracy"),
            **({"test_bits": result.final.get("test_bits"), "test_exact_match": result.final.get("test_exact_match")}
               if spec.kind == "lm" else {}),
            "step_ms": result.step_ms,
            "step_ratio": result.step_ms / results["jax"].step_ms,
            "parity_run": ("midpoint draws" if draws else "this run") if parity_results else None,
            "max_param_diff": param_diff,
            "max_state_diff": state_diff if stateful else None,
            "noise_floor": floor,
            "noise_floor_state": floor_state if stateful else None,
            "float64_diff": None,
        }
        if noise_floor and precision != "float64" and _above_floor(row):
            row["confirm_steps"] = confirm_at
            row["float32_diff_at_confirm"] = _snapshot_diffs(models, snapshots, style)
            row["float64_diff"] = _confirm(model_name, dataset, config, style, start, hparams, key_impl, progress,
                                           confirm_at)
        row["parity"] = parity(row, precision)
        if one_device:
            row.update(_one_device_row(models[style], parity_results[style], one_device[style], row, config, single,
                                       style, start, hparams, key_impl, progress, confirm_at,
                                       (snapshots[style], one_snapshots[style]), model_name, dataset, precision))
        if config.freeze or config.train_only:
            # Largest change of any frozen parameter from the common start: 0.0 means untouched.
            labels = models[style].converter.treedef.flatten_up_to(trainable_labels(models[style], config))
            start_flat = flatten_canonical(init_canonical)
            end = flatten_canonical(models[style].to_canonical(result.params))
            frozen = [r.canonical for r, label in zip(models[style].converter.rules, labels) if label == "frozen"]
            row["frozen"] = len(frozen)
            row["frozen_max_change"] = max(float(jnp.max(jnp.abs(end[p] - start_flat[p]))) for p in frozen)
        if "ema_test_loss" in result.final:
            row["ema_test_loss"] = result.final["ema_test_loss"]
            row["ema_test_accuracy"] = result.final.get("ema_test_accuracy")
        rows.append(row)
    return rows, results


def _one_device_row(model, sharded: Result, single: Result, row: dict, config: TrainConfig, one: TrainConfig,
                    style: str, start, hparams, key_impl, progress, confirm_at, snapshots, model_name, dataset,
                    precision) -> dict[str, Any]:
    """The difference of a style's sharded parity run from the same style on one device, and its verdict:
    ``parity``'s rule against the reference's noise floor, confirmed in float64 by the two runs."""
    diff = max_abs_diff(model.to_canonical(sharded.params), model.to_canonical(single.params))
    check = {"max_param_diff": diff, "max_state_diff": None, "noise_floor": row["noise_floor"],
             "noise_floor_state": None, "float64_diff": None}
    if precision != "float64" and _above_floor(check):
        check["float32_diff_at_confirm"] = [max_abs_diff(snapshots[0][0], snapshots[1][0]), None]
        with jax.enable_x64(True):
            models = _build_all(model_name, dataset, (style,), "float64", hparams)
            begin = (_float64(start[0]), _float64(start[1]))
            runs = [_train_all({style: models[style]}, dataset, c, begin, progress, key_impl,
                               stop_after=confirm_at)[style] for c in (config, one)]
            check["float64_diff"] = [max_abs_diff(models[style].to_canonical(runs[0].params),
                                                  models[style].to_canonical(runs[1].params)), None]
    return {"one_device_diff": diff, "one_device_float64_diff": (check["float64_diff"] or [None])[0],
            "one_device_parity": parity(check, precision)}


def _above_floor(row: dict) -> bool:
    pairs = [(row["max_param_diff"], row["noise_floor"])]
    if row["max_state_diff"] is not None:
        pairs.append((row["max_state_diff"], row["noise_floor_state"]))
    return any(d > f for d, f in pairs)


def _confirm(model_name: str, dataset: data_lib.Dataset, config: TrainConfig, style: str, start: tuple[Any, Any],
             hparams: dict, key_impl: Any, progress: bool, steps: int) -> list[float | None]:
    """``[param, state]`` differences of ``style`` from the reference, both trained in float64 from the
    same start for ``steps`` steps (the state's None for a stateless model)."""
    with jax.enable_x64(True):
        models = _build_all(model_name, dataset, (style,), "float64", hparams)
        results = _train_all(models, dataset, config, (_float64(start[0]), _float64(start[1])), progress,
                             key_impl, stop_after=steps)
        return list(_diffs(models, results, style))


def parity(row: dict, precision: str = "float32") -> str | None:
    """``bitwise``, ``rounding`` or ``DIFFERENT`` (see the module's docstring); None if unmeasured."""
    if row["max_param_diff"] is None:
        return None
    diffs = [row["max_param_diff"]] + ([row["max_state_diff"]] if row["max_state_diff"] is not None else [])
    if all(d == 0 for d in diffs):
        return "bitwise"
    if row["noise_floor"] is None:
        return None
    floors = [row["noise_floor"]] + ([row["noise_floor_state"]] if row["max_state_diff"] is not None else [])
    if precision == "float64":
        return "rounding" if all(d <= FLOAT64_MARGIN * f for d, f in zip(diffs, floors)) else "DIFFERENT"
    if all(d <= f for d, f in zip(diffs, floors)):
        return "rounding"
    confirmed = row.get("float64_diff")
    if confirmed is None:
        return "DIFFERENT"
    # The float32 difference after the same steps as the float64 runs (the whole run's when not recorded).
    float32 = row.get("float32_diff_at_confirm") or diffs
    return "rounding" if all(d64 <= SHRINK * d for d, d64 in zip(float32, confirmed) if d64 is not None) \
        else "DIFFERENT"


def format_table(rows: list[dict], kind: str) -> str:
    """A fixed-width table of the rows, as ``zoo compare`` prints it."""
    headline = ("test acc", lambda r: f"{100 * r['test_accuracy']:.2f}%") if kind == "classifier" \
        else ("test -ELBO", lambda r: f"{r['test_loss']:.3f}")
    lm = [("test bits/token", lambda r: f"{r['test_bits']:.4f}"),
          ("token acc", lambda r: f"{100 * r['test_accuracy']:.2f}%"),
          ("exact match", lambda r: f"{100 * r['test_exact_match']:.2f}%")]
    columns = [
        ("style", lambda r: r["style"]),
        ("params", lambda r: f"{r['params']:,}"),
        ("train loss", lambda r: f"{r['train_loss']:.4f}"),
        *(lm if kind == "lm" else [headline]),
        ("step ms", lambda r: f"{r['step_ms']:.2f}"),
        ("vs jax", lambda r: f"{r['step_ratio']:.2f}x"),
    ]
    if rows and rows[0].get("max_param_diff") is not None:
        columns.append(("max |param - jax|", lambda r: f"{r['max_param_diff']:.2e}"))
    if rows and rows[0].get("max_state_diff") is not None:
        columns.append(("max |state - jax|", lambda r: f"{r['max_state_diff']:.2e}"))
    if rows and rows[0].get("noise_floor") is not None:
        columns.append(("noise floor", lambda r: f"{r['noise_floor']:.2e}" + (
            f" / {r['noise_floor_state']:.2e}" if r.get("noise_floor_state") is not None else "")))
    if any(r.get("float64_diff") is not None for r in rows):
        columns.append(("float64", lambda r: "" if r.get("float64_diff") is None else " / ".join(
            f"{d:.1e}" for d in r["float64_diff"] if d is not None)))
    columns.append(("parity", lambda r: r.get("parity") or "-"))
    if rows and rows[0].get("one_device_diff") is not None:
        columns.append(("max |param - 1 device|", lambda r: f"{r['one_device_diff']:.2e}" + (
            "" if r.get("one_device_float64_diff") is None else f" (float64 {r['one_device_float64_diff']:.1e})")))
        columns.append(("vs 1 device", lambda r: r.get("one_device_parity") or "-"))
    if rows and "ema_test_loss" in rows[0]:
        columns.insert(4, ("EMA " + headline[0], lambda r: (
            f"{100 * r['ema_test_accuracy']:.2f}%" if kind == "classifier" else f"{r['ema_test_loss']:.3f}")))
    cells = [[name for name, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def explain(rows: list[dict]) -> list[str]:
    """What the table's parity columns were measured on, in a line or two, for the command line."""
    lines = []
    if rows and rows[0].get("draws") == "own":
        lines.append("each style drew its own dropout masks or noise (the frameworks derive keys differently): "
                     "losses and accuracy are from those runs; " + (
                         "the differences and parity are from a second run of every style in which every draw "
                         "is the same (shared/draws.py)" if rows[0].get("parity_run") else
                         "with --no-noise-floor no second run with the same draws was made, so no differences "
                         "are reported"))
    if rows and rows[0].get("one_device_diff") is not None:
        lines.append("sharded: every run above is split over the mesh as asked; 1 device: each style's parity run "
                     "again on one device, judged against the same noise floor")
    if any(r.get("float64_diff") is not None for r in rows):
        steps = next(r["confirm_steps"] for r in rows if r.get("float64_diff") is not None)
        lines.append(f"float64: above the noise floor, the style and plain JAX trained again in float64 for the "
                     f"first {steps} steps; rounding if their difference is {SHRINK:g} of the float32 one after "
                     "those steps or less (params / state)")
    return lines
