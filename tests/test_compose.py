"""docker-compose.yml, validated by Debian's `docker-compose config` (no Docker engine runs here).

`config` resolves the .env file, defaults and required variables as `docker compose up` would;
the tests then read the settings a deployment depends on from its output.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(COMPOSE is None, reason="needs Debian's docker-compose (.ci/run installs it)")

ENV = {
    "REDIS_PASSWORD": "0123abcd-redis",
    "DASHBOARD_USERNAME": "team",
    "DASHBOARD_PASSWORD": "dash-pw",
    "WANDB_API_KEY": "k" * 40,
}


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def env_file(directory: Path, **values: str | None) -> Path:
    """.env.example with some values replaced (None drops the line)."""
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        if key in values:
            if values[key] is not None:
                lines.append(f"{key}={values[key]}")
        else:
            lines.append(line)
    path = directory / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> dict:
    result = compose_config(env_file(tmp_path_factory.mktemp("compose"), **ENV))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def host_addresses(service: dict) -> set[str]:
    return {str(port).split(":")[0] for port in service.get("ports", [])}


def test_redis_is_7_with_aof_everysec_and_the_password_from_env(services):
    redis = services["redis"]
    image, tag = redis["image"].split(":")
    assert image == "redis" and int(tag.split(".")[0]) >= 7
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command  # expanded in the container, not in the file
    assert redis["environment"]["REDIS_PASSWORD"] == ENV["REDIS_PASSWORD"]


def test_redis_keeps_its_data_on_a_named_volume_and_has_a_healthcheck(services, tmp_path):
    redis = services["redis"]
    assert "redis-data:/data:rw" in redis["volumes"]
    config = yaml.safe_load(compose_config(env_file(tmp_path, **ENV)).stdout)
    assert "redis-data" in config["volumes"]
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_nothing_is_published_on_all_interfaces_by_default(services):
    assert host_addresses(services["redis"]) == {"127.0.0.1"}
    assert host_addresses(services["dashboard"]) == {"127.0.0.1"}
    assert "ports" not in services["worker"]


def test_dashboard_runs_runyard_dashboard_with_basic_auth_from_env(services):
    dashboard = services["dashboard"]
    assert dashboard["command"][:2] == ["runyard", "dashboard"]  # the JSON-serializer setup, not stock rq-dashboard
    assert dashboard["environment"]["RQ_DASHBOARD_USERNAME"] == "team"
    assert dashboard["environment"]["RQ_DASHBOARD_PASSWORD"] == "dash-pw"
    assert dashboard["environment"]["REDIS_URL"] == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"


def test_worker_reserves_the_gpus_and_runs_one_worker_per_gpu(services):
    worker = services["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == "all"
    assert worker["command"] == ["worker", "--gpus", "all"]
    assert worker["build"]["target"] == "worker"


def test_worker_has_data_and_runs_volumes_and_the_wandb_key_from_env(services):
    worker = services["worker"]
    mounts = {volume.split(":")[1]: volume for volume in worker["volumes"]}
    assert mounts["/data"].endswith(":ro") and mounts["/runyard/runs"].endswith(":rw")
    assert worker["environment"]["RUNYARD_HOME"] == "/runyard"
    assert worker["environment"]["WANDB_API_KEY"] == ENV["WANDB_API_KEY"]
    assert worker["environment"]["REDIS_URL"] == f"redis://:{ENV['REDIS_PASSWORD']}@redis:6379/0"


def test_worker_stop_grace_period_leaves_time_for_a_warm_shutdown(services):
    value, unit = re.fullmatch(r"(\d+)([smh])", services["worker"]["stop_grace_period"]).groups()
    assert int(value) * {"s": 1, "m": 60, "h": 3600}[unit] >= 30 * 60


def test_a_gpu_box_points_its_worker_at_the_redis_box(tmp_path):
    result = compose_config(env_file(tmp_path, **ENV, REDIS_HOST="10.0.0.5", BOX_NAME="gpu7", RUNYARD_GPUS="0,1"))
    assert result.returncode == 0, result.stderr
    worker = yaml.safe_load(result.stdout)["services"]["worker"]
    assert worker["environment"]["REDIS_URL"] == f"redis://:{ENV['REDIS_PASSWORD']}@10.0.0.5:6379/0"
    assert worker["hostname"] == "gpu7" and worker["command"] == ["worker", "--gpus", "0,1"]


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "DASHBOARD_PASSWORD"])
def test_a_missing_password_stops_compose_with_a_message_naming_it(tmp_path, missing):
    result = compose_config(env_file(tmp_path, **(ENV | {missing: None})))
    assert result.returncode != 0
    assert f"set {missing} in .env (copy .env.example)" in result.stderr


def test_dockerfile_builds_a_slim_publisher_and_a_cuda_pytorch_worker():
    text = (ROOT / "Dockerfile").read_text()
    images = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", text, re.M))
    stages = dict(re.findall(r"^FROM \$\{(\w+)\} AS (\w+)$", text, re.M))
    assert stages == {"PYTHON_IMAGE": "publisher", "PYTORCH_IMAGE": "worker"}
    assert images["PYTHON_IMAGE"].endswith("-slim")
    assert images["PYTORCH_IMAGE"].startswith("pytorch/pytorch:") and "cuda" in images["PYTORCH_IMAGE"]
    assert 'pip install ".[dashboard]"' in text and 'pip install ".[train]"' in text
    assert ".env" in (ROOT / ".dockerignore").read_text().split()  # secrets never go into an image
