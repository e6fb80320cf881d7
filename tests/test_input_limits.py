"""Hostile or careless input at the publishing boundary: YAML files, loss formulas, cross-field
checks and names. Each is refused fast, with a message naming the input and the fix, and
nothing reaches Redis."""

from __future__ import annotations

import time

import pytest

from contracts.loss_formula import format_loss, parse_loss
from contracts.spec import LOSSES, MAX_ERROR_LINES, SpecError, load_spec
from publisher.yaml_file import MAX_BYTES, YamlFileError, read_yaml_file
from tests.helpers import isolated_env, run_cli, tiny_spec

BILLION_LAUGHS = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 10)]
)


def nothing_in_redis(connection) -> bool:
    return not connection.keys("rq:job:*") and not connection.keys("runyard:search:*")


def cli_env(redis_url, tmp_path):
    return isolated_env(redis_url, tmp_path / "home")


# --- YAML files: the one loader (publisher.yaml_file) ---------------------------------------------

YAML_FILES = {
    "billion_laughs": (BILLION_LAUGHS, "once its aliases (*name) are expanded"),
    "self_reference": ("a: &x [1, *x]\n", "line 1: an alias refers to the block it is inside"),
    "deep_nesting": ("a: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than"),
    "duplicate_key": (
        "model: resnet50\nlr: 0.1\nepochs: 3\nlr: 0.2\n",
        "line 4: key 'lr' is given twice (first on line 2)",
    ),
    "control_character": ("model: res\x00net\n", "line 1 is not valid YAML (special characters are not allowed"),
    "syntax_error": ("model: [resnet50\n", "is not valid YAML"),
}


@pytest.mark.parametrize("name", list(YAML_FILES))
def test_a_bad_yaml_file_is_refused_fast_naming_the_file_and_line(tmp_path, name):
    text, message = YAML_FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(YamlFileError) as raised:
        read_yaml_file(path)
    assert str(raised.value).startswith(str(path)) and message in str(raised.value)
    assert time.monotonic() - started < 30  # generous: billion laughs used to run 66-84 s, then MemoryError


def test_a_yaml_file_over_the_size_cap_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"k{number}: 1\n" for number in range(1_000_000)))  # 1M unknown keys
    with pytest.raises(YamlFileError, match=rf"{MAX_BYTES:,}\); a spec or search file is a few kilobytes"):
        read_yaml_file(path)


def test_a_non_utf8_yaml_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: resnet50\nrun_name: café\n".encode("latin-1"))
    with pytest.raises(YamlFileError, match=r"latin1.yaml: line 2: byte 0xe9 is not UTF-8; save the file as UTF-8"):
        read_yaml_file(path)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {lr: 0.1, epochs: 3}\nrun:\n  <<: *b\n  lr: 0.2\n")
    assert read_yaml_file(path)["run"] == {"lr": 0.2, "epochs": 3}


def test_publish_refuses_a_billion_laughs_config_and_enqueues_nothing(redis_url, connection, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(BILLION_LAUGHS + "\nmodel: resnet50\n")
    result = run_cli("publish", "--config", str(path), env=cli_env(redis_url, tmp_path), timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"{path}: line " in result.stderr and "aliases (*name)" in result.stderr
    assert "Traceback" not in result.stderr and nothing_in_redis(connection)


@pytest.mark.parametrize("block", ["fixed", "values"])
def test_schedule_search_refuses_billion_laughs_in_fixed_or_values(redis_url, connection, tmp_path, demo_data, block):
    laughs = "\n".join(f"    {line}" for line in BILLION_LAUGHS.splitlines())
    if block == "fixed":
        text = f"method: grid\nparameters:\n  lr: {{values: [0.1]}}\nfixed:\n{laughs}\n"
    else:
        text = f"method: grid\ndefinitions:\n{laughs}\nparameters:\n  model:\n    values: *a9\n"
    path = tmp_path / "search.yaml"
    path.write_text(text)
    result = run_cli("schedule-search", str(path), env=cli_env(redis_url, tmp_path), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "search.yaml: line " in result.stderr and "aliases (*name)" in result.stderr
    assert "Traceback" not in result.stderr and nothing_in_redis(connection)


def test_publish_refuses_a_config_with_a_duplicate_key_naming_its_line(redis_url, connection, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model: resnet50\nlr: 0.1\nlr: 0.2\n")
    result = run_cli("publish", "--config", str(path), env=cli_env(redis_url, tmp_path))
    assert result.returncode == 2 and "spec.yaml: line 3: key 'lr' is given twice" in result.stderr
    assert nothing_in_redis(connection)


# --- Error messages are capped in count -------------------------------------------------------------


def test_a_spec_of_100k_unknown_keys_gets_one_short_message():
    started = time.monotonic()
    with pytest.raises(SpecError) as raised:
        load_spec({f"k{number}": 1 for number in range(100_000)})
    message = str(raised.value)
    assert "100,000 unknown fields ('k0', 'k1'" in message and "valid fields are: model" in message
    assert len(message) < 5000 and time.monotonic() - started < 10


def test_many_bad_values_list_the_first_problems_then_a_count():
    with pytest.raises(SpecError) as raised:
        load_spec({f"k{number}": 1 for number in range(MAX_ERROR_LINES)} | {"lr": -1, "epochs": 0, "seed": -1})
    lines = str(raised.value).splitlines()
    assert len(lines) == MAX_ERROR_LINES + 1 and lines[-1] == "... and 3 more problem(s); fix these first"


def test_a_search_of_3000_unknown_parameters_gets_a_capped_message(tmp_path):
    from schedule_search.config import SearchError
    from schedule_search.search import load_search

    path = tmp_path / "search.yaml"
    path.write_text("method: grid\nparameters:\n" + "".join(f"  p{number}: {{value: 1}}\n" for number in range(3000)))
    with pytest.raises(SearchError) as raised:
        load_search(path)
    lines = str(raised.value).splitlines()
    assert len(lines) == MAX_ERROR_LINES + 1 and lines[-1].startswith("... and 2,980 more parameter(s) not checked")


# --- Loss formulas round-trip ----------------------------------------------------------------------

ACCEPTED_FORMULAS = [
    "focal",
    "0.6*focal+0.4*f1",
    "1e3*focal+f1",
    "1e-5*focal+1E+2*f1",
    "0.1234567890123*focal+0.3*f1",
    "ce+f1",
    "1.5e+5*label_smoothing",
    "1e6*focal+1e-6*f1",
]


def _canonical(name: str) -> str:
    from contracts.spec import _canonical_choice

    return _canonical_choice("loss", name, LOSSES)


@pytest.mark.parametrize("formula", ACCEPTED_FORMULAS)
def test_every_accepted_loss_formula_parses_back_from_its_canonical_form(formula):
    terms = parse_loss(formula, _canonical)
    canonical = format_loss(terms)
    assert parse_loss(canonical, _canonical) == terms
    assert load_spec({"loss": canonical}).loss == load_spec({"loss": formula}).loss == canonical


@pytest.mark.parametrize("formula", ["1e20*focal+f1", "1e308*focal+1e308*f1", "inf*focal", "nan*f1", "1e-7*focal"])
def test_a_loss_weight_out_of_range_is_refused_naming_the_term(formula):
    with pytest.raises(SpecError, match=r"the weight must be a positive number from 1e-06 to 1000000"):
        load_spec({"loss": formula})


def test_publish_refuses_a_huge_loss_weight_and_enqueues_nothing(redis_url, connection, tmp_path):
    result = run_cli("publish", "--loss", "1e20*focal+f1", env=cli_env(redis_url, tmp_path))
    assert result.returncode == 2 and "loss term '1e20*focal'" in result.stderr
    assert "scale them down" in result.stderr and nothing_in_redis(connection)


def test_train_refuses_an_overflowing_loss_formula_without_a_traceback(tmp_path, demo_data):
    env = isolated_env("redis://127.0.0.1:1/0", tmp_path / "home")
    result = run_cli(
        "runyard", "train", "--data-dir", str(demo_data / "train"), "--loss", "1e308*focal+1e308*f1", env=env
    )
    assert result.returncode == 2 and "loss term '1e308*focal'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "home" / "runs").exists()


# --- Cross-field checks and names ------------------------------------------------------------------


def test_min_batch_size_above_batch_size_is_refused_with_the_fix():
    with pytest.raises(SpecError, match=r"min_batch_size \(16\) is larger than batch_size \(4\).*at most 4"):
        load_spec({"batch_size": 4, "min_batch_size": 16})
    assert load_spec({"batch_size": 4}).min_batch_size == 4  # the default floor follows a small batch


@pytest.mark.parametrize("field", ["run_name", "wandb.entity", "wandb.project", "queue"])
def test_an_api_key_like_token_in_a_name_is_refused_and_not_echoed(field):
    token = "0123456789abcdef0123456789abcdef01234567"
    data = {"wandb": {field.split(".")[1]: token}} if "." in field else {field: token}
    with pytest.raises(SpecError, match=rf"^{field}: looks like it holds an API-key-like token") as raised:
        load_spec(data)
    assert token not in str(raised.value)


def test_publish_refuses_kfold_with_the_search_file_that_fans_it_out(redis_url, connection, tmp_path, demo_data):
    env = cli_env(redis_url, tmp_path)
    spec = tiny_spec(demo_data)
    args = ["--model", spec["model"], "--no-pretrained", "--data-dir", spec["data_dir"], "--kfold-k", "3"]
    result = run_cli("publish", *args, env=env)
    assert result.returncode == 2 and "kfold.k=3 is a cross-validation of 3 fold jobs" in result.stderr
    assert "run `schedule-search cv.yaml`" in result.stderr and nothing_in_redis(connection)
    # The printed file is the exact fix: it publishes 3 folds and their aggregate.
    printed = result.stderr.split("`schedule-search cv.yaml`:\n", 1)[1].split("error: (or publish", 1)[0]
    (tmp_path / "cv.yaml").write_text(printed)
    fanned = run_cli("schedule-search", str(tmp_path / "cv.yaml"), "--dry-run", "--json", env=env)
    assert fanned.returncode == 0, fanned.stderr
    assert '"kind": "aggregate"' in fanned.stdout and fanned.stdout.count('"kind": "fold"') == 3
    assert nothing_in_redis(connection)


def test_publish_of_one_chosen_fold_is_still_allowed(redis_url, connection, tmp_path):
    result = run_cli("publish", "--kfold-k", "3", "--kfold-fold", "1", "--dry-run", env=cli_env(redis_url, tmp_path))
    assert result.returncode == 0, result.stderr
