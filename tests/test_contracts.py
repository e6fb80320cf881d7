"""The shared contracts: Redis key names spelled in one module, job meta read leniently and written checked."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from contracts.job_meta import read_job_meta, set_failure, update_job_meta
from contracts.spec import load_spec
from publisher.queue import publish_experiment
from publisher.status import collect_status
from tests.helpers import tiny_spec

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


def test_reading_job_meta_drops_invalid_values_keeps_unknown_keys_and_never_raises(caplog):
    stored = {"run_name": "r1", "epochs": "many", "history": 5, "added_later": [1], "failure_reason": "newer_reason"}
    meta = read_job_meta(stored, "job-1")
    assert (meta.run_name, meta.epochs, meta.history) == ("r1", None, None)
    assert set(meta.dropped) == {"epochs", "history"}
    assert meta.model_extra == {"added_later": [1]}
    assert meta.failure_reason == "newer_reason"  # a newer worker's reason is shown, not dropped
    assert "job-1: invalid meta left out: epochs" in caplog.text
    assert read_job_meta(b"\x80garbage").dropped == {"<meta>": "not a mapping (bytes)"}
    assert read_job_meta(None).run_name is None


def test_writing_job_meta_refuses_unknown_reasons_keys_and_values():
    meta: dict = {"run_name": "r1"}
    set_failure(meta, "crashed", "x" * 5000)
    assert meta["failure_reason"] == "crashed" and len(meta["failure_message"]) == 2000
    with pytest.raises(ValueError, match="unknown failure reason 'tired': use one of spec_error"):
        set_failure(meta, "tired", "no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not job meta keys: colour"):
        update_job_meta(meta, colour="red")
    with pytest.raises(ValidationError):
        update_job_meta(meta, max_requeues=-1)
    assert meta == {"run_name": "r1", "failure_reason": "crashed", "failure_message": "x" * 2000}


def test_status_lists_a_job_whose_stored_meta_has_garbage_values(connection, tmp_path):
    job = publish_experiment(connection, load_spec(tiny_spec(tmp_path)))
    connection.hset(
        job.key, "meta", json.dumps({"run_name": job.meta["run_name"], "progress": "??", "requeues": {"a": 1}})
    )
    (row,) = collect_status(connection)["queued"]
    assert (row["run_name"], row["requeues"], row["epoch"]) == (job.meta["run_name"], 0, None)
