"""Preemption by priority: a queued `high` job with no idle worker stops the cheapest lower job.

Every worker runs a Preemptor thread. When a `high` queue it serves has a job waiting, no worker
serving that queue is idle, and the job's owner is below their quota, one Preemptor (a short Redis
lock) picks a victim among the jobs running on workers that serve the queue:
- only jobs of lower priority in the same pool (`high` preempts `default` and `low`;
  `pool-high` preempts `pool` and `pool-low`), lowest priority first;
- then the cheapest: stopping at a step, the one with the shortest time since its last
  checkpoint (the least training re-done; a job with no checkpoint in this attempt loses at least
  its whole set-up, SETUP_ESTIMATE_S, since it cannot stop before its set-up ends); stopping at
  its epoch boundary, the one whose epoch ends soonest (the shortest wait); at equal cost the one
  running longest (the furthest into its set-up stops first);
- never one published with `--no-preempt`, nor one on a queue with preemption turned off
  (`runyard preemption off QUEUE`), nor one preempted before that has not trained another epoch.

Where the victim stops is RUNYARD_PREEMPT_AT (set it alike on every worker; the deciding
Preemptor's counts):
- `step`: at its next optimizer step. The `high` job waits ~1-2 s plus the victim's wind-down
  whatever the epoch length; the victim re-does the part of the epoch it had trained.
- `epoch`: at its next epoch boundary. Nothing is re-done; the `high` job waits for the rest of
  the victim's epoch (up to a whole one).
- `auto` (the default): the epoch boundary when the victim's epoch will end within
  RUNYARD_PREEMPT_AUTO_WAIT seconds (default 60; estimated from its last epoch's length and the
  time since that epoch's checkpoint), else the next step. A first epoch has no estimate: step.
BENCHMARKS.md has the three side by side. The choice is the request's `stop_at`.

The victim is asked through PREEMPT_KEY (worker.control reads it at step and epoch boundaries,
like a cancel, and at the end of its set-up: before importing torch and before its W&B run
starts). It then takes the same path as a warm shutdown: its checkpoint stays, it goes back to
the front of its queue with `preempted_by` in its meta, and its worker, now free, takes
the `high` job.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import as_text

from contracts.job_meta import update_job_meta
from contracts.keys import PREEMPT_FOR_PREFIX, PREEMPT_LOCK_KEY, PREEMPT_OFF_KEY, PREEMPT_PREFIX, QUOTA_KEY
from trainer.interrupt import EPOCH_BOUNDARY, STEP_BOUNDARY
from worker.fair_share import running_entries
from worker.heartbeat import REDIS_ERRORS
from worker.queue_index import OWNER_FIELD

# Redis keys of this module (to move into the contracts module's key table).

CHECK_INTERVAL_S = 1.0
LOCK_TTL_MS = 5000
REQUEST_TTL_S = 600  # a request its job never read (it ended first) lapses
# Once a job stopped for it, a high job waits this long for the freed worker before another is
# stopped: between the victim's requeue and its worker's next take no worker looks idle.
PREEMPTED_FOR_TTL_S = 60

PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}

# A job with no checkpoint in this attempt stops at its set-up's end at the earliest (the trainer
# has no step to stop at before), so it loses at least its whole set-up (imports, data, model:
# 2-5 s on cpu-2) however little of it has run. Its own last set-up, when a preemption noted one,
# replaces this.
SETUP_ESTIMATE_S = 5.0

PREEMPT_AT_ENV = "RUNYARD_PREEMPT_AT"  # step | epoch | auto (default)
AUTO_WAIT_ENV = "RUNYARD_PREEMPT_AUTO_WAIT"  # seconds: auto waits for an epoch boundary this close
DEFAULT_AUTO_WAIT_S = 60.0
EPOCH_REQUEST_TTL_S = 2 * 24 * 3600  # an epoch-boundary request waits as long as an epoch takes

log = logging.getLogger("runyard.preemption")


def preempt_at() -> str:
    """RUNYARD_PREEMPT_AT: where a victim stops (step, epoch or auto, the default)."""
    mode = os.environ.get(PREEMPT_AT_ENV, "").strip().lower() or "auto"
    if mode not in ("step", "epoch", "auto"):
        raise ValueError(f"{PREEMPT_AT_ENV}={mode!r} is not one of: step, epoch, auto")
    return mode


def auto_wait_s() -> float:
    """RUNYARD_PREEMPT_AUTO_WAIT in seconds (default 60)."""
    text = os.environ.get(AUTO_WAIT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_AUTO_WAIT_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"{AUTO_WAIT_ENV}={text!r} is not a number of seconds (0 or more)")
    return value


def preempt_key(job_id: str) -> str:
    return f"{PREEMPT_PREFIX}{job_id}"


def queue_priority(queue_name: str) -> tuple[str, str]:
    """(pool, priority) of an RQ queue name: high -> (default, high), pool-low -> (pool, low)."""
    if queue_name in ("high", "low"):
        return "default", queue_name
    pool, _, suffix = queue_name.rpartition("-")
    if pool and suffix in ("high", "low"):
        return pool, suffix
    return queue_name, "normal"


def may_preempt(high_queue: str, victim_queue: str) -> bool:
    """Whether a job queued on `high_queue` may stop one running from `victim_queue`."""
    pool, priority = queue_priority(high_queue)
    victim_pool, victim_priority = queue_priority(victim_queue)
    return priority == "high" and pool == victim_pool and PRIORITY_RANK[victim_priority] < PRIORITY_RANK[priority]


def preemption_request(connection: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The standing request that `job_id` stop for a `high` job, if any."""
    raw = connection.get(preempt_key(job_id))
    return json.loads(raw) if raw else None


def clear_preemption(connection: redis.Redis, job_id: str) -> None:
    connection.delete(preempt_key(job_id))


def set_queue_preemption(connection: redis.Redis, queue_name: str, enabled: bool) -> None:
    """Turn preemption of `queue_name`'s jobs on or off (for every worker, kept in Redis)."""
    if enabled:
        connection.srem(PREEMPT_OFF_KEY, queue_name)
    else:
        connection.sadd(PREEMPT_OFF_KEY, queue_name)


def queues_without_preemption(connection: redis.Redis) -> set[str]:
    return {as_text(name) for name in connection.smembers(PREEMPT_OFF_KEY)}


@dataclass
class Candidate:
    """A running job that could give its GPU to a `high` job."""

    job_id: str
    queue: str
    worker: str
    rank: int  # its priority: lower goes first
    work_lost_s: float  # time since its last checkpoint (or start)
    epoch_left_s: float | None = None  # until its epoch ends, from its last epoch's length (None: no estimate)
    running_s: float = 0.0  # since this attempt started
    setup_s: float | None = None  # a job with no checkpoint in this attempt: the set-up it pays at least

    def stop_at(self, mode: str, wait_s: float) -> str:
        """Where this job stops under RUNYARD_PREEMPT_AT `mode` (auto: the boundary when within `wait_s`)."""
        if mode == "auto":
            close = self.epoch_left_s is not None and self.epoch_left_s <= wait_s
            return EPOCH_BOUNDARY if close else STEP_BOUNDARY
        return EPOCH_BOUNDARY if mode == "epoch" else STEP_BOUNDARY

    def cost(self, mode: str, wait_s: float) -> tuple[int, float]:
        """What stopping it costs: epoch-boundary stops (by wait) before step stops (by work re-done)."""
        if self.stop_at(mode, wait_s) == EPOCH_BOUNDARY:
            return (0, self.epoch_left_s if self.epoch_left_s is not None else float("inf"))
        if self.setup_s is not None:  # still in its set-up or first epoch: it loses its set-up at least
            return (1, max(self.work_lost_s, self.setup_s))
        return (1, self.work_lost_s)

    def sort_key(self, mode: str, wait_s: float) -> tuple[int, tuple[int, float], float]:
        """Lowest priority, then the cheapest; at equal cost the one running longest (it stops soonest)."""
        return (self.rank, self.cost(mode, wait_s), -self.running_s)


def preemption_candidates(connection: redis.Redis, high_queue: str, workers: list[Worker]) -> list[Candidate]:
    """Jobs that a job on `high_queue` may stop, cheapest first."""
    off = queues_without_preemption(connection)
    now = time.time()
    candidates = []
    for worker in workers:
        job_id = worker.get_current_job_id()
        if high_queue not in worker.queue_names() or job_id is None or connection.exists(preempt_key(job_id)):
            continue
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except Exception:  # gone, or a record nobody can read: not a candidate
            continue
        if job.origin in off or not may_preempt(high_queue, job.origin) or job.meta.get("preemptible") is False:
            continue
        epochs = [row["epoch"] for row in job.meta.get("history") or []]
        trained = max(epochs, default=0)
        last_preempted = job.meta.get("preempted_after_epoch")
        if last_preempted is not None and trained <= int(last_preempted):
            continue  # no thrash: it must train another epoch first
        started = job.started_at.timestamp() if job.started_at else now
        checkpoint_at = max(float(job.meta.get("checkpoint_at") or 0), started)
        rank = PRIORITY_RANK[queue_priority(job.origin)[1]]
        epoch_s = (job.meta.get("progress") or {}).get("seconds")
        left = max(0.0, float(epoch_s) - (now - checkpoint_at)) if epoch_s and job.meta.get("checkpoint_at") else None
        setup = None
        if float(job.meta.get("checkpoint_at") or 0) < started:  # nothing trained in this attempt yet
            known = [entry.get("setup_s") for entry in job.meta.get("preemptions") or [] if entry.get("setup_s")]
            setup = float(known[-1]) if known else SETUP_ESTIMATE_S
        candidates.append(
            Candidate(
                job_id,
                job.origin,
                worker.name,
                rank,
                max(0.0, now - checkpoint_at),
                left,
                max(0.0, now - started),
                setup,
            )
        )
    mode, wait = preempt_at(), auto_wait_s()
    return sorted(candidates, key=lambda candidate: candidate.sort_key(mode, wait))


def _owner_has_room(connection: redis.Redis, job_id: str) -> bool:
    """Whether the queued job's owner could start another job now (quota)."""
    owner = connection.hget(Job.key_for(job_id), OWNER_FIELD)
    owner = as_text(owner) if owner is not None else ""
    cap = connection.hget(QUOTA_KEY, owner)
    if cap is None:
        return True
    held = sum(1 for entry_owner, _last in running_entries(connection).values() if entry_owner == owner)
    return held < int(cap)


def preempt_for(connection: redis.Redis, high_queue: str) -> str | None:
    """Ask one running job to stop if `high_queue` has a job no idle worker can take; its id."""
    queued = [
        as_text(job_id) for job_id in connection.lrange(f"{Queue.redis_queue_namespace_prefix}{high_queue}", 0, -1)
    ]
    if not queued:
        return None
    workers = [worker for worker in Worker.all(connection=connection) if high_queue in worker.queue_names()]
    if any(worker.get_state() == "idle" for worker in workers):
        return None  # that worker takes it
    with connection.pipeline(transaction=False) as pipeline:
        for job_id in queued:
            pipeline.exists(f"{PREEMPT_FOR_PREFIX}{job_id}")
        served = pipeline.execute()
    waiting = [
        job_id for job_id, done in zip(queued, served, strict=True) if not done and _owner_has_room(connection, job_id)
    ]
    if not waiting:
        return None
    candidates = preemption_candidates(connection, high_queue, workers)
    if not candidates:
        return None
    victim = candidates[0]
    stop_at = victim.stop_at(preempt_at(), auto_wait_s())
    request = {
        "by": waiting[0],
        "queue": high_queue,
        "at": time.time(),
        "work_lost_s": round(victim.work_lost_s, 1),
        "stop_at": stop_at,
        "epoch_left_s": None if victim.epoch_left_s is None else round(victim.epoch_left_s, 1),
    }
    at_epoch = stop_at == EPOCH_BOUNDARY
    ttl = EPOCH_REQUEST_TTL_S if at_epoch else REQUEST_TTL_S
    if not connection.set(preempt_key(victim.job_id), json.dumps(request), nx=True, ex=ttl):
        return None
    # The high job waits for this victim (for its epoch to end, at the boundary) before another is asked.
    held_off = PREEMPTED_FOR_TTL_S
    if at_epoch:
        held_off += EPOCH_REQUEST_TTL_S if victim.epoch_left_s is None else victim.epoch_left_s
    connection.set(f"{PREEMPT_FOR_PREFIX}{waiting[0]}", victim.job_id, ex=int(held_off) + 1)
    log.info(
        "preempting job %s on %s (%s, %.0f s since its checkpoint) at its next %s for %s job %s",
        victim.job_id,
        victim.worker,
        victim.queue,
        victim.work_lost_s,
        stop_at,
        high_queue,
        waiting[0],
    )
    return victim.job_id


class Preemptor(threading.Thread):
    """Every CHECK_INTERVAL_S: preempt for each `high` queue this worker serves (one decider at a time)."""

    def __init__(self, connection: redis.Redis, worker_name: str, queue_names: list[str]):
        super().__init__(name=f"preemptor-{worker_name}", daemon=True)
        self.connection = connection
        self.worker_name = worker_name
        self.high_queues = [name for name in queue_names if queue_priority(name)[1] == "high"]
        self._stopping = threading.Event()

    def run(self) -> None:
        while self.high_queues and not self._stopping.wait(CHECK_INTERVAL_S):
            try:
                self.check()
            except REDIS_ERRORS:
                pass  # the heartbeat thread reports outages
            except Exception as error:  # a record nobody can read must not end the thread
                log.warning("%s: preemption check skipped: %s: %s", self.worker_name, type(error).__name__, error)

    def check(self) -> None:
        if not self.connection.set(PREEMPT_LOCK_KEY, self.worker_name, nx=True, px=LOCK_TTL_MS):
            return
        try:
            for queue_name in self.high_queues:
                preempt_for(self.connection, queue_name)
        finally:
            if as_text(self.connection.get(PREEMPT_LOCK_KEY) or b"") == self.worker_name:
                self.connection.delete(PREEMPT_LOCK_KEY)

    def stop(self) -> None:
        self._stopping.set()


def record_preemption(job: Job, after_epoch: int) -> None:
    """In the preempted job's horse: note who took its GPU in its meta and drop the request."""
    request = preemption_request(job.connection, job.id) or {}
    # worker.control noted where it stopped: the training of the partial epoch thrown away (0 at an
    # epoch boundary) and the attempt's set-up (paid again when it resumes), apart.
    stop = job.meta.pop("preempt_stop", None) or {}
    started = job.started_at.timestamp() if job.started_at else time.time()
    since_checkpoint = time.time() - max(float(job.meta.get("checkpoint_at") or 0), started)
    entry = {
        "by": request.get("by"),
        "queue": request.get("queue"),
        "requested_at": request.get("at"),
        "seen_at": stop.get("seen_at"),  # when its should_stop read the request
        "at": time.time(),  # its wind-down (W&B finish, store) done; RQ requeues it next
        "after_epoch": after_epoch,
        "worker": job.worker_name,
        "stop_at": stop.get("boundary", request.get("stop_at")),
        "work_redone_s": round(float(stop.get("redone_s", since_checkpoint)), 2),  # training thrown away
        "setup_s": None if stop.get("setup_s") is None else round(float(stop["setup_s"]), 2),
        "work_lost_s": round(since_checkpoint, 1),  # since the checkpoint it resumes from (set-up included)
    }
    update_job_meta(
        job.meta,
        preempted_by=request.get("by"),
        preempted_after_epoch=after_epoch,
        preemptions=[*(job.meta.get("preemptions") or []), entry],
    )
    job.save_meta()
    clear_preemption(job.connection, job.id)
    log.info("job %s: preempted by %s after epoch %d; requeued at the front", job.id, entry["by"], after_epoch)
