"""A grid's points, built from values checked once each, equal the full validation of every point;
a search's points are made lazily and published a chunk at a time, each exactly once."""

from __future__ import annotations

import inspect

import pytest
import yaml

import schedule_search.publish as publish_module
from contracts.keys import RUN_JOBS_KEY, search_points_key
from contracts.spec import CROSS_FIELD_CHECKS, ExperimentSpec, load_spec
from publisher.options import merge
from schedule_search.config import SearchError, nest
from schedule_search.point_specs import PointSpecs
from schedule_search.points import SearchPoints
from schedule_search.publish import CHUNK, publish_search
from schedule_search.search import load_search
from tests.helpers import tiny_spec, write_search

# Independent fields (float, int, a string parsed by a validator, a choice) beside fields checked
# together: two leaves of one nested block, and the fields of the spec's cross-field checks.
GRID = {
    "lr": {"values": [0.001, 1.0e-2]},
    "seed": {"values": [1, 2]},
    "resize": {"values": ["32x32", [48, 40]]},
    "head_weights.mask": {"values": [1.0, 2]},
    "head_weights.age": {"values": [1.0, 0.5]},
    "loss": {"values": ["f1", "focal"]},
    "epochs": {"values": [2, 3]},
    "warmup_epochs": {"values": [0, 1]},
    "batch_size": {"values": [4, 16]},
}


def full_build(base: dict, params: dict, run_name: str) -> tuple[dict, str]:
    spec = load_spec(merge(base, nest(params)) | {"run_name": run_name})
    return spec.to_payload(), spec.spec_hash()


def test_grid_point_specs_equal_a_full_validation_of_every_point(tmp_path):
    search = load_search(write_search(tmp_path / "g.yaml", tmp_path, GRID, name="g"))
    base = merge(tiny_spec(tmp_path), {"wandb": {"group": "g"}})
    points = list(search.points)
    assert len(points) == len(search.points) == 2**9
    for point in points:
        payload, point_id = full_build(base, point.params, point.run_name)
        assert point.payload == payload and list(point.payload) == list(payload)  # same values, same order
        assert point.id == point_id


def test_point_specs_check_each_distinct_value_once_not_each_point(tmp_path, monkeypatch):
    import schedule_search.point_specs as point_specs

    validations = []
    monkeypatch.setattr(point_specs, "load_spec", lambda data: validations.append(data) or load_spec(data))
    search = load_search(write_search(tmp_path / "g.yaml", tmp_path, GRID, name="g"))
    list(search.points)
    # the first point, then each other value: one of each of the 4 independent parameters, 3 other
    # combinations of head_weights' two leaves, 7 of the 3 cross-field ones: 1 + 4 + 3 + 7
    assert len(validations) == 15


def test_a_value_that_sets_another_field_falls_back_to_full_validation(tmp_path):
    base = tiny_spec(tmp_path)
    specs = PointSpecs(base, {"lr": 0.01, "min_batch_size": 4})
    # batch_size is checked with min_batch_size: its default floor depends on the batch size
    for params in ({"lr": 0.1, "min_batch_size": 2}, {"lr": 0.01, "min_batch_size": 1}):
        assert specs.payload(params, "r") == full_build(base, params, "r")
    grouped = PointSpecs(base, {"epochs": 3, "batch_size": 32})
    assert grouped.payload({"epochs": 2, "batch_size": 4}, "r") == full_build(base, {"epochs": 2, "batch_size": 4}, "r")
    assert not grouped.exact


def test_a_grid_reports_a_bad_combination_of_fields_checked_together_and_a_bad_value(tmp_path):
    grid = {"lr": {"values": [0.01, -1]}, "epochs": {"values": [1, 3]}, "warmup_epochs": {"values": [0, 2]}}
    path = write_search(tmp_path / "g.yaml", tmp_path, grid, name="g")
    with pytest.raises(SearchError) as raised:
        load_search(path)
    lines = str(raised.value).splitlines()
    # A point fails for each bad part: a bad combination of fields checked together, a bad value.
    assert (
        lines[0]
        == "g.yaml: point 2 (lr=0.01, epochs=1, warmup_epochs=2): spec: warmup_epochs (2) must be less than epochs (1)"
    )
    assert lines[1] == "g.yaml: point 5 (lr=-1, epochs=1, warmup_epochs=0): lr: Input should be greater than 0 (got -1)"
    assert [line.split(" (")[0] for line in lines] == [f"g.yaml: point {index}" for index in (2, 5, 6, 6, 7, 8)]


def test_random_points_made_again_are_the_same_points(tmp_path):
    space = {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1}, "seed": {"values": [1, 2]}}
    search = load_search(write_search(tmp_path / "r.yaml", tmp_path, space, method="random", run_cap=20, name="r"))
    first = [(point.id, point.params, point.payload) for point in search.points]
    assert first == [(point.id, point.params, point.payload) for point in search.points]
    assert len(first) == len(search.points) == 20 and len({point_id for point_id, _, _ in first}) == 20


@pytest.mark.slow
def test_a_20000_point_grid_is_made_a_chunk_at_a_time_and_each_point_published_once(connection, tmp_path, monkeypatch):
    grid = {
        "lr": {"values": [round(1e-5 * (index + 1), 8) for index in range(200)]},
        "seed": {"values": list(range(100))},
    }
    path = write_search(tmp_path / "big.yaml", tmp_path, grid, name="big")
    search = load_search(path)
    assert not isinstance(search.points, list)
    made = 0
    checked = search.points

    def counted(check: bool):
        nonlocal made
        for point in checked:
            made += 1
            yield point

    search.points = SearchPoints(counted)
    search.points.count = len(checked)
    made_at_each_write = []
    enqueue_runs = publish_module._enqueue_runs

    def spied(connection, search, to_enqueue, *args):
        made_at_each_write.append(made)
        return enqueue_runs(connection, search, to_enqueue, *args)

    monkeypatch.setattr(publish_module, "_enqueue_runs", spied)
    report = publish_search(connection, search)
    assert len(made_at_each_write) == 20_000 // CHUNK
    # when the n-th chunk is written, no more than n chunks of points have been made
    assert all(made <= CHUNK * number for number, made in enumerate(made_at_each_write, 1))
    assert report.enqueued == 20_000
    queued = connection.lrange("rq:queue:default", 0, -1)
    assert len(queued) == len(set(queued)) == 20_000
    assert connection.hlen(search_points_key("big")) == connection.hlen(RUN_JOBS_KEY) == 20_000
    assert publish_search(connection, load_search(path)).enqueued == 0  # published again: nothing new
    assert connection.llen("rq:queue:default") == 20_000
    assert yaml.safe_load(path.read_text())["parameters"] == grid


def test_the_spec_validates_each_field_alone_but_for_the_cross_field_checks_point_specs_knows():
    """What makes checking each value once exact; a new model validator must update CROSS_FIELD_CHECKS."""
    decorators = ExperimentSpec.__pydantic_decorators__
    for validator in decorators.field_validators.values():
        # Only the value, or ValidationInfo for the field's own name: never other fields' data.
        parameters = list(inspect.signature(validator.func).parameters)
        assert parameters in (["value"], ["value", "info"])
        assert "info.data" not in inspect.getsource(validator.func)
    assert sorted(decorators.model_validators) == ["_consistent", "_default_min_batch_size"]
    assert {"epochs", "warmup_epochs", "batch_size", "min_batch_size"} <= CROSS_FIELD_CHECKS
