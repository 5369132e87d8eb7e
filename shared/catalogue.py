"""Reading the catalogue: ``zoo show`` (styles side by side in a terminal) and
``zoo copy`` (take one model file into your own project, and prove it stands alone).

The alignment of the files here is shared with the HTML catalogue
(:mod:`shared.site`): :func:`align` puts the same concept on the same row in
every style, and :func:`differs_from_reference` marks the lines a style does
not share with the plain-JAX reference.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import site as stdlib_site  # the standard library's, not shared.site
import subprocess
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from importlib import metadata
from typing import Any

import pygments
from packaging.requirements import Requirement
from pygments.formatters import TerminalFormatter
from pygments.lexers import PythonLexer
from pygments.token import Text

import zoo
from shared import files, registry
from shared.args import choice_list, int_at_least, path_arg
from shared.errors import ZooError, check_choice
from shared.registry import NAMES, STYLES

TITLES = {"jax": "plain JAX", "flax": "Flax Linen", "nnx": "Flax NNX", "haiku": "Haiku", "equinox": "Equinox"}
# The rows are anchored on the Linen file, not on the plain-JAX reference: the
# reference is a set of functions over a dict (init/apply), while the four
# framework files are classes with the same attribute names in the same order,
# so Linen lines up line for line with NNX, Haiku and Equinox, and the
# reference is then fitted in around that skeleton.
ANCHOR = "flax"
REFERENCE = "jax"
# The order styles are fitted in: the anchor, the other class-based files, the reference last.
ALIGN_ORDER = (ANCHOR, "nnx", "haiku", "equinox", REFERENCE)
# Lines pair up when at least this share of their tokens match (difflib ratio);
# lower, and unrelated lines that share only `self`, `=` and brackets would pair.
PAIR_THRESHOLD = 0.5
BLANK_SCORE = 0.2  # blank lines pair with blank lines, but weakly: they must not pull code apart

Token = tuple[Any, str]  # (pygments token type, text)


# --------------------------------------------------------------------------- files


def source_path(model: str, style: str) -> Path:
    """The catalogue's file for ``model`` in ``style``."""
    return Path(zoo.__file__).resolve().parent / style / f"{model}.py"


def read_lines(model: str, style: str) -> list[str]:
    return source_path(model, style).read_text().splitlines()


# --------------------------------------------------------------------------- alignment


def _tokens(line: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[A-Za-z_]\w*|\d+|\S", line))


@lru_cache(maxsize=65536)
def _similarity(a: tuple[str, ...], b: tuple[str, ...]) -> float:
    if not a and not b:
        return BLANK_SCORE
    if not a or not b:
        return 0.0
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if matcher.real_quick_ratio() < PAIR_THRESHOLD or matcher.quick_ratio() < PAIR_THRESHOLD:
        return 0.0
    ratio = matcher.ratio()
    return ratio if ratio >= PAIR_THRESHOLD else 0.0


def _pair(rows: list[list[tuple[str, ...]]], lines: list[tuple[str, ...]]) -> list[tuple[int, int]]:
    """The monotone pairing of ``lines`` with ``rows`` that maximises the summed similarity.

    A row scores as its best-matching cell. Unpaired rows and lines cost
    nothing: this is a weighted longest common subsequence.
    """
    n, m = len(rows), len(lines)
    score = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, prev, cur = rows[i - 1], score[i - 1], score[i]
        for j in range(1, m + 1):
            best = max(prev[j], cur[j - 1])
            sim = max(_similarity(cell, lines[j - 1]) for cell in row)
            if sim > 0.0 and prev[j - 1] + sim > best:
                best = prev[j - 1] + sim
            cur[j] = best
    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def align(sources: Mapping[str, Sequence[str]], anchor: str = ANCHOR) -> list[dict[str, int]]:
    """Rows of line indices, one dict ``{style: line index}`` per row; a style
    missing from a row has a blank cell there.

    Progressive alignment: the rows start as the anchor's lines; every other
    style in turn, in the order of ``sources``, is paired with the rows so far
    (:func:`_pair`). Between two
    pairs, its unpaired lines fill the blank cells of the rows there, top down,
    as a side-by-side diff shows a changed block, and get rows of their own
    only when they outnumber those rows. Every line of every file appears
    exactly once, in order.
    """
    rows: list[dict[str, int]] = [{anchor: i} for i in range(len(sources[anchor]))]
    for style in [s for s in sources if s != anchor]:
        lines = [_tokens(line) for line in sources[style]]
        cells = [[_tokens(sources[s][i]) for s, i in row.items()] for row in rows]
        pairs = _pair(cells, lines) + [(len(rows), len(lines))]  # a sentinel pair after the end
        merged: list[dict[str, int]] = []
        i0 = j0 = 0
        for i1, j1 in pairs:
            gap = [dict(row) for row in rows[i0:i1]]
            extra = list(range(j0, j1))
            for row, j in zip(gap, extra):
                row[style] = j
            merged += gap + [{style: j} for j in extra[len(gap):]]
            if i1 < len(rows):
                merged.append({**rows[i1], style: j1})
            i0, j0 = i1 + 1, j1 + 1
        rows = merged
    return rows


def differs_from_reference(lines: Sequence[str], reference: Sequence[str]) -> set[int]:
    """Indices of the non-blank ``lines`` that a line diff against ``reference``
    leaves unmatched: what ``diff zoo/jax/cnn.py zoo/flax/cnn.py`` would mark."""
    a = [line.strip() for line in reference]
    b = [line.strip() for line in lines]
    same: set[int] = set()
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        same.update(range(block.b, block.b + block.size))
    return {j for j, line in enumerate(b) if line and j not in same}


# --------------------------------------------------------------------------- highlighting


def token_lines(source: str) -> list[list[Token]]:
    """Pygments tokens of ``source``, split into one list per line (a docstring
    spanning lines is cut at each newline), so each line renders on its own."""
    lines: list[list[Token]] = [[]]
    for ttype, value in PythonLexer(stripnl=False, ensurenl=False).get_tokens(source):
        for k, part in enumerate(value.split("\n")):
            if k:
                lines.append([])
            if part:
                lines[-1].append((ttype, part))
    return lines[:len(source.splitlines())]


def _slice(tokens: Sequence[Token], start: int, end: int) -> list[Token]:
    out, pos = [], 0
    for ttype, text in tokens:
        a, b = max(start, pos), min(end, pos + len(text))
        if a < b:
            out.append((ttype, text[a - pos:b - pos]))
        pos += len(text)
    return out


def wrap(tokens: Sequence[Token], width: int) -> list[list[Token]]:
    """A line cut into pieces of at most ``width`` characters, preferring to break
    after a space; continuation pieces get a hanging indent of 4."""
    width = max(width, 1)
    text = "".join(t for _, t in tokens)
    if len(text) <= width:
        return [list(tokens)]
    indent = len(text) - len(text.lstrip(" "))
    hang = min(indent + 4, width // 2)
    pieces, start, room = [], 0, width
    while len(text) - start > room:
        end = start + room
        space = text.rfind(" ", start + room // 2, end)
        cut = space + 1 if space > start else end
        pieces.append((start, cut))
        start, room = cut, width - hang
    pieces.append((start, len(text)))
    return [([(Text, " " * hang)] if k else []) + _slice(tokens, a, b) for k, (a, b) in enumerate(pieces)]


def render(tokens: Sequence[Token], color: bool) -> str:
    if not color:
        return "".join(t for _, t in tokens)
    return pygments.format(tokens, TerminalFormatter()).rstrip("\n")


# --------------------------------------------------------------------------- zoo show

MIN_COLUMN = 60  # characters per column, line numbers included, below which styles are stacked


def _box(encoding: str | None) -> tuple[str, str]:
    """Separator and rule characters the output stream can encode."""
    try:
        "│─".encode(encoding or "ascii")
        return "│", "─"
    except (UnicodeEncodeError, LookupError):
        return "|", "-"


def show_text(model: str, styles: Sequence[str], width: int, *, color: bool = False,
              encoding: str | None = "utf-8") -> str:
    """The files of ``model`` in ``styles``: aligned side by side when every
    column gets at least :data:`MIN_COLUMN` characters of ``width``, else one
    after another; long lines wrap within their column."""
    bar, rule = _box(encoding)
    sources = {s: source_path(model, s).read_text() for s in styles}
    tokens = {s: token_lines(text) for s, text in sources.items()}
    number = max(len(str(len(t))) for t in tokens.values()) + 1  # line numbers and a space
    sep = f" {bar} "
    column = (width - len(sep) * (len(styles) - 1)) // len(styles)
    out: list[str] = []
    if len(styles) > 1 and column >= MIN_COLUMN:
        heads = [f"{TITLES[s]}: zoo/{s}/{model}.py"[:column].ljust(column) for s in styles]
        out.append(sep.join(heads).rstrip())
        out.append(sep.join(rule * column for _ in styles))
        anchor = ANCHOR if ANCHOR in styles else styles[0]
        order = [s for s in ALIGN_ORDER if s in styles]
        rows = align({s: sources[s].splitlines() for s in order}, anchor)
        for row in rows:
            cells = []
            for s in styles:
                if s not in row:
                    cells.append([])
                    continue
                pieces = wrap(tokens[s][row[s]], column - number)
                gutters = [str(row[s] + 1).rjust(number - 1) + " "] + [" " * number] * (len(pieces) - 1)
                cells.append([(g + "".join(t for _, t in p), g + render(p, color)) for g, p in zip(gutters, pieces)])
            for k in range(max(map(len, cells)) or 1):
                parts = []
                for cell in cells:
                    plain, shown = cell[k] if k < len(cell) else ("", "")
                    parts.append(shown + " " * (column - len(plain)))
                out.append(sep.join(parts).rstrip())
    else:
        for s in styles:
            out.append(f"{rule * 2} {TITLES[s]}: zoo/{s}/{model}.py ".ljust(width, rule)[:width])
            for i, line in enumerate(tokens[s]):
                for k, piece in enumerate(wrap(line, width - number)):
                    gutter = (str(i + 1).rjust(number - 1) + " ") if k == 0 else " " * number
                    out.append((gutter + render(piece, color)).rstrip())
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


MAX_WIDTH = 2000  # five columns of 400 characters: wider than any screen, and a page of text stays small


def run_show(args: argparse.Namespace) -> int:
    width = args.width or min(max(20, shutil.get_terminal_size((100, 24)).columns), MAX_WIDTH)
    text = show_text(args.model, args.styles, width, color=_use_color(args.color),
                     encoding=getattr(sys.stdout, "encoding", None))
    sys.stdout.write(text)
    return 0


# --------------------------------------------------------------------------- zoo copy

# What each style needs installed: (distribution, extras) besides jax and numpy,
# and the module the model file imports it as.
FRAMEWORKS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "jax": (),
    "flax": (("flax", ()),),
    "nnx": (("flax", ()),),
    "haiku": (("dm-haiku", ("jax",)),),  # dm-haiku declares jax only under its "jax" extra
    "equinox": (("equinox", ()),),
}
# What a model file may import beyond the standard library, jax and numpy: its framework (for
# Equinox also jaxtyping, the shape annotations its docs write, which Equinox itself requires).
FRAMEWORK_MODULES = {"jax": set(), "flax": {"flax"}, "nnx": {"flax"}, "haiku": {"haiku"},
                     "equinox": {"equinox", "jaxtyping"}}
CHECK_SHAPE = (8, 8, 1)  # the digits' image shape: small, so the check is quick


class CopyCheckError(Exception):
    """The copied file did not import or run on its own."""


def destination(model: str, dest: str | Path) -> Path:
    """``DEST/<model>.py`` for a folder (made if missing), or ``DEST`` itself when it ends in ``.py``."""
    if not str(dest).strip():
        raise ZooError("DEST: expected a folder or a file path ending in .py, got an empty one")
    dest = Path(dest)
    if dest.suffix == ".py":
        if dest.is_dir():
            raise ZooError(f"{dest} is a folder; give a folder to copy into or a file path ending in .py")
        return dest
    if dest.exists() and not dest.is_dir():
        raise ZooError(f"{dest} exists and is not a folder; give a folder or a file path ending in .py")
    return dest / f"{model}.py"


def copy_model(model: str, style: str, dest: str | Path, *, force: bool = False) -> Path:
    """Copy ``zoo/<style>/<model>.py`` to ``dest``, atomically; never overwrite unless ``force``."""
    check_choice("model", model, NAMES)
    check_choice("style", style, STYLES)
    target = destination(model, dest)
    files.output_file(target, "DEST")
    with files.claimed(target, "DEST", force=force), files.atomic_path(target) as tmp:
        tmp.write_bytes(source_path(model, style).read_bytes())
    return target


def imports_of(path: Path) -> set[str]:
    """Top-level names of the modules a Python file imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_distributions(style: str) -> set[str]:
    """jax, numpy and the style's framework, with everything they require, recursively."""
    todo = [("jax", ()), ("numpy", ()), *FRAMEWORKS[style]]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    allowed: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if (_canon(name), extras) in seen:
            continue
        seen.add((_canon(name), extras))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        allowed.add(_canon(name))
        for text in requires:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or ("",))):
                continue
            todo.append((req.name, tuple(sorted(req.extras))))
    return allowed


def hidden_modules(style: str) -> list[str]:
    """Installed top-level modules outside jax, numpy, the framework and their requirements."""
    allowed = allowed_distributions(style)
    return sorted(module for module, dists in metadata.packages_distributions().items()
                  if module not in sys.stdlib_module_names and module not in ("zoo", "shared")
                  and not any(_canon(d) in allowed for d in dists))


def _site_dirs() -> list[str]:
    dirs = list(stdlib_site.getsitepackages())
    if stdlib_site.ENABLE_USER_SITE:
        dirs.append(stdlib_site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


# Runs in a fresh `python -I -S`: no PYTHONPATH, no current folder on sys.path and
# no .pth hooks (so not the editable install of this repository either); only the
# site-packages folders are added back, with the packages the style does not need hidden.
CHECK_SCRIPT = r'''
import importlib, importlib.abc, importlib.util, json, os, sys, traceback

spec = json.load(sys.stdin)
sys.path.extend(spec["site"])
report = {"python": sys.executable, "cwd": os.getcwd(),
          "found": {name: importlib.util.find_spec(name) is not None for name in ("zoo", "shared")},
          "repo_on_path": [p for p in sys.path if os.path.realpath(p or ".") == spec["repo"]],
          "items": []}
hidden = frozenset(spec["hidden"])


class Hidden(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: not jax, numpy, "
                                      f"{spec['framework']} or one of their requirements)", name=name)
        return None


sys.meta_path.insert(0, Hidden())
import jax
import jax.numpy as jnp


def forward(module, item):
    """One forward pass in training mode (so dropout and BatchNorm's updates run too); outputs only."""
    import inspect

    key = jax.random.key(0)
    x = jnp.zeros((2, *item["in_shape"]), jnp.int32 if item["kind"] == "lm" else jnp.float32)
    labels = jnp.zeros((2,), jnp.int32)
    style, kwargs, call = item["style"], item["kwargs"], item["call"]
    extra = (labels,) if call["labels"] else ()
    if style == "jax":
        def takes(fn):
            return {k: v for k, v in kwargs.items() if k in inspect.signature(fn).parameters}
        made = module.init(key, **takes(module.init))
        params, state = made if call["state"] else (made, None)
        args = ((params,) + ((state,) if call["state"] else ()) + (x,) + extra
                + ((key,) if call["rng"] else ()) + ((True,) if call["train"] else ()))
        out = module.apply(*args, **takes(module.apply))
        return out[0] if call["state"] else out
    cls = getattr(module, item["class"])
    # Linen and Haiku infer some sizes from the first call: their classes take fewer arguments.
    lazy = {k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters}
    if style == "flax":
        net = cls(**lazy)
        args = (x,) + extra + ((True,) if call["train"] else ()) + ((key,) if call["rng_argument"] else ())
        rngs = {call["rng"]: key} if call["rng"] and not call["rng_argument"] else {}
        variables = net.init(key, *args)
        if call["state"]:
            return net.apply(variables, *args, rngs=rngs, mutable=["batch_stats"])[0]
        return net.apply(variables, *args, rngs=rngs)
    if style == "nnx":
        from flax import nnx
        net = cls(**kwargs, rngs=nnx.Rngs(0))
        return net(x, *extra, **({"rngs": nnx.Rngs(**{call["rng"]: 1})} if call["rng"] else {}))
    if style == "haiku":
        import haiku as hk
        transform = hk.transform_with_state if call["state"] else hk.transform
        f = transform(lambda *a: cls(**lazy)(*a))
        args = (x,) + extra + ((True,) if call["train"] else ())
        if call["state"]:
            params, state = f.init(key, *args)
            return f.apply(params, state, key, *args)[0]
        return f.apply(f.init(key, *args), key, *args)
    import equinox as eqx
    if item["chw"] and "in_shape" in kwargs:  # an Equinox model takes the CHW shape it acts on
        height, width, channels = kwargs["in_shape"]
        kwargs = {**kwargs, "in_shape": [channels, height, width]}
    if call["state"]:
        net, state = eqx.nn.make_with_state(cls)(**kwargs, key=key)
    else:
        net, state = cls(**kwargs, key=key), None
    args = [jnp.transpose(x, (0, 3, 1, 2)) if item["chw"] else x, *extra]
    in_axes = [0] * len(args)
    if call["state"]:
        args, in_axes = args + [state], in_axes + [None]
    kw = {"key": jax.random.split(key, 2)} if call["rng"] else {}
    out = jax.vmap(net, in_axes=tuple(in_axes), out_axes=(0, None) if call["state"] else 0,
                   axis_name="batch")(*args, **kw)
    return out[0] if call["state"] else out


for item in spec["items"]:
    entry = {"path": item["path"]}
    sys.path.insert(0, item["dir"])
    try:
        module = importlib.import_module(item["module"])
        entry["file"] = os.path.realpath(module.__file__)
        # One compiled program per model, at a low optimisation level: the check
        # needs one forward pass, not a fast one (op by op, or fully optimised,
        # compiling the initialisers takes several times longer than running them).
        lowered = jax.jit(lambda: forward(module, item)).lower()
        try:
            compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0,
                                                         "xla_llvm_disable_expensive_passes": True})
        except Exception:
            compiled = lowered.compile()
        leaves = jax.tree.leaves(compiled())
        entry["shapes"] = [list(leaf.shape) for leaf in leaves]
        entry["finite"] = all(bool(jnp.isfinite(leaf).all()) for leaf in leaves)
    except Exception as error:
        # The message itself: notes (JAX adds one on filtered tracebacks) come after it.
        text = str(error).strip().splitlines()
        entry["error"] = f"{type(error).__name__}: {text[0] if text else ''}"
    finally:
        sys.path.remove(item["dir"])
        sys.modules.pop(item["module"], None)
    report["items"].append(entry)
report["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in ("zoo", "shared"))
report["hidden"] = len(hidden)
print(json.dumps(report))
'''


def check_copies(style: str, copies: Sequence[tuple[Path, str]], *, timeout: float = 300) -> dict[str, Any]:
    """Import each copied ``(path, model)`` of one style in one fresh Python, away
    from this repository, and run one forward pass on zeros; raise
    :class:`CopyCheckError` saying what failed, else return the child's report."""
    items = []
    for path, model in copies:
        path = Path(path).resolve()
        spec = registry.get(model)
        items.append({
            "path": str(path), "dir": str(path.parent), "module": path.stem, "style": style,
            "kind": spec.kind, "class": spec.class_name,
            "kwargs": spec.kwargs(registry.example_shape(model, CHECK_SHAPE), 10, spec.small),
            "in_shape": list(registry.example_shape(model, CHECK_SHAPE)),
            "chw": style == "equinox" and spec.channels_first,
            "call": {"labels": spec.labels, "rng": spec.rng, "rng_argument": spec.rng_argument,
                     "train": spec.train_mode, "state": spec.state},
        })
    repo = os.path.realpath(source_path(NAMES[0], STYLES[0]).parents[2])
    framework = ", ".join(sorted(FRAMEWORK_MODULES[style])) or "no framework"
    spec = {"site": _site_dirs(), "repo": repo, "hidden": hidden_modules(style), "items": items,
            "framework": framework}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cwd = Path(items[0]["dir"])
    try:
        # -B: the import writes no __pycache__ into the user's folder.
        proc = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", CHECK_SCRIPT], input=json.dumps(spec),
                              capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CopyCheckError(f"the check did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CopyCheckError(f"the checking Python failed: {last}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = [f"{name} is importable there" for name, found in report["found"].items() if found]
    if report["repo_on_path"]:
        problems.append(f"this repository is on its sys.path ({report['repo_on_path'][0]})")
    if report["loaded"]:
        problems.append(f"it loaded {', '.join(report['loaded'])}")
    for (path, model), item, entry in zip(copies, items, report["items"]):
        name = Path(path).name
        if "error" in entry:
            problems.append(f"{name}: {entry['error']}")
            continue
        if entry["file"] != item["path"]:
            problems.append(f"import {item['module']} found {entry['file']}, not the copy; rename the copy")
            continue
        kw = item["kwargs"]
        if item["kind"] == "vae":
            expected = [[2, kw["num_pixels"]], [2, kw["latents"]], [2, kw["latents"]]]
        elif item["kind"] == "lm":  # logits per token
            expected = [[2, kw["block_size"], kw["vocab_size"]]]
        else:
            expected = [[2, kw["num_classes"]]]
        if entry["shapes"] != expected:
            problems.append(f"{name}: outputs of shape {entry['shapes']}, expected {expected}")
        elif not entry["finite"]:
            problems.append(f"{name}: the outputs are not finite")
        extra = imports_of(Path(path)) - set(sys.stdlib_module_names) - {"jax", "numpy"} \
            - FRAMEWORK_MODULES[style]
        if extra:
            problems.append(f"{name} imports {', '.join(sorted(extra))}, beyond jax, numpy and its framework")
    if problems:
        raise CopyCheckError("; ".join(problems))
    return report


def run_copy(args: argparse.Namespace) -> int:
    target = copy_model(args.model, args.style, args.dest, force=args.force)
    print(f"copied zoo/{args.style}/{args.model}.py -> {target}")
    if args.no_check:
        return 0
    try:
        report = check_copies(args.style, [(target, args.model)])
    except CopyCheckError as error:
        print(f"zoo: the copy did not pass its check (the file is kept): {error}", file=sys.stderr)
        return 1
    shapes = ", ".join(str(tuple(s)) for s in report["items"][0]["shapes"])
    needs = ", ".join(["jax", "numpy", *sorted(FRAMEWORK_MODULES[args.style])])
    print(f"checked: a fresh Python in {target.parent}, without this repository (import zoo and import "
          f"shared fail there) and with every installed package beyond {needs} and their requirements "
          f"hidden ({report['hidden']} modules), imported {target.name} and ran one forward pass on "
          f"zeros: outputs {shapes}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    style_list = choice_list(STYLES, "style")
    p = sub.add_parser("show", help="print a model's styles side by side in the terminal",
                       description="Print the files of one model, aligned so the same concept sits on the "
                                   "same row; stacked one after another when the terminal is too narrow.")
    p.add_argument("model", choices=NAMES)
    p.add_argument("--styles", type=style_list, default=STYLES, help="comma separated (default: all)")
    p.add_argument("--width", type=int_at_least(20, "at least 20 characters", MAX_WIDTH),
                   help=f"characters per line, 20 to {MAX_WIDTH} (default: the terminal's width)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="syntax colours (default: when writing to a terminal and NO_COLOR is unset)")
    p.set_defaults(handler=run_show)

    p = sub.add_parser("copy", help="copy a model file into your project and check it runs on its own",
                       description="Copy zoo/STYLE/MODEL.py to DEST, then import the copy in a fresh Python "
                                   "that cannot see this repository and run one forward pass. The copy is "
                                   "kept even if the check fails (it is byte for byte the catalogue's file; "
                                   "a failure usually means the framework is missing here).")
    p.add_argument("model", choices=NAMES)
    p.add_argument("--style", required=True, choices=STYLES)
    p.add_argument("dest", type=path_arg, metavar="DEST", help="a folder (DEST/MODEL.py) or a file path ending in .py")
    p.add_argument("--force", action="store_true", help="overwrite DEST if it exists")
    p.add_argument("--no-check", action="store_true", help="copy only; skip the fresh-process check")
    p.set_defaults(handler=run_copy)
