"""The run index: run name -> RQ job id, written with the job, so a run is found without a scan.

`runyard cancel RUN_NAME` reads one hash field instead of fetching every job on every queue
(100,000 queued jobs took ~100,000 commands). Publishing writes the entry in the same
transaction as the job; a run published again under the same name points to its latest job.
"""

from __future__ import annotations

import redis

from contracts.keys import RUN_JOBS_KEY


def index_run_jobs(connection: redis.Redis | redis.client.Pipeline, jobs: dict[str, str]) -> None:
    """Record run name -> job id for each of `jobs` (on a pipeline: as part of its transaction)."""
    if jobs:
        connection.hset(RUN_JOBS_KEY, mapping=jobs)


def job_ids_for_runs(connection: redis.Redis, run_names: list[str]) -> dict[str, str]:
    """The job id of each run name the index knows."""
    if not run_names:
        return {}
    found = connection.hmget(RUN_JOBS_KEY, run_names)
    return {name: job_id.decode() for name, job_id in zip(run_names, found, strict=True) if job_id}


def index_exists(connection: redis.Redis) -> bool:
    """False on a Redis that only older publishers wrote to (their jobs are found by a scan)."""
    return bool(connection.exists(RUN_JOBS_KEY))
