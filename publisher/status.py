"""What is queued, running, finished and failed: read from RQ's registries and runyard's records."""

from __future__ import annotations

from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.job_meta import read_job_meta
from publisher.sharing import wait_reasons
from worker.allow_listed_job import refused_records
from worker.results import leaderboard

LISTED_PER_STATE = 20


def _fetch(connection: redis.Redis, job_ids: list[str]) -> list[Job]:
    jobs = []
    for job_id in job_ids:
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except Exception:  # expired, or a payload that is not ours; status must still print
            continue
        jobs.append(job)
    return jobs


def _job_row(job: Job, queue_name: str) -> dict[str, Any]:
    try:
        meta = read_job_meta(job.meta, job.id)
    except Exception:  # a record RQ itself cannot read
        meta = read_job_meta({})
    progress = meta.progress or {}
    return {
        "job_id": job.id,
        "run_name": meta.run_name or job.description,
        "queue": queue_name,
        "worker": job.worker_name,
        "epoch": progress.get("epoch"),
        "epochs": progress.get("epochs") or meta.epochs,
        "val_f1": progress.get("val_f1"),
        "best_val_f1": progress.get("best_val_f1"),
        "eta_seconds": progress.get("eta_seconds"),
        "code": meta.code or {},
        "failure_reason": meta.failure_reason,
        "failure_message": meta.failure_message,
        "requeues": meta.requeues or 0,
        "owner": meta.owner,
        "preempted_by": meta.preempted_by,
        "preemptions": len(meta.preemptions or []),
    }


def _finished_row(job: Job, queue_name: str) -> dict[str, Any]:
    """A finished job with what its result says about its code versions and its W&B run."""
    row = _job_row(job, queue_name)
    try:
        result = job.return_value() or {}
    except Exception:  # a result that is not ours
        result = {}
    row["code"] = result.get("code") or {}
    row["wandb"] = result.get("wandb") or {}
    return row


def _failure_line(job: Job) -> str | None:
    try:
        result = job.latest_result()
    except Exception:
        return None
    if result is None or not result.exc_string:
        return None
    lines = [line for line in result.exc_string.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else None


def collect_status(connection: redis.Redis) -> dict[str, Any]:
    """Queues with counts, running jobs with progress, failed jobs with reasons, quarantined records, workers."""
    queues: list[dict[str, Any]] = []
    rows: dict[str, list[dict[str, Any]]] = {"running": [], "queued": [], "failed": [], "finished": []}
    for queue in Queue.all(connection=connection, serializer=JSONSerializer):
        try:
            counts, queue_rows = _queue_status(connection, queue)
        except redis.ResponseError as error:  # a key of the wrong type: say so, show the other queues
            queues.append({"name": queue.name, "error": f"{type(error).__name__}: {error}"})
            continue
        except ValueError as error:  # an entry RQ cannot parse (`runyard janitor` removes it)
            queues.append({"name": queue.name, "error": f"unreadable registry entry ({type(error).__name__})"})
            continue
        queues.append(counts)
        for state, state_rows in queue_rows.items():
            rows[state] += state_rows
    reasons = wait_reasons(connection)
    for row in rows["queued"]:
        row["wait_reason"] = reasons.get(row["job_id"])
    workers = []
    for worker in Worker.all(connection=connection, serializer=JSONSerializer):
        workers.append(
            {
                "name": worker.name,
                "state": str(worker.get_state()),
                "queues": worker.queue_names(),
                "current_job": worker.get_current_job_id(),
                "hostname": worker.hostname,
            }
        )
    running, finished = rows["running"], rows["finished"]
    return {
        "queues": queues,
        "running": running,
        "queued": rows["queued"],
        "failed": rows["failed"],
        "workers": workers,
        "quarantined": refused_records(connection),
        "finished": leaderboard(connection, limit=5),
        "preempted": [row for row in running + rows["queued"] if row["preemptions"]],
        "code_differs": [row for row in running + finished if row.get("code", {}).get("differs")],
        "wandb_offline": [
            {"run_name": row["run_name"], "sync": row["wandb"]["sync"]}
            for row in finished
            if row.get("wandb", {}).get("sync")
        ],
    }


def _queue_status(connection: redis.Redis, queue: Queue) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """One queue's counts, and its rows by state (running, queued, failed, finished)."""
    started_ids = queue.started_job_registry.get_job_ids()
    failed_ids = queue.failed_job_registry.get_job_ids()
    cancelled_ids = queue.canceled_job_registry.get_job_ids()
    counts = {
        "name": queue.name,
        "queued": queue.count,
        "started": len(started_ids),
        "finished": queue.finished_job_registry.count,
        "failed": len(failed_ids),
        "scheduled": queue.scheduled_job_registry.count,
        "cancelled": len(cancelled_ids),
    }
    finished_ids = queue.finished_job_registry.get_job_ids(-LISTED_PER_STATE, -1)
    rows = {
        "running": [_job_row(job, queue.name) for job in _fetch(connection, started_ids)],
        "finished": [_finished_row(job, queue.name) for job in _fetch(connection, finished_ids)],
        "queued": [_job_row(job, queue.name) for job in _fetch(connection, queue.get_job_ids(0, LISTED_PER_STATE))],
        "failed": [],
    }
    for job in _fetch(connection, failed_ids[-LISTED_PER_STATE:]):
        row = _job_row(job, queue.name)
        row["error"] = row["failure_message"] or _failure_line(job)
        rows["failed"].append(row)
    for job in _fetch(connection, cancelled_ids[-LISTED_PER_STATE:]):
        row = _job_row(job, queue.name)
        row["failure_reason"] = row["failure_reason"] or "cancelled"
        row["error"] = row["failure_message"] or "cancelled"
        rows["failed"].append(row)
    return counts, rows
