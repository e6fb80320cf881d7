"""`runyard train`: one spec trained locally from a YAML file and options, no queue, no Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from publisher.options import iter_fields, option_name
from runyard.cli.train import train_command
from tests.helpers import isolated_env, run_cli, tiny_spec


def test_runyard_train_runs_a_yaml_spec_here_with_progress_and_no_redis(demo_data, tmp_path):
    config = tmp_path / "spec.yaml"
    config.write_text(yaml.safe_dump(tiny_spec(demo_data, heads="multi", loss="0.6*focal+0.4*f1")))
    env = isolated_env("unix:///nowhere", tmp_path / "home")
    del env["REDIS_URL"]  # a local run must not need (or start) a Redis
    env["OMP_NUM_THREADS"] = "1"  # a tiny model on a shared 2-core box trains several times faster on one thread
    result = run_cli(
        "runyard",
        "train",
        "--config",
        str(config),
        "--epochs",
        "2",
        "--eval-dir",
        str(demo_data / "eval"),
        "--json",
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1/2" in result.stderr and "epoch 2/2" in result.stderr  # progress on stderr
    summary = json.loads(result.stdout)
    assert summary["epochs_completed"] == 2  # --epochs overrides the file's 1
    assert summary["run_dir"].startswith(str(tmp_path / "home" / "runs"))
    assert summary["submission"]["eval"]["images"] == 18
    assert sorted(path.name for path in (tmp_path / "home").iterdir()) == ["runs"]  # no embedded Redis


def test_train_help_lists_every_spec_field():
    result = CliRunner().invoke(train_command, ["--help"])
    assert result.exit_code == 0
    for path, _info in iter_fields():
        assert option_name(path) in result.output
    assert "no queue, no Redis" in result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--loss", "0.5*focal+hinge"], "loss: unknown loss 'hinge'"),
        (["--heads", "triple"], "'triple' is not one of 'single', 'multi'"),
        (["--ema-decay", "1.5"], "ema_decay: Input should be less than 1"),
        (["--warmup-epochs", "3"], "warmup_epochs (3) must be less than epochs (1)"),
        (["--data-dir", "{tmp}/nowhere"], "nowhere/images is not a directory"),
        (["--eval-dir", "{tmp}"], "has no info.csv"),
        (["--relabel", "{tmp}/fixes.csv"], "fixes.csv does not exist"),
        (["--config", "{tmp}/missing.yaml"], "missing.yaml: cannot read it"),
    ],
)
def test_bad_input_exits_2_before_any_training(demo_data, tmp_path, monkeypatch, args, words):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = ["--data-dir", str(demo_data / "train"), "--model", "test_efficientnet", "--no-pretrained"]
    result = CliRunner().invoke(train_command, [*base, *[arg.format(tmp=tmp_path) for arg in args]])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not list((tmp_path / "home").glob("runs/*/checkpoints"))


def test_runyard_help_and_train_help_never_import_torch():
    script = (
        "import sys\n"
        "from runyard.cli.main import main\n"
        "for args in (['--help'], ['train', '--help'], ['infer', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("NO-TORCH"), result.stderr
