"""W&B as users expect it, read back from the offline run file that wandb itself wrote.

The tracker runs in a child process with the environment a worker would have, so WANDB_PROJECT,
WANDB_ENTITY and WANDB_MODE are exercised the way a user sets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.wandb_records import find_run_file, summarize_run
from trainer.tracking import JOB_TYPES, WandbTracker, wandb_mode

TRACKED_RUN = """
import json, sys
from pathlib import Path
from trainer.tracking import WandbTracker

run_dir = Path(sys.argv[1])
(run_dir / "checkpoints").mkdir(parents=True)
(run_dir / "checkpoints" / "best.pt").write_bytes(b"weights" * 100)
(run_dir / "submission.csv").write_text("ImageID,ans\\nimg1.jpg,4\\n")
tracker = WandbTracker(
    "fold-3-of-5", run_dir, {"model": "test_resnet", "lr": 0.01, "kfold": {"k": 5, "fold": 3}},
    group="kfold-abc", tags=["kfold", "night"], job_type="fold",
)
for epoch, f1 in enumerate([0.31, 0.52, 0.47], 1):
    tracker.log({"val_f1": f1, "train_loss": 1.0 / epoch}, step=epoch)
tracker.summary({"best_val_f1": 0.52, "best_epoch": 2})
tracker.log_artifact(run_dir / "checkpoints" / "best.pt", name="fold-3-of-5-best", kind="model",
                     aliases=["best"], metadata={"epoch": 2})
tracker.log_artifact(run_dir / "submission.csv", name="fold-3-of-5-submission", kind="submission")
tracker.log_artifact(run_dir / "missing.csv", name="nothing", kind="submission")
tracker.finish()
print(json.dumps(tracker.describe()))
"""


def track(run_dir: Path, **env: str) -> dict:
    """Run TRACKED_RUN in a child with only these W&B variables set; its describe()."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    result = subprocess.run(
        [sys.executable, "-c", TRACKED_RUN, str(run_dir)],
        capture_output=True,
        text=True,
        env=clean | env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> tuple[dict, dict, Path]:
    """No API key, project and entity from the environment: what a worker box usually has."""
    run_dir = tmp_path_factory.mktemp("run")
    described = track(run_dir, WANDB_PROJECT="mask-status", WANDB_ENTITY="team-x")
    return described, summarize_run(find_run_file(run_dir)), run_dir


def test_no_api_key_means_offline_into_the_run_dir_with_a_sync_command(offline_run):
    described, _logged, run_dir = offline_run
    assert described["mode"] == "offline"
    assert Path(described["dir"]).parent == run_dir / "wandb"
    assert described["sync"] == f"wandb sync {described['dir']}"


def test_run_carries_name_group_job_type_tags_and_the_projects_from_the_environment(offline_run):
    described, logged, _run_dir = offline_run
    assert logged["run"]["name"] == "fold-3-of-5"
    assert logged["run"]["group"] == "kfold-abc" and logged["run"]["job_type"] == "fold"
    assert logged["run"]["tags"] == ["kfold", "night"]
    assert logged["run"]["project"] == described["project"] == "mask-status"
    assert logged["run"]["entity"] == "team-x"


def test_config_history_and_summary_hold_what_was_logged(offline_run):
    _described, logged, _run_dir = offline_run
    assert logged["config"]["model"] == "test_resnet" and logged["config"]["kfold"] == {"k": 5, "fold": 3}
    assert [row["val_f1"] for row in logged["history"]] == [0.31, 0.52, 0.47]
    assert [row["_step"] for row in logged["history"]] == [1, 2, 3]
    assert logged["summary"]["best_val_f1"] == 0.52 and logged["summary"]["best_epoch"] == 2


def test_best_checkpoint_and_submission_are_artifacts_and_a_missing_file_is_skipped(offline_run):
    _described, logged, run_dir = offline_run
    artifacts = {artifact["name"]: artifact for artifact in logged["artifacts"]}
    assert set(artifacts) == {"fold-3-of-5-best", "fold-3-of-5-submission"}
    model = artifacts["fold-3-of-5-best"]
    assert model["type"] == "model" and "best" in model["aliases"] and model["metadata"] == {"epoch": 2}
    assert model["files"] == {"best.pt": 700}
    assert artifacts["fold-3-of-5-submission"]["files"] == {
        "submission.csv": (run_dir / "submission.csv").stat().st_size
    }


def test_wandb_mode_disabled_writes_nothing(tmp_path):
    described = track(tmp_path, WANDB_MODE="disabled")
    assert described == {"mode": "disabled"}
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize(
    ("environment", "mode"),
    [
        ({}, "offline"),
        ({"WANDB_API_KEY": "k" * 40}, "online"),
        ({"WANDB_API_KEY": "k" * 40, "WANDB_MODE": "offline"}, "offline"),
        ({"WANDB_MODE": "dryrun"}, "offline"),
        ({"WANDB_MODE": "disabled"}, "disabled"),
    ],
)
def test_wandb_mode_follows_the_api_key_and_wandb_mode(monkeypatch, environment, mode):
    for key in [key for key in os.environ if key.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode() == mode


def test_an_unknown_job_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="job_type 'eval' is not one of " + ", ".join(JOB_TYPES)):
        WandbTracker("r", tmp_path, {}, job_type="eval")
