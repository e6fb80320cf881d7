"""Screenshots of `runyard dashboard` with real jobs, for the README (docs/dashboard-*.png).

Starts a throw-away Redis, generates demo data, publishes a few experiments (one fails on a
missing dataset), runs two CPU workers until two jobs are mid-training, then renders the
dashboard's workers and jobs pages in headless Chromium (Debian's `chromium`).

    python scripts/dashboard_screenshot.py [--out docs]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from contracts.spec import ExperimentSpec
from publisher.queue import publish_experiment
from runyard.dashboard import HEADLESS_CHROMIUM_FLAGS
from trainer.demo_data import make_demo_dataset
from worker.embedded import EmbeddedRedis

BIN = Path(sys.executable).parent


def spec(data: Path, **fields) -> ExperimentSpec:
    base = {
        "model": "test_efficientnet",
        "pretrained": False,
        "data_dir": str(data / "train"),
        "resize": "48x48",
        "batch_size": 32,
        "valid_batch_size": 256,
        "lr": 3e-3,
        "augmentation": "base",
        "wandb": {"group": "screenshot"},
    }
    return ExperimentSpec(**(base | fields))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def screenshot(url: str, path: Path, profile: Path, size: str = "1500,760") -> None:
    subprocess.run(
        [
            "chromium",
            *HEADLESS_CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            "--virtual-time-budget=6000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the PNG files")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ry-shot-") as scratch:
        scratch = Path(scratch)
        server = EmbeddedRedis(scratch / "redis")
        url = server.ensure_running(announce=False)
        try:
            run(scratch, url, args.out)
        finally:
            server.stop()


def run(scratch: Path, url: str, out: Path) -> None:
    """Publish, train until two runs are mid-way, and take the screenshots."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env |= {"REDIS_URL": url, "RUNYARD_HOME": str(scratch / "home"), "WANDB_MODE": "offline"}
    os.environ.update(REDIS_URL=url, RUNYARD_HOME=env["RUNYARD_HOME"])
    connection = redis.Redis.from_url(url)
    data = scratch / "data"
    make_demo_dataset(data, profiles=60, eval_profiles=6, image_size=(64, 48), seed=1)

    publish_experiment(connection, spec(data, data_dir=str(scratch / "nowhere")), retries=0)
    done = publish_experiment(connection, spec(data, epochs=2, loss="focal"), retries=0)
    long_runs = [
        publish_experiment(connection, spec(data, epochs=300, loss="f1", run_name="f1-loss-long")),
        publish_experiment(connection, spec(data, epochs=300, optimizer="adamw", run_name="adamw-long")),
    ]
    for loss in ("cross_entropy", "label_smoothing"):
        publish_experiment(connection, spec(data, epochs=30, loss=loss, priority="low"))

    workers = subprocess.Popen(
        [str(BIN / "worker"), "--cpu", "--workers", "2", "--name", "gpu-box-1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dashboard = None
    try:
        wait_for(lambda: done.get_status(refresh=True).value == "finished", 300, "the short run")

        def mid_training() -> bool:
            for job in long_runs:
                job.refresh()
            return all((job.meta.get("progress") or {}).get("epoch", 0) >= 3 for job in long_runs)

        wait_for(mid_training, 300, "two runs in training")
        dashboard = subprocess.Popen(
            [str(BIN / "runyard"), "dashboard", "--port", "0"], env=env, stdout=subprocess.PIPE, text=True
        )
        base = dashboard.stdout.readline().split()[2].rstrip("/")
        screenshot(f"{base}/0/view/workers", out / "dashboard-workers.png", scratch / "chrome")
        screenshot(f"{base}/0/view/jobs/default/started/8/asc/1", out / "dashboard-jobs.png", scratch / "chrome")
    finally:
        if dashboard is not None:
            dashboard.send_signal(signal.SIGINT)
            dashboard.wait(30)
        workers.send_signal(signal.SIGINT)
        time.sleep(1.5)  # RQ ignores a second Ctrl-C within a second of the first
        workers.send_signal(signal.SIGINT)
        workers.wait(60)


if __name__ == "__main__":
    main()
