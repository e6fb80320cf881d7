"""Publishing a search so that each point runs exactly once, however often and by how many it is published.

Each point is claimed in Redis by one Lua script call (atomic: no two publishers can both claim a
point) in the search's points hash, `point id -> {job_id, run_name, claimed_at}`. A point is
claimed again only when its job failed, was stopped or cancelled, or vanished without a run
record; a point claimed moments ago whose job is not yet written (another publisher is between
its claim and its enqueue) is left alone. The claimed points are then enqueued together: one
pipeline for the runs, then the k-fold aggregates with `depends_on` their folds.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.job import Dependency, Job

from contracts.job_meta import DEFAULT_MAX_REQUEUES
from contracts.keys import RUN_KEY_PREFIX, RUN_NAMES_KEY, search_key, search_points_key
from publisher.queue import DEFAULT_RETRIES, JOB_TIMEOUT_S, job_options, publish_context, queue, rq_queue_name
from schedule_search.methods import keeps_space
from schedule_search.points import Point
from schedule_search.search import Search
from worker.asha import recover_promotions
from worker.jobs import AGGREGATE_FOLDS, RUN_EXPERIMENT
from worker.results import get_search

# A claim younger than this whose job does not exist yet belongs to a publisher still enqueueing.
CLAIM_GRACE_S = 120

# KEYS: points hash, run-name set. ARGV: grace, dry run, job key prefix, run record prefix, then
# (point id, job id, run name, info JSON) per point. Returns {point id, outcome, claim JSON}.
CLAIM_SCRIPT = """
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
    local name, suffix = run_name, 1
    while redis.call('SADD', names, name) == 0 do
      suffix = suffix + 1
      name = run_name .. '-' .. suffix
    end
    claim = '{"job_id":"' .. job_id .. '","run_name":"' .. name .. '","claimed_at":'
      .. string.format('%.6f', now) .. ',"info":' .. info .. '}'
    redis.call('HSET', points, id, claim)
  end
  results[#results + 1] = {id, outcome, claim or false}
end
return results
"""

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


@dataclass
class PublishReport:
    """What publishing did: each point's outcome and the jobs it enqueued."""

    search: str
    method: str
    dry_run: bool
    outcomes: dict[str, str] = field(default_factory=dict)  # point id -> new | retry:failed | queued | ...
    jobs: list[dict[str, Any]] = field(default_factory=list)  # what was enqueued

    @property
    def enqueued(self) -> int:
        return sum(1 for outcome in self.outcomes.values() if is_enqueued(outcome))

    def counts(self) -> dict[str, int]:
        """Outcomes by kind: new, retried (failed, stopped, cancelled, lost), finished, queued, running."""
        return dict(Counter(outcome_kind(outcome) for outcome in self.outcomes.values()))


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
    connection: redis.Redis, search: Search, dry_run: bool = False
) -> list[tuple[Point, str, dict[str, Any] | None]]:
    """Claim every point that needs a job, atomically; (point, outcome, claim) for each point."""
    arguments: list[Any] = [CLAIM_GRACE_S, "1" if dry_run else "0", Job.redis_job_namespace_prefix, RUN_KEY_PREFIX]
    for point in search.points:
        info = {"index": point.index, "kind": point.kind, "fold": point.fold, "params": point.params}
        info = json.dumps(info, separators=(",", ":"))
        arguments += [point.id, str(uuid.uuid4()), point.run_name, info]
    script = connection.register_script(CLAIM_SCRIPT)
    replies = script(keys=[search_points_key(search.name), RUN_NAMES_KEY], args=arguments)
    by_id = {point.id: point for point in search.points}
    claims = []
    for point_id, outcome, claim in replies:
        claim_record = json.loads(claim) if claim else None
        claims.append((by_id[point_id.decode()], outcome.decode(), claim_record))
    return claims


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
) -> PublishReport:
    """Enqueue every point of `search` that is missing or failed; report what each point was."""
    report = PublishReport(search.name, search.method, dry_run)
    if not dry_run:
        check_definition(connection, search)
        connection.set(search_key(search.name), json.dumps(search.definition()))
    claims = claim_points(connection, search, dry_run)
    report.outcomes = {point.id: outcome for point, outcome, _claim in claims}
    if dry_run:
        return report

    context = context if context is not None else publish_context()
    job_ids = {point.id: claim["job_id"] for point, _outcome, claim in claims if claim}
    to_enqueue = [(point, claim) for point, outcome, claim in claims if is_enqueued(outcome)]
    try:
        report.jobs = _enqueue(connection, search, to_enqueue, job_ids, context, retries, timeout_s, max_requeues)
    except BaseException:
        release_claims(connection, search, [(point.id, claim["job_id"]) for point, claim in to_enqueue])
        raise
    _recover_promotions(connection, search)
    return report


def _recover_promotions(connection: redis.Redis, search: Search) -> None:
    """An ASHA search's paused and promoted points keep their claims (a re-publish restarts none of
    them); a promotion decided long ago whose job was never enqueued is enqueued now."""
    if search.asha is not None:
        recover_promotions(connection, search.name, search.asha)


def _enqueue(
    connection: redis.Redis,
    search: Search,
    to_enqueue: list[tuple[Point, dict[str, Any]]],
    job_ids: dict[str, str],
    context: dict[str, Any],
    retries: int,
    timeout_s: int,
    max_requeues: int,
) -> list[dict[str, Any]]:
    runs: dict[str, list] = defaultdict(list)
    aggregates: dict[str, list] = defaultdict(list)
    enqueued = []
    # An aggregate waits on its folds' jobs: the ones enqueued now and the ones RQ still holds (an
    # expired one finished long ago, and waiting on it would wait forever).
    waitable = {claim["job_id"] for _point, claim in to_enqueue}
    waitable |= _existing_jobs(connection, [job_ids[dep] for point, _ in to_enqueue for dep in point.depends_on])
    for point, claim in to_enqueue:
        run_name = claim["run_name"]
        spec = point.spec.model_copy(update={"run_name": run_name})
        queue_name = rq_queue_name(spec)
        common = job_options(
            spec,
            run_name,
            retries=0 if point.kind == "aggregate" else retries,
            timeout_s=timeout_s,
            max_requeues=max_requeues,
            job_id=claim["job_id"],
            spec_hash=point.id if point.kind in ("run", "fold") else None,  # a run's id is its hash
            search=search.name,
            point=point.id,
            kind=point.kind,
            params=point.params,
        )
        if point.kind == "aggregate":
            folds = [
                {"fold": fold, "run_name": _claimed_run_name(connection, search, fold_id), "point": fold_id}
                for fold, fold_id in enumerate(point.depends_on)
            ]
            waits = [job_ids[fold_id] for fold_id in point.depends_on if job_ids[fold_id] in waitable]
            kwargs = {"search": search.payload(point), "spec": spec.to_payload(), "folds": folds, "run_name": run_name}
            data = Queue.prepare_data(
                AGGREGATE_FOLDS,
                kwargs=kwargs,
                depends_on=Dependency(jobs=waits, allow_failure=True) if waits else None,
                **common,
            )
            aggregates[queue_name].append(data)
        else:
            kwargs = {"spec": spec.to_payload(), "context": context, "search": search.payload(point)}
            data = Queue.prepare_data(RUN_EXPERIMENT, kwargs=kwargs, **common)
            runs[queue_name].append(data)
        enqueued.append({"point": point.id, "job_id": claim["job_id"], "run_name": run_name, "queue": queue_name})
    with connection.pipeline() as pipeline:
        for queue_name, datas in runs.items():
            queue(connection, queue_name).enqueue_many(datas, pipeline=pipeline)
        pipeline.execute()
    for queue_name, datas in aggregates.items():
        # RQ checks the dependencies itself (WATCH per job), so these go without an outer pipeline.
        queue(connection, queue_name).enqueue_many(datas)
    return enqueued


def _existing_jobs(connection: redis.Redis, job_ids: list[str]) -> set[str]:
    if not job_ids:
        return set()
    with connection.pipeline() as pipeline:
        for job_id in job_ids:
            pipeline.exists(Job.key_for(job_id))
        return {job_id for job_id, exists in zip(job_ids, pipeline.execute(), strict=True) if exists}


def _claimed_run_name(connection: redis.Redis, search: Search, point_id: str) -> str:
    claim = connection.hget(search_points_key(search.name), point_id)
    return json.loads(claim)["run_name"]
