"""Who uses the workers: per-owner running, queued, GPU hours and share; why each queued job waits.

Read-only views over what worker.fair_share, worker.quotas and worker.preemption keep in Redis,
for `runyard status --owners` and the `wait_reason` of each queued job in `runyard status`.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import redis
from rich.table import Table
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import as_text

from worker.fair_share import NOBODY, decayed_usage, fair_share_enabled, gpu_seconds_since, running_entries
from worker.preemption import queue_priority
from worker.queue_index import OWNER_FIELD
from worker.quotas import quotas

DEFAULT_WINDOW_S = 24 * 3600
PRIORITY_ORDER = {"high": 0, "normal": 1, "low": 2}


def _queued_owners(connection: redis.Redis) -> dict[str, list[tuple[str, str]]]:
    """queue name -> [(job id, owner)] in queue order, for every RQ queue."""
    queued = {}
    for queue in Queue.all(connection=connection, serializer=JSONSerializer):
        ids = [as_text(job_id) for job_id in connection.lrange(queue.key, 0, -1)]
        with connection.pipeline(transaction=False) as pipeline:
            for job_id in ids:
                pipeline.hget(Job.key_for(job_id), OWNER_FIELD)
            owners = pipeline.execute(raise_on_error=False)  # a record of the wrong type reads as no owner
        queued[queue.name] = [
            (job_id, as_text(owner) if isinstance(owner, bytes) else _meta_owner(connection, job_id))
            for job_id, owner in zip(ids, owners, strict=True)
        ]
    return queued


def _meta_owner(connection: redis.Redis, job_id: str) -> str:
    """The owner in a job's meta, for a job no worker has looked at yet."""
    try:
        return str(Job.fetch(job_id, connection=connection, serializer=JSONSerializer).meta.get("owner") or NOBODY)
    except Exception:  # gone, or not ours
        return NOBODY


def owner_status(connection: redis.Redis, window_s: float = DEFAULT_WINDOW_S) -> list[dict[str, Any]]:
    """One row per owner: running and queued jobs, GPU hours in the window, share of them, quota."""
    running: dict[str, int] = {}
    now = time.time()
    uncharged: dict[str, float] = {}
    for owner, last in running_entries(connection).values():
        running[owner] = running.get(owner, 0) + 1
        uncharged[owner] = uncharged.get(owner, 0.0) + max(0.0, now - last)
    queued: dict[str, int] = {}
    for jobs in _queued_owners(connection).values():
        for _job_id, owner in jobs:
            queued[owner] = queued.get(owner, 0) + 1
    hours = {
        owner: (seconds + uncharged.get(owner, 0.0)) / 3600
        for owner, seconds in gpu_seconds_since(connection, now - window_s).items()
    }
    for owner, seconds in uncharged.items():
        hours.setdefault(owner, seconds / 3600)
    usage = decayed_usage(connection)
    caps = quotas(connection)
    total = sum(hours.values())
    owners = sorted(set(running) | set(queued) | set(hours) | set(caps))
    return [
        {
            "owner": owner or "(none)",
            "running": running.get(owner, 0),
            "queued": queued.get(owner, 0),
            "gpu_hours": round(hours.get(owner, 0.0), 4),
            "share": round(hours.get(owner, 0.0) / total, 4) if total else 0.0,
            "fair_share_usage_h": round(usage.get(owner, 0.0) / 3600, 4),
            "quota": caps.get(owner),
        }
        for owner in owners
    ]


def wait_reasons(connection: redis.Redis) -> dict[str, str]:
    """job id -> why it has not started, for every queued job (the same rules as the take)."""
    queued = _queued_owners(connection)
    caps = quotas(connection)
    held: dict[str, int] = {}
    for owner, _last in running_entries(connection).values():
        held[owner] = held.get(owner, 0) + 1
    usage = decayed_usage(connection)
    workers = Worker.all(connection=connection)
    fair = fair_share_enabled()
    reasons = {}
    for queue_name, jobs in queued.items():
        pool, priority = queue_priority(queue_name)
        serving = [worker for worker in workers if queue_name in worker.queue_names()]
        ahead = [
            name
            for name, others in queued.items()
            if others
            and queue_priority(name)[0] == pool
            and PRIORITY_ORDER[queue_priority(name)[1]] < PRIORITY_ORDER[priority]
        ]
        eligible = [owner for _job_id, owner in jobs if caps.get(owner) is None or held.get(owner, 0) < caps[owner]]
        next_owner = min(eligible, key=lambda owner: usage.get(owner, 0.0), default=None) if fair else None
        for position, (job_id, owner) in enumerate(jobs):
            if not serving:
                reasons[job_id] = f"no worker serves queue '{queue_name}'"
            elif caps.get(owner) is not None and held.get(owner, 0) >= caps[owner]:
                reasons[job_id] = f"{owner or '(none)'} is at their quota {held.get(owner, 0)}/{caps[owner]}"
            elif ahead:
                reasons[job_id] = f"behind queue '{ahead[0]}' (higher priority)"
            elif fair and next_owner is not None and next_owner != owner:
                reasons[job_id] = f"behind {next_owner or '(none)'}: fair share"
            elif not fair and position > 0:
                reasons[job_id] = f"behind {position} older job(s): first in, first out"
            elif any(worker.get_state() == "idle" for worker in serving):
                reasons[job_id] = "starting: a worker is free"
            else:
                reasons[job_id] = "all GPUs busy"
    return reasons


def owners_table(rows: list[dict[str, Any]], window_h: float) -> Table:
    """Per owner: running, queued, GPU hours in the window, their share, fair-share usage, quota."""
    table = Table(title=f"owners (GPU hours in the last {window_h:g} h)")
    for column in ("owner", "running", "queued", "GPU h", "share", "fair-share usage h", "quota"):
        table.add_column(column, justify="left" if column == "owner" else "right")
    for row in rows:
        table.add_row(
            row["owner"],
            str(row["running"]),
            str(row["queued"]),
            f"{row['gpu_hours']:.2f}",
            f"{row['share']:.0%}",
            f"{row['fair_share_usage_h']:.2f}",
            "-" if row["quota"] is None else str(row["quota"]),
        )
    return table


def queued_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="queued (first 20 per queue)")
    for column in ("run", "owner", "queue", "waiting because"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["run_name"] or row["job_id"], row["owner"] or "-", row["queue"], row["wait_reason"] or "-")
    return table


def preempted_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="preempted (back on their queue or resumed)")
    for column in ("run", "owner", "queue", "times", "last by job"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["run_name"] or row["job_id"],
            row["owner"] or "-",
            row["queue"],
            str(row["preemptions"]),
            row["preempted_by"] or "-",
        )
    return table


def print_owner_status(connection: redis.Redis, window_s: float, as_json: bool, out) -> None:
    """`runyard status --owners`: the owners table, or its JSON."""
    rows = owner_status(connection, window_s)
    if as_json:
        click.echo(json.dumps({"window_hours": window_s / 3600, "owners": rows}, indent=2))
        return
    out.print(owners_table(rows, window_s / 3600) if rows else "no owners yet: nothing queued, run or charged")
