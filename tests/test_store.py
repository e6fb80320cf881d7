"""The run store (RUNYARD_STORE): runs that outlive their box, with real parts.

Stores: a shared directory, and S3 through s3fs against moto's standalone server on 127.0.0.1
(the only S3 server installable here). Two "boxes" are worker processes with different
RUNYARD_HOMEs on one Redis; a dead box is kill -9 of its worker and work horse.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from contracts.spec import load_spec
from tests.helpers import isolated_env, kill_worker, run_cli, start_worker, tiny_spec, wait_for
from trainer.store import StoreError, display_url, open_store
from trainer.store_sync import StoreSync
from trainer.train import train

MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1 (a real HTTP server s3fs talks to)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_bucket(endpoint: str) -> str:
    """A new bucket on the moto server; returns its name."""
    import boto3

    name = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        **{key.lower(): value for key, value in MOTO_KEYS.items() if key != "AWS_DEFAULT_REGION"},
        region_name="us-east-1",
    ).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["shared-dir", "s3"])
def store_env(request, tmp_path) -> dict[str, str]:
    """The environment variables every box sets to share one store of each kind."""
    if request.param == "shared-dir":
        (tmp_path / "shared").mkdir()  # the mount every box has
        return {"RUNYARD_STORE": str(tmp_path / "shared" / "runyard")}
    endpoint = request.getfixturevalue("s3_endpoint")
    return {"RUNYARD_STORE": f"s3://{s3_bucket(endpoint)}/team", "AWS_ENDPOINT_URL": endpoint} | MOTO_KEYS


def test_the_url_shown_in_logs_and_results_never_carries_a_secret():
    assert display_url("s3://AKIA:s3cr3t@bucket/prefix?token=abc") == "s3://bucket/prefix"
    assert display_url("/mnt/shared/runyard") == "/mnt/shared/runyard"


def test_a_kill_in_the_middle_of_an_upload_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "box-a"))
    monkeypatch.setenv("RUNYARD_STORE", str(tmp_path / "shared"))
    store = open_store()
    run_dir = tmp_path / "box-a" / "runs" / "run"
    last = run_dir / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "weights": torch.arange(4.0)}, last)
    StoreSync(store, "run", run_dir).finish("running", timeout=10)
    sync = StoreSync(store, "run", run_dir)
    sync.epoch(1, {"last": last}, [], {"epoch": 1})
    sync.finish("running", timeout=10)
    # Epoch 2's upload is cut off by a kill -9: half its bytes reach the store, the manifest is not rewritten.
    torch.save({"epoch": 2, "weights": torch.arange(4.0) * 2}, buffer := io.BytesIO())
    torn = store.path("run", "checkpoints/last-e0002-0badc0de.pt")
    Path(torn).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    manifest = store.read_manifest("run")
    assert manifest["checkpoints"]["last"]["epoch"] == 1
    fetched = store.pull("run", tmp_path / "box-b" / "run", kinds=("last",), files=False)
    state = torch.load(fetched / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.arange(4.0))
    # A file that is not the one the manifest names (a torn or mixed copy) is refused, never loaded.
    Path(store.path("run", manifest["checkpoints"]["last"]["path"])).write_bytes(Path(torn).read_bytes())
    with pytest.raises(StoreError, match="differ from its manifest"):
        store.pull("run", tmp_path / "box-c" / "run", kinds=("last",), files=False)


def test_an_unreadable_last_checkpoint_falls_back_to_the_previous_one_then_to_a_fresh_start(
    tmp_path, monkeypatch, demo_data
):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("RUNYARD_STORE", raising=False)
    spec = load_spec(tiny_spec(demo_data, epochs=2, run_name="torn", pictures=False))
    train(spec)
    folder = tmp_path / "runs" / "torn" / "checkpoints"
    assert {path.name for path in folder.iterdir()} >= {"last.pt", "previous.pt", "best.pt"}
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:1000])  # a truncated write
    best_epoch = torch.load(folder / "best.pt", weights_only=True)["epoch"]

    result = train(spec, resume=True)
    assert result["resumed_from_epoch"] == max(best_epoch, 1)  # the newest of previous.pt and best.pt
    assert result["epochs_completed"] == 2
    [unreadable, resumed] = result["checkpoint_fallback"]
    assert unreadable.startswith("checkpoints/last.pt is unreadable (")
    assert resumed.startswith("resumed from ") and "instead" in resumed
    assert "checkpoints/last.pt is unreadable" in (tmp_path / "runs" / "torn" / "train.log").read_text()

    for path in folder.glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    result = train(spec, resume=True)
    assert result["resumed_from_epoch"] == 0 and result["epochs_completed"] == 2
    assert result["checkpoint_fallback"][-1] == "no readable checkpoint: training starts over from epoch 0"


def one_line_error(env: dict[str, str]) -> str:
    """What a worker started with `env` says before it takes any job (it must exit)."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.process", "--name", "box", "--burst"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_a_bad_store_url_stops_a_worker_with_one_clear_line_each(redis_url, tmp_path, s3_endpoint, connection):
    env = isolated_env(redis_url, tmp_path / "home")
    line = one_line_error(env | {"RUNYARD_STORE": "s4://bucket/runs"})
    assert "RUNYARD_STORE=s4://bucket/runs" in line and "Protocol not known: s4" in line and "s3://BUCKET" in line

    s3 = env | MOTO_KEYS | {"AWS_ENDPOINT_URL": s3_endpoint}
    line = one_line_error(s3 | {"RUNYARD_STORE": "s3://no-such-bucket/runs"})
    assert "store s3://no-such-bucket/runs: the bucket or directory does not exist" in line

    line = one_line_error(env | {"RUNYARD_STORE": str(tmp_path / "not-mounted" / "runyard")})
    assert "does not exist" in line and "not-mounted" in line

    # No permission: moto with authentication on refuses keys it does not know.
    port = free_port()
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env | {"INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _listening(port), 30, "moto with authentication")
        refused = s3 | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
        line = one_line_error(refused | {"RUNYARD_STORE": "s3://runs/team"})
    finally:
        moto.kill()
        moto.wait(10)
    assert "store s3://runs/team: permission denied" in line and "wrong-secret" not in line
    assert connection.keys("rq:worker:*") == []  # no worker registered, so no job taken


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


EPOCHS = 4
FAST = {"RUNYARD_HEARTBEAT_TTL": "4", "RUNYARD_JANITOR_INTERVAL": "1", "OMP_NUM_THREADS": "1"}


def alive(worker: subprocess.Popen) -> bool:
    assert worker.poll() is None, f"the worker exited with {worker.returncode}; see its log"
    return True


def metrics_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_box_b_resumes_a_run_whose_box_died_from_the_store_and_a_third_home_infers_from_it(
    store_env, redis_url, tmp_path, demo_data, monkeypatch
):
    spec = tiny_spec(demo_data, epochs=EPOCHS, pictures=False)
    args = [
        f"--{'' if value else 'no-'}{key.replace('_', '-')}"
        if isinstance(value, bool)
        else f"--{key.replace('_', '-')}={value}"
        for key, value in spec.items()
    ]
    box_a = isolated_env(redis_url, tmp_path / "box-a") | FAST | store_env
    box_b = isolated_env(redis_url, tmp_path / "box-b") | FAST | store_env
    published = run_cli("publish", *args, "--json", env=box_a)
    assert published.returncode == 0, published.stderr
    run_name = json.loads(published.stdout)["run_name"]
    for key, value in store_env.items():  # this process reads the store as the boxes do
        monkeypatch.setenv(key, value)
    store = open_store()
    workers = [start_worker(box_a, "box-a", tmp_path / "box-a.log")]
    try:
        manifest = wait_for(
            lambda: (
                alive(workers[0]) and (found := store.read_manifest(run_name)) and found.get("epoch", 0) >= 2 and found
            ),
            180,
            "epoch 2 in the store",
        )
        kill_worker(workers[0].pid)
        killed_at_epoch = store.read_manifest(run_name)["epoch"]
        assert manifest["box"] and killed_at_epoch < EPOCHS
        workers.append(start_worker(box_b, "box-b", tmp_path / "box-b.log"))
        final = wait_for(
            lambda: (
                alive(workers[1])
                and (found := store.read_manifest(run_name))
                and found.get("status") == "finished"
                and found
            ),
            300,
            "box B to finish the run",
        )
    finally:
        for worker in workers:
            kill_worker(worker.pid)
            worker.wait(10)
    assert not (tmp_path / "box-b" / "runs" / run_name / "checkpoints" / "previous.pt.unreadable").exists()
    result = json.loads(store.fs.cat_file(store.path(run_name, "result.json")))
    assert result["resumed_from_epoch"] == killed_at_epoch >= 2 and result["epochs_completed"] == EPOCHS
    assert result["store"] == store.run_url(run_name) and "testing" not in json.dumps(result)
    assert set(final["checkpoints"]) == {"last", "previous", "best"}

    # The history equals an uninterrupted run's: the same rows and the same final weights.
    straight_home = tmp_path / "straight"
    config = tmp_path / "straight.yaml"
    config.write_text(yaml.safe_dump(spec | {"run_name": "straight"}))
    alone = {key: value for key, value in isolated_env(redis_url, straight_home).items() if key != "RUNYARD_STORE"}
    trained = run_cli("runyard", "train", "--config", str(config), env=alone | FAST, timeout=300)
    assert trained.returncode == 0, trained.stderr
    straight_rows = metrics_rows((straight_home / "runs" / "straight" / "metrics.csv").read_text())
    stored_rows = metrics_rows(store.fs.cat_file(store.path(run_name, "metrics.csv")).decode())
    assert [row["epoch"] for row in stored_rows] == [str(epoch) for epoch in range(1, EPOCHS + 1)]
    assert [row["val_f1"] for row in stored_rows] == [row["val_f1"] for row in straight_rows]
    assert [row["train_loss"] for row in stored_rows] == [row["train_loss"] for row in straight_rows]
    resumed = store.pull(run_name, tmp_path / "pulled", kinds=("last",), files=False)
    resumed_state = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    straight_state = torch.load(straight_home / "runs" / "straight" / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in straight_state["model"].items():
        assert torch.equal(tensor, resumed_state["model"][name]), name

    # A third home that trained nothing writes a submission from the run's name.
    third = isolated_env(redis_url, tmp_path / "laptop") | store_env
    output = tmp_path / "submission.csv"
    inferred = run_cli(
        "runyard", "infer", run_name, "--eval-dir", str(demo_data / "eval"), "-o", str(output), "--json", env=third
    )
    assert inferred.returncode == 0, inferred.stderr
    assert (
        len(output.read_text().splitlines()) == 1 + len((demo_data / "eval" / "info.csv").read_text().splitlines()) - 1
    )
    assert (tmp_path / "laptop" / "runs" / run_name / "checkpoints" / "best.pt").is_file()


def test_runs_pull_and_gc_list_copy_and_thin_the_store_from_another_home(tmp_path, monkeypatch, demo_data):
    from click.testing import CliRunner

    from runyard.cli.main import main
    from runyard.doctor import check_store

    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "box-a"))
    monkeypatch.setenv("RUNYARD_STORE", str(tmp_path / "shared"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert check_store().status == "ok"
    for seed in (1, 2):
        spec = tiny_spec(demo_data, epochs=2, run_name=f"point-{seed}", seed=seed, pictures=False)
        train(load_spec(spec), context={"search": "sweep"})
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "laptop"))  # a home that trained nothing
    cli = CliRunner()

    listed = json.loads(cli.invoke(main, ["runs", "--json"], catch_exceptions=False).output)
    rows = {row["run_name"]: row for row in listed["runs"]}
    assert set(rows) == {"point-1", "point-2"}
    assert {row["status"] for row in rows.values()} == {"finished"}
    assert all(
        row["size"] > 0 and row["box"] == socket.gethostname() and row["search"] == "sweep" for row in rows.values()
    )
    assert "point-1" in cli.invoke(main, ["runs"], catch_exceptions=False).output

    pulled = cli.invoke(main, ["pull", "point-1", "--to", str(tmp_path / "copy"), "--json"], catch_exceptions=False)
    assert json.loads(pulled.output)["path"] == str(tmp_path / "copy")
    assert {"metrics.csv", "result.json", "spec.json"} <= {path.name for path in (tmp_path / "copy").iterdir()}
    assert torch.load(tmp_path / "copy" / "checkpoints" / "best.pt", weights_only=True)["epoch"] >= 1

    ranked = sorted(rows.values(), key=lambda row: row["best_val_f1"], reverse=True)
    dry = json.loads(cli.invoke(main, ["gc", "--keep-top", "1", "--json"], catch_exceptions=False).output)
    planned = {(item["run_name"], item["kind"]) for item in dry["files"]}
    assert planned == {(name, kind) for name in rows for kind in ("last", "previous")} | {
        (ranked[1]["run_name"], "best")
    }
    assert not dry["deleted"] and open_store().read_manifest("point-1")["checkpoints"].keys() == {
        "last",
        "previous",
        "best",
    }
    done = cli.invoke(main, ["gc", "--keep-top", "1", "--yes"], catch_exceptions=False)
    assert done.exit_code == 0 and "deleted 5 file(s)" in done.output
    store = open_store()
    assert set(store.read_manifest(ranked[0]["run_name"])["checkpoints"]) == {"best"}
    assert set(store.read_manifest(ranked[1]["run_name"])["checkpoints"]) == set()
    [kept] = Path(store.path(ranked[0]["run_name"], "checkpoints")).iterdir()
    assert kept.name.startswith(f"best-e{ranked[0]['best_epoch']:04d}-")


def test_a_store_that_goes_away_mid_run_gets_every_epoch_once_it_is_back(tmp_path, monkeypatch, demo_data):
    shared = tmp_path / "mnt" / "runyard"
    monkeypatch.setenv("RUNYARD_STORE", str(shared))
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    shared.mkdir(parents=True)  # the mounted store
    pending = []

    def outage(report):
        pending.append(report.store_pending)
        if report.epoch == 1:  # the mount goes away: its path is no longer a directory
            shared.rename(tmp_path / "mnt" / "away")
            shared.write_text("not mounted")
        if report.epoch == 3:  # back once an upload has failed and is being retried
            log = tmp_path / "home" / "runs" / "outage" / "train.log"
            wait_for(lambda: "retrying, training goes on" in log.read_text(), 60, "a failed upload")
            shared.unlink()
            (tmp_path / "mnt" / "away").rename(shared)

    result = train(load_spec(tiny_spec(demo_data, epochs=4, run_name="outage", pictures=False)), on_epoch=outage)
    store = open_store()
    manifest = store.read_manifest("outage")
    rows = metrics_rows(store.fs.cat_file(store.path("outage", "metrics.csv")).decode())
    assert result["epochs_completed"] == 4 and manifest["status"] == "finished" and manifest["epoch"] == 4
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert max(pending) >= 1  # the job's meta said artifacts were pending meanwhile
    assert "retrying, training goes on" in (tmp_path / "home" / "runs" / "outage" / "train.log").read_text()


def test_the_k_fold_ensemble_reads_folds_trained_on_two_boxes_from_the_store(
    connection, tmp_path, monkeypatch, demo_data
):
    import shutil

    from rq.job import Job
    from rq.serializers import JSONSerializer

    from worker.fold_aggregate import aggregate
    from worker.results import record_run

    (tmp_path / "shared").mkdir()
    monkeypatch.setenv("RUNYARD_STORE", str(tmp_path / "shared" / "runyard"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = tiny_spec(demo_data, pictures=False) | {"kfold": {"k": 3}}
    for fold, box in enumerate(("box-a", "box-b", "box-a")):
        monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / box))
        spec = base | {"kfold": {"k": 3, "fold": fold}, "run_name": f"cv-fold{fold}"}
        result = train(load_spec(spec))
        metric = {"name": "val_f1", "goal": "maximize", "best": result["best"]["val_f1"]}
        record_run(connection, result | {"search": "cv", "metric": metric, "search_score": None, "status": "finished"})
    for box in ("box-a", "box-b"):
        shutil.rmtree(tmp_path / box)  # the boxes are gone; their runs live on in the store
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "aggregator"))
    job = Job.create("worker.jobs.aggregate_folds", connection=connection, serializer=JSONSerializer)
    job.save()
    folds = [{"fold": fold, "run_name": f"cv-fold{fold}", "point": f"p{fold}"} for fold in range(3)]
    search = {"name": "cv", "point": "kfold-x", "params": {}}
    spec = base | {"run_name": "cv", "eval_dir": str(demo_data / "eval")}
    result = aggregate(job, search, spec, folds, "cv")
    assert result["ensemble"]["written"] and 0.0 <= result["ensemble"]["eval"]["f1"] <= 1.0
    assert result["store"] == open_store().run_url("cv")
    manifest = open_store().read_manifest("cv")
    assert manifest["status"] == "finished" and {"result.json", "submission.csv"} <= set(manifest["files"])
