"""The dependency rules of DESIGN.md, checked: contracts <- trainer <- worker <- publisher <- schedule_search.

`contracts` imports neither torch nor redis nor rq; `trainer` neither redis nor rq; publishing
(publisher/, schedule_search/) never loads torch; and no package imports one above it. Imports
inside functions count too: a run-time import upward is still a dependency upward.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("contracts", "trainer", "worker", "publisher", "schedule_search", "runyard")  # lowest first
FORBIDDEN = {"contracts": {"torch", "redis", "rq", "timm", "optuna"}, "trainer": {"redis", "rq"}}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str, rule) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in sorted((ROOT / package).rglob("*.py"))
        if path.name != "__main__.py"  # `python -m publisher` runs its command from runyard.cli; nothing imports it
        for line, imported in imported_packages(path)
        if rule(imported)
    ]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_no_queue_or_torch_libraries_they_must_not(package):
    assert violations(package, FORBIDDEN[package].__contains__) == []


@pytest.mark.parametrize("package", LAYERS)
def test_no_package_imports_a_layer_above_it(package):
    above = set(LAYERS[LAYERS.index(package) + 1 :])
    assert violations(package, above.__contains__) == []


def _modules_loaded_by(packages: list[str], home: Path) -> set[str]:
    """Import every module of `packages` in a fresh interpreter; the top-level packages it loaded."""
    names = [
        f"{package}.{info.name}"
        for package in packages
        for info in pkgutil.iter_modules([str(ROOT / package.replace(".", "/"))])
        if info.name != "__main__"  # that would run the command, not import it
    ]
    script = (
        "import importlib, json, sys\n"
        f"for name in {[*packages, *names]!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "RUNYARD_HOME": str(home), "REDIS_URL": "redis://127.0.0.1:1/0"},  # reach nothing
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_publishing_modules_load_no_torch(tmp_path):
    loaded = _modules_loaded_by(["publisher", "schedule_search", "schedule_search.methods", "runyard.cli"], tmp_path)
    assert {"publisher", "schedule_search", "runyard"} <= loaded
    assert {"torch", "torchvision", "timm"} & loaded == set()


def test_contracts_load_nothing_but_the_standard_library_and_pydantic(tmp_path):
    loaded = _modules_loaded_by(["contracts"], tmp_path)
    assert {"torch", "redis", "rq", "optuna", "trainer", "worker"} & loaded == set()


def _imported_modules(path: Path) -> set[str]:
    """The project modules a file imports (`from trainer import checkpoint` counts as trainer.checkpoint).

    Imports for type hints alone (under `if TYPE_CHECKING:`) never run, so they make no cycle.
    """
    tree = ast.parse(path.read_text())
    hints_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for statement in node.body
        for inner in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in hints_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in found if (ROOT / f"{name.replace('.', '/')}.py").is_file()}


def test_no_module_imports_one_that_imports_it_back():
    graph = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): _imported_modules(path)
        for package in LAYERS
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported == trail[0]:
                cycles.append(" -> ".join([*trail, imported]))
            elif imported not in trail and imported > trail[0]:  # each cycle once, from its smallest module
                visit(imported, [*trail, imported])

    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []
