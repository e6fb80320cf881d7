"""`runyard doctor` on a healthy box and on each broken setup: one clear line with the fix."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from rq import Worker

from tests.helpers import BIN, isolated_env, run_cli, start_redis_server

# What NVML would report on a GPU box; it cannot exist on this CPU-only machine.
FAKE_PYNVML = """
class _Memory:
    total = 80 * 2**30
def nvmlInit(): pass
def nvmlShutdown(): pass
def nvmlSystemGetDriverVersion(): return "550.54.15"
def nvmlDeviceGetCount(): return 2
def nvmlDeviceGetHandleByIndex(index): return index
def nvmlDeviceGetName(handle): return "NVIDIA A100-SXM4-80GB"
def nvmlDeviceGetMemoryInfo(handle): return _Memory()
"""


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run_cli("runyard", "doctor", *args, env=env)


def lines_with(output: str, status: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"{status} ")]


@pytest.fixture
def aof_redis(tmp_path):
    process, url = start_redis_server(tmp_path, "--appendonly", "yes", password="doctor-pw")
    yield url
    process.terminate()
    process.wait(10)


def test_healthy_setup_is_all_ok_with_counts_per_class(aof_redis, demo_data, tmp_path):
    env = isolated_env(aof_redis, tmp_path / "home")
    del env["WANDB_MODE"]  # a worker box with no W&B settings at all
    worker = subprocess.Popen(
        [str(BIN / "worker"), "--cpu", "--name", "docbox"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        connection = redis.Redis.from_url(aof_redis)
        deadline = time.monotonic() + 60
        while not Worker.all(connection=connection) and time.monotonic() < deadline:
            time.sleep(0.1)
        result = doctor(env, "--data-dir", str(demo_data / "train"))
        report = json.loads(doctor(env, "--data-dir", str(demo_data / "train"), "--json").stdout)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines_with(result.stdout, "fail") == []
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses == {
        "redis": "ok",
        "aof": "ok",
        "workers": "ok",
        "store": "ok",
        "gpus": "warn",
        "wandb": "ok",
        "data": "ok",
    }
    [redis_line] = [line for line in result.stdout.splitlines() if line.startswith("ok    redis")]
    assert "Redis 6." in redis_line or "Redis 7." in redis_line
    assert ":***@" in redis_line and "doctor-pw" not in result.stdout  # the password is never printed
    assert "append-only file on (appendfsync everysec)" in result.stdout
    assert ": 1 (1 idle; last heartbeat" in result.stdout
    assert "offline (no WANDB_API_KEY)" in result.stdout
    assert "252 images, 36 profiles, 18/18 classes with images" in result.stdout
    per_class = report["checks"][-1]["data"]["per_class"]
    assert len(per_class) == 18 and sum(per_class.values()) == 252
    assert per_class["wear/female/>=60"] == 5 * per_class["incorrect/female/>=60"]  # 5 mask photos per person


def test_redis_down_is_one_line_naming_the_url_and_the_fix(tmp_path):
    env = isolated_env(f"unix://{tmp_path}/nothing.sock", tmp_path / "home")
    result = doctor(env)
    assert result.returncode == 1
    [line] = lines_with(result.stdout, "fail")
    assert line.startswith(f"fail  redis    cannot reach Redis at unix://{tmp_path}/nothing.sock")
    assert line.endswith("start that server, fix REDIS_URL, or unset REDIS_URL to use the embedded Redis")
    assert "skip  aof      needs Redis" in result.stdout


def test_wrong_redis_password_is_one_line_with_the_fix(aof_redis, tmp_path):
    wrong = aof_redis.replace(":doctor-pw@", ":not-it@")
    result = doctor(isolated_env(wrong, tmp_path / "home"))
    assert result.returncode == 1
    [line] = lines_with(result.stdout, "fail")
    assert "refused the password: put the right one in REDIS_URL (redis://:PASSWORD@HOST:6379/0)" in line
    assert "not-it" not in result.stdout


def test_missing_redis_password_is_one_line_with_the_fix(aof_redis, tmp_path):
    result = doctor(isolated_env(aof_redis.replace(":doctor-pw@", ""), tmp_path / "home"))
    assert result.returncode == 1
    [line] = lines_with(result.stdout, "fail")
    assert "wants a password: put it in REDIS_URL" in line


def test_empty_data_dir_is_one_line_with_the_fix(redis_url, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = doctor(isolated_env(redis_url, tmp_path / "home"), "--data-dir", str(empty))
    assert result.returncode == 1
    [line] = lines_with(result.stdout, "fail")
    assert line.startswith(f"fail  data     {empty}/images is not a directory")
    assert "make one with `runyard make-demo-data DIR`" in line


def test_image_folder_without_class_folders_is_one_line_with_the_fix(redis_url, tmp_path):
    result = doctor(
        isolated_env(redis_url, tmp_path / "home"), "--data-dir", str(tmp_path), "--dataset", "image_folder"
    )
    [line] = lines_with(result.stdout, "fail")
    assert "an image_folder dataset needs at least 2" in line and "runyard make-demo-data --help" in line


def test_no_aof_and_no_workers_are_warnings_that_say_what_to_do(redis_url, tmp_path):
    result = doctor(isolated_env(redis_url, tmp_path / "home"))
    assert result.returncode == 0
    assert (
        "warn  aof      append-only file off: a Redis restart loses queued jobs; run redis-server with" in result.stdout
    )
    assert "warn  workers  no workers registered: start one on each GPU box with `worker --gpus all`" in result.stdout


def test_gpus_are_listed_from_nvml(redis_url, tmp_path):
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    env = isolated_env(redis_url, tmp_path / "home")
    env["PYTHONPATH"] = f"{fake}:{env.get('PYTHONPATH', '')}"
    report = json.loads(doctor(env, "--json").stdout)
    [gpus] = [check for check in report["checks"] if check["name"] == "gpus"]
    assert gpus["status"] == "ok"
    assert gpus["detail"] == "2 GPU(s): 2 x NVIDIA A100-SXM4-80GB 80 GiB (driver 550.54.15)"


def test_doctor_help_names_every_check():
    result = run_cli("runyard", "doctor", "--help")
    assert result.returncode == 0
    for word in ("Redis", "AOF", "workers", "run store", "GPUs", "W&B", "dataset"):
        assert word in result.stdout


def test_healthy_data_dir_from_the_default_path_is_found(redis_url, demo_data, tmp_path):
    env = isolated_env(redis_url, tmp_path / "home")
    (tmp_path / "data").symlink_to(demo_data)
    result = subprocess.run(
        [str(BIN / "runyard"), "doctor"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert "ok    data     data/train (mask): 252 images" in result.stdout
    assert Path(tmp_path / "data" / "train").is_dir()
