"""Reading many RQ jobs at once when any of their records may be one a teammate's tool overwrote."""

from __future__ import annotations

import redis
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

UNREADABLE = (NoSuchJobError, redis.ResponseError, DeserializationError, ValueError, TypeError, KeyError)


def fetch_jobs(connection: redis.Redis, job_ids: list[str]) -> list[Job | None]:
    """The jobs of `job_ids` in order (one round trip); None for one that is gone or cannot be read.

    RQ's fetch_many fails as a whole on one record a teammate's tool overwrote (not a hash, not
    RQ's fields); then each job is read alone and the unreadable ones are None.
    """
    try:
        return Job.fetch_many(job_ids, connection, serializer=JSONSerializer)
    except UNREADABLE:
        jobs: list[Job | None] = []
        for job_id in job_ids:
            try:
                jobs.append(Job.fetch(job_id, connection=connection, serializer=JSONSerializer))
            except UNREADABLE:
                jobs.append(None)
        return jobs
