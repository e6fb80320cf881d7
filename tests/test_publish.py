"""`publish`: options from the spec, JSON on the queue, bad input refused with nothing enqueued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest
import yaml
from click.testing import CliRunner
from rq import Queue
from rq.serializers import JSONSerializer

from contracts.spec import ExperimentSpec
from publisher.options import iter_fields, option_name
from runyard.cli.publish import publish_command
from worker.jobs import RUN_EXPERIMENT


def publish(*args: str):
    return CliRunner().invoke(publish_command, list(args))


def enqueued_job_count(connection) -> int:
    return len(connection.keys("rq:job:*"))


def test_help_lists_every_spec_field_with_its_default():
    result = publish("--help")
    assert result.exit_code == 0
    for path, _info in iter_fields():
        assert option_name(path) in result.output
    assert "[default: efficientnet_b2]" in result.output
    assert "[default: 0.001]" in result.output


def test_dry_run_prints_the_seed_default_spec_and_enqueues_nothing(connection):
    result = publish("--model", "efficientnet_b2", "--loss", "f1", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed["spec"] == ExperimentSpec(loss="f1").to_payload()
    assert printed["spec_hash"] == ExperimentSpec(loss="f1").spec_hash()
    assert enqueued_job_count(connection) == 0


def test_publish_enqueues_a_json_job_with_retry_and_a_long_timeout(connection):
    result = publish("--model", "efficientnet_b2", "--loss", "f1", "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    [job] = Queue("default", connection=connection, serializer=JSONSerializer).get_jobs()
    assert job.id == printed["job_id"]
    assert job.func_name == RUN_EXPERIMENT
    assert job.description == printed["run_name"] == job.kwargs["spec"]["run_name"]
    assert job.kwargs["spec"]["loss"] == "f1" and job.kwargs["spec"]["model"] == "efficientnet_b2"
    assert job.retries_left == 2 and job.timeout == 48 * 3600
    assert job.result_ttl >= 7 * 24 * 3600
    # The payload in Redis is plain JSON, readable by anyone and unpicklable by design.
    raw = zlib.decompress(connection.hget(f"rq:job:{job.id}", "data"))
    assert json.loads(raw)[0] == RUN_EXPERIMENT
    assert "warning: data_dir data/train does not exist" in result.stderr


def test_two_publishes_of_one_spec_get_distinct_run_names(connection):
    first = json.loads(publish("--run-name", "exp", "--json").stdout)
    second = json.loads(publish("--run-name", "exp", "--json").stdout)
    assert (first["run_name"], second["run_name"]) == ("exp", "exp-2")


def test_config_file_is_the_base_and_options_override_it(connection, tmp_path):
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump({"model": "resnet50", "lr": 0.01, "wandb.project": "masks", "epochs": 5}))
    result = publish("--config", str(config), "--lr", "0.02", "--dry-run", "--json")
    spec = json.loads(result.stdout)["spec"]
    assert (spec["model"], spec["lr"], spec["epochs"], spec["wandb"]["project"]) == ("resnet50", 0.02, 5, "masks")


def test_priority_picks_the_high_and_low_queues(connection):
    publish("--priority", "high")
    publish("--priority", "low", "--queue", "a100")
    assert Queue("high", connection=connection).count == 1
    assert Queue("a100-low", connection=connection).count == 1


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUTS = [
    (["--model", "efficientnet_b9"], "model: unknown timm model 'efficientnet_b9'"),
    (["--loss", "hinge"], "loss: unknown loss 'hinge'"),
    (["--optimizer", "rmsprop"], "optimizer: unknown optimizer 'rmsprop'"),
    (["--lr", "-1"], "lr: Input should be greater than 0"),
    (["--lr", "fast"], "'fast' is not a valid float"),
    (["--batch-size", "0"], "batch_size: Input should be greater than or equal to 1"),
    (["--batch-size", "abc"], "'abc' is not a valid integer"),
    (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
    (["--resize", "big"], "resize: size 'big' is not HEIGHTxWIDTH"),
    (["--val-ratio", "1"], "val_ratio: Input should be less than 1"),
    (["--priority", "urgent"], "'urgent' is not one of 'high', 'normal', 'low'"),
    (["--run-name", "../../etc"], "run_name: String should match pattern"),
    (["--wandb-tags", ",".join(f"t{i}" for i in range(30))], "wandb.tags: List should have at most 20 items"),
    (["--timeout", "forever"], "'forever' is not a duration"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml: cannot read it"),
    (["--config", "{tmp}/broken.yaml"], "broken.yaml: line 2 is not valid YAML"),
    (["--config", "{tmp}/list.yaml"], "list.yaml: a spec file must be a mapping"),
    (["--config", "{tmp}/typo.yaml"], "batchsize: unknown field; did you mean batch_size"),
    (["--config", "{tmp}/secret.yaml"], "wandb_api_key: looks like a secret"),
    (["--data-dir", "s3://alice:hunter2@bucket/train"], "data_dir: looks like it holds a password inside a URL"),
    (["--output-dir", "https://bob:pw@share/runs"], "output_dir: looks like it holds a password inside a URL"),
    (["--wandb-tags", "a," + "0123456789abcdef" * 3], "wandb.tags: looks like it holds an API-key-like token"),
    (["--grad-accum-steps", "0"], "grad_accum_steps: Input should be greater than or equal to 1"),
    (["--min-batch-size", "0"], "min_batch_size: Input should be greater than or equal to 1"),
    (["--max-requeues", "-1"], "--max-requeues': -1 is not in the range 0<=x<=100"),
    (["--config", "{tmp}/secret-value.yaml"], "looks like it holds an API-key-like token"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(args)[:40] for args, _ in BAD_INPUTS])
def test_bad_input_exits_2_names_the_field_and_enqueues_nothing(connection, tmp_path, args, message):
    _write(tmp_path, "broken.yaml", "model: [unclosed\n")
    _write(tmp_path, "list.yaml", "- model: resnet50\n")
    _write(tmp_path, "typo.yaml", "batchsize: 32\n")
    _write(tmp_path, "secret.yaml", "wandb_api_key: abc123\n")
    _write(tmp_path, "secret-value.yaml", "wandb.tags: [" + "ab" * 20 + "]\n")
    result = publish(*[arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert "hunter2" not in result.output and "0123456789abcdef" * 3 not in result.output  # secrets not echoed
    assert enqueued_job_count(connection) == 0


def test_unreachable_redis_is_one_clear_line_with_the_password_masked(tmp_path):
    env = os.environ | {"REDIS_URL": "redis://:hunter2@127.0.0.1:1/0", "RUNYARD_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "publisher", "--model", "resnet50"], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in errors[0]
    assert "hunter2" not in result.stderr + result.stdout


def test_a_url_that_is_not_redis_is_refused(tmp_path):
    env = os.environ | {"REDIS_URL": "http://localhost:6379", "RUNYARD_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "publisher"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 1
    assert "is not a Redis URL; use redis://" in result.stderr


def test_publishing_never_imports_torch(redis_url):
    script = (
        "import sys\n"
        "from runyard.cli.publish import publish_command\n"
        "try:\n"
        "    publish_command(['--model', 'efficientnet_b2', '--loss', 'f1'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "published" in result.stdout, result.stderr
    assert result.stdout.strip().endswith("NO-TORCH")
