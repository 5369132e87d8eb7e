"""Parameters from outside: ``zoo import`` and ``zoo export``.

``zoo import`` reads parameters saved the way each framework's users save them
and writes a zoo checkpoint (canonical layout, step 0) that ``--init-from``,
``zoo sample`` and every style read:

- Flax: ``flax.serialization.to_bytes`` (msgpack) of ``params`` or of the whole
  ``{"params": ..., "batch_stats": ...}``, and Orbax checkpoint folders;
- Haiku and plain JAX: ``.npz`` of the flattened params dict (``np.savez``);
- Equinox: ``eqx.tree_serialise_leaves`` files, read against the catalogue's
  Equinox model (with its ``eqx.nn.State`` for a model with state).

A tree with exactly the catalogue's names for ``--from`` goes through that
style's converter. Otherwise the names are the framework's own generated ones
(Linen's ``Conv_0``, ``Dense_1``; Haiku's ``linear``, ``linear_1`` or
``mlp/~/linear_0``; NNX's attribute names): modules are matched to the
canonical ones by their order and the shapes of their leaves, the mapping is
printed, and an ambiguous one is refused (``--map FILE`` settles it). Those
frameworks store dense and convolution kernels as the canonical layout does
(``(in, out)``, HWIO), so a renamed leaf is the canonical leaf. Pickles are
refused: loading one runs whatever code it holds.

``zoo export`` writes a checkpoint's parameters (and state) back in those
formats; export then import is bitwise the identity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import equinox as eqx
import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from shared import checkpoint, files, registry
from shared import styles as styles_lib
from shared.args import int_list, path_arg
from shared.errors import ZooError
from shared.layouts import flatten_canonical, nest_canonical
from shared.registry import NAMES, STYLES

EXPORT_FORMATS = ("msgpack", "npz", "eqx")  # zoo import also reads Orbax folders
SUFFIXES = {".msgpack": "msgpack", ".npz": "npz", ".eqx": "eqx"}
PICKLE_SUFFIXES = (".pkl", ".pickle", ".p", ".pt", ".pth", ".ckpt")
# Leaf names the frameworks give a layer's arrays, and the canonical name of each.
ROLES = {"kernel": "kernel", "w": "kernel", "bias": "bias", "b": "bias", "scale": "scale",
         "offset": "bias", "mean": "mean", "var": "var"}
# Styles whose trees store kernels as the canonical layout does: a renamed leaf is the canonical leaf.
RENAMABLE = ("jax", "flax", "nnx", "haiku")


# --------------------------------------------------------------------------- reading


def detect_format(path: Path) -> str:
    """The format of ``path`` by its suffix and first bytes; pickles are refused."""
    if path.is_dir():
        return "orbax"
    head = path.read_bytes()[:2] if path.is_file() else b""
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80":
        raise ZooError(f"{path} is a pickle (or looks like one): loading a pickle runs whatever code it holds, "
                       "so zoo never does; save the parameters with flax.serialization.to_bytes, np.savez or "
                       "eqx.tree_serialise_leaves")
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    if head == b"PK":
        return "npz"
    raise ZooError(f"cannot tell the format of {path} by its name; name it .msgpack, .npz or .eqx")


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict's arrays by "/"-joined path, in the dict's own order (``checkpoint.flatten``
    sorts the keys, and the reference's insertion order is the network's order)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def read_dict(path: Path, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(params, state)`` of a msgpack, npz or Orbax file, each flat by "/"-joined path."""
    try:
        if fmt == "msgpack":
            tree = flax.serialization.msgpack_restore(path.read_bytes())
        elif fmt == "npz":
            with np.load(path, allow_pickle=False) as archive:
                tree = {key: archive[key] for key in archive.files}
        else:
            if (path / "meta").exists() or checkpoint.steps(path):
                raise ZooError(f"{path} is a zoo checkpoint already: give it to --init-from as it is")
            with checkpoint.quiet():
                tree = ocp.StandardCheckpointer().restore(path.absolute())
    except ZooError:
        raise
    except Exception as error:  # msgpack, zip, Orbax: all mean "not a readable file of that format"
        raise ZooError(f"{path} is not a readable {fmt} file ({type(error).__name__}: "
                       f"{str(error).strip().splitlines()[0][:160] if str(error).strip() else ''})") from None
    if not isinstance(tree, dict):
        raise ZooError(f"{path} holds a {type(tree).__name__}, not a dict of parameters")
    state = {}
    if set(tree) >= {"params"} and isinstance(tree["params"], dict):  # Linen's whole variables dict
        state = _flat(tree.get("batch_stats", {})) if isinstance(tree.get("batch_stats", {}), dict) else {}
        tree = tree["params"]
    flat = _flat(tree) if fmt != "npz" else {k: np.asarray(v) for k, v in tree.items()}
    if fmt == "npz" and any(k.startswith("state/") for k in flat):
        state = {k[len("state/"):]: v for k, v in flat.items() if k.startswith("state/")}
        flat = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in flat.items()
                if not k.startswith("state/")}
    if not flat or not all(np.issubdtype(v.dtype, np.floating) for v in flat.values()):
        raise ZooError(f"{path} holds no floating-point parameter arrays")
    return flat, state


# --------------------------------------------------------------------------- naming


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _split(path: str) -> tuple[str, str]:
    """``("Conv_0", "kernel")`` for ``Conv_0/kernel``; ``mlp/~/linear_0/w`` keeps its module path."""
    module, _, leaf = path.rpartition("/")
    return module, leaf


def _modules(flat: dict[str, Any], canonical_names: bool) -> dict[str, dict[str, Any]]:
    modules: dict[str, dict[str, Any]] = {}
    for path, value in flat.items():
        module, leaf = _split(path)
        role = leaf if canonical_names else ROLES.get(leaf)
        if role is None:
            raise ZooError(f"cannot tell what the array {path} is: its name {leaf!r} is none of "
                           f"{', '.join(sorted(ROLES))}; name the modules with --map")
        modules.setdefault(module, {})[role] = value
    return modules


def _signature(leaves: dict[str, Any]) -> tuple:
    return tuple(sorted((role, tuple(np.shape(v))) for role, v in leaves.items()))


def map_names(source: dict[str, dict[str, Any]], target: dict[str, dict[str, Any]],
              given: dict[str, str] | None = None) -> dict[str, str]:
    """``{source module: canonical module}``, by ``given`` pairs first, then by order and shape.

    In order: the source modules sorted by their names' numbers (``linear`` <
    ``linear_1`` < ``linear_2``; ``Conv_0`` < ``Conv_1`` < ``Dense_0``), the
    canonical ones in the network's order, pairwise when every pair's leaves
    have the same shapes. Otherwise each canonical module takes the one source
    module of its shapes; two of the same shapes that order does not settle
    are refused.
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(source)) + sorted(set(given.values()) - set(target))
    if unknown:
        raise ZooError(f"--map names {unknown[0]!r}, which is not a module of "
                       f"{'the file' if unknown[0] in given else 'the model'}")
    mapping = dict(given)
    rest_source = sorted((m for m in source if m not in mapping), key=_natural)
    rest_target = [m for m in target if m not in mapping.values()]
    if len(rest_source) != len(rest_target):
        raise ZooError(f"the file has {len(source)} modules with parameters and the model {len(target)}: "
                       f"{', '.join(sorted(source, key=_natural)[:6])} against {', '.join(list(target)[:6])}")
    if all(_signature(source[s]) == _signature(target[t]) for s, t in zip(rest_source, rest_target)):
        mapping.update(zip(rest_source, rest_target))
        return mapping
    for t in rest_target:
        candidates = [s for s in rest_source if _signature(source[s]) == _signature(target[t])
                      and s not in mapping]
        if len(candidates) != 1:
            raise ZooError(f"cannot tell which module of the file is {t} "
                           f"({', '.join(f'{r} {s}' for r, s in _signature(target[t]))}): "
                           + (f"{' and '.join(candidates[:3])} all fit" if candidates else "none fits")
                           + "; give the pairs with --map FILE (JSON: {\"file's module\": \"model's module\"})")
        mapping[candidates[0]] = t
    return mapping


# --------------------------------------------------------------------------- import


@dataclasses.dataclass
class Imported:
    model: styles_lib.Model  # the plain-JAX reference, whose trees are canonical
    params: dict[str, Any]  # canonical
    state: dict[str, Any]  # canonical
    mapping: dict[str, str]  # file's module -> canonical module ({} when the names were the catalogue's)
    fmt: str


def _network_order(model: styles_lib.Model) -> dict[str, dict[str, Any]]:
    """The canonical modules in the order the reference's initialiser makes them (the network's)."""
    module = model.module
    spec = model.spec
    params = module.init(jax.random.key(0), **styles_lib._split_kwargs(module.init, spec.kwargs(
        model.in_shape, model.num_classes, model.hparams)))
    params = params[0] if spec.state else params
    return _modules(_flat(params), canonical_names=True)


def import_params(path: str | Path, model_name: str, style: str, *, in_shape: tuple[int, int, int],
                  num_classes: int = 10, names: dict[str, str] | None = None, **hparams: Any) -> Imported:
    """Read ``path`` (saved by ``style``'s users) as the canonical parameters of ``model_name``."""
    path = Path(path)
    fmt = detect_format(path)
    reference = styles_lib.build_once(model_name, "jax", in_shape=in_shape, num_classes=num_classes, **hparams)
    native = styles_lib.build_once(model_name, style, in_shape=in_shape, num_classes=num_classes, **hparams)
    init_params, init_state = jax.eval_shape(native.init, jax.random.key(0))
    if fmt == "eqx":
        if style != "equinox":
            raise ZooError(f"{path} is an Equinox file (tree_serialise_leaves); give --from equinox")
        params, state = _read_eqx(path, native)
        return Imported(reference, native.to_canonical(params), native.state_to_canonical(state), {}, fmt)
    flat, flat_state = read_dict(path, fmt)
    ours = checkpoint.flatten(init_params)
    if not names and set(flat) == set(ours):  # the catalogue's own names for this style
        tree = jax.tree.unflatten(jax.tree.structure(init_params), [flat[p] for p in ours])
        theirs = checkpoint.flatten(init_state)
        state = (native.state_to_canonical(jax.tree.unflatten(jax.tree.structure(init_state),
                                                              [flat_state[p] for p in theirs]))
                 if theirs and set(flat_state) == set(theirs) else _initial_state(reference))
        return Imported(reference, native.to_canonical(tree), state, {}, fmt)
    if style not in RENAMABLE:
        raise ZooError(f"{path}: its names are not the catalogue's {style} names, and {style} stores kernels "
                       "transposed, so they cannot be matched by shape; save the catalogue's own model")
    source = _modules(flat, canonical_names=False)
    mapping = map_names(source, _network_order(reference), names)
    nested = nest_canonical({f"{dst}/{role}": value for src, dst in mapping.items()
                               for role, value in source[src].items()})
    reference.from_canonical(nested)  # checks every path and shape against the model, in one line
    return Imported(reference, nested, _initial_state(reference), mapping, fmt)


def _initial_state(reference: styles_lib.Model) -> dict[str, Any]:
    """The model's initial state (BatchNorm's running statistics), canonical: none without state, and else
    one small program (the parameters' draws, which it does not return, are dead code to XLA)."""
    if not reference.spec.state:
        return {}
    return reference.state_to_canonical(jax.jit(lambda key: reference.init(key)[1])(jax.random.key(0)))


def _equinox_skeleton(native: styles_lib.Model) -> tuple[Any, Any]:
    params, state = native.init(jax.random.key(0))
    module, eqx_state = native.as_module(params, state, False)
    return module, eqx_state


def _read_eqx(path: Path, native: styles_lib.Model) -> tuple[Any, Any]:
    module, eqx_state = _equinox_skeleton(native)
    like = (module, eqx_state) if eqx_state is not None else module
    try:
        loaded = eqx.tree_deserialise_leaves(path, like)
    except Exception as error:  # wrong skeleton, truncated file
        raise ZooError(f"{path} does not fit the catalogue's Equinox {native.name} "
                       f"({type(error).__name__}: {str(error).strip().splitlines()[0][:160]}); check the "
                       "model and its hyperparameters") from None
    module, eqx_state = loaded if eqx_state is not None else (loaded, None)
    arrays = eqx.filter(module, eqx.is_array)
    params = {styles_lib._dotted(p): v for p, v in jax.tree_util.tree_leaves_with_path(arrays)}
    state = {}
    if eqx_state is not None:
        for name, (statistics, counter) in styles_lib.equinox_batch_norms(module, eqx_state):
            mean, var = eqx_state.get(statistics)
            state.update({f"{name}.mean": mean, f"{name}.var": var, f"{name}.counter": eqx_state.get(counter)})
    return params, state


# --------------------------------------------------------------------------- export


def export(path: str | Path, style: str, fmt: str, out: str | Path) -> Path:
    """Write the parameters (and state) of the checkpoint at ``path`` as ``style``'s users save them."""
    if fmt not in EXPORT_FORMATS:
        raise ZooError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt}")
    if fmt == "eqx" and style != "equinox":
        raise ZooError("--format eqx is Equinox's: give --style equinox")
    model, params, state = checkpoint.load_variables(path, style)
    out = Path(out)
    if fmt == "eqx":
        module, eqx_state = model.as_module(params, state, False)
        with files.atomic_path(out) as tmp:
            eqx.tree_serialise_leaves(tmp, (module, eqx_state) if eqx_state is not None else module)
        return out
    # (For Equinox, npz and msgpack hold the adapter's flat dict by attribute path, PyTorch's names.)
    has_state = bool(jax.tree.leaves(state))
    if fmt == "msgpack":
        tree = {"params": params, **({"batch_stats": state} if has_state else {})} if has_state else params
        data = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, tree))
        with files.atomic_path(out) as tmp:
            tmp.write_bytes(data)
    elif fmt == "npz":
        flat = {"/".join(map(str, k)) if isinstance(k, tuple) else k: np.asarray(v)
                for k, v in flatten_canonical(params).items()}
        if has_state:
            flat = {f"params/{k}": v for k, v in flat.items()}
            flat.update({f"state/{k}": np.asarray(v) for k, v in flatten_canonical(state).items()})
        with files.atomic_path(out) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **flat)
    return out


# --------------------------------------------------------------------------- command line


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="bring in parameters saved by a framework's own users",
                       description="Read parameters saved with flax.serialization (msgpack), np.savez (npz), "
                                   "eqx.tree_serialise_leaves (eqx) or Orbax, map their names to the model's "
                                   "and write a zoo checkpoint that --init-from and every style read.")
    p.add_argument("file", type=path_arg, metavar="FILE")
    p.add_argument("--model", required=True, choices=NAMES)
    p.add_argument("--from", dest="style", required=True, choices=STYLES, help="the framework that saved FILE")
    p.add_argument("--in-shape", type=int_list, default=(28, 28, 1), metavar="H,W,C",
                   help="the images the model was made for (default: 28,28,1, MNIST)")
    p.add_argument("--num-classes", type=int, default=10)
    registry.add_hparam_flags(p)
    p.add_argument("--map", type=path_arg, metavar="FILE", help="JSON pairs {\"file's module\": \"model's module\"}")
    p.add_argument("--out", type=path_arg, required=True, help="the zoo checkpoint folder to write (new or empty)")
    p.set_defaults(handler=run_import)

    p = sub.add_parser("export", help="write a checkpoint's parameters the way a framework's users load them")
    p.add_argument("checkpoint", type=path_arg, metavar="CHECKPOINT")
    p.add_argument("--style", required=True, choices=STYLES)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", type=path_arg, required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(handler=run_export)


def run_import(args: argparse.Namespace) -> int:
    source = files.input_path(args.file, "FILE")
    out = files.output_dir(args.out, "--out")
    if len(args.in_shape) != 3:
        raise ZooError(f"--in-shape must be H,W,C, got {','.join(map(str, args.in_shape))}")
    names = None
    if args.map:
        try:
            names = json.loads(files.input_path(args.map, "--map", folder=False).read_text())
        except ValueError as error:
            raise ZooError(f"--map {args.map} is not valid JSON ({error})") from None
        if not (isinstance(names, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in names.items())):
            raise ZooError(f"--map {args.map} must be a JSON object of names: {{\"Dense_0\": \"dense1\"}}")
    hparams = registry.given_hparams(args.model, vars(args))
    # The folder is held from here to the end: a second import into it is refused, not raced.
    with checkpoint.locked(out):
        if any(p.name != checkpoint.LOCK_NAME for p in out.iterdir()):
            raise ZooError(f"--out {out} is not empty; give a new or empty folder for the imported checkpoint")
        imported = import_params(source, args.model, args.style, in_shape=tuple(args.in_shape),
                                 num_classes=args.num_classes, names=names, **hparams)
        checkpoint.write_imported(out, imported.model, imported.params, imported.state,
                                  {"file": str(source), "format": imported.fmt, "style": args.style,
                                   "mapping": imported.mapping})
    if imported.mapping:
        width = max(map(len, imported.mapping))
        print("module in the file".ljust(width) + "  ->  canonical module (shapes)")
        canonical = flatten_canonical(imported.params)
        for src, dst in imported.mapping.items():
            shapes = ", ".join(str(tuple(np.shape(v))) for k, v in canonical.items() if k.rpartition("/")[0] == dst)
            print(f"{src.ljust(width)}  ->  {dst} ({shapes})")
    print(f"wrote {out} (a zoo checkpoint of {args.model}, step 0): --init-from {out}, or zoo sample / "
          f"zoo export in any style")
    return 0


def run_export(args: argparse.Namespace) -> int:
    out = files.output_file(args.out, "--out", f".{args.format}")
    files.input_path(args.checkpoint, "CHECKPOINT")
    with files.claimed(out, "--out", force=args.force):
        path = export(args.checkpoint, args.style, args.format, out)
    print(f"wrote {path}")
    return 0


