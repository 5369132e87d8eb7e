"""One optax training loop for every model in every style.

The loop sees a model only through :class:`shared.styles.Model` (``init``,
``apply`` with explicit params and key, converters), so a Haiku VAE and an
Equinox CNN train through the very same jitted step. Everything that decides
the result is derived from the seed: the initial parameters, the batch order
(``(seed, epoch)`` shuffles) and the per-step key (``fold_in(key, step)``), so
two runs with the same arguments give bitwise identical parameters.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from shared import data as data_lib
from shared import parallel, tasks
from shared.args import MAX_COUNT, SEED_LIMIT
from shared.errors import ZooError
from shared.files import atomic_path, write_json
from shared.registry import MODELS
from shared.styles import Model

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "linear_warmup")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes a training run besides the model and the data."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    optimizer: str = "adam"
    weight_decay: float = 1e-4  # adamw only
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float | None = None
    ema: float | None = None
    freeze: tuple[str, ...] = ()
    train_only: tuple[str, ...] = ()
    devices: int | None = None  # None: every local device
    eval_batch_size: int = 500
    # The device mesh's axis sizes, (("data", d), ("model", m)) (None: every device on data), and how the
    # parameters are placed on it (shared.parallel: dp, fsdp, tp or fsdp+tp).
    mesh: tuple[tuple[str, int], ...] | None = None
    strategy: str = "dp"

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if not 1 <= getattr(self, name) <= MAX_COUNT:
                raise ZooError(f"{name.replace('_', '-')} must be a positive integer up to {MAX_COUNT}, "
                               f"got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ZooError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ZooError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ZooError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ZooError(f"seed must be from 0 to {SEED_LIMIT - 1}, got {self.seed}")
        if not 0 <= self.warmup_steps <= MAX_COUNT:
            raise ZooError(f"warmup-steps must be from 0 to {MAX_COUNT}, got {self.warmup_steps}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ZooError(f"weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise ZooError(f"momentum must be a number in [0, 1) (0 for none), got {self.momentum}")
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ZooError(f"clip-norm must be a positive number, got {self.clip_norm}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ZooError(f"ema decay must be between 0 and 1 (e.g. 0.99), got {self.ema}")
        if self.freeze and self.train_only:
            raise ZooError("give either --freeze or --train-only, not both")
        if self.devices is not None and self.devices < 1:
            raise ZooError(f"devices must be a positive integer, got {self.devices}")
        if self.strategy not in parallel.STRATEGIES:
            raise ZooError(f"unknown strategy {self.strategy!r}; choose from {', '.join(parallel.STRATEGIES)}")
        if self.mesh is not None:
            parallel.check_mesh(self.mesh)


class TrainState(NamedTuple):
    step: jax.Array
    params: Any
    model_state: Any  # BatchNorm's running statistics; {} for a stateless model
    opt_state: Any
    ema_params: Any  # None without --ema


# --------------------------------------------------------------------------- optimiser


def learning_rate(config: TrainConfig, total_steps: int) -> optax.Schedule:
    if config.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.lr, config.warmup_steps, max(total_steps, config.warmup_steps + 1))
    if config.schedule == "linear_warmup":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, config.warmup_steps), optax.constant_schedule(config.lr)],
            [config.warmup_steps])
    return optax.constant_schedule(config.lr)


def trainable_labels(model: Model, config: TrainConfig) -> Any | None:
    """``"train"``/``"frozen"`` for every native leaf, chosen by canonical path.

    Patterns are shell-style (``fnmatch``) against paths such as
    ``encoder/fc1/kernel``, so ``'encoder*'`` selects the whole encoder in every
    style. Returns None when everything trains.
    """
    patterns = config.freeze or config.train_only
    if not patterns:
        return None
    paths = model.converter.canonical_paths()
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            raise ZooError(f"pattern {pattern!r} matches no parameter of {model.name}; "
                           f"its parameters are {', '.join(paths)}")
    matched = []
    for rule in model.converter.rules:  # one per native leaf, which may hold several canonical ones
        parts = [any(fnmatch.fnmatchcase(part, p) for p in patterns) for part in rule.parts]
        if any(parts) and not all(parts):
            raise ZooError(f"{' '.join(patterns)} selects part of {rule.canonical}, which {model.style} keeps in "
                           f"one array ({rule.native}); select all of them or none")
        matched.append(parts[0])
    train = [not m for m in matched] if config.freeze else matched
    if not any(train):
        raise ZooError(f"{'--freeze' if config.freeze else '--train-only'} {' '.join(patterns)} "
                       "leaves no parameter to train")
    return model.converter.treedef.unflatten(["train" if t else "frozen" for t in train])


def make_optimizer(config: TrainConfig, total_steps: int, labels: Any | None) -> optax.GradientTransformation:
    schedule = learning_rate(config, total_steps)
    if config.optimizer == "adamw":
        base = optax.adamw(schedule, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        base = optax.sgd(schedule, momentum=config.momentum or None)
    else:
        base = optax.adam(schedule)
    if config.clip_norm is not None:
        base = optax.chain(optax.clip_by_global_norm(config.clip_norm), base)
    if labels is None:
        return base
    # Frozen leaves get zero updates and no optimiser state at all.
    # The labels go in behind a function: an Equinox module is callable, and
    # optax would otherwise call it as if it were a labelling function.
    return optax.multi_transform({"train": base, "frozen": optax.set_to_zero()}, lambda _: labels)


# --------------------------------------------------------------------------- steps


def make_train_step(model: Model, optimizer: optax.GradientTransformation, config: TrainConfig,
                    key: jax.Array) -> Callable:
    """``step(state, batch) -> (state, loss, finite)``, a pure function to jit.

    The model runs in training mode, and its new state (BatchNorm's running
    statistics, computed over the whole batch, however it is sharded) comes
    out beside the gradients. EMA and freezing apply to the parameters; the
    state of a frozen layer still follows its batches, as in PyTorch's
    train mode.
    """

    def loss_fn(params, model_state, batch, step_key):
        outputs, model_state = model.apply(params, model_state, batch["image"], batch["label"], step_key, True)
        return tasks.per_example(model.kind, outputs, batch)["loss"].mean(), model_state

    def step(state: TrainState, batch: dict[str, jax.Array]):
        step_key = jax.random.fold_in(key, state.step)
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, step_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(params, ema, 1.0 - config.ema)
        # One flag per parameter: False where its gradient or new value is not finite.
        finite = jax.tree.map(lambda g, p: jnp.isfinite(g).all() & jnp.isfinite(p).all(), grads, params)
        return TrainState(state.step + 1, params, model_state, opt_state, ema), loss, finite

    return step


def make_eval_step(model: Model, key: jax.Array) -> Callable:
    def evaluate(params, model_state, batch, index):
        outputs, _ = model.apply(params, model_state, batch["image"], batch["label"],
                                 jax.random.fold_in(key, index), False)
        metrics = tasks.per_example(model.kind, outputs, batch)
        return {name: jnp.sum(value * batch["mask"]) for name, value in metrics.items()}

    return evaluate


def evaluate(eval_step: Callable, params: Any, model_state: Any, split: data_lib.Split, batch_size: int,
             sharding: NamedSharding | None = None) -> dict[str, float]:
    """Means of the per-example metrics over the whole split (nothing dropped), in eval mode."""
    totals: dict[str, float] = {}
    for index, batch in enumerate(data_lib.eval_batches(split, batch_size)):
        if sharding is not None:
            batch = jax.device_put(batch, sharding)
        for name, value in eval_step(params, model_state, batch, index).items():
            totals[name] = totals.get(name, 0.0) + float(value)
    return {name: total / len(split) for name, total in totals.items()}


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Result:
    model: str
    style: str
    dataset: str
    config: TrainConfig
    params: Any
    model_state: Any
    ema_params: Any
    history: list[dict[str, float]]
    step_times: list[float]
    step_losses: list[float]
    step_lrs: list[float]
    final: dict[str, float]

    @property
    def step_ms(self) -> float | None:
        """Median wall time of a train step in steady state, in milliseconds (None: no step ran)."""
        times = self.step_times[1:] or self.step_times  # the first step includes compilation
        return float(np.median(times) * 1000) if times else None

    def metrics(self) -> dict[str, Any]:
        return {"model": self.model, "style": self.style, "dataset": self.dataset,
                "config": dataclasses.asdict(self.config), "final": self.final,
                "step_ms": self.step_ms, "history": self.history,
                "steps": {"loss": self.step_losses, "lr": self.step_lrs}}


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter."""


@dataclasses.dataclass
class RunLog:
    """What a run has recorded so far: the loop appends to it as it goes.

    ``on_step`` hooks read it (a checkpoint stores it), and a resumed run is
    handed the stored one, so its metrics continue the interrupted run's
    instead of starting over.
    """

    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    step_losses: list[float] = dataclasses.field(default_factory=list)
    # Training updates the model state had seen at step 0 (from --init-from): Haiku and
    # Equinox need the total to debias their running averages again.
    state_updates: int = 0


def make_mesh(devices: int | None, mesh: tuple[tuple[str, int], ...] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over the first ``devices`` devices (default: all of them), of the given
    axis sizes (default: every device on ``data``).

    ``jax.devices()`` lists every process's devices after
    ``jax.distributed.initialize``, so on several hosts the batch is split
    over all of them; in one process they are its local devices.
    """
    available = jax.devices()
    count = len(available) if devices is None else devices
    if count > len(available):
        raise ZooError(f"--devices {count} asked for, but only {len(available)} "
                       f"{available[0].platform} device(s) are visible")
    if jax.process_count() > 1 and count != len(available):
        raise ZooError(f"--devices {count}: with {jax.process_count()} processes every one of the "
                       f"{len(available)} devices takes part; leave --devices out")
    return parallel.make_mesh(parallel.mesh_shape(mesh, count), available[:count])


def state_shardings(model: Model, optimizer: optax.GradientTransformation, state: TrainState,
                    strategy: str, mesh: Mesh) -> TrainState:
    """Where each part of the training state lives: the parameters, their EMA and the optimiser's
    moments (``optax.tree_map_params``) as the strategy places the parameters; the step, the
    optimiser's counts and the model state replicated."""
    params = parallel.shardings(model, strategy, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # A frozen parameter has no optimiser state: optax.multi_transform keeps an empty MaskedNode there.
    opt_state = optax.tree_map_params(
        optimizer, lambda value, sharding: value if isinstance(value, optax.MaskedNode) else sharding,
        state.opt_state, params, transform_non_params=lambda _: replicated,
        is_leaf=lambda value: isinstance(value, optax.MaskedNode))
    return TrainState(replicated, params, jax.tree.map(lambda _: replicated, state.model_state), opt_state,
                      None if state.ema_params is None else params)


def placed_step(model: Model, optimizer: optax.GradientTransformation, config: TrainConfig, key: jax.Array,
                start: TrainState, mesh: Mesh) -> tuple[TrainState, Callable]:
    """``start`` placed on ``mesh`` as ``config.strategy`` says, and the jitted step that keeps it there.

    No buffer donation: the state after step t is still needed (for a
    checkpoint) while step t + 1 runs. The outputs are pinned where the
    strategy places them (with dp, replicated: every device keeps the whole
    state); XLA inserts the collectives that placement implies around the
    batch, split over the mesh's data axis.
    """
    shardings = state_shardings(model, optimizer, start, config.strategy, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(make_train_step(model, optimizer, config, key), out_shardings=(shardings, replicated, replicated))
    return jax.device_put(start, shardings), step


def train(model: Model, dataset: data_lib.Dataset, config: TrainConfig, *,
          init_params: Any = None, init_state: Any = None, out_dir: str | Path | None = None,
          progress: bool = True, on_step: Callable[[int, TrainState], None] | None = None,
          start: TrainState | None = None, log: RunLog | None = None, key_impl: Any = None,
          stop_after: int | None = None) -> Result:
    """Train ``model`` on ``dataset`` and return the trained parameters and metrics.

    ``init_params`` and ``init_state`` are the model's native parameters and
    state to start from (default: its own initialiser with the run's seed).
    An EMA of the parameters is evaluated with the run's current state. ``on_step(step, state)`` is called
    after every step with the completed, finite state (checkpointing hooks in
    there); at the end of an epoch it comes after that epoch's evaluation, so
    ``log`` then holds its record. ``start`` resumes from a saved state, and
    ``log`` (what the run had recorded up to ``start``) continues its metrics.
    ``key_impl`` is the PRNG implementation of the run's keys (default: JAX's;
    :data:`shared.draws.MIDPOINT` makes every draw the same in every style).
    ``stop_after`` ends the run after that many steps (the schedule is still the
    whole run's); an epoch cut short is not evaluated.
    """
    config.validate()
    if tuple(dataset.in_shape) != tuple(model.in_shape):
        raise ZooError(f"{model.name} was built for images of shape {model.in_shape}, "
                       f"but {dataset.name} has {dataset.in_shape}")
    mesh = make_mesh(config.devices, config.mesh)
    parallel.check_divides(model, config.strategy, dict(mesh.shape))  # and that the model can be sharded
    parallel.check_batch({"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size},
                         dict(mesh.shape))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    init_key, train_key = jax.random.split(jax.random.key(config.seed, impl=key_impl))
    steps_per_epoch = len(dataset.train) // config.batch_size
    if steps_per_epoch == 0:
        raise ZooError(f"batch size {config.batch_size} is larger than the "
                       f"{len(dataset.train)} training examples of {dataset.name}")
    total_steps = steps_per_epoch * config.epochs
    if total_steps > MAX_COUNT:  # the step counter is an int32 on the device
        raise ZooError(f"{config.epochs} epochs of {steps_per_epoch} steps are {total_steps} steps, more "
                       f"than the {MAX_COUNT} a run can count; ask for fewer --epochs")
    labels = trainable_labels(model, config)
    optimizer = make_optimizer(config, total_steps, labels)
    schedule = learning_rate(config, total_steps)

    if start is None:
        if init_params is None or init_state is None:  # (not drawn when given)
            drawn_params, drawn_state = model.init(init_key)
        params = drawn_params if init_params is None else init_params
        model_state = drawn_state if init_state is None else init_state
        ema = params if config.ema is not None else None
        start = TrainState(jnp.zeros((), jnp.int32), params, model_state, jax.jit(optimizer.init)(params), ema)
    state, train_step = placed_step(model, optimizer, config, train_key, start, mesh)
    eval_step = jax.jit(make_eval_step(model, jax.random.split(train_key)[1]))

    log = RunLog() if log is None else log
    history, step_losses = log.history, log.step_losses
    step_times: list[float] = []
    first_step = int(start.step)
    logged_from = first_step - len(step_losses)  # the step the log's first loss belongs to
    if logged_from < 0:
        raise ValueError(f"the log holds {len(step_losses)} step losses but the run starts at step {first_step}")
    bar = tqdm(total=total_steps, initial=first_step, disable=not progress or jax.process_index() > 0,
               leave=False, desc=f"{model.name}/{model.style}", unit="step", dynamic_ncols=True)
    # A run resumed mid-epoch already has that epoch's first losses in the log.
    epoch_losses = step_losses[max(first_step // steps_per_epoch * steps_per_epoch - logged_from, 0):]
    pending = None  # (step, loss, finite): results are fetched one step late to keep dispatch async
    last_time = time.perf_counter()

    def settle(item) -> None:
        nonlocal last_time
        index, loss, finite = item
        loss = float(loss)
        now = time.perf_counter()
        step_times.append(now - last_time)
        last_time = now
        if not math.isfinite(loss) or not all(bool(f) for f in jax.tree.leaves(finite)):
            flags = model.converter.treedef.flatten_up_to(finite)
            # Sorted, so that every style names the same parameter.
            bad = sorted(r.canonical for r, f in zip(model.converter.rules, flags) if not bool(f))
            raise NonFiniteError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient or parameter'} at step "
                f"{index + 1}; first non-finite parameter: {bad[0] if bad else '(none: the loss itself)'}. "
                "Try a lower --lr or --clip-norm")
        step_losses.append(loss)
        epoch_losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        for epoch in range(first_step // steps_per_epoch, config.epochs):
            if stop_after is not None and epoch * steps_per_epoch >= stop_after:
                break
            batches = data_lib.train_batches(dataset.train, config.batch_size, config.seed, epoch)
            stopped = False
            for index in range(first_step % steps_per_epoch if epoch == first_step // steps_per_epoch else 0,
                               steps_per_epoch):
                if stop_after is not None and epoch * steps_per_epoch + index >= stop_after:
                    stopped = True
                    break
                batch = jax.device_put(batches[index], batch_sharding)
                previous = state
                state, loss, finite = train_step(state, batch)
                if pending is not None:
                    settle(pending)
                    if on_step is not None:
                        on_step(pending[0] + 1, previous)
                pending = (epoch * steps_per_epoch + index, loss, finite)
            if pending is not None:
                settle(pending)
                pending = None
            if stopped:  # within the epoch: no record, and the hook sees the last step
                if on_step is not None:
                    on_step(stop_after, state)
                break
            record = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch,
                      "lr": float(schedule((epoch + 1) * steps_per_epoch - 1)),
                      "train_loss": float(np.mean(epoch_losses)) if epoch_losses else float("nan")}
            epoch_losses.clear()
            record.update({f"test_{k}": v for k, v in evaluate(
                eval_step, state.params, state.model_state, dataset.test, config.eval_batch_size,
                batch_sharding).items()})
            history.append(record)
            headline = tasks.headline(model.kind)
            bar.set_postfix(train_loss=f"{record['train_loss']:.4f}",
                            **{f"test_{headline}": f"{record['test_' + headline]:.4f}"})
            if on_step is not None:
                on_step((epoch + 1) * steps_per_epoch, state)
    finally:
        bar.close()

    final = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")} if history else {}
    if state.ema_params is not None:
        final.update({f"ema_test_{k}": v for k, v in evaluate(
            eval_step, state.ema_params, state.model_state, dataset.test, config.eval_batch_size,
            batch_sharding).items()})
    result = Result(model.name, model.style, dataset.name, config, state.params, state.model_state,
                    state.ema_params,
                    history, step_times, step_losses,
                    [float(schedule(i)) for i in range(logged_from, logged_from + len(step_losses))], final)
    if out_dir is not None and jax.process_index() == 0:  # one writer when several hosts train
        write_outputs(result, Path(out_dir))
    return result


# --------------------------------------------------------------------------- outputs


def write_outputs(result: Result, out_dir: Path) -> None:
    write_json(out_dir / "metrics.json", result.metrics())
    plot_curves(result, out_dir / "curves.png")


def plot_curves(result: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = MODELS[result.model].kind
    # Fixed margins: tight_layout measures every label's extent, which took half of the second a
    # plot costs, on every zoo train.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.15, top=0.82, wspace=0.3)
    steps = np.arange(1, len(result.step_losses) + 1)
    axes[0].plot(steps, result.step_losses, lw=0.8, alpha=0.5, label="train (per step)")
    ep_steps = [h["step"] for h in result.history]
    axes[0].plot(ep_steps, [h["train_loss"] for h in result.history], "o-", label="train (epoch mean)")
    axes[0].plot(ep_steps, [h["test_loss"] for h in result.history], "s-", label="test")
    axes[0].set(xlabel="step", ylabel="negative ELBO" if kind == "vae" else "cross-entropy", title="loss")
    if kind in ("classifier", "lm"):
        axes[0].set_yscale("log")
        axes[1].plot(ep_steps, [100 * h["test_accuracy"] for h in result.history], "s-", color="C2",
                     label="tokens" if kind == "lm" else None)
        if kind == "lm":  # its tokens, and whole answers
            axes[1].plot(ep_steps, [100 * h["test_exact_match"] for h in result.history], "o-", color="C4",
                         label="exact match")
            axes[1].legend()
        axes[1].set(xlabel="step", ylabel="%", title="test accuracy")
    else:
        axes[1].plot(ep_steps, [h["test_bce"] for h in result.history], "s-", label="reconstruction (BCE)")
        axes[1].plot(ep_steps, [h["test_kl"] for h in result.history], "s-", label="KL")
        axes[1].set(xlabel="step", title="test loss terms")
        axes[1].legend()
    axes[2].plot(steps, result.step_lrs, color="C3")
    axes[2].set(xlabel="step", title="learning rate")
    axes[0].legend()
    fig.suptitle(f"{result.model} / {result.style} on {result.dataset}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def count_params(tree: Any) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def max_abs_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest elementwise difference of two trees, computed on the host (NumPy rounds
    ``x - y`` as XLA does; an eager ``jnp`` op would compile a program per leaf shape)."""
    return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))

