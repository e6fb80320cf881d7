"""Putting experiments on the RQ queue: JSON payloads only, a Retry policy, long timeouts."""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.job_meta import DEFAULT_MAX_REQUEUES, update_job_meta
from contracts.spec import ExperimentSpec, current_host, current_user
from publisher.run_index import index_run_jobs
from worker.code_version import git_state
from worker.fair_share import FairShareQueue, job_owner
from worker.jobs import RUN_EXPERIMENT
from worker.quotas import check_owner
from worker.results import reserve_run_name

JOB_TIMEOUT_S = 2 * 24 * 3600  # a long training run, not a web request
RESULT_TTL_S = 30 * 24 * 3600  # RQ's copy; runyard's own run record (worker.results) never expires
FAILURE_TTL_S = 365 * 24 * 3600
DEFAULT_RETRIES = 2
OWNER_ENV = "RUNYARD_USER"  # who a job belongs to for fair share and quotas, when not the login user


def rq_queue_name(spec: ExperimentSpec) -> str:
    """The RQ queue a spec goes to: `default` -> high/default/low by priority, `pool` -> pool-high/pool/pool-low."""
    return queue_for(spec.queue, spec.priority)


def queue_for(queue_name: str, priority: str) -> str:
    """rq_queue_name of a spec's `queue` and `priority` fields (as a spec payload carries them)."""
    if priority == "normal":
        return queue_name
    return priority if queue_name == "default" else f"{queue_name}-{priority}"


def queue(connection: redis.Redis, name: str) -> Queue:
    """The RQ queue `name`; its enqueues also index each job under its owner (worker.queue_index)."""
    return FairShareQueue(name, connection=connection, serializer=JSONSerializer)


def current_owner() -> str:
    """The owner of what this process publishes: RUNYARD_USER, else the login user."""
    owner = os.environ.get(OWNER_ENV, "").strip()
    return check_owner(owner) if owner else current_user()


def publish_context(owner: str | None = None) -> dict[str, Any]:
    """Who published (and owns the job), from where and at which code version; logged with the run."""
    return {
        "user": current_user(),
        "owner": check_owner(owner) if owner else current_owner(),
        "host": current_host(),
        "published_at": time.time(),
        **git_state(),
    }


def job_options(
    spec: ExperimentSpec,
    run_name: str,
    *,
    retries: int = DEFAULT_RETRIES,
    timeout_s: int = JOB_TIMEOUT_S,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    job_id: str | None = None,
    spec_hash: str | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """The options every runyard job is enqueued with (`Queue.enqueue_call` / `Queue.prepare_data`).

    `publish`, `schedule-search` (its runs and k-fold aggregates) and the demo all enqueue through
    this, so time limits, TTLs, retries and the job's identity in meta are set one way. `meta` adds
    keys of contracts.job_meta.JobMeta (a search point's search, point, kind, params).
    """
    identity = update_job_meta(
        {},
        run_name=run_name,
        spec_hash=spec_hash or spec.spec_hash(),
        model=spec.model,
        epochs=spec.epochs,
        max_requeues=max_requeues,
        **meta,
    )
    return {
        "timeout": timeout_s,
        "result_ttl": RESULT_TTL_S,
        "failure_ttl": FAILURE_TTL_S,
        "retry": Retry(max=retries) if retries else None,
        "description": run_name,
        "job_id": job_id,
        "meta": identity,
    }


def publish_experiment(
    connection: redis.Redis,
    spec: ExperimentSpec,
    context: dict[str, Any] | None = None,
    retries: int = DEFAULT_RETRIES,
    timeout_s: int = JOB_TIMEOUT_S,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    preemptible: bool = True,
) -> Job:
    """Enqueue `spec` (with a unique run name) for `worker.jobs.run_experiment`; return the RQ job."""
    run_name = reserve_run_name(connection, spec.run_name or spec.default_run_name())
    spec = spec.model_copy(update={"run_name": run_name})
    context = context if context is not None else publish_context()
    with connection.pipeline() as pipeline:
        job = queue(connection, rq_queue_name(spec)).enqueue_call(
            RUN_EXPERIMENT,
            kwargs={"spec": spec.to_payload(), "context": context},
            **job_options(
                spec,
                run_name,
                retries=retries,
                timeout_s=timeout_s,
                max_requeues=max_requeues,
                owner=job_owner(context),
                preemptible=preemptible,
            ),
            pipeline=pipeline,
        )
        index_run_jobs(pipeline, {run_name: job.id})  # with the job, in one transaction
        pipeline.execute()
    return job
