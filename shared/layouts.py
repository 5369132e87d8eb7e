"""Layout changes and leaf-by-leaf converters between a style's tree and the canonical one.

The canonical layout is the plain-JAX reference's parameter dict: nested dicts
named like the model attributes (``"conv1"``, ``"encoder"/"fc1"``), leaves
called ``kernel`` and ``bias``, dense kernels ``(in, out)``, conv kernels HWIO,
and a flattened feature map in HWC order.

A :class:`Converter` is built from a style's parameter tree and holds one
:class:`LeafRule` per native leaf: where the leaf lives in the native tree, its
canonical path, and the layout change between the two. A native leaf may hold
several canonical ones (:class:`Split`: an LSTM's gates in one matrix), so the
native leaves partition the canonical ones. The rules act leaf by leaf, so they
convert anything shaped like the parameters (gradients, Adam moments, an EMA)
as well as the parameters themselves, and they leave ``optax.MaskedNode``
placeholders (frozen parameters) alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shared.errors import ZooError

PyTree = Any
Canonical = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Layout:
    """An exact, invertible change of array layout (a permutation of elements)."""

    note: str
    forward: Callable[[jax.Array], jax.Array]
    backward: Callable[[jax.Array], jax.Array]

    def then(self, other: "Layout") -> "Layout":
        if self is IDENTITY:
            return other
        if other is IDENTITY:
            return self
        return Layout(f"{self.note}, then {other.note}",
                      lambda x: other.forward(self.forward(x)),
                      lambda x: self.backward(other.backward(x)))


IDENTITY = Layout("same layout", lambda x: x, lambda x: x)
TRANSPOSE = Layout("transpose (out, in) -> (in, out)", lambda x: x.T, lambda x: x.T)
OIHW_TO_HWIO = Layout("kernel OIHW -> HWIO",
                      lambda x: jnp.transpose(x, (2, 3, 1, 0)),
                      lambda x: jnp.transpose(x, (3, 2, 0, 1)))
CONV_BIAS = Layout("bias (out, 1, 1) -> (out,)",
                   lambda x: x.reshape(x.shape[0]),
                   lambda x: x.reshape((x.shape[0], 1, 1)))


def chw_rows_to_hwc(height: int, width: int, channels: int) -> Layout:
    """Reorder the rows of an ``(in, out)`` kernel fed by a flattened feature map.

    Flattening a ``C x H x W`` map gives the features in a different order from
    flattening ``H x W x C``, so the first dense layer after the convolutions
    must have its rows permuted, not just its matrix transposed.
    """
    perm = np.arange(channels * height * width).reshape(channels, height, width)
    # canonical row r comes from CHW row perm[r]; int32 indices, whatever x64 mode says
    perm = perm.transpose(1, 2, 0).ravel().astype(np.int32)
    inverse = np.argsort(perm).astype(np.int32)
    return Layout(f"rows CHW -> HWC for a {height}x{width}x{channels} feature map",
                  lambda x: x[perm], lambda x: x[inverse])


def reshape(native: tuple[int, ...], canonical: tuple[int, ...]) -> Layout:
    """A reshape between two shapes of the same elements in the same (row-major) order."""
    return Layout(f"reshape {_shape(native)} -> {_shape(canonical)}",
                  lambda x: x.reshape(canonical), lambda x: x.reshape(native))


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ")"


@dataclasses.dataclass(frozen=True)
class Renamed:
    """A native leaf whose canonical path is not the one its own path gives.

    Haiku calls the output projection of its attention ``linear`` where the
    canonical layout (Linen's) calls it ``out``. ``layout`` applies after the
    style's per-leaf conventions (a transpose).
    """

    canonical: str
    layout: Layout = IDENTITY


@dataclasses.dataclass(frozen=True)
class Split:
    """One native leaf that holds several canonical leaves, exactly.

    An LSTM's gates: Haiku keeps one ``(in + hidden, 4 * hidden)`` matrix over
    ``[x, h]`` in gate order i, g, f, o, Equinox one ``(4 * hidden, in)``
    matrix in order i, f, g, o, where the canonical layout has a kernel per
    gate. ``forward`` gives the parts in the order of ``parts``; ``backward``
    puts them back. ``offsets`` are constants added to a part's parameter
    values on the way to the canonical layout (Haiku adds 1 to the forget
    gate's pre-activation inside its cell, so its bias is the canonical one
    minus 1); they do not apply to gradients or optimiser moments, which a
    constant shift of the parameters leaves unchanged.
    """

    note: str
    parts: tuple[str, ...]
    forward: Callable[[jax.Array], Sequence[jax.Array]]
    backward: Callable[[Sequence[jax.Array]], jax.Array]
    offsets: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LeafRule:
    native: str  # the leaf's path in the native tree, as jax.tree_util.keystr prints it
    parts: tuple[str, ...]  # its canonical path ("/"-joined); several for a Split
    layout: Layout  # for a Split, only its note is used
    native_shape: tuple[int, ...] = ()
    part_shapes: tuple[tuple[int, ...], ...] = ()
    split: Split | None = None
    renamed: bool = False  # a Renamed rule gave its canonical path

    @property
    def canonical(self) -> str:
        """The canonical path, or for a split its parts in brace form (``lstm/cell/{ii,if,ig,io}/kernel``)."""
        return self.parts[0] if len(self.parts) == 1 else brace(self.parts)

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        return self.part_shapes[0]

    def forward(self, leaf: Any, offsets: bool) -> list[Any]:
        if self.split is None:
            return [self.layout.forward(leaf)]
        values = list(self.split.forward(leaf))
        if offsets:
            values = [v + jnp.asarray(self.split.offsets[p], v.dtype) if p in self.split.offsets else v
                      for p, v in zip(self.parts, values)]
        return values

    def backward(self, values: list[Any], offsets: bool) -> Any:
        if self.split is None:
            return self.layout.backward(values[0])
        if offsets:
            values = [v - jnp.asarray(self.split.offsets[p], v.dtype) if p in self.split.offsets else v
                      for p, v in zip(self.parts, values)]
        return self.split.backward(values)


def brace(paths: Sequence[str]) -> str:
    """``a/{x,y}/k`` for ``a/x/k`` and ``a/y/k``: several paths that differ in one segment, shown as one."""
    split = [p.split("/") for p in paths]
    if len({len(s) for s in split}) == 1:
        differ = [i for i in range(len(split[0])) if len({s[i] for s in split}) > 1]
        if len(differ) == 1:
            i = differ[0]
            return "/".join(split[0][:i] + ["{" + ",".join(s[i] for s in split) + "}"] + split[0][i + 1:])
    return "{" + ",".join(paths) + "}"


def _key_name(entry: Any) -> str | int:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    raise TypeError(f"unexpected key path entry {entry!r}")


def canonical_name(style: str, path: tuple) -> str:
    """The canonical path of a native leaf, from its key path in the native tree."""
    names = [_key_name(entry) for entry in path]
    if style == "flax" and names and names[0] == "params":
        names = names[1:]
    if style == "nnx" and names and names[-1] == "value":
        names = names[:-1]  # an nnx.Variable's array sits under .value
    if style == "equinox" and len(names) == 1 and isinstance(names[0], str):
        # The adapter's flat dict: {"blocks.0.conv1.weight": ...}, attribute paths joined by dots.
        names = [int(part) if part.isdigit() else part for part in names[0].split(".")]
    if style == "haiku":
        # {"vae/~/encoder/~/fc1": {"w": ...}}: drop the root module and the "~" separators.
        module, leaf = names
        names = [part for part in module.split("/")[1:] if part != "~"] + [leaf]
    parts: list[str] = []
    for name in names:
        if isinstance(name, int):  # a list of layers: layers[0] -> layers_0, as Linen names it
            parts[-1] = f"{parts[-1]}_{name}"
        else:
            # Haiku's w/b and BatchNorm offset, Equinox's weight: the canonical kernel/bias.
            parts.append({"w": "kernel", "b": "bias", "offset": "bias", "weight": "kernel"}.get(name, name))
    return "/".join(parts)


def keepdims_to_vector(shape: tuple[int, ...]) -> Layout:
    """Haiku's BatchNorm keeps its scale, offset and statistics as ``(1, 1, 1, C)``."""
    return Layout(f"{'x'.join(map(str, shape))} -> ({shape[-1]},)",
                  lambda x: x.reshape(x.shape[-1]), lambda x: x.reshape(shape))


def style_layout(style: str, canonical: str, shape: tuple[int, ...]) -> Layout:
    """The layout change a style's conventions impose on one leaf."""
    leaf = canonical.rsplit("/", 1)[-1]
    if style == "haiku" and leaf in ("scale", "bias", "mean", "var") and len(shape) > 1:
        return keepdims_to_vector(shape)
    if style != "equinox":
        return IDENTITY
    if leaf == "kernel" and len(shape) == 2:
        return TRANSPOSE
    if leaf == "kernel" and len(shape) == 4:
        return OIHW_TO_HWIO
    if leaf == "bias" and len(shape) == 3:
        return CONV_BIAS
    return IDENTITY


def _stack_prefix(name: str, stacked: Sequence[str]) -> str | None:
    return next((prefix for prefix in stacked if name.startswith(prefix + "/")), None)


def unstacked(prefix: str, name: str, depth: int, layout: Layout) -> Split:
    """A leaf of ``depth`` layers stacked on its leading axis (blocks run by a scan): the canonical
    per-layer leaves ``{prefix}_0/...`` to ``{prefix}_{depth - 1}/...``, each through ``layout``."""
    rest = name[len(prefix):]
    note = f"{depth} layers on axis 0 -> {prefix}_0 ... {prefix}_{depth - 1}"
    return Split(note if layout is IDENTITY else f"{note}, each {layout.note}",
                 tuple(f"{prefix}_{i}{rest}" for i in range(depth)),
                 lambda w: [layout.forward(w[i]) for i in range(depth)],
                 lambda parts: jnp.stack([layout.backward(p) for p in parts]))


class Converter:
    """Maps one style's parameter tree to the canonical dict and back, exactly."""

    def __init__(self, style: str, template: PyTree, extra: Mapping[str, Layout | Renamed | Split] | None = None,
                 stacked: Sequence[str] = ()):
        """``extra``: rules beyond the style's per-leaf conventions, keyed by the canonical path the
        leaf's own path gives (a Layout applied after the conventions, a rename, a split), for one
        layer where the leaf is stacked. ``stacked``: prefixes of those paths whose leaves hold their
        layers on a leading axis (``blocks``: blocks run by a scan); each maps to the canonical
        per-layer leaves (``blocks_0``, ``blocks_1``, ...), the same whether the model scans or not."""
        self.style = style
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(template)
        extra = dict(extra or {})
        self.rules: list[LeafRule] = []
        for path, leaf in leaves:
            name = canonical_name(style, path)
            prefix = _stack_prefix(name, stacked)
            shape = tuple(np.shape(leaf))
            layer_shape = shape[1:] if prefix else shape
            if style == "equinox" and name.endswith("/kernel") and len(layer_shape) == 1:
                name = name[:-len("kernel")] + "scale"  # a BatchNorm's or LayerNorm's weight
            abstract = jax.ShapeDtypeStruct(shape, jnp.float32)
            rule = extra.pop(name, None)
            if isinstance(rule, Split):
                part_shapes = tuple(tuple(p.shape) for p in jax.eval_shape(rule.forward, abstract))
                if len(part_shapes) != len(rule.parts):
                    raise ValueError(f"{style}: the split of {name} gives {len(part_shapes)} parts, "
                                     f"not {len(rule.parts)}")
                self.rules.append(LeafRule(jax.tree_util.keystr(path), rule.parts, Layout(rule.note, None, None),
                                           shape, part_shapes, rule))
                continue
            renamed = isinstance(rule, Renamed)
            if renamed:
                name, rule = rule.canonical, rule.layout
            layout = style_layout(style, name, layer_shape)
            if rule is not None:
                layout = layout.then(rule)
            if prefix:
                split = unstacked(_stack_prefix(name, stacked) or prefix, name, shape[0], layout)
                part = tuple(jax.eval_shape(layout.forward, jax.ShapeDtypeStruct(layer_shape, jnp.float32)).shape)
                self.rules.append(LeafRule(jax.tree_util.keystr(path), split.parts, Layout(split.note, None, None),
                                           shape, (part,) * shape[0], split, renamed))
                continue
            canonical_shape = tuple(jax.eval_shape(layout.forward, abstract).shape)
            self.rules.append(LeafRule(jax.tree_util.keystr(path), (name,), layout, shape, (canonical_shape,),
                                       renamed=renamed))
        names = self.canonical_paths()
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"{style}: several leaves map to {sorted(duplicates)}")
        if extra:
            raise ValueError(f"{style}: layout rules for unknown leaves {sorted(extra)}")
        self.shapes = {p: s for rule in self.rules for p, s in zip(rule.parts, rule.part_shapes)}

    def to_canonical(self, tree: PyTree, *, offsets: bool = True) -> Canonical:
        """The canonical dict of a tree shaped like the parameters. ``offsets=False`` for trees of
        gradients or optimiser moments, which a split's constant offsets do not apply to."""
        try:
            leaves = self.treedef.flatten_up_to(tree)
        except (ValueError, TypeError, KeyError) as err:
            detail = (str(err).splitlines() or [""])[0]
            raise ZooError(f"this is not the {self.style} tree of this model, whose leaves are "
                           f"{_listing([r.native for r in self.rules])} (build the model with the "
                           f"hyperparameters the tree was made with; {detail[:160]})") from None
        out: Canonical = {}
        for rule, leaf in zip(self.rules, leaves):
            if _is_placeholder(leaf):
                for part in rule.parts:
                    _set(out, part, leaf)
                continue
            _check_shape(f"{rule.canonical} ({self.style} {rule.native})", rule.native_shape, leaf)
            for part, value in zip(rule.parts, rule.forward(leaf, offsets)):
                _set(out, part, value)
        return out

    def from_canonical(self, canonical: Canonical, *, offsets: bool = True) -> PyTree:
        check_canonical(canonical, self.shapes, "parameters")
        leaves = []
        for rule in self.rules:
            values = [_get(canonical, part) for part in rule.parts]
            placeholders = [_is_placeholder(v) for v in values]
            if any(placeholders) and not all(placeholders):
                raise ZooError(f"{self.style} keeps {rule.canonical} in one array ({rule.native}): "
                               "they are frozen or trained together")
            leaves.append(values[0] if placeholders[0] else rule.backward(values, offsets))
        return self.treedef.unflatten(leaves)

    def canonical_paths(self) -> list[str]:
        """Every canonical path, in the order of the native leaves (a split's parts together)."""
        return [part for rule in self.rules for part in rule.parts]


def check_canonical(canonical: Any, shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Refuse, in one line, canonical ``what`` (parameters, state) of other paths or shapes than ``shapes``."""
    given = flatten_canonical(canonical) if isinstance(canonical, Mapping) else {}
    missing, extra = sorted(set(shapes) - set(given)), sorted(set(given) - set(shapes))
    if missing or extra:
        raise ZooError(f"not this model's {what}: "
                       + "; ".join(part for part in (f"missing {_listing(missing)}" if missing else "",
                                                     f"unexpected {_listing(extra)}" if extra else "") if part)
                       + " (build the model with the hyperparameters they were trained with)")
    for path, value in given.items():
        if not _is_placeholder(value):
            _check_shape(path if what == "parameters" else f"{what} {path}", shapes[path], value)


def _check_shape(path: str, expected: tuple[int, ...], value: Any) -> None:
    shape = tuple(np.shape(value))
    if shape != expected:
        raise ZooError(f"{path}: expected shape {expected}, got {shape} (the model was built for another "
                       "input shape or other hyperparameters; build it with the ones the parameters have)")
    if not (jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)):
        raise ZooError(f"{path}: expected an array of numbers, got dtype {value.dtype}")


def _listing(names: list[str], at_most: int = 4) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f" and {len(names) - at_most} more" if len(names) > at_most else "")


def _is_placeholder(leaf: Any) -> bool:
    return leaf is None or type(leaf).__name__ == "MaskedNode"


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _get(tree: Mapping, path: str) -> Any:
    for part in path.split("/"):
        if not isinstance(tree, Mapping) or part not in tree:
            raise KeyError(f"canonical parameters have no {path!r}")
        tree = tree[part]
    return tree


def flatten_canonical(tree: Canonical, prefix: str = "") -> dict[str, Any]:
    """``{"conv1/kernel": array, ...}`` for a canonical dict."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_canonical(value, path + "/"))
        else:
            flat[path] = value
    return flat


def nest_canonical(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_canonical`: ``{"blocks_0/bn1/bias": x}`` ->
    ``{"blocks_0": {"bn1": {"bias": x}}}``."""
    nested: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = leaf
    return nested
