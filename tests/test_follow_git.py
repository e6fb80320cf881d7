"""`worker --follow-git` and the code version recorded per run, with real local git repositories.

The module copies runyard's source into a repository with a bare `origin`, clones it twice (the
publisher's box and the worker's box), and runs a real worker from its clone. A commit pushed
between two jobs is picked up by the second: the worker fast-forwards, restarts, trains on the
new commit, and the run records that it trained on other code than it was published with.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from tests.helpers import BIN, isolated_env, run_cli, tiny_spec
from tests.wandb_records import find_run_file, summarize_run

SOURCE = Path(__file__).resolve().parent.parent
GIT_IDENTITY = ("-c", "user.name=runyard tests", "-c", "user.email=tests@runyard.invalid")


def git(directory: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *GIT_IDENTITY, *args], cwd=directory, capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def copy_source(destination: Path) -> Path:
    """runyard's files as they are in this checkout (tracked and new, not ignored ones)."""
    listed = git(SOURCE, "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, listed):
        if (SOURCE / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SOURCE / name, destination / name)
    return destination


@dataclass
class Followed:
    first: Job
    second: Job
    commit_a: str
    commit_b: str
    worker_checkout: Path
    worker_log: str
    env: dict[str, str]


def wait_finished(job: Job, worker: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED):
        assert worker.poll() is None, "the worker exited"
        assert time.monotonic() < deadline, f"job {job.id} did not finish"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def followed(redis_server, demo_data, tmp_path_factory) -> Followed:
    root = tmp_path_factory.mktemp("follow-git")
    seed = copy_source(root / "seed")
    git(seed, "init", "--quiet", "--initial-branch=main")
    git(seed, "add", "--all")
    git(seed, "commit", "--quiet", "-m", "A")
    subprocess.run(["git", "clone", "--quiet", "--bare", str(seed), str(root / "origin.git")], check=True)
    for box in ("worker-box", "publisher-box"):
        subprocess.run(["git", "clone", "--quiet", str(root / "origin.git"), str(root / box)], check=True)
    commit_a = git(seed, "rev-parse", "HEAD")

    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    env = isolated_env(redis_server, root / "home")
    worker_env = env | {"PYTHONPATH": str(root / "worker-box")}
    publisher_env = env | {"PYTHONPATH": str(root / "publisher-box")}
    spec = tiny_spec(demo_data)
    spec_args = ["--no-pretrained", "--data-dir", spec["data_dir"], "--resize", "32x32", "--epochs", "1"]
    spec_args += ["--batch-size", "32", "--augmentation", "base", "--json"]

    def publish(run_name: str) -> Job:
        result = run_cli(
            "publish", "--model", "test_efficientnet", "--run-name", run_name, *spec_args, env=publisher_env
        )
        assert result.returncode == 0, result.stderr
        return Job.fetch(json.loads(result.stdout)["job_id"], connection=connection, serializer=JSONSerializer)

    log_path = root / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [str(BIN / "worker"), "--cpu", "--follow-git", "--name", "follower"],
            env=worker_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        first = publish("before-the-commit")
        wait_finished(first, worker)
        (seed / "trainer" / "NOTICE").write_text("a commit the worker must pick up\n")
        git(seed, "add", "--all")
        git(seed, "commit", "--quiet", "-m", "B")
        git(seed, "push", "--quiet", str(root / "origin.git"), "main")
        second = publish("after-the-commit")
        wait_finished(second, worker)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
    return Followed(
        first, second, commit_a, git(seed, "rev-parse", "HEAD"), root / "worker-box", log_path.read_text(), env
    )


def test_a_commit_pushed_between_two_jobs_is_picked_up_by_the_second(followed):
    assert followed.first.get_status() == JobStatus.FINISHED, followed.worker_log[-3000:]
    assert followed.second.get_status() == JobStatus.FINISHED, followed.worker_log[-3000:]
    assert followed.first.return_value()["code"]["worker"]["git_sha"] == followed.commit_a
    assert followed.second.return_value()["code"]["worker"]["git_sha"] == followed.commit_b
    assert git(followed.worker_checkout, "rev-parse", "HEAD") == followed.commit_b
    assert f"follow-git: code moved {followed.commit_a[:10]} -> {followed.commit_b[:10]}" in followed.worker_log
    assert followed.worker_log.count("follow-git: restarting follower-cpu0 on the new code") == 1


def test_worker_log_has_a_progress_line_per_epoch_with_eta(followed):
    assert re.search(
        r"epoch 1/1  train loss [\d.]+ .* F1 [\d.]+ \| best F1 [\d.]+ \(epoch 1\) .*\| ETA 0m00s", followed.worker_log
    )


def test_result_records_publisher_and_worker_commits_and_whether_they_differ(followed):
    same = followed.first.return_value()["code"]
    assert same["publisher"] == {"git_sha": followed.commit_a, "git_dirty": False}
    assert same["differs"] is False and same["reason"] == "same commit"
    moved = followed.second.return_value()["code"]
    assert moved["publisher"]["git_sha"] == followed.commit_a  # the publisher's box was not updated
    assert moved["differs"] is True
    assert moved["reason"] == f"published at {followed.commit_a[:10]}, trained at {followed.commit_b[:10]}"


def test_run_dir_and_wandb_record_both_commits(followed):
    result = followed.second.return_value()
    context = json.loads((Path(result["run_dir"]) / "context.json").read_text())
    assert context["git_sha"] == followed.commit_a
    assert context["worker"]["git_sha"] == followed.commit_b and context["worker"]["name"] == "follower-cpu0"
    logged = summarize_run(find_run_file(result["run_dir"]))
    assert logged["config"]["context"]["git_sha"] == followed.commit_a
    assert logged["config"]["context"]["worker"]["git_sha"] == followed.commit_b


def test_wandb_run_of_a_worker_job_has_job_type_best_metrics_and_the_best_checkpoint(followed):
    result = followed.second.return_value()
    logged = summarize_run(find_run_file(result["run_dir"]))
    assert logged["run"]["job_type"] == "train"
    assert logged["summary"]["best_val_f1"] == pytest.approx(result["best"]["val_f1"])
    assert logged["summary"]["best_epoch"] == result["best"]["epoch"] == 1
    [artifact] = logged["artifacts"]
    assert artifact["name"] == "after-the-commit-best" and artifact["type"] == "model"
    assert "best" in artifact["aliases"]
    assert artifact["files"] == {"best.pt": (Path(result["run_dir"]) / "checkpoints" / "best.pt").stat().st_size}


def test_status_flags_the_run_trained_on_other_code_and_prints_wandb_sync(followed):
    status = run_cli("runyard", "status", "--json", env=followed.env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert [row["run_name"] for row in report["code_differs"]] == ["after-the-commit"]
    syncs = {row["run_name"]: row["sync"] for row in report["wandb_offline"]}
    assert set(syncs) == {"before-the-commit", "after-the-commit"}
    assert all(command.startswith("wandb sync ") for command in syncs.values())
    table = run_cli("runyard", "status", env=followed.env).stdout
    assert "runs on other code than published" in table
    assert f"published at {followed.commit_a[:10]}, trained at {followed.commit_b[:10]}" in table
    assert syncs["after-the-commit"] in table


def test_follow_git_outside_a_git_checkout_is_refused(tmp_path, redis_url):
    plain = copy_source(tmp_path / "plain")
    result = run_cli(
        "worker", "--cpu", "--follow-git", env=isolated_env(redis_url, tmp_path) | {"PYTHONPATH": str(plain)}
    )
    assert result.returncode == 2
    assert f"--follow-git: {plain} is not a git checkout" in result.stderr


def test_follow_git_on_a_branch_without_upstream_is_refused(tmp_path, redis_url):
    local = copy_source(tmp_path / "local")
    git(local, "init", "--quiet")
    result = run_cli(
        "worker", "--cpu", "--follow-git", env=isolated_env(redis_url, tmp_path) | {"PYTHONPATH": str(local)}
    )
    assert result.returncode == 2
    assert "has no upstream; set one with `git branch --set-upstream-to=origin/main`" in result.stderr
