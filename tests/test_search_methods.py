"""Search methods behind one interface: each registered method expands a file, and a sampled space keeps its name."""

from __future__ import annotations

import pytest

from schedule_search.methods import METHODS
from schedule_search.publish import SearchConflict, publish_search
from schedule_search.search import load_search
from tests.helpers import write_search

LR = {"lr": {"values": [0.001, 0.01]}}
LR_RANGE = {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}


@pytest.mark.parametrize(
    ("method", "parameters", "kinds"),
    [("grid", LR, {"run"}), ("random", LR_RANGE, {"run"}), ("bayes", LR_RANGE, {"trial"})],
)
def test_each_registered_method_expands_a_search_file_into_its_points(tmp_path, method, parameters, kinds):
    assert method in METHODS
    search = load_search(write_search(tmp_path / "s.yaml", tmp_path, parameters, method=method, run_cap=2, name="s"))
    assert (search.method, len(search.points), {point.kind for point in search.points}) == (method, 2, kinds)
    assert (search.study is not None and search.study.bayes is not None) == METHODS[method].samples_from_study


def test_a_sampled_search_keeps_its_space_under_its_name_and_a_grid_may_grow(connection, tmp_path):
    bayes = write_search(tmp_path / "b.yaml", tmp_path, LR_RANGE, method="bayes", run_cap=2, name="tpe")
    publish_search(connection, load_search(bayes))
    wider = {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-1}}
    for other in (
        write_search(tmp_path / "b2.yaml", tmp_path, wider, method="bayes", run_cap=2, name="tpe"),
        write_search(tmp_path / "g.yaml", tmp_path, LR, name="tpe"),
    ):
        with pytest.raises(SearchConflict, match="search 'tpe' already exists with another method, space or metric"):
            publish_search(connection, load_search(other))

    grid = write_search(tmp_path / "g.yaml", tmp_path, LR, name="g")
    publish_search(connection, load_search(grid))
    grown = write_search(tmp_path / "g.yaml", tmp_path, {"lr": {"values": [0.001, 0.01, 0.1]}}, name="g")
    assert publish_search(connection, load_search(grown)).enqueued == 1
