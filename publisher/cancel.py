"""Cancelling experiments: queued jobs are removed, running ones stop at their next step boundary.

A running job is asked through a flag in Redis (worker.control), checked by its trainer after
every optimizer step; it then ends as `canceled` with failure_reason `cancelled` and keeps its
checkpoint. `force` also sends RQ's stop-job command, which kills the work horse at once.
Jobs of a search are the ones whose meta["search"] names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.job_meta import read_job_meta, set_failure
from worker.control import request_cancel

# States a job can be cancelled in; finished, failed and already cancelled jobs are left alone.
ACTIVE_STATES = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED)


@dataclass
class Cancelled:
    """What `cancel_job` did to one job."""

    job_id: str
    run_name: str | None
    queue: str
    was: str
    action: str  # "cancelled" (it never ran), "stopping" (at its next step) or "killed" (--force)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def active_jobs(connection: redis.Redis) -> list[Job]:
    """Every queued, scheduled, deferred or running job on every queue."""
    jobs: list[Job] = []
    for queue in Queue.all(connection=connection, serializer=JSONSerializer):
        ids = queue.get_job_ids()
        for registry in (queue.scheduled_job_registry, queue.deferred_job_registry, queue.started_job_registry):
            ids += registry.get_job_ids(cleanup=False)
        for job_id in dict.fromkeys(ids):
            try:
                job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
            except Exception:  # expired, or a record no runyard tool wrote
                continue
            if job.get_status(refresh=False) in ACTIVE_STATES:
                jobs.append(job)
    return jobs


def find_jobs(connection: redis.Redis, names: list[str] = (), search: str | None = None) -> list[Job]:
    """Active jobs whose id or run name is in `names`, or whose meta["search"] is `search`."""
    wanted = set(names)
    return [
        job
        for job in active_jobs(connection)
        if job.id in wanted
        or job.meta.get("run_name") in wanted
        or job.description in wanted
        or (search is not None and job.meta.get("search") == search)
    ]


def cancel_job(connection: redis.Redis, job: Job, force: bool = False) -> Cancelled:
    """Cancel one active job (see the module docstring)."""
    was = job.get_status(refresh=True)
    # The flag is set first in every case: a worker may be dequeuing the job right now.
    request_cancel(connection, job.id)
    action = "stopping"
    if was != JobStatus.STARTED:
        set_failure(job.meta, "cancelled", "cancelled by `runyard cancel` before it ran")
        job.save_meta()  # a running job writes its own meta, so only a waiting one is written here
        job.cancel()
        action = "cancelled"
    elif force:
        try:
            send_stop_job_command(connection, job.id, serializer=JSONSerializer)
            action = "killed"
        except InvalidJobOperation:
            pass  # it finished meanwhile; the flag is harmless
    return Cancelled(
        job.id, read_job_meta(job.meta, job.id).run_name or job.description, job.origin, str(was.value), action
    )
