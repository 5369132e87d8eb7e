"""Train one model in every style from the same start and compare the results.

Every style starts from the same canonical parameters (the plain-JAX
reference's initialiser, converted into each style), sees the same batches in
the same order and the same per-step keys, so any difference in the trained
parameters is the frameworks' own doing, down to float32 rounding.

How large a difference rounding alone can make is measured, not assumed: the
reference is trained once more from its initial parameters moved by one ulp
(``jnp.nextafter``), and that run's largest difference from the reference is
the row's ``noise_floor`` (``noise_floor_state`` for the running statistics).
Each row's ``parity`` is then ``bitwise`` (no difference at all),
``rounding`` (not above the noise floor) or ``DIFFERENT`` (above it: the style
computes something else).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shared import data as data_lib
from shared import styles as styles_lib
from shared.layouts import flatten_canonical
from shared.train import Result, TrainConfig, count_params, max_abs_diff, train, trainable_labels
from shared.registry import STYLES

ROW_KEYS = ("style", "params", "train_loss", "test_loss", "test_accuracy", "step_ms", "step_ratio",
            "max_param_diff", "max_state_diff", "noise_floor", "noise_floor_state", "parity")
PARITIES = ("bitwise", "rounding", "DIFFERENT")


def compare(model_name: str, dataset: data_lib.Dataset, config: TrainConfig,
            styles: tuple[str, ...] = STYLES, *, precision: str = "float32",
            progress: bool = True, hparams: dict | None = None,
            init_canonical: dict | None = None,
            init_canonical_state: dict | None = None,
            noise_floor: bool = True) -> tuple[list[dict], dict[str, Result]]:
    """Rows of the comparison (one per style) and each style's full result.

    ``max_state_diff`` is the largest difference of the model state (BatchNorm's
    running statistics) from the reference's, in the canonical layout; None
    for a stateless model. ``noise_floor=False`` skips the one-ulp run: the
    rows then have ``noise_floor`` None and a ``parity`` of ``bitwise`` or None.
    """
    hparams = hparams or {}
    config.validate()
    models = {style: styles_lib.build(model_name, style, in_shape=dataset.in_shape,
                                      num_classes=dataset.num_classes, precision=precision, **hparams)
              for style in dict.fromkeys(("jax", *styles))}
    if init_canonical is None or init_canonical_state is None:  # (an eager init compiles op by op: skip it if given)
        init_key, _ = jax.random.split(jax.random.key(config.seed))
        start_params, start_state = models["jax"].init(init_key)
        init_canonical = start_params if init_canonical is None else init_canonical
        init_canonical_state = start_state if init_canonical_state is None else init_canonical_state
    results: dict[str, Result] = {}
    for style, model in models.items():
        results[style] = train(model, dataset, config, init_params=model.from_canonical(init_canonical),
                               init_state=model.state_from_canonical(init_canonical_state, 0),
                               progress=progress)
    reference = results["jax"]
    reference_params = models["jax"].to_canonical(reference.params)
    reference_state = models["jax"].state_to_canonical(reference.model_state)
    stateful = bool(jax.tree.leaves(reference_state))
    floor = floor_state = None
    if noise_floor:
        moved = jax.tree.map(lambda x: jnp.nextafter(x, jnp.asarray(jnp.inf, x.dtype)), init_canonical)
        noisy = train(models["jax"], dataset, config, init_params=models["jax"].from_canonical(moved),
                      init_state=models["jax"].state_from_canonical(init_canonical_state, 0), progress=progress)
        floor = max_abs_diff(models["jax"].to_canonical(noisy.params), reference_params)
        floor_state = (max_abs_diff(models["jax"].state_to_canonical(noisy.model_state), reference_state)
                       if stateful else None)
    rows = []
    for style in styles:
        result = results[style]
        canonical = models[style].to_canonical(result.params)
        row = {
            "style": style,
            "params": count_params(result.params),
            "train_loss": result.history[-1]["train_loss"],
            "test_loss": result.final["test_loss"],
            "test_accuracy": result.final.get("test_accuracy"),
            "step_ms": result.step_ms,
            "step_ratio": result.step_ms / reference.step_ms,
            "max_param_diff": max_abs_diff(canonical, reference_params),
            "max_state_diff": (max_abs_diff(models[style].state_to_canonical(result.model_state), reference_state)
                               if stateful else None),
            "noise_floor": floor,
            "noise_floor_state": floor_state,
        }
        row["parity"] = parity(row)
        if config.freeze or config.train_only:
            # Largest change of any frozen parameter from the common start: 0.0 means untouched.
            labels = models[style].converter.treedef.flatten_up_to(trainable_labels(models[style], config))
            start = flatten_canonical(init_canonical)
            end = flatten_canonical(canonical)
            frozen = [r.canonical for r, label in zip(models[style].converter.rules, labels) if label == "frozen"]
            row["frozen"] = len(frozen)
            row["frozen_max_change"] = max(float(jax.numpy.max(jax.numpy.abs(end[p] - start[p]))) for p in frozen)
        if "ema_test_loss" in result.final:
            row["ema_test_loss"] = result.final["ema_test_loss"]
            row["ema_test_accuracy"] = result.final.get("ema_test_accuracy")
        rows.append(row)
    return rows, results


def parity(row: dict) -> str | None:
    """``bitwise``, ``rounding`` (within the one-ulp noise floor) or ``DIFFERENT``; None if unmeasured."""
    diffs = [row["max_param_diff"]] + ([row["max_state_diff"]] if row["max_state_diff"] is not None else [])
    if all(d == 0 for d in diffs):
        return "bitwise"
    if row["noise_floor"] is None:
        return None
    floors = [row["noise_floor"]] + ([row["noise_floor_state"]] if row["max_state_diff"] is not None else [])
    return "rounding" if all(d <= f for d, f in zip(diffs, floors)) else "DIFFERENT"


def format_table(rows: list[dict], kind: str) -> str:
    """A fixed-width table of the rows, as ``zoo compare`` prints it."""
    headline = ("test acc", lambda r: f"{100 * r['test_accuracy']:.2f}%") if kind == "classifier" \
        else ("test -ELBO", lambda r: f"{r['test_loss']:.3f}")
    columns = [
        ("style", lambda r: r["style"]),
        ("params", lambda r: f"{r['params']:,}"),
        ("train loss", lambda r: f"{r['train_loss']:.4f}"),
        headline,
        ("step ms", lambda r: f"{r['step_ms']:.2f}"),
        ("vs jax", lambda r: f"{r['step_ratio']:.2f}x"),
        ("max |param - jax|", lambda r: f"{r['max_param_diff']:.2e}"),
    ]
    if rows and rows[0].get("max_state_diff") is not None:
        columns.append(("max |state - jax|", lambda r: f"{r['max_state_diff']:.2e}"))
    if rows and rows[0].get("noise_floor") is not None:
        columns.append(("noise floor", lambda r: f"{r['noise_floor']:.2e}" + (
            f" / {r['noise_floor_state']:.2e}" if r.get("noise_floor_state") is not None else "")))
    columns.append(("parity", lambda r: r.get("parity") or "-"))
    if rows and "ema_test_loss" in rows[0]:
        columns.insert(4, ("EMA " + headline[0], lambda r: (
            f"{100 * r['ema_test_accuracy']:.2f}%" if kind == "classifier" else f"{r['ema_test_loss']:.3f}")))
    cells = [[name for name, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
