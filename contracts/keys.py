"""Every Redis key runyard writes under its own prefix (RQ's keys stay RQ's business).

One place to read what runyard keeps in Redis, and the only place a key name is spelled out.
"""

from __future__ import annotations

PREFIX = "runyard"

WORKERS_KEY = f"{PREFIX}:workers"  # hash: worker name -> {host, pid, started} of every worker that beats
LEADERBOARD_KEY = f"{PREFIX}:leaderboard"  # sorted set: run name -> best val F1, all runs
RUN_NAMES_KEY = f"{PREFIX}:run-names"  # set: every run name ever reserved (each run gets its own dir)
REFUSED_KEY = f"{PREFIX}:refused"  # list: the last refused jobs; `REFUSED_KEY:<job id>` keeps the record
RUN_KEY_PREFIX = f"{PREFIX}:run:"  # + run name: the finished run's JSON summary (also used by Lua)

RUN_JOBS_KEY = f"{PREFIX}:run-jobs"  # hash: run name -> its job id (cancel by name without a scan)
JANITOR_LEASE_KEY = f"{PREFIX}:janitor:lease"  # the one janitor that sweeps the fleet now (SET NX PX)

# Sharing the workers (worker.fair_share, worker.quotas, worker.preemption)
QUOTA_KEY = f"{PREFIX}:quota"  # hash: owner -> concurrent GPU cap
USAGE_KEY = f"{PREFIX}:fairshare:usage"  # hash: owner -> decayed GPU seconds, as of USAGE_AT_KEY
USAGE_AT_KEY = f"{PREFIX}:fairshare:usage_at"  # hash: owner -> when its usage was last decayed
RUNNING_KEY = f"{PREFIX}:fairshare:running"  # hash: job id -> "<owner>\t<time of its last charge>"
HOURLY_KEY = f"{PREFIX}:fairshare:hourly"  # hash: "<owner>\t<hour since the epoch>" -> GPU seconds (undecayed)
PREEMPT_PREFIX = f"{PREFIX}:preempt:"  # + job id: the request that the job stop (JSON: by, at, queue)
PREEMPT_FOR_PREFIX = f"{PREFIX}:preempt-for:"  # + high job id: a job was already stopped for it
PREEMPT_LOCK_KEY = f"{PREFIX}:preempt-lock"  # one deciding Preemptor at a time
PREEMPT_OFF_KEY = f"{PREFIX}:preempt-off"  # set: queue names whose jobs are never preempted
QUEUE_INDEX_PREFIX = f"{PREFIX}:fairshare:index:"  # + RQ queue name + ":": the queue's owner index (below)


def run_key(run_name: str) -> str:
    """A finished run's JSON summary; it never expires."""
    return f"{RUN_KEY_PREFIX}{run_name}"


def search_key(search: str) -> str:
    """The search's definition (JSON), written by schedule-search on every publish."""
    return f"{PREFIX}:search:{search}"


def search_leaderboard_key(search: str) -> str:
    """Sorted set of a search's runs by their search score."""
    return f"{PREFIX}:search:{search}:leaderboard"


def search_data_errors_key(search: str) -> str:
    """Hash of data error message -> how many of the search's points failed with it (worker.search_stop)."""
    return f"{search_key(search)}:data-errors"


def search_stopped_key(search: str) -> str:
    """The stop record (JSON: reason, at) of a search stopped after repeated identical data errors."""
    return f"{search_key(search)}:stopped"


def search_points_key(search: str) -> str:
    """Hash of point id -> its claim (job id, run name): what makes each point run exactly once."""
    return f"{PREFIX}:search:{search}:points"


def asha_rung_key(search: str, rung: int) -> str:
    """Sorted set of the points that reached ASHA rung `rung` (0 = the first), by their search score."""
    return f"{PREFIX}:search:{search}:asha:rung:{rung}"


def asha_promoted_key(search: str, rung: int) -> str:
    """Set of the points promoted out of ASHA rung `rung`: what makes a promotion happen once."""
    return f"{PREFIX}:search:{search}:asha:rung:{rung}:promoted"


def asha_runs_key(search: str) -> str:
    """Hash of point id -> its ASHA state (JSON: state, rung, run name, job id)."""
    return f"{PREFIX}:search:{search}:asha:runs"


def asha_templates_key(search: str) -> str:
    """Hash of point id -> how to enqueue its next segment (the job's function, kwargs and options, JSON)."""
    return f"{PREFIX}:search:{search}:asha:templates"


def asha_pending_key(search: str) -> str:
    """Sorted set of promotions decided but not yet enqueued, by when they were decided (or last leased)."""
    return f"{PREFIX}:search:{search}:asha:pending"


def optuna_study_prefix(search: str) -> str:
    """Prefix of a bayes search's Optuna journal (point optuna-dashboard's JournalRedisBackend at it)."""
    return f"{PREFIX}:optuna:{search}"


def heartbeat_key(worker_name: str) -> str:
    """A worker's liveness: rewritten every few seconds with a short TTL."""
    return f"{PREFIX}:heartbeat:{worker_name}"


def cancel_key(job_id: str) -> str:
    """Set by `runyard cancel`: the job stops at its next step boundary."""
    return f"{PREFIX}:cancel:{job_id}"


def requeue_counter_key(job_id: str) -> str:
    """How many times janitors requeued a job after its worker died."""
    return f"{PREFIX}:requeues:{job_id}"


def refused_job_key(job_id: str) -> str:
    """Where a refused (quarantined) job's RQ record is moved aside."""
    return f"{REFUSED_KEY}:{job_id}"


def queue_index_jobs_key(queue_name: str) -> str:
    """Set of the job ids in `queue_name`'s owner index (worker.queue_index)."""
    return f"{QUEUE_INDEX_PREFIX}{queue_name}:jobs"


def queue_index_owners_key(queue_name: str) -> str:
    """Set of the owners with jobs in `queue_name`'s owner index."""
    return f"{QUEUE_INDEX_PREFIX}{queue_name}:owners"


def queue_index_owner_key(queue_name: str, owner: str) -> str:
    """List of `owner`'s indexed job ids on `queue_name`, oldest first (the Lua take appends owners to "")."""
    return f"{QUEUE_INDEX_PREFIX}{queue_name}:owner:{owner}"


def queue_index_checked_key(queue_name: str) -> str:
    """Set for a while after a reindex of `queue_name`: how many listed jobs it could not index (duplicates)."""
    return f"{QUEUE_INDEX_PREFIX}{queue_name}:checked"


def queue_index_lock_key(queue_name: str) -> str:
    """The one process reindexing `queue_name` now (SET NX PX)."""
    return f"{QUEUE_INDEX_PREFIX}{queue_name}:reindexing"
