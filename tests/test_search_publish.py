"""Publishing a search: one JSON job per point, each point exactly once, atomically in Redis."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys

import redis
import yaml
from click.testing import CliRunner
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

import schedule_search.publish as publish_module
from contracts.keys import search_points_key
from runyard.cli.publish import cancel_command, leaderboard_command, status_command
from runyard.cli.schedule_search import schedule_search_command
from schedule_search.publish import claim_points, publish_search
from schedule_search.search import load_search
from tests.helpers import BIN, write_search
from worker.jobs import AGGREGATE_FOLDS, RUN_EXPERIMENT
from worker.search_stop import cancel_waiting_points

GRID = {"lr": {"values": [0.001, 0.01]}, "loss": {"values": ["f1", "focal"]}}


def schedule(*args: str) -> dict:
    result = CliRunner().invoke(schedule_search_command, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def default_queue(connection) -> Queue:
    return Queue("default", connection=connection, serializer=JSONSerializer)


def test_a_grid_becomes_one_json_job_per_point_tagged_with_its_search(connection, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    printed = schedule(str(path))
    assert (printed["points"], printed["enqueued"], printed["counts"]) == (4, 4, {"new": 4})
    jobs = default_queue(connection).get_jobs()
    assert [job.description for job in jobs] == ["g-001", "g-002", "g-003", "g-004"]
    points = {point.id: point for point in load_search(path).points}
    for job in jobs:
        assert job.func_name == RUN_EXPERIMENT and job.retries_left == 2
        assert job.meta["search"] == "g" and job.meta["point"] in points
        point = points[job.meta["point"]]
        assert job.kwargs["spec"]["lr"] == point.params["lr"] and job.kwargs["spec"]["run_name"] == job.description
        assert job.kwargs["search"]["name"] == "g" and job.kwargs["search"]["params"] == point.params
        assert job.kwargs["search"]["study"] is None  # no early stopping, no bayes: no Optuna in the worker
    assert {job["job_id"] for job in printed["jobs"]} == {job.id for job in jobs}


def test_publishing_the_same_file_again_enqueues_nothing(connection, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    schedule(str(path))
    again = schedule(str(path))
    assert (again["enqueued"], again["counts"]) == (0, {"queued": 4})
    assert default_queue(connection).count == 4
    result = CliRunner().invoke(schedule_search_command, [str(path)])
    assert "enqueued 0 (0 new)" in result.output and "skipped 4 queued" in result.output


def test_a_grown_grid_enqueues_only_its_new_points(connection, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    schedule(str(path))
    write_search(
        tmp_path / "grid.yaml", tmp_path, GRID | {"loss": {"values": ["f1", "focal", "cross_entropy"]}}, name="g"
    )
    grown = schedule(str(path))
    assert (grown["enqueued"], grown["counts"]) == (2, {"new": 2, "queued": 4})
    assert [job.kwargs["spec"]["loss"] for job in default_queue(connection).get_jobs()[4:]] == ["cross_entropy"] * 2


def test_dry_run_lists_the_points_and_which_are_new_and_enqueues_nothing(connection, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    before = schedule(str(path), "--dry-run")
    assert before["dry_run"] and before["new"] == 4 and [row["status"] for row in before["points"]] == ["new"] * 4
    assert not connection.keys("rq:job:*") and not connection.exists(search_points_key("g"))
    schedule(str(path))
    after = schedule(str(path), "--dry-run")
    assert after["new"] == 0 and {row["status"] for row in after["points"]} == {"queued"}
    table = CliRunner().invoke(schedule_search_command, [str(path), "--dry-run"])
    assert "0 would be enqueued, 0 already done, 4 queued or running" in table.output


def _publish_after_barrier(url: str, path: str, barrier, results) -> None:
    connection = redis.Redis.from_url(url)
    search = load_search(path)
    barrier.wait()
    results.put(publish_search(connection, search, context={}).enqueued)


def test_two_processes_publishing_one_search_at_once_enqueue_each_point_once(redis_url, connection, tmp_path):
    parameters = {
        "lr": {"values": [round(0.0001 * step, 4) for step in range(1, 21)]},
        "seed": {"values": list(range(20))},
    }
    path = write_search(tmp_path / "big.yaml", tmp_path, parameters, name="race")
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    publishers = [
        context.Process(target=_publish_after_barrier, args=(redis_url, str(path), barrier, results)) for _ in range(2)
    ]
    for process in publishers:
        process.start()
    for process in publishers:
        process.join(60)
        assert process.exitcode == 0
    enqueued = sorted(results.get(timeout=5) for _ in publishers)
    assert sum(enqueued) == 400
    jobs = default_queue(connection).get_jobs()
    assert len(jobs) == 400 and len({job.meta["point"] for job in jobs}) == 400
    assert connection.hlen(search_points_key("race")) == 400


def test_a_publisher_that_died_after_claiming_leaves_the_points_to_the_next_one_after_a_grace_period(
    connection, tmp_path, monkeypatch
):
    search = load_search(write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g"))
    claim_points(connection, search)  # claimed, then the publisher died before enqueueing
    fresh = publish_search(connection, search, context={})
    assert fresh.enqueued == 0 and set(fresh.outcomes) == {"claimed"}
    monkeypatch.setattr(publish_module, "CLAIM_GRACE_S", 0)
    late = publish_search(connection, search, context={})
    assert late.enqueued == 4 and set(late.outcomes) == {"retry:lost"}
    assert default_queue(connection).count == 4


def test_a_k_fold_point_enqueues_its_folds_and_an_aggregate_that_waits_for_them(connection, tmp_path):
    path = write_search(tmp_path / "cv.yaml", tmp_path, {"lr": {"values": [0.001]}}, name="cv")
    document = yaml.safe_load(path.read_text())
    document["fixed"]["kfold"] = {"k": 3}
    path.write_text(yaml.safe_dump(document))
    printed = schedule(str(path))
    assert printed["enqueued"] == 4
    folds = default_queue(connection).get_jobs()
    assert [job.kwargs["spec"]["kfold"] for job in folds] == [{"k": 3, "fold": fold} for fold in range(3)]
    assert {job.kwargs["search"]["kfold_set"] for job in folds} == {"cv-001"}
    [aggregate_id] = [job["job_id"] for job in printed["jobs"] if job["run_name"] == "cv-001"]
    aggregate = Job.fetch(aggregate_id, connection=connection, serializer=JSONSerializer)
    assert aggregate.func_name == AGGREGATE_FOLDS and aggregate.get_status() == JobStatus.DEFERRED
    assert sorted(aggregate.dependency_ids) == sorted(job.id for job in folds)
    assert aggregate.allow_dependency_failures  # a failed fold is reported, not waited on forever
    assert [fold["run_name"] for fold in aggregate.kwargs["folds"]] == [f"cv-001-fold{fold}" for fold in range(3)]


def test_a_bayes_search_cannot_change_its_space_under_the_same_name(connection, tmp_path):
    space = {"lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}}
    path = write_search(tmp_path / "b.yaml", tmp_path, space, method="bayes", run_cap=3, name="tpe")
    assert schedule(str(path))["enqueued"] == 3
    write_search(
        tmp_path / "b.yaml", tmp_path, space | {"loss": {"values": ["f1"]}}, method="bayes", run_cap=3, name="tpe"
    )
    changed = CliRunner().invoke(schedule_search_command, [str(path)])
    assert changed.exit_code == 2 and "already exists with another method, space or metric" in changed.output
    assert default_queue(connection).count == 3


def test_status_of_a_search_lists_its_points_and_unknown_searches_are_refused(connection, tmp_path):
    schedule(str(write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")))
    result = CliRunner().invoke(status_command, ["--search", "g", "--json"])
    status = json.loads(result.stdout)
    assert status["counts"]["queued"] == 4 and status["done"] == 0
    assert [row["run_name"] for row in status["rows"]] == ["g-001", "g-002", "g-003", "g-004"]
    for command in (status_command, leaderboard_command):
        unknown = CliRunner().invoke(command, ["--search", "nope"])
        assert unknown.exit_code == 2 and "no search named 'nope'" in unknown.output


def test_status_of_a_search_whose_job_record_a_tool_overwrote_counts_that_point_missing(connection, tmp_path):
    printed = schedule(str(write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")))
    overwritten = printed["jobs"][0]["job_id"]
    connection.delete(Job.key_for(overwritten))
    connection.set(Job.key_for(overwritten), "not a hash")  # a teammate's tool wrote a string there
    result = CliRunner().invoke(status_command, ["--search", "g", "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)["counts"]
    assert {state: count for state, count in counts.items() if count} == {"queued": 3, "missing": 1}


def test_stopping_a_search_whose_job_record_a_tool_overwrote_cancels_the_other_points(connection, tmp_path):
    printed = schedule(str(write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")))
    overwritten = printed["jobs"][0]["job_id"]
    connection.delete(Job.key_for(overwritten))
    connection.set(Job.key_for(overwritten), "not a hash")
    assert cancel_waiting_points(connection, "g") == 3
    assert connection.get(Job.key_for(overwritten)) == b"not a hash"  # left for the quarantine


def test_schedule_search_runs_as_a_module_and_as_a_runyard_command_without_torch(redis_url, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    script = (
        "import sys\n"
        "from runyard.cli.schedule_search import schedule_search_command\n"
        "try:\n"
        f"    schedule_search_command([{str(path)!r}, '--json'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY' if {'torch', 'optuna'} & set(sys.modules) else 'LIGHT')\n"
    )
    published = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert '"enqueued": 4' in published.stdout, published.stderr
    assert published.stdout.strip().endswith("LIGHT")
    as_module = subprocess.run(
        [sys.executable, "-m", "schedule_search", str(path)], capture_output=True, text=True, timeout=60
    )
    assert as_module.returncode == 0 and "enqueued 0 (0 new)" in as_module.stdout
    help_text = subprocess.run([str(BIN / "runyard"), "schedule-search", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "W&B-sweep YAML" in help_text.stdout


def test_runyard_cancel_of_a_search_cancels_its_points_and_publishing_again_brings_them_back(connection, tmp_path):
    path = write_search(tmp_path / "grid.yaml", tmp_path, GRID, name="g")
    schedule(str(path))
    cancelled = CliRunner().invoke(cancel_command, ["--search", "g", "--json"])
    assert cancelled.exit_code == 0, cancelled.output
    assert default_queue(connection).count == 0
    again = schedule(str(path))
    assert (again["enqueued"], again["counts"]) == (4, {"retried": 4})
    assert default_queue(connection).count == 4
