"""Publishing a search so that each point runs exactly once, however often and by how many it is published.

Each point is claimed in Redis by one Lua script call (atomic: no two publishers can both claim a
point) in the search's points hash, `point id -> {job_id, run_name, claimed_at}`. A point is
claimed again only when its job failed, was stopped or cancelled, or vanished without a run
record; a point claimed moments ago whose job is not yet written (another publisher is between
its claim and its enqueue) is left alone. Points are claimed and enqueued a chunk at a time (one
script call, then one transaction for the chunk's runs), then the k-fold aggregates with
`depends_on` their folds. Every job's run name goes into the run index (publisher.run_index).
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.job import Dependency, Job

from contracts.job_meta import DEFAULT_MAX_REQUEUES
from contracts.keys import RUN_KEY_PREFIX, RUN_NAMES_KEY, search_key, search_points_key
from contracts.spec import ExperimentSpec
from publisher.job_batch import JobBatch, json_bytes
from publisher.queue import (
    DEFAULT_RETRIES,
    JOB_TIMEOUT_S,
    job_options,
    publish_context,
    queue,
    queue_for,
    rq_queue_name,
)
from publisher.run_index import index_run_jobs
from schedule_search.methods import keeps_space
from schedule_search.points import Point
from schedule_search.search import Search
from worker.asha import recover_promotions
from worker.fair_share import job_owner
from worker.jobs import AGGREGATE_FOLDS, RUN_EXPERIMENT
from worker.results import RESERVE_RUN_NAME_LUA, get_search
from worker.search_stop import clear_stop

# A claim younger than this whose job does not exist yet belongs to a publisher still enqueueing.
CLAIM_GRACE_S = 120
# Points per claim script call and per enqueue transaction. A claim costs Redis ~7 us a point
# wherever the point is in the search (BENCHMARKS.md, publishing, third pass): 200 points are ~1.5 ms,
# so that a call stays far below 50 ms even when the box starves or forks Redis (AOF rewrite) in
# the middle of it; 100 to 500 cost the publisher the same CPU.
CHUNK = 200

# KEYS: points hash, run-name set. ARGV: grace, dry run, job key prefix, run record prefix, then
# (point id, job id, run name, info JSON) per point. Returns {point id, outcome, claim JSON} per
# point, or {point id, outcome, false, reserved run name} for a point claimed now (the caller has
# the rest of its claim: no JSON to send back and parse per new point).
# Run names are reserved the way `publish` reserves them: worker.results.RESERVE_RUN_NAME_LUA.
CLAIM_SCRIPT = (
    RESERVE_RUN_NAME_LUA
    + """
local points, names = KEYS[1], KEYS[2]
local grace, dry = tonumber(ARGV[1]), ARGV[2] == '1'
local job_prefix, run_prefix = ARGV[3], ARGV[4]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local results = {}
for i = 5, #ARGV, 4 do
  local id, job_id, run_name, info = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local claim = redis.call('HGET', points, id)
  local outcome = 'new'
  if claim then
    local record = cjson.decode(claim)
    local status = redis.call('HGET', job_prefix .. record.job_id, 'status')
    if status then
      outcome = status
      if status == 'failed' or status == 'stopped' or status == 'canceled' then
        outcome = 'retry:' .. status
      end
    elseif redis.call('EXISTS', run_prefix .. record.run_name) == 1 then
      outcome = 'finished'
    elseif now - tonumber(record.claimed_at) < grace then
      outcome = 'claimed'
    else
      outcome = 'retry:lost'
    end
  end
  if (outcome == 'new' or string.sub(outcome, 1, 6) == 'retry:') and not dry then
    local name = reserve_run_name(names, run_name)
    redis.call('HSET', points, id, '{"job_id":"' .. job_id .. '","run_name":"' .. name .. '","claimed_at":'
      .. string.format('%.6f', now) .. ',"info":' .. info .. '}')
    results[#results + 1] = {id, outcome, false, name}
  else
    results[#results + 1] = {id, outcome, claim or false}
  end
end
return results
"""
)

# Undo claims whose jobs could not be enqueued, and free their run names.
# KEYS: points hash, run-name set; ARGV: (point id, job id) pairs.
RELEASE_SCRIPT = """
for i = 1, #ARGV, 2 do
  local claim = redis.call('HGET', KEYS[1], ARGV[i])
  if claim and string.find(claim, ARGV[i + 1], 1, true) then
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('SREM', KEYS[2], cjson.decode(claim).run_name)
  end
end
"""


class SearchConflict(ValueError):
    """The search name is taken by a different bayes search; the message says to rename it."""


# Enqueued jobs a report keeps (for a caller's first look); every job goes to publish_search's on_job.
FIRST_JOBS = 100


@dataclass
class PublishReport:
    """What publishing did, in memory that does not grow with the search: points per outcome, the
    queues used and the first FIRST_JOBS jobs enqueued (publish_search's on_point and on_job see every one)."""

    search: str
    method: str
    dry_run: bool
    outcomes: Counter[str] = field(default_factory=Counter)  # new | retry:failed | queued | ... -> points
    queues: set[str] = field(default_factory=set)
    first_jobs: list[dict[str, Any]] = field(default_factory=list)  # {point, job_id, run_name, queue}

    @property
    def enqueued(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if is_enqueued(outcome))

    def counts(self) -> dict[str, int]:
        """Outcomes by kind: new, retried (failed, stopped, cancelled, lost), finished, queued, running."""
        kinds: Counter[str] = Counter()
        for outcome, count in self.outcomes.items():
            kinds[outcome_kind(outcome)] += count
        return dict(kinds)

    def add_jobs(self, jobs: list[dict[str, Any]], on_job: JobSink | None) -> None:
        """Count a chunk's enqueued jobs in, and hand each to `on_job`."""
        self.queues.update(job["queue"] for job in jobs)
        self.first_jobs += jobs[: FIRST_JOBS - len(self.first_jobs)]
        if on_job is not None:
            for job in jobs:
                on_job(job)


# Called with each point and its outcome as it is claimed (or looked at, in a dry run).
PointSink = Callable[[Point, str], None]
# Called with each enqueued job as {point, job_id, run_name, queue}, a chunk at a time.
JobSink = Callable[[dict[str, Any]], None]


def is_enqueued(outcome: str) -> bool:
    return outcome == "new" or outcome.startswith("retry:")


def outcome_kind(outcome: str) -> str:
    """new | retried | finished | running | queued."""
    if outcome == "new":
        return "new"
    if outcome.startswith("retry:"):
        return "retried"
    if outcome == "started":
        return "running"
    if outcome == "finished":
        return "finished"
    return "queued"  # queued, deferred, scheduled, created, claimed by a publisher right now


def claim_points(
    connection: redis.Redis, search: Search, points: list[Point] | None = None, dry_run: bool = False
) -> list[tuple[Point, str, dict[str, Any] | None]]:
    """Claim each of `points` (default: all of the search's) that needs a job, atomically.

    Returns (point, outcome, claim) for each point. One script call: keep `points` to a CHUNK.
    """
    points = list(search.points) if points is None else points
    arguments: list[Any] = [CLAIM_GRACE_S, "1" if dry_run else "0", Job.redis_job_namespace_prefix, RUN_KEY_PREFIX]
    job_ids = {}
    for point in points:
        info = json_bytes({"index": point.index, "kind": point.kind, "fold": point.fold, "params": point.params})
        job_ids[point.id] = job_id = str(uuid.uuid4())
        arguments += [point.id, job_id, point.run_name, info]
    script = connection.register_script(CLAIM_SCRIPT)
    replies = script(keys=[search_points_key(search.name), RUN_NAMES_KEY], args=arguments)
    by_id = {point.id: point for point in points}
    claims = []
    for reply in replies:
        point_id = reply[0].decode()
        if len(reply) == 4:  # claimed now, under the job id sent and the run name reserved
            claim_record = {"job_id": job_ids[point_id], "run_name": reply[3].decode()}
        else:
            claim_record = json.loads(reply[2]) if reply[2] else None
        claims.append((by_id[point_id], reply[1].decode(), claim_record))
    return claims


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`items` (any iterable, consumed lazily) in consecutive lists of at most `size`."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def release_claims(connection: redis.Redis, search: Search, claims: list[tuple[str, str]]) -> None:
    """Give back claims (point id, job id) whose jobs were never enqueued."""
    if claims:
        script = connection.register_script(RELEASE_SCRIPT)
        script(keys=[search_points_key(search.name), RUN_NAMES_KEY], args=[part for claim in claims for part in claim])


def check_definition(connection: redis.Redis, search: Search) -> None:
    """A study that samples the space (bayes) keeps it: publishing another space under the same name is refused."""
    stored = get_search(connection, search.name)
    if not stored or not (keeps_space(search.method) or keeps_space(stored.get("method"))):
        return
    new = search.definition()
    if (stored.get("method"), stored.get("parameters"), stored.get("metric")) != (
        new["method"],
        new["parameters"],
        new["metric"],
    ):
        raise SearchConflict(
            f"search {search.name!r} already exists with another method, space or metric, and its Optuna study "
            "cannot change them: give this search another `name`"
        )


def publish_search(
    connection: redis.Redis,
    search: Search,
    retries: int = DEFAULT_RETRIES,
    timeout_s: int = JOB_TIMEOUT_S,
    dry_run: bool = False,
    context: dict[str, Any] | None = None,
    max_requeues: int = DEFAULT_MAX_REQUEUES,
    on_point: PointSink | None = None,
    on_job: JobSink | None = None,
) -> PublishReport:
    """Enqueue every point of `search` that is missing or failed; report how many points were what.

    Points go CHUNK at a time: one claim script call, then one transaction that writes the
    chunk's jobs, so no Redis command holds the server for long and the publisher holds one
    chunk's jobs at a time. K-fold aggregates go last, once every fold has its job. Each point's
    outcome goes to `on_point` and each enqueued job to `on_job` as they happen (the report
    counts them).
    """
    report = PublishReport(search.name, search.method, dry_run)
    # Before any claim: a bad RUNYARD_USER (the owner) must leave nothing behind.
    context = context if context is not None else publish_context()
    if not dry_run:
        check_definition(connection, search)
        connection.set(search_key(search.name), json.dumps(search.definition()))
        clear_stop(connection, search.name)  # published again, presumably with the data fixed
    folds: dict[str, dict[str, Any]] = {}  # fold point id -> its claim, for its set's aggregate
    aggregates: list[tuple[Point, dict[str, Any]]] = []
    pending: list[tuple[Point, dict[str, Any]]] = []  # claimed, not yet enqueued: released on an error
    try:
        for chunk in chunks(search.points, CHUNK):
            claims = claim_points(connection, search, chunk, dry_run)
            for point, outcome, claim in claims:
                report.outcomes[outcome] += 1
                if on_point is not None:
                    on_point(point, outcome)
                if point.kind == "fold" and claim:
                    folds[point.id] = claim
            if dry_run:
                continue
            runs = [(point, claim) for point, outcome, claim in claims if is_enqueued(outcome)]
            aggregates += [(point, claim) for point, claim in runs if point.kind == "aggregate"]
            pending = aggregates + [(point, claim) for point, claim in runs if point.kind != "aggregate"]
            runs_now = pending[len(aggregates) :]
            report.add_jobs(
                _enqueue_runs(connection, search, runs_now, context, retries, timeout_s, max_requeues), on_job
            )
            pending = aggregates
        for chunk in chunks(aggregates, CHUNK):
            report.add_jobs(
                _enqueue_aggregates(connection, search, chunk, folds, context, timeout_s, max_requeues), on_job
            )
            pending = pending[len(chunk) :]
    except BaseException:
        release_claims(connection, search, [(point.id, claim["job_id"]) for point, claim in pending])
        raise
    _recover_promotions(connection, search)
    return report


def _job_options(
    point: Point,
    spec: ExperimentSpec,
    search: Search,
    claim: dict[str, Any],
    context: dict[str, Any],
    retries: int,
    timeout_s: int,
    max_requeues: int,
) -> dict[str, Any]:
    """publisher.queue.job_options for one point: its claimed job id and run name, its place in the search."""
    return job_options(
        spec,
        claim["run_name"],
        retries=retries,
        timeout_s=timeout_s,
        max_requeues=max_requeues,
        job_id=claim["job_id"],
        spec_hash=point.id if point.kind in ("run", "fold") else None,  # a run's id is its hash
        search=search.name,
        point=point.id,
        kind=point.kind,
        params=point.params,
        owner=job_owner(context),  # a search's points, folds and aggregates are its publisher's
    )


def _point_options(checked: dict[str, Any], point: Point, claim: dict[str, Any]) -> dict[str, Any]:
    """`checked` (another run point's _job_options in this search) with this point's own values.

    Saves a JobMeta validation per job: only the values below differ between a search's run
    points, and each has the type JobMeta wants by construction (the run name and job id are the
    claim's strings, the model and epochs come from the point's validated spec).
    """
    meta = checked["meta"] | {
        "run_name": claim["run_name"],
        "spec_hash": point.id if point.kind in ("run", "fold") else point.spec.spec_hash(),
        "model": point.payload["model"],
        "epochs": point.payload["epochs"],
        "point": point.id,
        "kind": point.kind,
        "params": dict(point.params),
    }
    return checked | {"description": claim["run_name"], "job_id": claim["job_id"], "meta": meta}


def _recover_promotions(connection: redis.Redis, search: Search) -> None:
    """An ASHA search's paused and promoted points keep their claims (a re-publish restarts none of
    them); a promotion decided long ago whose job was never enqueued is enqueued now."""
    if search.asha is not None:
        recover_promotions(connection, search.name, search.asha)


def _enqueue_runs(
    connection: redis.Redis,
    search: Search,
    to_enqueue: list[tuple[Point, dict[str, Any]]],
    context: dict[str, Any],
    retries: int,
    timeout_s: int,
    max_requeues: int,
) -> list[dict[str, Any]]:
    """One transaction: the chunk's run jobs (publisher.job_batch) and their run names in the index."""
    if not to_enqueue:
        return []
    batch = JobBatch(connection)
    enqueued = []
    checked: dict[str, Any] | None = None  # the chunk's first options, checked by job_options
    for point, claim in to_enqueue:
        # The claimed run name changes neither queue nor priority.
        queue_name = queue_for(point.payload["queue"], point.payload["priority"])
        spec_payload = point.payload | {"run_name": claim["run_name"]}  # the spec with its claimed run name
        kwargs = {"spec": spec_payload, "context": context, "search": search.payload(point)}
        if checked is None:
            checked = _job_options(point, point.spec, search, claim, context, retries, timeout_s, max_requeues)
            options = checked
        else:
            options = _point_options(checked, point, claim)
        batch.add(queue_name, RUN_EXPERIMENT, kwargs, options)
        enqueued.append(
            {"point": point.id, "job_id": claim["job_id"], "run_name": claim["run_name"], "queue": queue_name}
        )
    with connection.pipeline() as pipeline:
        batch.write(pipeline)
        index_run_jobs(pipeline, {job["run_name"]: job["job_id"] for job in enqueued})
        pipeline.execute()
    return enqueued


def _enqueue_aggregates(
    connection: redis.Redis,
    search: Search,
    to_enqueue: list[tuple[Point, dict[str, Any]]],
    folds: dict[str, dict[str, Any]],
    context: dict[str, Any],
    timeout_s: int,
    max_requeues: int,
) -> list[dict[str, Any]]:
    """K-fold aggregates, each waiting on its folds' jobs (`depends_on`)."""
    # An aggregate waits on the folds' jobs RQ still holds (an expired one finished long ago, and
    # waiting on it would wait forever).
    waitable = _existing_jobs(
        connection, [folds[fold]["job_id"] for point, _ in to_enqueue for fold in point.depends_on]
    )
    by_queue: dict[str, list] = defaultdict(list)
    enqueued = []
    for point, claim in to_enqueue:
        spec = point.spec.model_copy(update={"run_name": claim["run_name"]})
        queue_name = rq_queue_name(spec)
        fold_runs = [
            {"fold": fold, "run_name": folds[fold_id]["run_name"], "point": fold_id}
            for fold, fold_id in enumerate(point.depends_on)
        ]
        waits = [folds[fold_id]["job_id"] for fold_id in point.depends_on if folds[fold_id]["job_id"] in waitable]
        kwargs = {
            "search": search.payload(point),
            "spec": spec.to_payload(),
            "folds": fold_runs,
            "run_name": claim["run_name"],
        }
        depends_on = Dependency(jobs=waits, allow_failure=True) if waits else None
        options = _job_options(point, spec, search, claim, context, 0, timeout_s, max_requeues)
        by_queue[queue_name].append(
            Queue.prepare_data(AGGREGATE_FOLDS, kwargs=kwargs, depends_on=depends_on, **options)
        )
        enqueued.append(
            {"point": point.id, "job_id": claim["job_id"], "run_name": claim["run_name"], "queue": queue_name}
        )
    for queue_name, datas in by_queue.items():
        # RQ checks the dependencies itself (WATCH per job), so these go without an outer pipeline.
        queue(connection, queue_name).enqueue_many(datas)
    with connection.pipeline() as pipeline:
        index_run_jobs(pipeline, {job["run_name"]: job["job_id"] for job in enqueued})
        pipeline.execute()
    return enqueued


def _existing_jobs(connection: redis.Redis, job_ids: list[str]) -> set[str]:
    if not job_ids:
        return set()
    with connection.pipeline() as pipeline:
        for job_id in job_ids:
            pipeline.exists(Job.key_for(job_id))
        return {job_id for job_id, exists in zip(job_ids, pipeline.execute(), strict=True) if exists}
