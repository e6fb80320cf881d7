"""Processes a section starts (console scripts, workers, memory holders) and their cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpucheck.context import ROOT, Context, log


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with the checkout importable and W&B off (nothing may prompt or upload)."""
    env = dict(os.environ) | {"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return env | extra


CLI_ENTRY = {
    "publish": "from runyard.cli.publish import publish_command as c; c(prog_name='publish')",
    "worker": "from runyard.cli.worker import worker_command as c; c(prog_name='worker')",
    "runyard": "from runyard.cli.main import main as c; c(prog_name='runyard')",
}


def cli_command(name: str, *args: str) -> list[str]:
    """A console script's command line that works without `pip install -e` (a bare checkout)."""
    return [sys.executable, "-c", CLI_ENTRY[name], *args]


def run_cli(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(
        cli_command(name, *args), capture_output=True, text=True, env=child_env(**(env or {})), timeout=timeout
    )


def tail(text: str, lines: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-lines:])


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (workers start their children in new sessions)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def kill_tree(pid: int) -> None:
    for each in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, signal.SIGKILL)


class WorkerRun:
    """A section's own RUNYARD_HOME with an embedded Redis, the jobs it publishes and the worker it
    starts; everything started is stopped on exit, whatever happened."""

    def __init__(self, ctx: Context, name: str, extra_env: dict[str, str] | None = None):
        self.ctx = ctx
        self.name = f"check-{name}"
        self.home = ctx.work / f"home-{name}"
        self.env = child_env(RUNYARD_HOME=str(self.home), RUNYARD_HEARTBEAT_TTL="6", **(extra_env or {}))
        self.env.pop("REDIS_URL", None)
        self.processes: list[subprocess.Popen] = []
        self.worker: subprocess.Popen | None = None
        self.connection = None

    def __enter__(self) -> WorkerRun:
        os.environ["RUNYARD_HOME"] = str(self.home)
        os.environ.pop("REDIS_URL", None)
        from worker.connection import connect

        self.connection = connect()
        return self

    def __exit__(self, *exc_info) -> None:
        for process in self.processes:
            kill_tree(process.pid)
            with contextlib.suppress(Exception):
                process.wait(timeout=10)
        from worker.connection import embedded_server

        with contextlib.suppress(Exception):
            embedded_server().stop()

    def publish(self, spec: dict[str, Any]) -> str:
        import yaml

        path = self.ctx.work / f"{spec['run_name']}.yaml"
        path.write_text(yaml.safe_dump({key: list(v) if isinstance(v, tuple) else v for key, v in spec.items()}))
        answer = subprocess.run(
            cli_command("publish", "--config", str(path), "--json", "--retries", "0"),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if answer.returncode != 0:
            raise RuntimeError(f"publish exited {answer.returncode}: {tail(answer.stderr)}")
        job_id = json.loads(answer.stdout)["job_id"]
        log(f"    published {spec['run_name']} as job {job_id}")
        return job_id

    def start_worker(self, *extra: str) -> None:
        where = ["--gpus", "0"] if self.ctx.cuda else ["--cpu"]
        log_file = open(self.ctx.work / f"{self.name}-worker.log", "w")  # noqa: SIM115 (lives with the process)
        self.worker = subprocess.Popen(
            cli_command("worker", *where, "--burst", "--name", self.name, *extra),
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(self.worker)
        log(f"    started worker {' '.join([*where, *extra])} (pid {self.worker.pid})")

    def hold_gpu_memory(self, fraction: float | None = None, keep_free_gib: float | None = None) -> subprocess.Popen:
        """Another process holding `fraction` of the GPU's memory, or all but `keep_free_gib` of what is free."""
        size = f"int(total * {fraction})" if fraction is not None else f"free - int({keep_free_gib} * 2**30)"
        script = (
            "import sys, torch; free, total = torch.cuda.mem_get_info(); "
            f"held = torch.empty({size}, dtype=torch.uint8, device='cuda'); "
            "print(held.numel(), flush=True); sys.stdin.read()"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=self.env
        )
        self.processes.append(holder)
        held = holder.stdout.readline().strip()
        if not held.isdigit():
            raise RuntimeError(f"the process meant to hold GPU memory failed (exit {holder.poll()})")
        log(f"    pid {holder.pid} holds {int(held) / 2**30:.1f} GiB of the GPU")
        return holder

    def job_status(self, job_id: str) -> str:
        """RQ's status of the job, as its plain value (`queued`, `started`, `finished`...)."""
        from rq.job import Job
        from rq.serializers import JSONSerializer

        status = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer).get_status(refresh=True)
        return str(getattr(status, "value", status))

    def wait_finished(self, job_id: str, timeout: float) -> tuple[str, dict[str, Any] | None, float]:
        """Wait for the job to end (or `timeout`): its status, its result, the seconds waited."""
        from rq.job import Job
        from rq.serializers import JSONSerializer

        started = time.monotonic()
        status = "unknown"
        while time.monotonic() - started < timeout:
            status = self.job_status(job_id)
            if status in ("finished", "failed", "stopped", "canceled"):
                break
            time.sleep(1)
        job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        result = job.return_value() if status == "finished" else None
        if status == "failed":
            latest = job.latest_result()
            log(f"    job failed: {tail(latest.exc_string if latest else '', 6)}")
        return status, result, time.monotonic() - started

    def wait_for_heartbeat(self, key: str, timeout: float) -> str | None:
        """The worker's heartbeat field `key`, once it shows (None after `timeout`)."""
        from worker.heartbeat import heartbeat_key

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.connection.get(heartbeat_key(f"{self.name}-gpu0"))
            if raw and json.loads(raw).get(key):
                return json.loads(raw)[key]
            time.sleep(0.5)
        return None


def stop_embedded_redis(work: Path) -> None:
    """A section killed on its budget leaves its embedded Redis running: stop it."""
    from worker.embedded import EmbeddedRedis

    for home in work.glob("home-*"):
        with contextlib.suppress(Exception):
            EmbeddedRedis(home / "redis").stop()
