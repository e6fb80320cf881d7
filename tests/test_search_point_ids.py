"""Duplicate points are found with a compact set of ids (schedule_search.point_ids)."""

from __future__ import annotations

import pytest

from schedule_search.config import SearchError
from schedule_search.point_ids import PointIdSet
from schedule_search.search import load_search
from tests.helpers import write_search


def test_point_id_set_holds_each_id_once_spec_hashes_and_other_ids_alike():
    ids = PointIdSet()
    assert ids.add("0123456789ab") and ids.add("0123456789ac") and ids.add("kfold-0123456789ab")
    assert not ids.add("0123456789ab") and not ids.add("kfold-0123456789ab")
    assert "0123456789ac" in ids and "ffffffffffff" not in ids and "t001" not in ids
    assert len(ids) == 3


def test_a_grid_point_equal_to_an_earlier_one_is_refused_naming_both(tmp_path):
    # queue is outermost and does not change what is trained: point 4 repeats point 1, past bad point 2.
    parameters = {"queue": {"values": ["a", "b"]}, "lr": {"values": [0.001, -1, 0.002]}}
    path = write_search(tmp_path / "s.yaml", tmp_path, parameters, name="dups")
    with pytest.raises(SearchError, match="points 1 and 4 train the same experiment"):
        load_search(path)


def test_a_grid_without_duplicates_is_accepted_at_every_size(tmp_path):
    parameters = {"lr": {"values": [0.001 * (index + 1) for index in range(50)]}, "seed": {"values": list(range(40))}}
    search = load_search(write_search(tmp_path / "s.yaml", tmp_path, parameters, name="wide"))
    assert len(search.points) == 2000 and len({point.id for point in search.points}) == 2000
