"""ASHA with real `worker` processes on demo data: runs pause at rungs, the best are promoted and resume.

A 9-point grid (lr) with `early_terminate: {type: asha, min_iter: 1, eta: 3, max_iter: 9}`: rungs at
1, 3 and 9 epochs. Three lrs learn and six do not, in that order, so one worker taking the points in
order sees the learners first and ASHA's asynchronous decisions are the synchronous ones: all 9
pause at rung 0, exactly 3 are promoted to rung 1 and exactly 1 of those to the end.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from tests.helpers import isolated_env, kill_worker, run_cli, start_worker, tiny_spec, wait_for, write_search
from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.train import train
from worker.asha import asha_runs
from worker.results import get_run

LEARNING = [3e-3, 2e-3, 1.5e-3]  # F1 0.05-0.10 after one epoch on the demo data
STUCK = [1e-6, 2e-6, 3e-6, 5.0, 6.0, 7.0]  # about 0.01: too small to move, or wrecked by Adam at once
ASHA = {"type": "asha", "min_iter": 1, "eta": 3, "max_iter": 9}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}


def schedule(env: dict[str, str], path: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "schedule_search", str(path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def burst_worker(env: dict[str, str], name: str = "asha-test") -> str:
    """One worker process until the queue is empty (promotions enqueued meanwhile included)."""
    command = [sys.executable, "-m", "worker.process", "--name", name, "--burst"]
    worker = subprocess.run(command, capture_output=True, text=True, env=env | ONE_THREAD, timeout=600)
    assert worker.returncode == 0, (worker.stdout + worker.stderr)[-3000:]
    return worker.stdout + worker.stderr


def train_straight(spec: dict) -> dict:
    """The same spec trained without a pause, in this process, on one thread as the workers train."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # another thread count sums in another order: not the same floats
    try:
        return train(load_spec(spec | {"run_name": "straight"}))
    finally:
        torch.set_num_threads(threads)


def val_f1s(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv") as handle:
        return [row["val_f1"] for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def asha_search(redis_server, demo_data, tmp_path_factory):
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    home = tmp_path_factory.mktemp("asha-home")
    env = isolated_env(redis_server, home)
    path = write_search(
        home / "halving.yaml",
        demo_data,
        {"lr": {"values": LEARNING + STUCK}},
        name="halving",
        fixed=tiny_spec(demo_data, epochs=9, pictures=False),
        early_terminate=ASHA,
    )
    published = schedule(env, path)
    burst_worker(env)
    again = schedule(env, path)
    return {"connection": connection, "env": env, "home": home, "published": published, "again": again}


def test_nine_points_pause_at_the_first_rung_then_exactly_three_and_then_one_are_promoted(asha_search):
    connection = asha_search["connection"]
    states = asha_runs(connection, "halving")
    assert len(states) == 9
    by_rung = {rung: sorted(p for p, s in states.items() if s["rung"] == rung) for rung in range(3)}
    assert [len(by_rung[rung]) for rung in range(3)] == [6, 2, 1]  # 3 promoted out of rung 0, 1 out of rung 1
    assert {s["state"] for p, s in states.items() if s["rung"] < 2} == {"paused"}
    [winner] = by_rung[2]
    assert states[winner]["state"] == "finished"
    records = {p: get_run(connection, s["run_name"]) for p, s in states.items()}
    assert all(record["status"] == "paused" for p, record in records.items() if p != winner)
    assert records[winner]["status"] == "finished" and records[winner]["epochs_completed"] == 9
    promoted = set(by_rung[1]) | {winner}
    assert {records[p]["params"]["lr"] for p in promoted} == set(LEARNING)
    for point, state in states.items():  # each pause or finish is an RQ job that finished normally
        job = Job.fetch(state["job_id"], connection=connection, serializer=JSONSerializer)
        assert job.get_status() == JobStatus.FINISHED and job.return_value()["status"] == records[point]["status"]
        assert job.meta["rung"] == state["rung"] and job.meta["status"] == records[point]["status"]
    # Every rung's epochs trained once: 9 x 1 + 3 x 2 + 1 x 6.
    assert sum(record["epochs_completed"] - record["resumed_from_epoch"] for record in records.values()) <= 21
    assert sorted(record["epochs_completed"] for record in records.values()) == [1] * 6 + [3] * 2 + [9]


def test_the_promoted_runs_history_equals_an_uninterrupted_runs(asha_search, demo_data, monkeypatch):
    connection = asha_search["connection"]
    [winner] = [s for s in asha_runs(connection, "halving").values() if s["state"] == "finished"]
    record = get_run(connection, winner["run_name"])
    assert record["resumed_from_epoch"] == 3  # resumed twice: after epoch 1, then after epoch 3
    monkeypatch.setenv("RUNYARD_HOME", str(asha_search["home"]))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    straight = train_straight(tiny_spec(demo_data, epochs=9, pictures=False, lr=record["params"]["lr"]))
    assert val_f1s(Path(record["run_dir"])) == val_f1s(Path(straight["run_dir"]))
    paused = load_checkpoint(checkpoint_path(Path(record["run_dir"])))
    uninterrupted = load_checkpoint(checkpoint_path(Path(straight["run_dir"])))
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(tensor, paused["model"][name]), name


def test_publishing_the_search_again_restarts_no_paused_or_promoted_run(asha_search):
    assert asha_search["published"]["enqueued"] == 9
    again = asha_search["again"]
    assert again["enqueued"] == 0 and again["counts"] == {"finished": 9}


def test_status_shows_each_runs_rung_and_state_and_the_leaderboard_ranks_the_deepest_rung_first(asha_search):
    env = asha_search["env"]
    status = json.loads(run_cli("runyard", "status", "--search", "halving", "--json", env=env).stdout)
    assert sorted(row["state"] for row in status["rows"]) == ["finished"] + ["paused"] * 8
    assert sorted(row["rung"] for row in status["rows"]) == [0] * 6 + [1] * 2 + [2]
    table = run_cli("runyard", "status", "--search", "halving", env=env).stdout
    assert "rung" in table and "paused" in table and "finished" in table
    board = json.loads(run_cli("runyard", "leaderboard", "--search", "halving", "--json", env=env).stdout)
    assert [row["asha"]["rung"] for row in board] == [2, 1, 1, 0, 0, 0, 0, 0, 0]
    assert [row["params"]["lr"] in LEARNING for row in board[:3]] == [True] * 3
    for rung in (1, 0):
        scores = [row["search_score"] for row in board if row["asha"]["rung"] == rung]
        assert scores == sorted(scores, reverse=True)
    board_table = " ".join(run_cli("runyard", "leaderboard", "--search", "halving", env=env).stdout.split())
    assert "paused at" in board_table  # a paused row names its rung (the table may wrap the cell)
    compare = run_cli("runyard", "compare", "halving", "--no-wandb", "--json", env=env)
    assert compare.returncode == 0, compare.stderr
    assert json.loads(compare.stdout)["points"] == 9


@pytest.mark.slow
def test_a_worker_killed_while_a_promoted_run_resumes_leaves_it_to_resume_again_from_its_checkpoint(
    redis_url, demo_data, tmp_path
):
    """Three points, rungs at 3 and 9 epochs: the best is promoted; its worker dies mid-resume; another finishes it."""
    connection = redis.Redis.from_url(redis_url)
    env = isolated_env(redis_url, tmp_path / "home") | ONE_THREAD
    env |= {"RUNYARD_HEARTBEAT_TTL": "4", "RUNYARD_JANITOR_INTERVAL": "1"}
    path = write_search(
        tmp_path / "revive.yaml",
        demo_data,
        {"lr": {"values": [LEARNING[0], STUCK[0], STUCK[3]]}},
        name="revive",
        fixed=tiny_spec(demo_data, epochs=9, pictures=False),
        early_terminate=ASHA | {"min_iter": 3},
    )
    published = schedule(env, path)
    root = next(job["job_id"] for job in published["jobs"] if job["run_name"].endswith("-001"))
    workers = {name: start_worker(env, name, tmp_path / f"{name}.log") for name in ("box1", "box2")}
    try:
        promoted = wait_for(lambda: _started(connection, f"{root}-rung1"), 180, "the promotion to start")
        wait_for(lambda: (_refreshed(promoted).meta.get("resumed_from_epoch") or 0) >= 3, 60, "the resume")
        doomed = promoted.worker_name
        kill_worker(workers[doomed].pid)
        # The last finished epoch when it died: 3 (the rung's checkpoint it resumed from) or later.
        done = max(3, (_refreshed(promoted).meta.get("progress") or {}).get("epoch") or 0)
        wait_for(lambda: _refreshed(promoted).get_status() == JobStatus.FINISHED, 240, "the other box to finish it")
    finally:
        for process in workers.values():
            kill_worker(process.pid)
            process.wait(10)
    result = promoted.return_value()
    assert result["status"] == "finished" and result["worker"]["name"] != doomed
    assert promoted.meta["requeues"] == 1 and promoted.meta["requeue_log"][0]["worker"] == doomed
    assert result["resumed_from_epoch"] == done  # from its run's last checkpoint, not from epoch 0
    straight = train_straight(tiny_spec(demo_data, epochs=9, pictures=False, lr=LEARNING[0]))
    assert val_f1s(Path(result["run_dir"])) == val_f1s(Path(straight["run_dir"]))


def _started(connection: redis.Redis, job_id: str) -> Job | None:
    if not Job.exists(job_id, connection=connection):
        return None
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    return job if job.get_status() == JobStatus.STARTED else None


def _refreshed(job: Job) -> Job:
    job.refresh()
    return job
