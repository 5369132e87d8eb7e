"""The architecture, checked: modules depend downward only, and only the registry knows the models.

Static checks of the source (``ast``), so they cost nothing at run time.
"""

import ast
import re
from pathlib import Path

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
