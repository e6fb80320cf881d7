"""Search files: W&B-sweep YAML in, validated points out; a bad file is refused with nothing enqueued."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from contracts.spec import load_spec
from runyard.cli.schedule_search import schedule_search_command
from schedule_search.config import SearchError
from schedule_search.search import load_search
from tests.helpers import tiny_spec, write_search


def schedule(*args: str):
    return CliRunner().invoke(schedule_search_command, list(args))


def nothing_in_redis(connection) -> bool:
    return not connection.keys("rq:job:*") and not connection.keys("runyard:search:*")


def test_grid_is_the_product_of_the_values_first_parameter_outermost(tmp_path):
    path = write_search(
        tmp_path / "grid.yaml",
        tmp_path,
        {"lr": {"values": [0.001, 0.01]}, "loss": {"values": ["f1", "focal", "cross_entropy"]}},
        name="losses",
    )
    search = load_search(path)
    assert [(point.params["lr"], point.params["loss"]) for point in search.points] == [
        (0.001, "f1"),
        (0.001, "focal"),
        (0.001, "cross_entropy"),
        (0.01, "f1"),
        (0.01, "focal"),
        (0.01, "cross_entropy"),
    ]
    assert [point.run_name for point in search.points] == [f"losses-{index:03d}" for index in range(1, 7)]
    assert len({point.id for point in search.points}) == 6
    for point in search.points:
        assert point.id == point.spec.spec_hash()
        assert point.spec.lr == point.params["lr"] and point.spec.model == "test_efficientnet"
        assert point.spec.wandb.group == "losses"  # one W&B group per search


def test_nested_dotted_and_constant_parameters_set_the_spec(tmp_path):
    path = write_search(
        tmp_path / "nested.yaml",
        tmp_path,
        {
            "wandb": {"parameters": {"project": {"value": "masks"}, "tags": {"value": ["a", "b"]}}},
            "kfold.k": {"value": 1},
            "resize": {"values": ["32x32", [48, 40]]},
            "optimizer": {"values": ["adam", "sgd"]},
            "epochs": {"value": 3},
        },
    )
    search = load_search(path)
    assert list(search.parameters) == ["resize", "optimizer"]  # constants are in every spec, not searched
    assert [tuple(point.spec.resize) for point in search.points] == [(32, 32), (32, 32), (48, 40), (48, 40)]
    assert {point.spec.wandb.project for point in search.points} == {"masks"}
    assert {tuple(point.spec.wandb.tags) for point in search.points} == {("a", "b")}
    assert {point.spec.epochs for point in search.points} == {3}


def test_base_file_then_fixed_then_search_level_keys(tmp_path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump(tiny_spec(tmp_path, epochs=7, lr=0.5) | {"wandb.group": "mine", "queue": "gpu"})
    )
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "base": "base.yaml",
                "fixed": {"epochs": 9},
                "priority": "high",
                "project": "masks",
                "program": "train.py",  # W&B's; ignored with a warning
                "parameters": {"loss": {"values": ["f1"]}},
            }
        )
    )
    search = load_search(path)
    [point] = search.points
    assert (point.spec.epochs, point.spec.lr, point.spec.queue, point.spec.priority) == (9, 0.5, "gpu", "high")
    assert (point.spec.wandb.project, point.spec.wandb.group) == ("masks", "mine")  # an explicit group is kept
    assert any("program/command are ignored" in warning for warning in search.warnings)


def test_default_name_follows_the_file_content(tmp_path):
    first = write_search(tmp_path / "sweep.yaml", tmp_path, {"lr": {"values": [0.001]}})
    name = load_search(first).name
    assert name.startswith("sweep-") and load_search(first).name == name
    write_search(tmp_path / "sweep.yaml", tmp_path, {"lr": {"values": [0.002]}})
    assert load_search(first).name != name


def test_int_uniform_bounds_make_an_enumerable_grid(tmp_path):
    path = write_search(tmp_path / "g.yaml", tmp_path, {"epochs": {"min": 1, "max": 3}})
    search = load_search(path)
    assert search.parameters["epochs"].distribution == "int_uniform"  # integer bounds, as W&B infers
    assert [point.params["epochs"] for point in search.points] == [1, 2, 3]


def test_run_cap_keeps_the_first_points_of_a_grid(tmp_path):
    path = write_search(tmp_path / "g.yaml", tmp_path, {"seed": {"values": [1, 2, 3, 4]}}, run_cap=2)
    search = load_search(path)
    assert [point.params["seed"] for point in search.points] == [1, 2]
    assert any("run_cap 2 keeps the first 2" in warning for warning in search.warnings)


RANDOM_SPACE = {
    "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
    "weight_decay": {"distribution": "q_uniform", "min": 0.0, "max": 0.01, "q": 0.001},
    "batch_size": {"distribution": "int_uniform", "min": 8, "max": 64},
    "val_ratio": {"distribution": "uniform", "min": 0.1, "max": 0.3},
    "lr_gamma": {"distribution": "log_uniform", "min": math.log(0.1), "max": 0.0},
    "loss": {"values": ["f1", "focal", "cross_entropy"], "probabilities": [0.5, 0.5, 0.0]},
}


def test_seeded_random_search_draws_the_same_points_every_time(tmp_path):
    path = write_search(tmp_path / "r.yaml", tmp_path, RANDOM_SPACE, method="random", run_cap=12, seed=7)
    first = [(point.id, point.params) for point in load_search(path).points]
    again = [(point.id, point.params) for point in load_search(path).points]
    assert first == again and len(first) == 12
    other = write_search(tmp_path / "r2.yaml", tmp_path, RANDOM_SPACE, method="random", run_cap=12, seed=8)
    assert [point_id for point_id, _ in first] != [point.id for point in load_search(other).points]


def test_random_draws_respect_each_distribution(tmp_path):
    path = write_search(tmp_path / "r.yaml", tmp_path, RANDOM_SPACE, method="random", run_cap=40, seed=1)
    points = list(load_search(path).points)
    assert len({point.id for point in points}) == 40
    for point in points:
        params = point.params
        assert 1e-4 <= params["lr"] <= 1e-2
        assert params["weight_decay"] in {round(step * 0.001, 3) for step in range(11)}
        assert isinstance(params["batch_size"], int) and 8 <= params["batch_size"] <= 64
        assert 0.1 <= params["val_ratio"] <= 0.3 and 0.1 <= params["lr_gamma"] <= 1.0
        assert params["loss"] in ("f1", "focal")  # probability 0 is never drawn
    # Log-uniform: about as many draws below the geometric middle (1e-3) as above it.
    below = sum(point.params["lr"] < 1e-3 for point in points)
    assert 8 <= below <= 32


def test_random_search_in_a_small_space_runs_each_distinct_point_once(tmp_path):
    path = write_search(
        tmp_path / "r.yaml", tmp_path, {"loss": {"values": ["f1", "focal"]}}, method="random", run_cap=5
    )
    search = load_search(path)
    assert sorted(point.params["loss"] for point in search.points) == ["f1", "focal"]
    assert any("only 2 distinct points" in warning for warning in search.warnings)


def test_bayes_search_publishes_trial_slots_and_the_space_as_optuna_distributions(tmp_path):
    path = write_search(
        tmp_path / "b.yaml",
        tmp_path,
        {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, "resize": {"values": [32, "48x40"]}},
        method="bayes",
        run_cap=4,
        name="tpe",
    )
    search = load_search(path)
    assert [point.id for point in search.points] == ["t001", "t002", "t003", "t004"]
    assert next(point.run_name for point in search.points) == "tpe-t001"
    bayes = search.study.bayes
    assert set(bayes.space) == {"lr", "resize"} and json.loads(bayes.space["lr"])["attributes"]["log"] is True
    assert bayes.json_params == []  # 32 and "48x40" are plain choices
    assert search.study.prefix == "runyard:optuna:tpe"


def test_k_fold_spec_fans_out_into_folds_and_an_aggregate(tmp_path):
    path = write_search(tmp_path / "k.yaml", tmp_path, {"lr": {"values": [0.001, 0.01]}}, name="cv")
    document = yaml.safe_load(path.read_text())
    document["fixed"]["kfold.k"] = 3
    path.write_text(yaml.safe_dump(document))
    points = list(load_search(path).points)
    assert [(point.kind, point.fold, point.run_name) for point in points[:4]] == [
        ("fold", 0, "cv-001-fold0"),
        ("fold", 1, "cv-001-fold1"),
        ("fold", 2, "cv-001-fold2"),
        ("aggregate", None, "cv-001"),
    ]
    folds, aggregate = points[:3], points[3]
    assert [fold.spec.kfold.fold for fold in folds] == [0, 1, 2] and {fold.spec.kfold.k for fold in folds} == {3}
    assert aggregate.depends_on == [fold.id for fold in folds] and aggregate.id.startswith("kfold-")
    assert {fold.spec.wandb.group for fold in folds} == {"cv-001"}  # one W&B group per k-fold set
    assert len(points) == 8


BAD_SEARCHES = [
    ({"metod": "grid"}, "metod: unknown key; did you mean method?"),
    ({"method": None}, "method: required: grid, random or bayes"),
    ({"method": "sweep"}, "method: Input should be 'grid', 'random' or 'bayes'"),
    (
        {"parameters": {"learning_rate": {"values": [0.1]}}},
        "parameters.learning_rate: not a spec field; did you mean lr",
    ),
    ({"parameters": {"wandb": {"parameters": {"projet": {"value": "x"}}}}}, "did you mean wandb.project"),
    ({"parameters": {"lr": {"values": []}}}, "parameters.lr: `values` is empty"),
    (
        {"parameters": {"lr": {"distribution": "uniform", "min": 0.1, "max": 0.01}}},
        "min (0.1) must be below max (0.01)",
    ),
    ({"parameters": {"lr": {"distribution": "log_normal", "min": 0.1, "max": 1}}}, "unknown distribution 'log_normal'"),
    ({"parameters": {"lr": {"distribution": "q_uniform", "min": 0.1, "max": 1}}}, "q_uniform needs a step `q` > 0"),
    ({"parameters": {"lr": {"values": [0.1, 0.2], "probabilities": [0.5, 0.6]}}}, "probabilities must be >= 0 and sum"),
    ({"parameters": {"lr": {"valeus": [0.1]}}}, "parameters.lr.valeus: unknown key"),
    ({"parameters": {"lr": 0.1}}, "parameters.lr: must be a mapping such as {values: [...]}"),
    ({"parameters": {"lr": {"mu": 0, "sigma": 1}}}, "normal distributions (mu/sigma) are not supported"),
    ({"parameters": {"run_name": {"values": ["a"]}}}, "parameters.run_name: cannot be searched"),
    ({"parameters": {"lr": {"min": 1e-4, "max": 1e-2}}}, "parameters.lr: a grid needs `values`"),
    ({"parameters": {"lr": {"values": [0.001, -1]}}}, "point 2 (lr=-1): lr: Input should be greater than 0"),
    (
        {"parameters": {"queue": {"values": ["a", "b"]}}},
        "points 1 and 2 train the same experiment (they differ only in queue",
    ),
    ({"parameters": {}}, "parameters: list at least one parameter to search"),
    ({"method": "random"}, "run_cap: a random search needs run_cap"),
    ({"metric": {"name": "f1"}}, "unknown metric 'f1'; choose one of: val_f1"),
    ({"early_terminate": {"type": "median"}}, "unknown early_terminate type 'median'; choose one of: hyperband"),
    ({"early_terminate": {"type": "hyperband", "min_iter": 1}}, "min_iter 1 leaves nothing to stop"),
    ({"fixed": {"batchsize": 32}}, "base/fixed: batchsize: unknown field; did you mean batch_size"),
    ({"base": "missing.yaml"}, "base: "),
    ({"name": "../etc"}, "name: String should match pattern"),
    ({"method": "bayes", "run_cap": 2, "parameters": {"lr": {"values": [10, 20]}}}, "(lr=20): lr: Input should be"),
    ({"method": "bayes", "run_cap": 2, "fixed": {"kfold.k": 3}}, "bayes does not fan out k-fold sets"),
    ({"early_terminate": {"type": "asha", "min_iter": 1}}, "early_terminate: min_iter 1 must be below max_iter 1"),
    (
        {"fixed": {"epochs": 9}, "early_terminate": {"type": "asha", "max_iter": 5}},
        "max_iter 5 differs from the points' epochs 9",
    ),
    ({"fixed": {"epochs": 9}, "early_terminate": {"type": "asha", "s": 2}}, "asha has no `s`"),
    (
        {"method": "bayes", "run_cap": 2, "fixed": {"epochs": 9}, "early_terminate": {"type": "asha"}},
        "asha promotes grid or random points",
    ),
    (
        {"parameters": {"epochs": {"values": [3, 9]}}, "early_terminate": {"type": "asha"}},
        "asha needs every point to train the same epochs",
    ),
]


@pytest.mark.parametrize("change, message", BAD_SEARCHES, ids=[message[:40] for _, message in BAD_SEARCHES])
def test_bad_search_file_exits_2_names_the_problem_and_enqueues_nothing(connection, tmp_path, change, message):
    document = {"method": "grid", "fixed": tiny_spec(tmp_path), "parameters": {"lr": {"values": [0.001]}}}
    for key, value in change.items():
        if key == "fixed":
            document["fixed"] |= value
        else:
            document[key] = value
    document = {key: value for key, value in document.items() if value is not None or key != "method"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(document))
    result = schedule(str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "invalid search, nothing enqueued" in result.output and "Traceback" not in result.output
    assert nothing_in_redis(connection)


@pytest.mark.parametrize(
    "text, message",
    [("method: [grid\n", "bad.yaml: line 2 is not valid YAML"), ("- grid\n", "a search file is a mapping")],
)
def test_unreadable_search_file_is_refused(connection, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = schedule(str(path))
    assert result.exit_code == 2 and message in result.output
    assert nothing_in_redis(connection)


def test_missing_search_file_is_refused(connection, tmp_path):
    result = schedule(str(tmp_path / "nowhere.yaml"))
    assert result.exit_code == 2 and "nowhere.yaml: cannot read it" in result.output


def test_a_point_that_fails_validation_is_reported_with_its_params(tmp_path):
    path = write_search(tmp_path / "s.yaml", tmp_path, {"batch_size": {"values": [32, 0, 10_000]}})
    with pytest.raises(SearchError) as error:
        load_search(path)
    lines = str(error.value).splitlines()
    assert lines == [
        "s.yaml: point 2 (batch_size=0): batch_size: Input should be greater than or equal to 1 (got 0)",
        "s.yaml: point 3 (batch_size=10000): batch_size: Input should be less than or equal to 4096 (got 10000)",
    ]


def test_every_point_of_a_search_is_a_valid_spec(tmp_path):
    path = write_search(tmp_path / "r.yaml", tmp_path, RANDOM_SPACE, method="random", run_cap=10)
    for point in load_search(path).points:
        assert load_spec(point.spec.to_payload()) == point.spec
