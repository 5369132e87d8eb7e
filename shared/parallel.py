"""Model parallelism: a device mesh, a sharding strategy, and where each parameter lives.

A model that can be sharded (``ModelSpec.parallel``) names the axes of every
parameter in each style, its framework's own way (``Model.logical_axes``):
``embed`` (the residual width), ``heads``, ``kv`` (a head's width), ``mlp``
(the MLP's hidden units), ``vocab``, ``layers`` (a scanned stack). A strategy
is a set of logical-axis rules, as Linen's ``nn.logical_axis_rules`` takes them,
onto a two-axis mesh ``(data, model)``:

- ``dp``: no rule. Every parameter is replicated and the batch is split over
  ``data`` (what ``zoo train`` has always done).
- ``fsdp``: ``embed`` over ``data``. Every device holds a slice of every
  parameter and of its Adam moments; XLA gathers a layer's weights where it
  uses them and reduces the gradients onto the slices.
- ``tp``: ``heads`` and ``mlp`` over ``model`` (Megatron): each device computes
  its heads and its slice of the MLP; the attention's output projection and the
  MLP's second matrix sum their partial products across ``model``.
- ``fsdp+tp``: both.

The batch is always split over ``data``. The canonical shardings are the plain-JAX
reference's; :func:`canonical_specs` maps any style's through its converter,
so the test can show that each framework's annotations place every parameter
where the reference's do.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shared.errors import ZooError
from shared.layouts import LeafRule
from shared.registry import MODELS
from shared.styles import Model

MESH_AXES = ("data", "model")
LOGICAL_AXES = ("vocab", "embed", "heads", "kv", "mlp", "layers")
SPLITS: dict[str, dict[str, str]] = {
    "dp": {},
    "fsdp": {"embed": "data"},
    "tp": {"heads": "model", "mlp": "model"},
    "fsdp+tp": {"embed": "data", "heads": "model", "mlp": "model"},
}
# Every logical axis with its mesh axis or None, as nn.logical_axis_rules and nnx.logical_axis_rules take
# them (NNX keeps a name it has no rule for, and the mesh then refuses it).
RULES: dict[str, tuple[tuple[str, str | None], ...]] = {
    strategy: tuple((name, split.get(name)) for name in LOGICAL_AXES) for strategy, split in SPLITS.items()}
STRATEGIES = tuple(RULES)
# The hyperparameter that sizes a logical axis, for the message of a dimension the mesh does not divide.
SIZED_BY = {"embed": "--width", "heads": "--num-heads", "mlp": "--mlp-dim", "kv": "--width / --num-heads"}


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """``"data=2,model=2"`` as ``(("data", 2), ("model", 2))``: the mesh's axes and their sizes (an axis
    left out has size 1)."""
    pairs = []
    for part in text.split(","):
        name, eq, size = (piece.strip() for piece in part.partition("="))
        if not eq or not re.fullmatch(r"[0-9]{1,6}", size):
            raise ZooError(f"{text!r} is not a mesh; give axis=size pairs, e.g. data=2,model=2")
        pairs.append((name, int(size)))
    return check_mesh(pairs, f" in {text!r}")


def check_mesh(pairs: Sequence[Sequence[Any]], where: str = "") -> tuple[tuple[str, int], ...]:
    """``(axis, size)`` pairs checked (known axes, each once, sizes from 1 to 4096) and completed with the
    axes left out, of size 1, in ``MESH_AXES`` order."""
    sizes: dict[str, int] = {}
    for name, size in pairs:
        if name not in MESH_AXES:
            raise ZooError(f"unknown mesh axis {name!r}{where}; the axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise ZooError(f"mesh axis {name!r} given twice{where}")
        if not (isinstance(size, int) and 1 <= size <= 4096):
            raise ZooError(f"mesh axis {name} must have a size from 1 to 4096, got {size}")
        sizes[name] = size
    return tuple((axis, sizes.get(axis, 1)) for axis in MESH_AXES)


def mesh_arg(text: str) -> tuple[tuple[str, int], ...]:
    """:func:`parse_mesh` as an argparse type: a refusal is argparse's one line."""
    try:
        return parse_mesh(text)
    except ZooError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def mesh_shape(mesh: tuple[tuple[str, int], ...] | None, devices: int) -> dict[str, int]:
    """The mesh's axis sizes over ``devices`` devices: all of them on ``data`` when no mesh is given."""
    shape = dict(mesh) if mesh else {"data": devices, "model": 1}
    if math.prod(shape.values()) != devices:
        given = ",".join(f"{axis}={size}" for axis, size in shape.items())
        raise ZooError(f"--mesh {given} has {math.prod(shape.values())} devices but the run has {devices}; "
                       "make the sizes multiply to the number of devices (--devices)")
    return shape


def check_batch(sizes: Mapping[str, int], shape: Mapping[str, int]) -> None:
    """Refuse a batch size (by option name) that the mesh's data axis, which splits every batch, does not
    divide."""
    for name, size in sizes.items():
        if size % shape["data"]:
            raise ZooError(f"{name.replace('_', '-')} {size} must be divisible by the mesh's data axis "
                           f"({shape['data']} devices), which splits the batch")


def make_mesh(shape: Mapping[str, int], devices: list[Any]) -> Mesh:
    return Mesh(np.asarray(devices).reshape(tuple(shape[axis] for axis in MESH_AXES)), MESH_AXES)


def check_strategy(model: Model, strategy: str) -> None:
    if strategy not in RULES:
        raise ZooError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy != "dp" and model.logical_axes is None:
        refuse_strategy(model.name, strategy)


def refuse_strategy(name: str, strategy: str) -> None:
    shardable = ", ".join(spec.name for spec in MODELS.values() if spec.parallel)
    raise ZooError(f"{name} does not name its parameters' axes, so it trains with --strategy dp only "
                   f"(replicated parameters, the batch split over the devices); --strategy {strategy} is "
                   f"for {shardable}")


def to_mesh_axes(logical: PartitionSpec, strategy: str) -> PartitionSpec:
    """A spec of logical axis names as mesh axes, by the strategy's rule for each name (None: not split)."""
    rules = dict(RULES[strategy])
    unknown = [name for name in logical if name is not None and name not in rules]
    if unknown:
        raise ValueError(f"logical axis {unknown[0]!r} is none of {', '.join(LOGICAL_AXES)}")
    return PartitionSpec(*(None if name is None else rules[name] for name in logical))


def native_specs(model: Model, strategy: str) -> Any:
    """The style's parameter tree with, at each leaf, its ``PartitionSpec`` over the mesh."""
    check_strategy(model, strategy)
    if model.logical_axes is None:
        return model.converter.treedef.unflatten([PartitionSpec()] * len(model.converter.rules))
    return jax.tree.map(lambda spec: to_mesh_axes(spec, strategy), model.logical_axes)


def check_divides(model: Model, strategy: str, shape: Mapping[str, int]) -> None:
    """Refuse, in one line, a parameter axis that the mesh axis it is split over does not divide."""
    specs = native_specs(model, strategy)
    if model.logical_axes is None:
        return
    leaves = model.converter.treedef.flatten_up_to(specs)
    names = model.converter.treedef.flatten_up_to(model.logical_axes)
    for rule, spec, logical in zip(model.converter.rules, leaves, names):
        for axis, (mesh_axis, name) in enumerate(zip(spec, logical)):
            size = rule.native_shape[axis]
            if mesh_axis and size % shape[mesh_axis]:
                hint = f" ({SIZED_BY[name]})" if name in SIZED_BY else ""
                raise ZooError(f"{model.name}: --strategy {strategy} splits the {name!r} axis of "
                               f"{rule.canonical}, of size {size}{hint}, over {mesh_axis}={shape[mesh_axis]}, "
                               f"which does not divide it; choose a size divisible by {shape[mesh_axis]} or "
                               "another --mesh")


def shardings(model: Model, strategy: str, mesh: Mesh) -> Any:
    """The style's parameter tree of ``NamedSharding``: where each parameter lives on ``mesh``."""
    check_divides(model, strategy, dict(mesh.shape))
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), native_specs(model, strategy))


# --------------------------------------------------------------------------- canonical shardings


def _blocks(shape: tuple[int, ...], axis: int, parts: int) -> np.ndarray:
    """For every element of an array of ``shape``, which of ``parts`` equal blocks along ``axis`` holds it."""
    index = np.arange(shape[axis]) * parts // shape[axis]
    return np.broadcast_to(index.reshape([-1 if i == axis else 1 for i in range(len(shape))]), shape)


def _spec_of(parts: Mapping[str, np.ndarray], shape: tuple[int, ...], where: str) -> PartitionSpec:
    """The spec under which each element of a canonical array of ``shape`` sits on the device block
    ``parts[mesh_axis]`` says: each mesh axis splits exactly one array axis into blocks, or none."""
    entries: list[Any] = [None] * len(shape)
    for mesh_axis, blocks in parts.items():
        if not blocks.any():
            continue
        found = [axis for axis in range(len(shape)) if np.array_equal(blocks, _blocks(shape, axis, 2))]
        if len(found) != 1:
            raise ValueError(f"{where}: its {mesh_axis} blocks are no split of one canonical axis")
        entries[found[0]] = mesh_axis
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def canonical_specs(model: Model, specs: Any) -> dict[str, PartitionSpec]:
    """The canonical path of every parameter with its ``PartitionSpec``, for the style's native ``specs``.

    Each mesh axis is taken to have two devices; for each native leaf, the
    index of the device block holding each element is carried through the
    converter's exact layout change (transposes, reshapes, unstacking), and
    read back as the canonical axis it splits. A spec that no canonical
    sharding can express (a block structure a transpose scrambled) is an
    error, not a guess.
    """
    leaves = model.converter.treedef.flatten_up_to(specs)
    out: dict[str, PartitionSpec] = {}
    for rule, spec in zip(model.converter.rules, leaves):
        blocks = {}
        for axis, mesh_axis in enumerate(spec):
            if mesh_axis is not None and not isinstance(mesh_axis, str):
                raise ValueError(f"{rule.canonical}: one axis over several mesh axes ({mesh_axis}) is not mapped")
            if mesh_axis is not None:
                blocks[mesh_axis] = _blocks(rule.native_shape, axis, 2)
        moved = {name: _forward(rule, b) for name, b in blocks.items()}
        for i, (path, shape) in enumerate(zip(rule.parts, rule.part_shapes)):
            out[path] = _spec_of({name: m[i] for name, m in moved.items()}, shape, path)
    return out


def _forward(rule: LeafRule, blocks: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(part) for part in rule.forward(blocks.astype(np.int32), False)]


# --------------------------------------------------------------------------- what a step moves


# An HLO instruction: "%name = f32[4,16]{1,0} all-gather(...)" or a tuple of results "(f32[..], f32[..])".
_HLO = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)"
                  r"(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo: str) -> dict[str, dict[str, Any]]:
    """The collectives of a compiled (SPMD-partitioned) program's HLO text, by kind: how many, the bytes
    of their results on one device (what each device receives: a property of the program, not of the
    machine), and the shapes of those results (``"f32[32,9,16]"``)."""
    out: dict[str, dict[str, Any]] = {}
    for result, kind in _HLO.findall(hlo):
        arrays = _ARRAY.findall(result)
        entry = out.setdefault(kind, {"count": 0, "bytes": 0, "shapes": []})
        entry["count"] += 1
        entry["bytes"] += sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
                              for dtype, dims in arrays)
        entry["shapes"] += [f"{dtype}[{dims}]" for dtype, dims in arrays]
    return out


def bytes_per_device(tree: Any) -> dict[int, int]:
    """The bytes of ``tree``'s arrays that each device holds, by device id (from ``addressable_shards``)."""
    held: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return held


def host_copy(tree: Any) -> Any:
    """``tree``'s arrays as whole host arrays, on every process: ``jax.device_get`` in one process; across
    several, where a process holds only its devices' shards, an all-gather that every process must join."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)
