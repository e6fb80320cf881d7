"""Searches run by real `worker` processes on demo data: grid, hyperband, a failed point, k-fold, bayes.

One sequence serves the module, as a team would live it:
1. publish `lrs` (a 2x2 grid of lr x loss with hyperband; its data sits behind a mount), `cv` (one
   spec with kfold.k = 3) and `tpe` (a 2-trial bayes search); publish `lrs` again at once;
2. a worker runs the first three points of `lrs`;
3. the mount goes away; a worker runs the fourth point, which fails; the mount comes back;
4. `lrs` is published again; then two workers run everything left, and `lrs` is published once more.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.keys import optuna_study_prefix as study_prefix
from tests.helpers import BIN, isolated_env, run_cli, tiny_spec, write_search
from tests.wandb_records import find_run_file, summarize_run
from worker.results import get_run

GOOD_LR, BAD_LR = 0.003, 5.0  # Adam at lr 5 wrecks a network in one epoch


@dataclass
class SearchRun:
    connection: redis.Redis
    env: dict[str, str]
    home: Path
    files: dict[str, Path]
    published: dict[str, list[dict]] = field(default_factory=dict)  # search -> each publish's JSON
    status: dict[str, dict] = field(default_factory=dict)  # moment -> `runyard status --search lrs --json`
    worker_output: str = ""

    def run_record(self, run_name: str) -> dict:
        record = get_run(self.connection, run_name)
        assert record is not None, f"no run record for {run_name}"
        return record


def schedule(run: SearchRun, name: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "schedule_search", str(run.files[name]), "--json"],
        capture_output=True,
        text=True,
        env=run.env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    run.published.setdefault(name, []).append(printed)
    return printed


def work(run: SearchRun, *args: str) -> None:
    """`worker --cpu --burst ARGS` until the queues are empty."""
    _run_worker(run, [str(BIN / "worker"), "--cpu", "--burst", *args], run.env)


def work_one_thread(run: SearchRun, max_jobs: int) -> None:
    """One burst worker process (what `worker --cpu` starts per slot) on one torch thread, for
    `max_jobs` jobs: on a busy 2-core box two threads make each epoch several times slower."""
    command = [sys.executable, "-m", "worker.process", "--name", "search-test", "--burst", "--max-jobs", str(max_jobs)]
    # No test reads these runs' W&B: skip it to save the time.
    _run_worker(run, command, run.env | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"})


def _run_worker(run: SearchRun, command: list[str], env: dict[str, str]) -> None:
    worker = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    run.worker_output += worker.stdout + worker.stderr
    assert worker.returncode == 0, run.worker_output[-3000:]


def search_status(run: SearchRun, name: str) -> dict:
    result = run_cli("runyard", "status", "--search", name, "--json", env=run.env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def search_run(redis_server, demo_data, tmp_path_factory) -> SearchRun:
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    home = tmp_path_factory.mktemp("home")
    mount = home / "mount"  # stands for a network mount holding the data
    mount.symlink_to(demo_data / "train")
    grid = {"lr": {"values": [GOOD_LR, BAD_LR]}, "loss": {"values": ["cross_entropy", "focal"]}}
    files = {
        "lrs": write_search(
            home / "lrs.yaml",
            demo_data,
            grid,
            name="lrs",
            fixed=tiny_spec(demo_data, epochs=2, pictures=False) | {"data_dir": str(mount)},
            early_terminate={"type": "hyperband", "min_iter": 1, "eta": 3},
        ),
        "cv": write_search(
            home / "cv.yaml",
            demo_data,
            {"loss": {"values": ["focal"]}},
            name="cv",
            fixed=tiny_spec(demo_data, pictures=False, eval_dir=str(demo_data / "eval")) | {"kfold.k": 3},
        ),
        "tpe": write_search(
            home / "tpe.yaml",
            demo_data,
            {
                "lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
                "loss": {"values": ["cross_entropy", "focal"]},
            },
            name="tpe",
            method="bayes",
            run_cap=2,
            fixed=tiny_spec(demo_data, pictures=False),
        ),
    }
    run = SearchRun(connection, isolated_env(redis_server, home), home, files)
    schedule(run, "lrs")
    schedule(run, "lrs")
    schedule(run, "cv")
    schedule(run, "tpe")
    work_one_thread(run, max_jobs=3)
    run.status["after three"] = search_status(run, "lrs")
    mount.unlink()
    work_one_thread(run, max_jobs=1)
    mount.symlink_to(demo_data / "train")
    run.status["after the failure"] = search_status(run, "lrs")
    schedule(run, "lrs")
    work(run, "--workers", "2")
    schedule(run, "lrs")
    run.status["at the end"] = search_status(run, "lrs")
    return run


def test_a_2x2_grid_runs_4_jobs_and_publishing_it_again_enqueues_none(search_run):
    first, again, *_rest, last = search_run.published["lrs"]
    assert (first["points"], first["enqueued"]) == (4, 4)
    assert (again["enqueued"], again["counts"]) == (0, {"queued": 4})
    assert (last["enqueued"], last["counts"]) == (0, {"finished": 4})
    end = search_run.status["at the end"]
    assert end["done"] == 4 and end["counts"]["failed"] == 0 and end["counts"]["queued"] == 0


def test_a_failed_point_is_the_only_one_enqueued_again(search_run):
    after_three = search_run.status["after three"]
    assert after_three["done"] == 3 and after_three["counts"]["queued"] == 1
    [failed] = [row for row in search_run.status["after the failure"]["rows"] if row["state"] == "failed"]
    assert failed["detail"] == "data_error" and failed["params"] == {"lr": BAD_LR, "loss": "focal"}
    retry = search_run.published["lrs"][2]
    assert (retry["enqueued"], retry["counts"]) == (1, {"retried": 1, "finished": 3})
    [job] = retry["jobs"]
    assert job["point"] == failed["point"]
    assert job["run_name"] == f"{failed['run_name']}-2"  # the failed run's dir is kept; the retry gets its own
    [final] = [row for row in search_run.status["at the end"]["rows"] if row["point"] == failed["point"]]
    assert final["state"] in ("finished", "pruned") and final["run_name"] == job["run_name"]


def test_hyperband_prunes_the_runs_with_a_far_too_high_lr_and_they_count_as_done(search_run):
    rows = {(row["params"]["lr"], row["params"]["loss"]): row for row in search_run.status["at the end"]["rows"]}
    for loss in ("cross_entropy", "focal"):
        pruned = rows[(BAD_LR, loss)]
        assert pruned["state"] == "pruned"
        record = search_run.run_record(pruned["run_name"])
        assert record["status"] == "pruned" and record["epochs_completed"] == 1 and record["stopped_early"]
        run_dir = Path(record["run_dir"])
        assert (run_dir / "checkpoints" / "best.pt").stat().st_size > 0  # a pruned run keeps its checkpoint
        with open(run_dir / "metrics.csv") as handle:
            assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]
        job = Job.fetch(record["job_id"], connection=search_run.connection, serializer=JSONSerializer)
        assert job.meta["status"] == "pruned" and job.return_value()["status"] == "pruned"
    leader = search_run.run_record(rows[(GOOD_LR, "cross_entropy")]["run_name"])
    assert leader["status"] == "finished" and leader["epochs_completed"] == 2
    trials = _study(search_run, "lrs").trials
    assert sum(trial.state == optuna.trial.TrialState.PRUNED for trial in trials) >= 2
    assert sum(trial.state == optuna.trial.TrialState.FAIL for trial in trials) == 1  # the data_error attempt


def test_search_leaderboard_ranks_the_points_by_the_metric(search_run):
    board = run_cli("runyard", "leaderboard", "--search", "lrs", "--json", env=search_run.env)
    rows = json.loads(board.stdout)
    assert len(rows) == 4
    scores = [row["metric"]["best"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["params"]["lr"] == GOOD_LR
    assert {row["search"] for row in rows} == {"lrs"}
    table = run_cli("runyard", "leaderboard", "--search", "lrs", env=search_run.env)
    assert "pruned" in table.stdout and "lrs-001" in table.stdout


def test_status_table_of_a_search_shows_each_point(search_run):
    table = run_cli("runyard", "status", "--search", "lrs", env=search_run.env)
    assert table.returncode == 0
    assert "4/4 done" in table.stdout and "pruned" in table.stdout and "lrs-004-2" in table.stdout


def test_k3_spec_runs_3_fold_jobs_and_an_aggregate_with_mean_and_std(search_run):
    [published] = search_run.published["cv"]
    assert published["enqueued"] == 4
    jobs = {
        job["run_name"]: Job.fetch(job["job_id"], connection=search_run.connection, serializer=JSONSerializer)
        for job in published["jobs"]
    }
    folds = [jobs[f"cv-001-fold{fold}"] for fold in range(3)]
    aggregate = jobs["cv-001"]
    results = [job.return_value() for job in folds]
    summary = aggregate.return_value()
    assert summary["k"] == 3 and [row["run_name"] for row in summary["folds"]] == [r["run_name"] for r in results]
    f1s = [result["best"]["val_f1"] for result in results]
    assert summary["mean"]["val_f1"] == pytest.approx(statistics.fmean(f1s))
    assert summary["std"]["val_f1"] == pytest.approx(statistics.pstdev(f1s))
    assert "val_acc" in summary["std"]
    assert aggregate.ended_at >= max(job.ended_at for job in folds)
    assert [result["run_name"] for result in results] == [f"cv-001-fold{fold}" for fold in range(3)]
    board = json.loads(run_cli("runyard", "leaderboard", "--search", "cv", "--json", env=search_run.env).stdout)
    assert [row["run_name"] for row in board] == ["cv-001"]  # the set, not its folds
    table = run_cli("runyard", "leaderboard", "--search", "cv", env=search_run.env).stdout
    assert "±" in table and "(k=3)" in table
    logged = summarize_run(find_run_file(summary["run_dir"]))
    assert logged["run"]["group"] == "cv-001" and logged["run"]["job_type"] == "aggregate"
    assert logged["summary"]["val_f1_mean"] == pytest.approx(summary["mean"]["val_f1"])
    fold_run = summarize_run(find_run_file(results[0]["run_dir"]))["run"]
    assert fold_run["group"] == "cv-001" and fold_run["job_type"] == "fold"


def test_k_fold_aggregate_writes_the_fold_ensemble_submission_and_scores_it(search_run, demo_data):
    [published] = search_run.published["cv"]
    [aggregate] = [job for job in published["jobs"] if job["run_name"] == "cv-001"]
    summary = Job.fetch(aggregate["job_id"], connection=search_run.connection, serializer=JSONSerializer).return_value()
    ensemble = summary["ensemble"]
    assert ensemble["written"] and ensemble["voting"] == "soft"
    with open(ensemble["path"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(demo_data / "eval" / "info.csv", newline="") as handle:
        expected = [row["ImageID"] for row in csv.DictReader(handle)]
    assert [row["ImageID"] for row in rows] == expected and all(0 <= int(row["ans"]) < 18 for row in rows)
    assert 0.0 <= ensemble["eval"]["f1"] <= 1.0 and ensemble["eval"]["images"] == len(expected)
    logged = summarize_run(find_run_file(summary["run_dir"]))
    assert logged["summary"]["ensemble_eval_f1"] == pytest.approx(ensemble["eval"]["f1"])


def test_bayes_trials_train_the_params_sampled_for_them(search_run):
    status = search_status(search_run, "tpe")
    assert status["done"] == 2
    trials = {trial.user_attrs["run_name"]: trial for trial in _study(search_run, "tpe").trials}
    for row in status["rows"]:
        record = search_run.run_record(row["run_name"])
        spec = json.loads((Path(record["run_dir"]) / "spec.json").read_text())
        assert 1e-3 <= spec["lr"] <= 1e-2 and spec["lr"] == record["params"]["lr"]
        assert spec["loss"] == record["params"]["loss"]
        trial = trials[row["run_name"]]
        assert trial.params == record["params"] and trial.value == pytest.approx(record["best"]["val_f1"])


def test_comparison_picture_is_written_and_logged_to_wandb(search_run):
    result = run_cli("runyard", "compare", "lrs", "--json", env=search_run.env)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    png = Path(written["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["points"] == 4
    assert png.parent == search_run.home / "searches" / "lrs"
    logged = summarize_run(find_run_file(png.parent))
    assert logged["run"]["group"] == "lrs" and logged["run"]["job_type"] == "compare"
    assert logged["history"][-1]["comparison._type"] == "image-file"


def test_every_job_of_a_search_names_its_search_in_meta(search_run):
    for name, publishes in search_run.published.items():
        for printed in publishes:
            for job in printed["jobs"]:
                fetched = Job.fetch(job["job_id"], connection=search_run.connection, serializer=JSONSerializer)
                assert fetched.meta["search"] == name


def _study(search_run: SearchRun, name: str) -> optuna.Study:
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    url = search_run.env["REDIS_URL"]
    storage = JournalStorage(JournalRedisBackend(url, prefix=study_prefix(name)))
    return optuna.load_study(study_name=f"runyard-{name}", storage=storage)
