"""ASHA on checkpoints: a search point pauses at each rung and the best 1/eta of a rung are promoted.

A point of a search with `early_terminate: {type: asha, min_iter, eta, max_iter}` trains to its
rung (min_iter, min_iter * eta, ... epochs, then max_iter), records its result and ends: its RQ
job finishes normally with status `paused` in its result and meta, its checkpoint is kept and its
GPU is free. The job then reports the rung in one Lua script call (`RUNG_REPORT_SCRIPT`): the
result joins the rung's sorted set and, for every rung, any run now in the top 1/eta of the runs
that reached it and not promoted yet is marked promoted. The reporting worker enqueues each
promotion at the front of its queue as a new job that resumes the run's checkpoint up to the next
rung, so a free worker takes a promotion before a new point and no worker waits for a rung to
fill (asynchronous successive halving, Li et al., MLSys 2020).

Each promotion is decided once: the script adds the run to the rung's promoted set, and a run
already there is never picked again, however many workers report at once. Its job id is derived
from the run's first job (`<first job id>-rung<k>`) and enqueued with RQ's `unique`, so a promotion
whose enqueue was lost (the reporter died in between) is enqueued again by a later report or a
re-publish once its lease ran out, and never twice.

The resumed job's spec is the point's spec, untouched: `epochs` stays max_iter, so the LR schedule
is the full run's and the final history equals an uninterrupted run's; only where it pauses moves.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import redis
from rq import Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.job_meta import JobMeta, update_job_meta
from contracts.keys import (
    asha_pending_key,
    asha_promoted_key,
    asha_rung_key,
    asha_runs_key,
    asha_templates_key,
    search_points_key,
)
from contracts.search_payload import AshaSettings
from worker.fair_share import FairShareQueue

log = logging.getLogger("runyard.asha")

# A decided promotion whose job has not started after this long is enqueued again (RQ's `unique`
# makes that a no-op when the job exists): it covers a reporter that died between deciding and enqueueing.
PROMOTION_LEASE_S = 120
# The meta a promoted job inherits from the job that paused (what publishing wrote).
IDENTITY_META = ("run_name", "spec_hash", "model", "epochs", "max_requeues", "search", "point", "kind", "params")
LOWEST_SCORE = -1e300
ROOT_JOB_ID = re.compile(r"^(?P<root>.+?)(-rung\d+)?$")


PROMOTERS: dict[str, type[AshaSettings]] = {"asha": AshaSettings}  # contracts.plugins.PROMOTERS


# KEYS: runs hash, templates hash, pending zset, points hash, then (rung zset, promoted set) per
# rung below the top, then the top rung's zset. ARGV: point ('' = only re-lease stale
# promotions), rung, score, eta, run name, job id, template JSON, lease seconds, root job id, the
# search's number of points (0 = unknown). Returns (point, rung, job id, template) per promotion.
RUNG_REPORT_SCRIPT = """
local runs, templates, pending, points = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local point, rung, score, eta = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local run_name, job_id, template, lease, root = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9]
local total = tonumber(ARGV[10])
local rungs = (#KEYS - 5) / 2
local top_key = KEYS[#KEYS]
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local promotions = {}

local function rung_key(r)
  if r == rungs then return top_key end
  return KEYS[5 + 2 * r]
end

local function promote(r, member)
  local info = cjson.decode(redis.call('HGET', runs, member))
  info.state, info.rung, info.at = 'promoted', r + 1, now
  info.job_id = info.root .. '-rung' .. (r + 1)
  redis.call('HSET', runs, member, cjson.encode(info))
  local claim = redis.call('HGET', points, member)
  if claim then  -- a re-publish then sees the promotion's job, not the paused one
    local record = cjson.decode(claim)
    record.job_id = info.job_id
    redis.call('HSET', points, member, cjson.encode(record))
  end
  redis.call('ZADD', pending, now, member)
  promotions[#promotions + 1] = {member, tostring(r + 1), info.job_id, redis.call('HGET', templates, member)}
end

if point ~= '' then
  redis.call('HSET', templates, point, template)
  redis.call('ZADD', rung_key(rung), score, point)
  local state = 'paused'
  if rung == rungs then state = 'finished' end
  redis.call('HSET', runs, point, cjson.encode({state = state, rung = rung, run_name = run_name,
    job_id = job_id, root = root, at = now}))
end

-- Top rung first: a run close to finishing frees its rung's slot sooner (Li et al.'s order).
for r = rungs - 1, 0, -1 do
  local promoted_key = KEYS[6 + 2 * r]
  local top = math.floor(redis.call('ZCARD', rung_key(r)) / eta)
  if top > 0 then
    for _, member in ipairs(redis.call('ZREVRANGE', rung_key(r), 0, top - 1)) do
      if redis.call('HEXISTS', runs, member) == 1 and redis.call('SADD', promoted_key, member) == 1 then
        promote(r, member)
      end
    end
  end
end

-- The end of a finite search: every point has reported, nothing is promoted and on its way, and
-- no run reached the top (a rung with fewer than eta results promotes nobody). The best run of
-- the deepest rung reached goes on, so the search always trains one run to max_iter.
if #promotions == 0 and total > 0 and redis.call('ZCARD', rung_key(0)) >= total
    and redis.call('ZCARD', top_key) == 0 then
  local in_flight, deepest = 0, nil
  for r = 0, rungs - 1 do
    in_flight = in_flight + redis.call('SCARD', KEYS[6 + 2 * r]) - redis.call('ZCARD', rung_key(r + 1))
    if redis.call('ZCARD', rung_key(r)) > 0 then deepest = r end
  end
  if in_flight == 0 and deepest ~= nil then
    local best = redis.call('ZREVRANGE', rung_key(deepest), 0, 0)[1]
    if redis.call('SADD', KEYS[6 + 2 * deepest], best) == 1 then promote(deepest, best) end
  end
end

for _, member in ipairs(redis.call('ZRANGEBYSCORE', pending, '-inf', now - lease)) do
  local info = cjson.decode(redis.call('HGET', runs, member))
  redis.call('ZADD', pending, now, member)  -- leased to this caller: no second one enqueues it meanwhile
  promotions[#promotions + 1] = {member, tostring(info.rung), info.job_id, redis.call('HGET', templates, member)}
end
return promotions
"""


@dataclass
class Promotion:
    """A run promoted to `rung`: the job to enqueue to resume it there."""

    point: str
    rung: int
    job_id: str
    template: dict[str, Any]


def rung_keys(search: str, settings: AshaSettings) -> list[str]:
    """The script's KEYS for `search`."""
    keys = [asha_runs_key(search), asha_templates_key(search), asha_pending_key(search), search_points_key(search)]
    for rung in range(settings.top_rung):
        keys += [asha_rung_key(search, rung), asha_promoted_key(search, rung)]
    return [*keys, asha_rung_key(search, settings.top_rung)]


def root_job_id(job_id: str) -> str:
    """The id of a point's first job: every promotion's job id is derived from it."""
    match = ROOT_JOB_ID.match(job_id)
    return match.group("root") if match else job_id


def job_template(job: Job) -> dict[str, Any]:
    """How to enqueue the next segment of `job`'s run: its function, arguments, queue and options."""
    meta = JobMeta.model_validate({key: job.meta.get(key) for key in IDENTITY_META})
    return {
        "job_id": job.id,
        "func": job.func_name,
        "kwargs": job.kwargs,
        "queue": job.origin,
        "timeout": job.timeout,
        "result_ttl": job.result_ttl,
        "failure_ttl": job.failure_ttl,
        "retries": job.retries_left or 0,
        "description": job.description,
        "meta": meta.model_dump(include=set(IDENTITY_META), exclude_none=True),
    }


def report_rung(
    connection: redis.Redis,
    search: str,
    point: str,
    settings: AshaSettings,
    score: float,
    run_name: str,
    job: Job,
) -> list[Promotion]:
    """Record that `point` reached its rung with `score` (higher is better); the promotions now due."""
    score = float(score) if math.isfinite(score) else LOWEST_SCORE  # a diverged run (NaN loss) ranks last
    arguments = [point, settings.rung, repr(score), settings.eta, run_name, job.id]
    arguments += [json.dumps(job_template(job)), PROMOTION_LEASE_S, root_job_id(job.id), settings.points or 0]
    return _run_script(connection, search, settings, arguments)


def recover_promotions(connection: redis.Redis, search: str, settings: AshaSettings) -> list[str]:
    """Enqueue promotions decided long ago whose job never started (the deciding worker died); their job ids."""
    arguments = ["", 0, 0, settings.eta, "", "", "", PROMOTION_LEASE_S, "", settings.points or 0]
    return enqueue_promotions(connection, _run_script(connection, search, settings, arguments))


def _run_script(connection: redis.Redis, search: str, settings: AshaSettings, arguments: list[Any]) -> list[Promotion]:
    script = connection.register_script(RUNG_REPORT_SCRIPT)
    replies = script(keys=rung_keys(search, settings), args=arguments)
    return [
        Promotion(point.decode(), int(rung), job_id.decode(), json.loads(template))
        for point, rung, job_id, template in replies
    ]


def enqueue_promotions(connection: redis.Redis, promotions: list[Promotion]) -> list[str]:
    """Enqueue each promotion at the front of its queue, once (a job id that exists already is left alone)."""
    enqueued = []
    for promotion in promotions:
        template = promotion.template
        kwargs = json.loads(json.dumps(template["kwargs"]))
        kwargs["search"]["asha"]["rung"] = promotion.rung
        settings = AshaSettings.model_validate(kwargs["search"]["asha"])
        meta = update_job_meta(
            dict(template["meta"]),
            rung=promotion.rung,
            rung_epochs=settings.rung_epochs()[promotion.rung],
            promoted_from_job=template.get("job_id"),
        )
        queue = FairShareQueue(template["queue"], connection=connection, serializer=JSONSerializer)
        try:
            queue.enqueue_call(
                template["func"],
                kwargs=kwargs,
                timeout=template["timeout"],
                result_ttl=template["result_ttl"],
                failure_ttl=template["failure_ttl"],
                retry=Retry(max=template["retries"]) if template["retries"] else None,
                description=template["description"],
                job_id=promotion.job_id,
                meta=meta,
                at_front=True,  # a free worker takes a due promotion before a new point
                unique=True,
            )
        except DuplicateJobError:
            continue  # enqueued by an earlier attempt
        enqueued.append(promotion.job_id)
        log.info("search point %s promoted to rung %d: job %s", promotion.point, promotion.rung, promotion.job_id)
    return enqueued


def promotion_started(connection: redis.Redis, search: str, point: str) -> None:
    """A promoted job began: its promotion is no longer pending."""
    connection.zrem(asha_pending_key(search), point)


def asha_runs(connection: redis.Redis, search: str) -> dict[str, dict[str, Any]]:
    """Every point's ASHA state in `search`: state (paused, promoted, finished), rung, run name, job id."""
    return {key.decode(): json.loads(value) for key, value in connection.hgetall(asha_runs_key(search)).items()}
