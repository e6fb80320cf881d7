"""The shared contracts: Redis key names spelled in one module, job meta read leniently and written checked."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "worker", "publisher", "schedule_search", "runyard")


def _key_literals(path: Path) -> list[str]:
    """String constants (f-string parts included) in `path` that start like a runyard Redis key."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and node.value.startswith("runyard:")
        and " " not in node.value
    ]


def test_redis_key_names_are_spelled_only_in_contracts_keys():
    found = [
        hit for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py")) for hit in _key_literals(path)
    ]
    assert found == [], "build Redis keys with contracts.keys:\n" + "\n".join(found)
