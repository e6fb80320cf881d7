"""publish -> a real `worker --cpu --burst` process -> a trained model with metrics back in Redis.

One worker run serves the whole module: an injected `os.system` job, a job whose data dir does not
exist, and a real 3-epoch experiment, published in that order.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.helpers import BIN, isolated_env, run_cli, tiny_spec
from tests.wandb_records import find_run_file, summarize_run

EPOCHS = 3


@dataclass
class WorkerRun:
    connection: redis.Redis
    env: dict[str, str]
    home: Path
    good: Job
    injected: Job
    missing_data: Job
    marker: Path
    snapshots: list[tuple[str, int | None]] = field(default_factory=list)
    worker_output: str = ""


def publish_json(env, *args) -> dict:
    result = run_cli("publish", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def spec_args(spec: dict) -> list[str]:
    return [arg for key, value in spec.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def worker_run(redis_server, demo_data, tmp_path_factory) -> WorkerRun:
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    home = tmp_path_factory.mktemp("home")
    env = isolated_env(redis_server, home)
    marker = home / "os-system-ran"

    queue = Queue("default", connection=connection, serializer=JSONSerializer)
    injected = queue.enqueue_call("os.system", args=(f"touch {marker}",), description="injected")
    spec = tiny_spec(demo_data, epochs=EPOCHS)
    spec.pop("pretrained")
    missing = publish_json(env, "--no-pretrained", *spec_args(spec | {"data_dir": str(home / "nowhere")}))
    good = publish_json(
        env,
        "--no-pretrained",
        *spec_args(spec),
        "--wandb-group",
        "g1",
        "--wandb-tags",
        "a,b",
        "--eval-dir",
        str(demo_data / "eval"),
    )

    worker = subprocess.Popen(
        [str(BIN / "worker"), "--cpu", "--burst"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    good_job = Job.fetch(good["job_id"], connection=connection, serializer=JSONSerializer)
    run = WorkerRun(
        connection,
        env,
        home,
        good_job,
        Job.fetch(injected.id, connection=connection, serializer=JSONSerializer),
        Job.fetch(missing["job_id"], connection=connection, serializer=JSONSerializer),
        marker,
    )
    deadline = time.monotonic() + 240
    while worker.poll() is None and time.monotonic() < deadline:
        good_job.refresh()
        run.snapshots.append((good_job.get_status().value, (good_job.meta.get("progress") or {}).get("epoch")))
        time.sleep(0.05)
    if worker.poll() is None:
        worker.kill()
    run.worker_output = worker.communicate()[0]
    assert worker.returncode == 0, run.worker_output
    for job in (run.good, run.injected, run.missing_data):
        job.refresh()
    return run


def test_injected_os_system_job_is_refused_and_the_worker_keeps_serving(worker_run):
    assert worker_run.injected.get_status() == JobStatus.FAILED
    assert "refused to run 'os.system'" in worker_run.injected.latest_result().exc_string
    assert not worker_run.marker.exists()
    assert worker_run.good.get_status() == JobStatus.FINISHED


def test_job_with_missing_data_fails_as_data_error_without_retries(worker_run):
    job = worker_run.missing_data
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["failure_reason"] == "data_error"
    assert "is not a directory" in job.meta["failure_message"]
    assert job.retries_left == 0  # a missing dataset will not appear by retrying


def test_finished_job_returns_a_result_and_joins_the_leaderboard(worker_run):
    result = worker_run.good.return_value()
    assert result["epochs_completed"] == EPOCHS
    assert 0.0 <= result["best"]["val_f1"] <= 1.0 and 1 <= result["best"]["epoch"] <= EPOCHS
    assert result["run_name"] == worker_run.good.description
    board = run_cli("runyard", "leaderboard", "--json", env=worker_run.env)
    assert board.returncode == 0, board.stderr
    [entry] = json.loads(board.stdout)
    assert entry["run_name"] == result["run_name"] and entry["best"] == result["best"]
    assert entry["job_id"] == worker_run.good.id


def test_run_dir_holds_spec_metrics_checkpoints_and_log(worker_run):
    run_dir = Path(worker_run.good.return_value()["run_dir"])
    assert run_dir.parent == worker_run.home / "runs"
    assert json.loads((run_dir / "spec.json").read_text())["epochs"] == EPOCHS
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
    assert (run_dir / "checkpoints" / "best.pt").stat().st_size > 0
    assert (run_dir / "checkpoints" / "last.pt").stat().st_size > 0
    assert f"epoch {EPOCHS}/{EPOCHS}" in (run_dir / "train.log").read_text()


def test_job_with_an_eval_dir_writes_the_submission_itself(worker_run):
    result = worker_run.good.return_value()
    submission = Path(result["submission"]["path"])
    assert submission == Path(result["run_dir"]) / "submission.csv"
    with open(submission) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result["submission"]["eval"]["images"] == 18
    assert all(0 <= int(row["ans"]) < 18 for row in rows)
    artifacts = {
        artifact["name"]: artifact for artifact in summarize_run(find_run_file(result["run_dir"]))["artifacts"]
    }
    assert artifacts[f"{result['run_name']}-submission"]["type"] == "submission"


def test_meta_shows_each_epoch_while_the_job_runs(worker_run):
    seen_running = {epoch for status, epoch in worker_run.snapshots if status == "started" and epoch}
    assert seen_running, "no progress was visible in job.meta while the job was running"
    assert seen_running <= set(range(1, EPOCHS + 1))
    meta = worker_run.good.meta
    assert [row["epoch"] for row in meta["history"]] == list(range(1, EPOCHS + 1))
    assert meta["progress"]["epoch"] == EPOCHS and meta["progress"]["epochs"] == EPOCHS
    assert {"val_f1", "val_acc", "val_loss", "train_loss", "best_val_f1", "seconds", "eta_seconds"} <= set(
        meta["progress"]
    )


def test_wandb_offline_run_holds_the_config_and_every_epochs_metrics(worker_run):
    result = worker_run.good.return_value()
    assert result["wandb"]["mode"] == "offline" and result["wandb"]["sync"].startswith("wandb sync ")
    logged = summarize_run(find_run_file(result["run_dir"]))
    assert logged["run"]["name"] == result["run_name"]
    assert logged["run"]["group"] == "g1" and logged["run"]["tags"] == ["a", "b"]
    assert logged["config"]["model"] == "test_efficientnet" and logged["config"]["epochs"] == EPOCHS
    assert logged["config"]["spec_hash"] == result["spec_hash"]
    with open(Path(result["run_dir"]) / "metrics.csv") as handle:
        csv_f1 = [float(row["val_f1"]) for row in csv.DictReader(handle)]
    assert [row["val_f1"] for row in logged["history"]] == pytest.approx(csv_f1)
    assert logged["summary"]["best_val_f1"] == pytest.approx(result["best"]["val_f1"])


def test_status_lists_the_failed_jobs_with_their_reasons(worker_run):
    status = run_cli("runyard", "status", "--json", env=worker_run.env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    failed = {row["job_id"]: row for row in report["failed"]}
    assert failed[worker_run.missing_data.id]["failure_reason"] == "data_error"
    assert "refused to run 'os.system'" in failed[worker_run.injected.id]["error"]
    [default] = [row for row in report["queues"] if row["name"] == "default"]
    assert default["finished"] == 1 and default["failed"] == 2 and default["queued"] == 0
    table = run_cli("runyard", "status", env=worker_run.env)
    assert "data_error" in table.stdout and "refused to run" in table.stdout


def test_ctrl_c_stops_an_idle_worker_cleanly(redis_url, connection):
    from rq import Worker

    worker = subprocess.Popen(
        [str(BIN / "worker"), "--cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 60
    while not Worker.all(connection=connection) and time.monotonic() < deadline:
        time.sleep(0.1)
    [registered] = Worker.all(connection=connection)
    assert registered.name.endswith("-cpu0")
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=30) == 0
    assert Worker.all(connection=connection) == []
    assert "warm shut down requested" in worker.stdout.read()


def test_a_stop_during_registry_maintenance_ends_the_loop_and_a_bad_record_does_not(connection, monkeypatch):
    # Ctrl-C on an idle worker: RQ's handler raises StopRequested wherever the loop is; swallowed
    # inside maintenance, the worker went on to a blocking dequeue and never stopped.
    from rq import Worker
    from rq.exceptions import StopRequested

    from worker.rq_worker import RunyardWorker

    worker = RunyardWorker(["default"], name="maintenance-test", connection=connection)
    monkeypatch.setattr(Worker, "run_maintenance_tasks", lambda self: (_ for _ in ()).throw(StopRequested()))
    with pytest.raises(StopRequested):
        worker.run_maintenance_tasks()
    monkeypatch.setattr(Worker, "run_maintenance_tasks", lambda self: (_ for _ in ()).throw(ValueError("bad record")))
    worker.run_maintenance_tasks()  # logged and skipped


def test_a_stop_whose_raise_went_astray_is_still_honoured_before_the_blocking_dequeue(connection):
    from rq.exceptions import StopRequested

    from worker.rq_worker import RunyardWorker

    worker = RunyardWorker(["default"], name="astray-stop-test", connection=connection)
    with pytest.raises(StopRequested):
        worker._shutdown()  # idle: RQ raises, and the request is remembered as well
    assert worker._stop_requested
    with pytest.raises(StopRequested):
        worker.dequeue_job_and_maintain_ttl(timeout=60)  # would otherwise block for a minute
