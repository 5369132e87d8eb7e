"""Checkpoints that every style can read: Orbax on disk, the canonical layout inside.

A checkpoint of step ``N`` lives in ``DIR/N/`` (an ``orbax.checkpoint``
``CheckpointManager`` folder) and holds four items:

- ``params``, ``state``, ``opt_state`` and ``ema``: arrays in the **canonical
  layout** (:mod:`shared.layouts`), so a checkpoint written by Haiku is
  resumed by Equinox. ``state`` is the model's state (BatchNorm's running
  statistics, canonical: not debiased); the metadata's ``state_updates``
  counts the training steps it has seen, which Haiku and Equinox need to
  debias it again. In the optimiser state every subtree shaped like the parameters
  (Adam's ``mu`` and ``nu``, SGD's ``trace``, inside ``multi_transform`` with
  ``optax.MaskedNode`` where parameters are frozen) is converted; the other
  leaves (step counts) are stored as they are.
- ``meta``: JSON with the run's configuration (model, hyperparameters, input
  shape, dataset, :class:`~shared.train.TrainConfig`, precision, the style
  that wrote it, library versions), the step and the data order
  ``(epoch, index)``, the run's metrics so far, and the shape, dtype and CRC-32
  of every array. It is read and checked before any array is.

Orbax writes each step into ``DIR/N.orbax-checkpoint-tmp`` and renames it
into place once complete, so a crash during a save leaves the earlier steps as
they were. An unfinished folder is never listed or read as a step; it stays
until a later run saves step ``N`` again, which replaces it.

One run writes to a folder at a time: :func:`locked` holds an exclusive
``fcntl`` lock on ``DIR/.zoo-lock`` for the whole run, and a second writer is
refused at its start, told the first one's pid. The kernel drops the lock when
its process dies, however it dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import sys
import zlib
from importlib.metadata import version
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.utils import TMP_DIR_SUFFIX

from shared import data as data_lib
from shared import files, parallel, registry
from shared import styles as styles_lib
from shared import train as train_lib
from shared.errors import ZooError
from shared.files import strict
from shared.layouts import _key_name, nest_canonical
from shared.styles import Model

FORMAT = 2
ARRAY_ITEMS = ("params", "state", "opt_state", "ema")
ITEMS = (*ARRAY_ITEMS, "meta")
DEFAULT_KEEP = 3
# TrainConfig fields a resumed run may change (the evaluation batch size has
# no option on the command line). Everything else decides the optimiser
# state's structure, the batch order or the trajectory, so it must match: to
# continue from the parameters with other settings, use --init-from.
RESUMABLE_CHANGES = ("epochs", "devices", "mesh", "strategy", "eval_batch_size")


# --------------------------------------------------------------------------- layout


def _params_like(model: Model):
    treedef = model.converter.treedef

    def check(node: Any) -> bool:
        try:
            treedef.flatten_up_to(node)
        except (ValueError, TypeError):
            return False
        return True
    return check


def to_canonical_tree(model: Model, tree: Any) -> Any:
    """An optimiser state with every subtree shaped like the parameters in the canonical layout.

    Those subtrees are moments of the gradients (Adam's ``mu`` and ``nu``), so a
    converter's constant offsets (Haiku's forget-gate bias) do not apply.
    """
    params_like = _params_like(model)
    return jax.tree.map(lambda node: model.converter.to_canonical(node, offsets=False) if params_like(node)
                        else node, tree, is_leaf=params_like)


def from_canonical_tree(model: Model, canonical: Any, like: Any) -> Any:
    """The inverse of :func:`to_canonical_tree`; ``like`` is a native tree of the wanted structure."""
    params_like = _params_like(model)
    return jax.tree.map(lambda node, value: model.converter.from_canonical(value, offsets=False)
                        if params_like(node) else value, like, canonical, is_leaf=params_like)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"0/mu/conv1/kernel": leaf, ...}``: every leaf by its "/"-joined path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(_key_name(k)) for k in path): leaf for path, leaf in leaves}


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def _describe(array: Any) -> dict[str, Any]:
    return {"shape": list(np.shape(array)), "dtype": str(np.dtype(array.dtype))}


# --------------------------------------------------------------------------- one writer per folder

LOCK_NAME = files.LOCK_NAME


@contextlib.contextmanager
def locked(directory: str | Path) -> Iterator[None]:
    """Hold ``directory`` (a checkpoint folder, created if missing) for one writer, this process.

    A second process is refused at once with a :class:`ZooError` naming the
    holder's pid and host (see :func:`shared.files.held`). On several hosts only
    process 0 takes the lock: the others write into the same folder with it. A
    folder this call created and left empty is removed: a run refused early
    leaves nothing behind. A killed run leaves its lock file, which blocks no one.
    """
    directory = Path(directory).absolute()
    if jax.process_index() > 0:
        yield
        return
    with files.held(directory / LOCK_NAME, f"{directory} is in use by another zoo run ({{holder}}); wait for "
                                           "it to end, or choose another --checkpoint-dir"):
        yield


# --------------------------------------------------------------------------- orbax


def _closed_loop_hook(previous):
    """When a restore fails, tensorstore still completes the reads it had started, and their
    callbacks land on Orbax's event loop, which is closed by then: "RuntimeError: Event loop
    is closed", printed as unraisable, up to dozens of times after the refusal. Nothing is
    lost (the restore has already failed); only that one message is dropped."""

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
            return
        previous(unraisable)

    hook.zoo_closed_loop = True
    return hook


if not getattr(sys.unraisablehook, "zoo_closed_loop", False):
    sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)


@contextlib.contextmanager
def quiet(level: int = logging.ERROR) -> Iterator[None]:
    """Orbax reports routine events as absl warnings; keep the CLI's stderr for real ones."""
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _manager(directory: Path, *, read_only: bool, keep: int | None = None):
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    with quiet():
        return ocp.CheckpointManager(directory.absolute(), options=options, item_names=ITEMS)


def steps(directory: str | Path) -> list[int]:
    """The complete checkpoints in ``directory``, oldest first (unfinished saves are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    with quiet():
        manager = _manager(directory, read_only=True)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()


def resumable(directory: str | Path) -> bool:
    """Whether ``--resume`` has a run to continue in ``directory``: True when it holds a complete checkpoint;
    False, and a new run starts there, when it does not exist yet, is empty or holds only what a run killed
    before its first save leaves (an unfinished save, a lock file). A folder holding anything else is
    refused: it is not a zoo checkpoint folder."""
    directory = Path(directory)
    if not os.path.lexists(directory):
        return False
    files.input_path(directory, "--checkpoint-dir", folder=True)
    if steps(directory):
        return True
    strangers = sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME and TMP_DIR_SUFFIX not in p.name)
    if strangers:
        raise ZooError(f"--checkpoint-dir {directory} holds no zoo checkpoint but {', '.join(strangers[:3])}"
                       f"{', ...' if len(strangers) > 3 else ''}: nothing to resume there; choose another "
                       "--checkpoint-dir")
    return False


def resolve(path: str | Path) -> tuple[Path, int]:
    """``(checkpoint folder, step)`` for a checkpoint folder (its newest step) or one step's folder."""
    path = Path(path)
    if not path.exists():
        raise ZooError(f"checkpoint {path} does not exist")
    if path.name.isdigit() and (path / "meta").exists():
        if int(path.name) not in steps(path.parent):
            raise ZooError(f"{path} is not a complete checkpoint (its save did not finish)")
        return path.parent, int(path.name)
    found = steps(path)
    if not found:
        raise ZooError(f"{path} holds no complete checkpoint; give a folder written by "
                       "zoo train --checkpoint-dir, or one of its step folders")
    return path, found[-1]


def read_meta(directory: str | Path, step: int) -> dict[str, Any]:
    """The JSON metadata of one step, checked to be there and whole."""
    directory = Path(directory)
    manager = _manager(directory, read_only=True)
    try:
        with quiet():
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as error:  # orbax and tensorstore raise many kinds; all mean the same here
        raise _unreadable(directory, step, error) from None
    finally:
        manager.close()
    required = {"format", "model", "hparams", "in_shape", "num_classes", "precision", "dataset", "config",
                "step", "data_order", "arrays", "log", "state_updates"}
    if not isinstance(meta, dict) or not required <= set(meta):
        missing = sorted(required - set(meta)) if isinstance(meta, dict) else ["everything"]
        raise _unreadable(directory, step, f"its metadata lacks {', '.join(missing)}")
    if meta["format"] != FORMAT:
        raise ZooError(f"checkpoint {directory / str(step)} has format {str(meta['format'])[:20]!r}; "
                       f"this zoo reads format {FORMAT}")
    problem = _meta_problem(meta)
    if problem:
        raise _unreadable(directory, step, f"its metadata has {problem}")
    if meta["step"] != step:
        raise _unreadable(directory, step, f"its metadata says step {meta['step']}")
    return meta


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What in the metadata is not what :class:`Saver` writes (None: nothing), so that a checkpoint
    edited or damaged by hand is refused in one line, never followed into a traceback."""
    if meta["model"] not in registry.NAMES:
        return f"model {str(meta['model'])[:40]!r}, which this zoo does not have"
    spec = registry.get(meta["model"])
    if not isinstance(meta["hparams"], dict):
        return "hparams that are not an object"
    flags = {h.name: h for h in spec.hparams}
    for name, value in meta["hparams"].items():
        if name not in flags:
            return f"a hyperparameter {str(name)[:40]!r} that {spec.name} does not take"
        if value is None and flags[name].default is None:
            continue  # left to the model, as its default is (the ViT's patch size follows the image size)
        if flags[name].parse is None:  # a switch
            if not isinstance(value, bool):
                return f"hyperparameter {name} = {str(value)[:40]}, which is not true or false"
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        try:  # the command line's own parser: the value must be one the flag would accept
            parsed = flags[name].parse(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            return f"hyperparameter {name} = {text[:40]}, which --{name.replace('_', '-')} would refuse"
        if (list(parsed) if isinstance(parsed, tuple) else parsed) != value:
            return f"hyperparameter {name} = {text[:40]} of the wrong type"
    rank = 1 if spec.kind == "lm" else 3
    if not (isinstance(meta["in_shape"], list) and len(meta["in_shape"]) == rank
            and all(_is_int(d, 1) for d in meta["in_shape"])):
        return f"an input shape that is not {'one positive integer' if rank == 1 else 'three positive integers'}"
    if not _is_int(meta["num_classes"], 1):
        return "a number of classes that is not a positive integer"
    if meta["precision"] not in styles_lib.PRECISIONS or (
            meta["dataset"] not in data_lib.DATASETS and not (meta["dataset"] is None and "imported" in meta)):
        return "an unknown precision or dataset"
    if not isinstance(meta.get("dataset_options", {}), dict):
        return "dataset options that are not an object"
    vocab = meta.get("vocab")
    if vocab is not None and not (isinstance(vocab, list) and len(vocab) == meta["num_classes"]
                                  and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        return "a vocabulary that is not one character per class"
    if not isinstance(meta["config"], dict):
        return "a config that is not an object"
    try:
        config = train_lib.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in meta["config"].items()})
        config.validate()
    except (TypeError, ValueError) as error:  # ZooError is a ValueError
        return f"a config this zoo refuses ({str(error)[:120]})"
    if not _is_int(meta["step"]) or not _is_int(meta["state_updates"]) or meta["state_updates"] < meta["step"]:
        return "a step or state update count that is not a whole number (or fewer updates than steps)"
    order = meta["data_order"]
    if not (isinstance(order, dict) and all(_is_int(order.get(k)) for k in ("epoch", "index"))
            and _is_int(order.get("steps_per_epoch"), 1)):
        return "a data order that is not three whole numbers"
    arrays = meta["arrays"]
    if not isinstance(arrays, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list) and all(_is_int(d) for d in v["shape"])
            and isinstance(v.get("dtype"), str) and _is_int(v.get("crc32")) for v in arrays.values()):
        return "an array list without a shape, dtype and CRC-32 for every array"
    for entry in arrays.values():
        try:
            np.dtype(entry["dtype"])
        except TypeError:
            return f"an array of dtype {entry['dtype'][:20]!r}"
    log = meta["log"]
    if not (isinstance(log, dict) and isinstance(log.get("history"), list)
            and all(isinstance(h, dict) for h in log["history"]) and isinstance(log.get("step_losses"), list)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in log["step_losses"])
            and len(log["step_losses"]) <= meta["step"]):
        return "a log that is not a history of records and at most one loss per step"
    return None


def _unreadable(directory: Path, step: int, why: Any) -> ZooError:
    if isinstance(why, BaseException):
        text = str(why).strip().splitlines()
        why = f"{type(why).__name__}: {text[0] if text else ''}"[:300]
    others = [s for s in steps(directory) if s != step]
    hint = (f"; move {directory / str(step)} elsewhere to use step {others[-1]}, the newest other one"
            if others else "")
    return ZooError(f"checkpoint {directory / str(step)} is corrupted or truncated ({why}){hint}")


def _restore_arrays(directory: Path, step: int, meta: dict[str, Any],
                    expected: dict[str, dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """Restore the items of ``expected`` (``{item: {path: ShapeDtypeStruct}}``), checked against ``meta``."""
    stored = meta["arrays"]
    for item, flat in expected.items():
        have = {p[len(item) + 1:]: v for p, v in stored.items() if p.startswith(item + "/")}
        missing, extra = sorted(set(flat) - set(have)), sorted(set(have) - set(flat))
        if missing or extra:
            raise ZooError(f"checkpoint {directory / str(step)} does not fit: its {item} "
                           + (f"lacks {missing[0]}" if missing else f"has an extra {extra[0]}")
                           + f" ({len(missing)} missing, {len(extra)} extra arrays); "
                           "was it written with another --optimizer, --freeze or --ema?")
        for path, want in flat.items():
            got = have[path]
            if list(want.shape) != got["shape"] or str(np.dtype(want.dtype)) != got["dtype"]:
                raise ZooError(f"checkpoint {directory / str(step)} does not fit: {item}/{path} is "
                               f"{got['dtype']}{tuple(got['shape'])} there, "
                               f"{np.dtype(want.dtype)}{tuple(want.shape)} here")
    targets = {item: nest_canonical({p: np.zeros(v.shape, v.dtype) for p, v in flat.items()})
               for item, flat in expected.items() if flat}
    manager = _manager(directory, read_only=True)
    try:
        with quiet():
            restored = manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(target) for item, target in targets.items()}))
    except Exception as error:
        raise _unreadable(directory, step, error) from None
    finally:
        manager.close()
    out: dict[str, dict[str, np.ndarray]] = {}
    for item, flat in expected.items():
        values = flatten(restored[item]) if flat else {}
        for path, value in values.items():
            if _crc(np.asarray(value)) != stored[f"{item}/{path}"]["crc32"]:
                raise _unreadable(directory, step, f"{item}/{path} does not match its checksum")
        out[item] = values
    return out


# --------------------------------------------------------------------------- saving


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{name: version(name) for name in ("jax", "jaxlib", "optax", "orbax-checkpoint", "zoo")}}


def run_config(model: Model, dataset: data_lib.Dataset, config: train_lib.TrainConfig) -> dict[str, Any]:
    """The configuration part of the metadata: what the run was, in JSON types."""
    return json.loads(json.dumps({
        "format": FORMAT, "model": model.name, "hparams": model.hparams, "in_shape": model.in_shape,
        "num_classes": model.num_classes, "precision": model.precision, "style": model.style,
        "dataset": dataset.name, "dataset_options": dataset.options, "train_examples": len(dataset.train),
        # A language model's tokens: zoo generate reads and writes text with them.
        "vocab": list(dataset.vocab) if dataset.vocab is not None else None,
        "config": dataclasses.asdict(config), "versions": _versions()}))


class Saver:
    """The ``on_step`` hook that writes checkpoints of a run (see :func:`train`)."""

    def __init__(self, directory: Path, model: Model, dataset: data_lib.Dataset,
                 config: train_lib.TrainConfig, log: train_lib.RunLog, *, save_every: int, keep: int):
        self.directory, self.model, self.log = directory, model, log
        self.save_every = save_every
        self.steps_per_epoch = len(dataset.train) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        self.meta = run_config(model, dataset, config)
        self.keep = keep
        self.manager = None  # opened at the first save: a run refused before it leaves no folder behind

    def __call__(self, step: int, state: train_lib.TrainState) -> None:
        if step % self.save_every == 0 or step == self.total_steps:
            self.save(step, state)

    def save(self, step: int, state: train_lib.TrainState) -> None:
        host = parallel.host_copy(state)  # canonical trees are made on the host, whatever the sharding
        trees = {"params": self.model.to_canonical(host.params),
                 "state": self.model.state_to_canonical(host.model_state),
                 "opt_state": to_canonical_tree(self.model, host.opt_state),
                 "ema": None if host.ema_params is None else self.model.to_canonical(host.ema_params)}
        flats = {item: {p: np.asarray(v) for p, v in flatten(tree).items()} for item, tree in trees.items()}
        arrays = {f"{item}/{p}": {**_describe(v), "crc32": _crc(v)}
                  for item, flat in flats.items() for p, v in flat.items()}
        epoch, index = divmod(step, self.steps_per_epoch)
        meta = {**self.meta, "step": step, "arrays": arrays, "state_updates": self.log.state_updates + step,
                "data_order": {"epoch": epoch, "index": index, "steps_per_epoch": self.steps_per_epoch},
                # Copies: Orbax writes the JSON in the background while the loop appends to the log.
                "log": {"history": [dict(h) for h in self.log.history],
                        "step_losses": list(self.log.step_losses)}}
        items = {item: ocp.args.StandardSave(nest_canonical(flat)) for item, flat in flats.items() if flat}
        if self.manager is None:
            self.manager = _manager(self.directory, read_only=False, keep=self.keep)
        with quiet(logging.CRITICAL):  # see close(): a failed or interrupted save is raised, not logged
            self.manager.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(strict(meta))),
                              force=True)

    def close(self) -> None:
        """Wait for a save still being written, then release the folder."""
        if self.manager is None:
            return
        # Orbax logs a failed (or interrupted: Ctrl-C) save with its traceback, then raises it;
        # the exception is what the caller reports, in one line.
        with quiet(logging.CRITICAL):
            self.manager.wait_until_finished()
            self.manager.close()
        self.manager = None


def write_imported(directory: str | Path, reference: Model, params: Any, state: Any,
                   source: dict[str, Any]) -> None:
    """Write canonical ``params`` and ``state`` from outside (``zoo import``) as step 0 of a
    checkpoint: no dataset, no optimiser state, the source described under ``imported``."""
    directory = Path(directory)
    flats = {"params": {p: np.asarray(v) for p, v in flatten(params).items()},
             "state": {p: np.asarray(v) for p, v in flatten(state).items()}}
    check_canonical_like = _canonical_shapes(reference)
    for item, like in zip(("params", "state"), check_canonical_like):
        want = {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flatten(like).items()}
        got = {p: (v.shape, v.dtype) for p, v in flats[item].items()}
        if want != got:
            bad = sorted(set(want) ^ set(got)) or sorted(p for p in want if want[p] != got[p])
            raise ZooError(f"the imported {item} do not fit {reference.name}: {bad[0]}")
    meta = json.loads(json.dumps({
        "format": FORMAT, "model": reference.name, "hparams": reference.hparams, "in_shape": reference.in_shape,
        "num_classes": reference.num_classes, "precision": reference.precision, "style": source["style"],
        "dataset": None, "train_examples": 0, "config": dataclasses.asdict(train_lib.TrainConfig()),
        "versions": _versions(), "imported": source, "step": 0, "state_updates": 0,
        "data_order": {"epoch": 0, "index": 0, "steps_per_epoch": 1},
        "log": {"history": [], "step_losses": []},
        "arrays": {f"{item}/{p}": {**_describe(v), "crc32": _crc(v)} for item, flat in flats.items()
                   for p, v in flat.items()}}))
    items = {item: ocp.args.StandardSave(nest_canonical(flat)) for item, flat in flats.items() if flat}
    with locked(directory):
        manager = _manager(directory, read_only=False, keep=1)
        try:
            with quiet(logging.CRITICAL):
                manager.save(0, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)
                manager.wait_until_finished()
        finally:
            manager.close()


# --------------------------------------------------------------------------- loading


def _check_resumable(meta: dict[str, Any], model: Model, dataset: data_lib.Dataset,
                     config: train_lib.TrainConfig, where: Path) -> None:
    here = run_config(model, dataset, config)
    clashes = []
    for key in ("model", "hparams", "in_shape", "num_classes", "precision", "dataset", "dataset_options",
                "train_examples"):
        if meta.get(key, {} if key == "dataset_options" else None) != here[key]:
            clashes.append(f"{key} {_show(meta.get(key))} there, {_show(here[key])} here")
    for key, value in here["config"].items():
        if key not in RESUMABLE_CHANGES and meta["config"].get(key) != value:
            clashes.append(f"{key.replace('_', '-')} {_show(meta['config'].get(key))} there, {_show(value)} here")
    if clashes:
        raise ZooError(f"cannot resume from {where}: {'; '.join(clashes)}. Resume with the same settings "
                       "(only --epochs, --devices, --mesh and --strategy may change), or start a new run "
                       "from its parameters with --init-from")
    order = meta["data_order"]
    steps_per_epoch = len(dataset.train) // config.batch_size
    if (order["steps_per_epoch"] != steps_per_epoch
            or order["epoch"] * order["steps_per_epoch"] + order["index"] != meta["step"]):
        raise ZooError(f"cannot resume from {where}: its data order (epoch {order['epoch']}, batch "
                       f"{order['index']} of {order['steps_per_epoch']}) does not fit step {meta['step']} "
                       f"with {steps_per_epoch} batches per epoch")


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "(" + ", ".join(map(str, value)) + ")"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items()) or "{}"
    return str(value)


def restore_state(directory: str | Path, model: Model, dataset: data_lib.Dataset,
                  config: train_lib.TrainConfig,
                  step: int | None = None) -> tuple[train_lib.TrainState, train_lib.RunLog]:
    """The training state and log of a checkpoint, in ``model``'s style, to resume the run.

    The restore target is built from this style's own optimiser state, mapped
    to the canonical layout, so any style reads any style's checkpoint.
    """
    directory = Path(directory)
    if step is None:
        directory, step = resolve(directory)
    where = directory / str(step)
    meta = read_meta(directory, step)
    _complete(meta, model, dataset, config, where)  # refuses another run's, or one past the end of this

    steps_per_epoch = len(dataset.train) // config.batch_size
    optimizer = train_lib.make_optimizer(config, steps_per_epoch * config.epochs,
                                         train_lib.trainable_labels(model, config))

    def opt_shapes(key):  # the optimiser state as this style holds it and in the canonical layout
        opt_state = optimizer.init(model.init_params(key))
        return opt_state, to_canonical_tree(model, opt_state)

    like_opt, canonical_opt = jax.eval_shape(opt_shapes, jax.random.key(0))
    canonical_params, canonical_state = _canonical_shapes(model)
    expected = {"params": flatten(canonical_params), "state": flatten(canonical_state),
                "opt_state": flatten(canonical_opt),
                "ema": flatten(canonical_params) if config.ema is not None else {}}
    values = _restore_arrays(directory, step, meta, expected)

    def rebuild(item: str, like: Any) -> Any:
        treedef = jax.tree_util.tree_structure(like)
        return treedef.unflatten([values[item][p] for p in flatten(like)])

    params = model.from_canonical(rebuild("params", canonical_params))
    model_state = model.state_from_canonical(rebuild("state", canonical_state), meta["state_updates"])
    opt_state = from_canonical_tree(model, rebuild("opt_state", canonical_opt), like_opt)
    ema = model.from_canonical(rebuild("ema", canonical_params)) if config.ema is not None else None
    log = train_lib.RunLog([dict(h) for h in meta["log"]["history"]], list(meta["log"]["step_losses"]),
                           meta["state_updates"] - step)
    return train_lib.TrainState(jnp.asarray(step, jnp.int32), params, model_state, opt_state, ema), log


def _canonical_shapes(model: Model) -> tuple[Any, Any]:
    """Shapes and dtypes of ``model``'s parameters and state in the canonical layout."""
    def canonical(key):
        params, state = model.init(key)
        return model.to_canonical(params), model.state_to_canonical(state)
    return jax.eval_shape(canonical, jax.random.key(0))


def read_variables(path: str | Path, model: Model) -> tuple[Any, Any, int]:
    """The parameters and state stored at ``path``, in ``model``'s style, and the state's update count.

    They must be of the same network: the same model, number of classes and shapes.
    """
    directory, step = resolve(path)
    where = directory / str(step)
    meta = read_meta(directory, step)
    clashes = [f"{key} {_show(meta[key])} there, {_show(value)} here"
               for key, value in (("model", model.name), ("num_classes", model.num_classes))
               if meta[key] != value]
    if clashes:
        raise ZooError(f"cannot take the parameters of {where}: {'; '.join(clashes)}")
    canonical_params, canonical_state = _canonical_shapes(model)
    values = _restore_arrays(directory, step, meta, {"params": flatten(canonical_params),
                                                     "state": flatten(canonical_state)})

    def rebuild(item: str, like: Any) -> Any:
        return jax.tree_util.tree_structure(like).unflatten([values[item][p] for p in flatten(like)])

    updates = meta["state_updates"]
    return (model.from_canonical(rebuild("params", canonical_params)),
            model.state_from_canonical(rebuild("state", canonical_state), updates), updates)


def read_params(path: str | Path, model: Model) -> Any:
    """The parameters stored at ``path``, in ``model``'s style."""
    return read_variables(path, model)[0]


def read_canonical(path: str | Path, model_name: str, in_shape: tuple[int, int, int],
                   num_classes: int, **hparams: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The parameters and state stored at ``path`` in the canonical layout, and the state's update count."""
    reference = styles_lib.build_once(model_name, "jax", in_shape=in_shape, num_classes=num_classes, **hparams)
    return read_variables(path, reference)


def load_variables(path: str | Path, style: str, expect_model: str | None = None) -> tuple[Model, Any, Any]:
    """The model a checkpoint was trained as, built in ``style``, and its parameters and state.

    ``path`` is a checkpoint folder (its newest step is read) or one step's folder.
    """
    directory, step = resolve(path)
    meta = read_meta(directory, step)
    if expect_model is not None and meta["model"] != expect_model:
        raise ZooError(f"checkpoint {directory / str(step)} holds a {meta['model']}, not a {expect_model}")
    model = styles_lib.build_once(meta["model"], style, in_shape=tuple(meta["in_shape"]),
                                  num_classes=meta["num_classes"], precision=meta.get("precision", "float32"),
                                  **meta["hparams"])
    params, state, _ = read_variables(directory / str(step), model)
    return model, params, state


# --------------------------------------------------------------------------- a run with checkpoints


def train(model: Model, dataset: data_lib.Dataset, config: train_lib.TrainConfig, directory: str | Path, *,
          save_every: int | None = None, keep: int = DEFAULT_KEEP, resume: bool = False,
          init_params: Any = None, init_state: Any = None, init_updates: int = 0,
          out_dir: str | Path | None = None, progress: bool = True) -> train_lib.Result:
    """:func:`shared.train.train` with checkpoints in ``directory``.

    Saves every ``save_every`` steps (default: at the end of every epoch) and
    at the end of training, keeping the newest ``keep``. With ``resume`` the
    run continues from the newest complete checkpoint, in any style; without
    it, a folder that already holds checkpoints is refused rather than mixed.
    ``init_state`` (with ``init_updates``, the training steps it has seen)
    starts the model state from another run's, as ``--init-from`` does.
    """
    config.validate()
    directory = Path(directory)
    if save_every is not None and save_every < 1:
        raise ZooError(f"save-every must be a positive integer, got {save_every}")
    if keep < 1:
        raise ZooError(f"keep must be a positive integer, got {keep}")
    if resume and init_params is not None:
        raise ZooError("give either --resume or --init-from, not both")
    if directory.exists() and not directory.is_dir():
        raise ZooError(f"checkpoint dir {directory} is a file, not a folder")
    if resume and not directory.is_dir():
        raise ZooError(f"nothing to resume: {directory} does not exist; run without --resume to start")
    with locked(directory):  # the steps found stay the steps there: no other run writes meanwhile
        found = steps(directory)
        # A file, link or other entry named like a step that is not one would be replaced by that save.
        strangers = sorted((p for p in directory.iterdir() if p.name.isdigit() and int(p.name) not in found
                            and (p.is_symlink() or not p.is_dir())), key=lambda p: int(p.name))
        if strangers:
            raise ZooError(f"{strangers[0]} is not a checkpoint, but a step of this run would be saved under "
                           "its name; move it out of the checkpoint folder")
        start, log = None, train_lib.RunLog(state_updates=init_updates)
        if resume:
            if not found:
                raise ZooError(f"nothing to resume: {directory} holds no complete checkpoint; "
                               "run without --resume to start")
            start, log = restore_state(directory, model, dataset, config, found[-1])
        elif found:
            raise ZooError(f"{directory} already holds checkpoints (steps {', '.join(map(str, found))}); "
                           "pass --resume to continue that run, or choose another --checkpoint-dir")
        steps_per_epoch = max(len(dataset.train) // config.batch_size, 1)
        saver = Saver(directory, model, dataset, config, log, save_every=save_every or steps_per_epoch,
                      keep=keep)
        try:
            return train_lib.train(model, dataset, config, init_params=init_params, init_state=init_state,
                                   out_dir=out_dir, progress=progress, on_step=saver, start=start, log=log)
        except train_lib.NonFiniteError as error:
            saver.close()
            kept = steps(directory)
            raise train_lib.NonFiniteError(
                f"{error}; the newest checkpoint, from before it, is {directory / str(kept[-1])}" if kept
                else f"{error}; no checkpoint was saved before it") from None
        finally:
            saver.close()


def already_complete(directory: str | Path, model: Model, dataset: data_lib.Dataset,
                     config: train_lib.TrainConfig) -> bool:
    """Whether the newest checkpoint in ``directory`` (or the step folder given) has done every step of
    ``config``'s run; refused unless ``model``, ``dataset`` and ``config`` may resume it at all.

    A checkpoint beyond that (resumed with fewer ``--epochs`` than it has done) is refused.
    """
    folder, step = resolve(directory)
    return _complete(read_meta(folder, step), model, dataset, config, folder / str(step))


def _complete(meta: dict[str, Any], model: Model, dataset: data_lib.Dataset, config: train_lib.TrainConfig,
              where: Path) -> bool:
    """:func:`already_complete` for metadata already read."""
    _check_resumable(meta, model, dataset, config, where)
    step, total = meta["step"], len(dataset.train) // config.batch_size * config.epochs
    if step > total:
        epochs = f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}"
        raise ZooError(f"cannot resume from {where}: it is at step {step}, past the {total} steps "
                       f"of {epochs}; give --epochs {-(-step // max(total // config.epochs, 1))} "
                       "or more (or leave --epochs out to take it from the checkpoint)")
    return step == total
