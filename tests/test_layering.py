"""The architecture, checked: modules depend downward only, and only the registry knows the models.

Static checks of the source (``ast``), so they cost nothing at run time.
"""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from shared.registry import NAMES

ROOT = Path(__file__).resolve().parents[1]
SHARED = sorted((ROOT / "shared").glob("*.py"))


def project_imports(path: Path) -> tuple[set[str], list[str]]:
    """The ``shared`` modules a file imports, and those it imports inside a function."""
    tree = ast.parse(path.read_text())
    top, nested = set(), []
    for node in ast.walk(tree):
        names: set[str] = set()
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "shared":
                names = {alias.name for alias in node.names}
            elif node.module.startswith("shared."):
                names = {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            names = {a.name.split(".")[1] for a in node.names if a.name.startswith("shared.")}
        top |= names
    for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module and (module == "shared" or module.startswith("shared.")):
                    nested.append(f"{path.name}:{node.lineno} imports {module} inside {function.name}")
    return top, nested


def test_no_import_cycles_and_no_imports_inside_functions():
    graph, nested = {}, []
    for path in SHARED:
        deps, inner = project_imports(path)
        graph[path.stem] = deps - {path.stem}
        nested += inner
    assert nested == []
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(stack + [dep])}"
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    # The small modules at the bottom import nothing of the project, and nothing imports the CLI.
    assert graph["errors"] == set() and graph["args"] == set()
    assert not any("cli" in deps for deps in graph.values())


def test_only_the_registry_branches_on_a_model_name():
    """No comparison with, and no table keyed by, a model's name outside the registry (and the tests).

    ("vae" is also a kind, the task a model is trained for: comparisons of a kind are fine.)"""
    names = "|".join(NAMES)
    pattern = re.compile(rf"""(==|!=|\bin)\s*["']({names})["']|["']({names})["']\s*(==|!=)|^\s*["']({names})["']\s*:""")
    offenders = []
    for path in [*SHARED, *(ROOT / "zoo").glob("*/*.py")]:
        if path.name == "registry.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "kind" not in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# The other frameworks each style's model files must not name (a difference between frameworks belongs
# in the porting table and docs/porting.md, not in a file meant to be copied).
OTHER_FRAMEWORKS = {
    "jax": ("flax", "linen", "nnx", "haiku", "equinox", "pytorch", "torch", "keras", "tensorflow"),
    "flax": ("nnx", "haiku", "equinox", "pytorch", "torch", "keras", "tensorflow"),
    "nnx": ("linen", "haiku", "equinox", "pytorch", "torch", "keras", "tensorflow"),
    "haiku": ("flax", "linen", "nnx", "equinox", "pytorch", "torch", "keras", "tensorflow"),
    "equinox": ("flax", "linen", "nnx", "haiku", "pytorch", "torch", "keras", "tensorflow"),
}


def _prose(path: Path) -> list[tuple[int, str]]:
    """Every comment and string literal of a file (docstrings included), with its line."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type in (tokenize.COMMENT, tokenize.STRING)]


@pytest.mark.parametrize("style", list(OTHER_FRAMEWORKS))
def test_model_files_follow_their_own_framework(style):
    """No model file names another framework in its comments or docstrings, imports a private module
    (``flax.nnx.nn``, ``haiku._src``, ``equinox._...``), or (in Linen, NNX and Haiku, which see a batch)
    vmaps a layer or a draw with ``jax.vmap`` to copy per-example draws."""
    for path in sorted((ROOT / "zoo" / style).glob("*.py")):
        if path.name == "__init__.py":
            continue
        for line, text in _prose(path):
            words = set(re.findall(r"[a-z]+", text.lower()))
            named = sorted(words & set(OTHER_FRAMEWORKS[style]))
            assert not named, f"{path.relative_to(ROOT)}:{line} names {', '.join(named)}"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            module = node.module if isinstance(node, ast.ImportFrom) else (
                node.names[0].name if isinstance(node, ast.Import) else None)
            if module:
                private = [part for part in module.split(".") if part.startswith("_")]
                assert not private and not module.startswith("flax.nnx.nn"), f"{path.name} imports {module}"
        if style in ("flax", "nnx", "haiku"):
            assert "jax.vmap(" not in path.read_text(), f"{path.relative_to(ROOT)} vmaps with jax.vmap"
