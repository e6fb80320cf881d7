"""A run name is reserved one way, by `publish` and by a search's claim script alike."""

from __future__ import annotations

from schedule_search.publish import publish_search
from schedule_search.search import load_search
from tests.helpers import write_search
from worker.results import reserve_run_name


def test_a_taken_run_name_gets_the_next_free_suffix(connection):
    assert [reserve_run_name(connection, "exp") for _ in range(3)] == ["exp", "exp-2", "exp-3"]


def test_a_search_point_and_a_published_run_share_one_run_name_sequence(connection, tmp_path):
    assert reserve_run_name(connection, "g-001") == "g-001"
    search = load_search(write_search(tmp_path / "g.yaml", tmp_path, {"lr": {"values": [0.01]}}, name="g"))
    [job] = publish_search(connection, search).first_jobs
    assert job["run_name"] == "g-001-2"
    assert reserve_run_name(connection, "g-001") == "g-001-3"
