"""Fair share between people: a free worker takes the queued job whose owner used the least GPU time.

Within the highest non-empty priority a worker serves, the owner with the least decayed GPU time
(Slurm-style: usage halves every RUNYARD_FAIRSHARE_HALF_LIFE, default 24 h) goes first, oldest job
first within an owner; owners at their quota (worker.quotas) are skipped. The choice and the take
are one Lua script, so two workers never take the same job. Jobs stay in RQ's own queue lists until
taken, so `rq info` and rq-dashboard still list every queued job.

GPU time is what each job held a GPU for: a job's entry in RUNNING_KEY is written at the take, and
its owner is charged the time since the entry's last charge while it runs (every monitoring
interval of the worker) and when it ends. RUNYARD_SCHEDULING=fifo turns all of this off (RQ's own
first-in first-out dequeue).

The take reads the candidates from each queue's owner index (worker.queue_index): it ranks the
owners with queued jobs, pops the chosen owner's oldest id and removes it from RQ's list, so its
cost grows with the number of owners, not of queued jobs (see BENCHMARKS.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import redis
from redis.commands.core import Script
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.utils import as_text

from contracts.keys import (
    HOURLY_KEY,
    QUOTA_KEY,
    RUNNING_KEY,
    USAGE_AT_KEY,
    USAGE_KEY,
    queue_index_checked_key,
    queue_index_owner_key,
)
from worker.queue_index import OWNER_LUA, index_job, index_keys, queue_name_of, reindex_queue

NOBODY = ""  # the owner of a job enqueued without one (by plain RQ, or before owners existed)

HALF_LIFE_ENV = "RUNYARD_FAIRSHARE_HALF_LIFE"
DEFAULT_HALF_LIFE_S = 24 * 3600
SCHEDULING_ENV = "RUNYARD_SCHEDULING"  # fairshare (default) | fifo
# How often a worker asks again while every queued job waits for its owner's quota (with all
# queues empty it blocks in BLPOP instead, as RQ does).
POLL_INTERVAL_S = 0.5
# A running entry not charged for this long belongs to a worker that died; its job is not counted.
STALE_RUNNING_S = 300
# Between the take and RQ marking the job started is well under a second; an entry whose job is
# queued again after this long was put back (follow-git, a janitor) and no longer runs.
REQUEUED_AFTER_S = 30
# One take drops at most this many stale index entries (O(1) each), and at most MAX_MISSES that
# looked queued but were not on RQ's list (an LREM over the whole list each), then asks again.
MAX_SKIPS = 200
MAX_MISSES = 4

# GPU hours per owner are kept this long (`runyard status --owners --window` reads at most this).
HOURLY_KEPT_H = 7 * 24

# Shared by the take and the charge: decay an owner's usage to `now` and add `extra` seconds.
_DECAY_LUA = """
local function decayed(usage_key, usage_at_key, owner, now, half_life)
  local usage = tonumber(redis.call('HGET', usage_key, owner) or '0')
  local at = tonumber(redis.call('HGET', usage_at_key, owner) or tostring(now))
  if now > at then usage = usage * math.pow(2, -(now - at) / half_life) end
  return usage
end
local function charge(usage_key, usage_at_key, owner, now, half_life, extra)
  local usage = decayed(usage_key, usage_at_key, owner, now, half_life) + extra
  redis.call('HSET', usage_key, owner, tostring(usage))
  redis.call('HSET', usage_at_key, owner, tostring(now))
end
local function charge_hours(usage_key, usage_at_key, hourly_key, owner, now, half_life, held)
  charge(usage_key, usage_at_key, owner, now, half_life, held)
  if held <= 0 then return end
  local hour = math.floor(now / 3600)
  local field = owner .. '\t' .. tostring(hour)
  if redis.call('HEXISTS', hourly_key, field) == 0 then
    -- The owner's first charge this hour: drop every owner's hours older than anyone reads.
    for _, old in ipairs(redis.call('HKEYS', hourly_key)) do
      local old_hour = tonumber(string.match(old, '\t(%d+)$'))
      if old_hour and old_hour <= hour - HOURLY_KEPT_H then redis.call('HDEL', hourly_key, old) end
    end
  end
  redis.call('HINCRBYFLOAT', hourly_key, field, held)
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
""".replace("HOURLY_KEPT_H", str(HOURLY_KEPT_H))

# rq internals this script relies on (rq 3.0): a queue is a Redis list of job ids, taken from the
# left (RQ's LPOP); a job is the hash Job.redis_job_namespace_prefix + id, whose `status` field is
# RQ's JobStatus and `origin` its queue's name. Removing the id from the list is what RQ's own pop
# does; the worker then registers the job (StartedJobRegistry, execution) as after any dequeue.
# The candidates come from each queue's owner index (worker.queue_index), not from RQ's list.
# KEYS: per queue (in priority order) its key, index jobs, index owners, checked; then usage,
# usage_at, running, quota, hourly.
# ARGV: number of queues, half-life s, job key prefix, stale s, requeued-after s, the (1-based)
# queue index and id of a job the caller popped with BLPOP (0 and '' for none: it goes back first),
# then per queue its name and its owner lists' key prefix.
# Returns {index of the queue (1-based), job id}, {0, jobs queued} when no job may be taken,
# {-1, 0} when it dropped MAX_SKIPS stale entries (ask again) and {-2, queue index} when that
# queue lists jobs its index lacks (reindex it, then ask again).
TAKE_LUA = (
    (
        _DECAY_LUA
        + OWNER_LUA
        + """
local nq = tonumber(ARGV[1])
local usage_key, usage_at_key = KEYS[4 * nq + 1], KEYS[4 * nq + 2]
local running_key, quota_key, hourly_key = KEYS[4 * nq + 3], KEYS[4 * nq + 4], KEYS[4 * nq + 5]
local half_life, prefix = tonumber(ARGV[2]), ARGV[3]
local stale, requeued_after = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock()
local function queue_keys(q) return KEYS[4 * q - 3], KEYS[4 * q - 2], KEYS[4 * q - 1], KEYS[4 * q] end
local function queue_args(q) return ARGV[6 + 2 * q], ARGV[7 + 2 * q] end
if ARGV[6] ~= '0' then
  local q = tonumber(ARGV[6])
  local queue_key, jobs_key, owners_key = queue_keys(q)
  local _, owner_prefix = queue_args(q)
  redis.call('LPUSH', queue_key, ARGV[7])
  index_job(jobs_key, owners_key, owner_prefix, prefix, ARGV[7], true)
end

-- Who runs what now, dropping entries of jobs that no longer run.
local running, uncharged = {}, {}
local entries = redis.call('HGETALL', running_key)
for i = 1, #entries, 2 do
  local owner, last = string.match(entries[i + 1], '^(.*)\\t([%d%.e%+%-]+)$')
  local status = redis.call('HGET', prefix .. entries[i], 'status')
  last = tonumber(last)
  if owner == nil or last == nil or now - last > stale or status == false
     or (status == 'queued' and now - last > requeued_after) then
    redis.call('HDEL', running_key, entries[i])
  elseif status ~= 'queued' and status ~= 'started' then
    -- It ended a moment ago and its worker has not charged it yet (it does just after RQ marks
    -- the job ended): charge the owner here, or that charge finds no entry and the time since
    -- the job's last charge (often all of a short job) would never count.
    charge_hours(usage_key, usage_at_key, hourly_key, owner, now, half_life, math.max(0, now - last))
    redis.call('HDEL', running_key, entries[i])
  else
    running[owner] = (running[owner] or 0) + 1
    uncharged[owner] = (uncharged[owner] or 0) + math.max(0, now - last)
  end
end

-- Whether an indexed id can be taken from the queue named queue_name: it is still queued there,
-- or its record is one RQ cannot read (not a hash, an unknown status: the fetch quarantines it).
local function takeable(key, queue_name)
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then return false end
  if kind ~= 'hash' then return true end
  local status, origin = redis.call('HGET', key, 'status'), redis.call('HGET', key, 'origin')
  return not no_longer_queued(status, origin, queue_name)
end

local usage_of = {}
local skips, misses = 0, 0
for q = 1, nq do
  local queue_key, jobs_key, owners_key, checked_key = queue_keys(q)
  local queue_name, owner_prefix = queue_args(q)
  local listed = redis.call('LLEN', queue_key)
  local indexed = redis.call('SCARD', jobs_key)
  if listed == 0 then
    if indexed > 0 or redis.call('EXISTS', owners_key) == 1 then  -- all stale (the queue was emptied)
      for _, owner in ipairs(redis.call('SMEMBERS', owners_key)) do redis.call('UNLINK', owner_prefix .. owner) end
      redis.call('UNLINK', jobs_key, owners_key)
    end
  else
    local checked = redis.call('GET', checked_key)
    if (checked == false and listed ~= indexed) or listed > indexed + tonumber(checked or '0') then
      return {-2, q}
    end
    local candidates = {}
    for _, owner in ipairs(redis.call('SMEMBERS', owners_key)) do
      local quota = redis.call('HGET', quota_key, owner)
      local held = running[owner] or 0
      if quota == false or held < tonumber(quota) then
        if usage_of[owner] == nil then
          usage_of[owner] = decayed(usage_key, usage_at_key, owner, now, half_life) + (uncharged[owner] or 0)
        end
        table.insert(candidates, {owner, usage_of[owner], held})
      end
    end
    table.sort(candidates, function(a, b)
      if a[2] ~= b[2] then return a[2] < b[2] end
      if a[3] ~= b[3] then return a[3] < b[3] end
      return a[1] < b[1]
    end)
    for _, candidate in ipairs(candidates) do
      local owner = candidate[1]
      while true do
        local id = redis.call('LPOP', owner_prefix .. owner)
        if not id or redis.call('EXISTS', owner_prefix .. owner) == 0 then redis.call('SREM', owners_key, owner) end
        if not id then break end
        -- An id no longer in the index set was dropped as stale (or taken) already.
        if redis.call('SREM', jobs_key, id) == 1 and takeable(prefix .. id, queue_name) then
          -- LREM scans from the head; an id the list no longer holds costs a whole scan.
          if redis.call('LREM', queue_key, 1, id) == 1 then
            redis.call('HSET', running_key, id, owner .. '\\t' .. string.format('%.6f', now))
            return {q, id}
          end
          misses = misses + 1
        end
        skips = skips + 1
        if skips >= MAX_SKIPS or misses >= MAX_MISSES then return {-1, 0} end
      end
    end
  end
end
local queued = 0
for q = 1, nq do queued = queued + redis.call('LLEN', (queue_keys(q))) end
return {0, queued}
"""
    )
    .replace("MAX_SKIPS", str(MAX_SKIPS))
    .replace("MAX_MISSES", str(MAX_MISSES))
)

# KEYS: usage, usage_at, running, hourly. ARGV: job id, half-life s, 1 when the job ended (0: still runs).
# Charges the job's owner the time since its entry's last charge; returns the seconds charged.
CHARGE_LUA = (
    _DECAY_LUA
    + """
local usage_key, usage_at_key, running_key, hourly_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local entry = redis.call('HGET', running_key, ARGV[1])
if not entry then return '0' end
local owner, last = string.match(entry, '^(.*)\\t([%d%.e%+%-]+)$')
local now = clock()
local held = math.max(0, now - tonumber(last or now))
charge_hours(usage_key, usage_at_key, hourly_key, owner or '', now, tonumber(ARGV[2]), held)
if ARGV[3] == '1' then
  redis.call('HDEL', running_key, ARGV[1])
else
  redis.call('HSET', running_key, ARGV[1], (owner or '') .. '\\t' .. string.format('%.6f', now))
end
return tostring(held)
"""
)


_TAKE = Script(None, TAKE_LUA.encode())
_REINDEX = -2  # the take's answer when a queue lists jobs its index lacks (-1: ask again)


def job_owner(context: dict[str, Any] | None) -> str:
    """The owner a job's publish context names: `owner`, else the publishing `user`."""
    context = context or {}
    return str(context.get("owner") or context.get("user") or NOBODY)


def half_life_s() -> float:
    """RUNYARD_FAIRSHARE_HALF_LIFE in seconds (e.g. 86400, 90m, 24h, 2d), default 24 h."""
    text = os.environ.get(HALF_LIFE_ENV, "").strip().lower()
    if not text:
        return float(DEFAULT_HALF_LIFE_S)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = 0.0
    if value <= 0:
        raise ValueError(f"{HALF_LIFE_ENV}={text!r} is not a positive duration like 86400, 90m, 24h or 2d")
    return value


def fair_share_enabled() -> bool:
    """False when RUNYARD_SCHEDULING=fifo (RQ's plain first-in first-out dequeue)."""
    mode = os.environ.get(SCHEDULING_ENV, "fairshare").strip().lower() or "fairshare"
    if mode not in ("fairshare", "fifo"):
        raise ValueError(f"{SCHEDULING_ENV}={mode!r} is not one of: fairshare, fifo")
    return mode == "fairshare"


def take_job_id(
    connection: redis.Redis,
    queue_keys: list[str],
    half_life: float | None = None,
    popped: tuple[int, str] | None = None,
) -> tuple[int, str] | None:
    """Atomically pick and remove the fair-share choice from `queue_keys`: (queue index, job id).

    `popped` (queue index, job id) is a job the caller took off a queue by BLPOP: it goes back
    first, in the same atomic step, and competes like any other.
    """
    return _take(connection, queue_keys, half_life, popped)[0]


def _take(
    connection: redis.Redis, queue_keys: list[str], half_life: float | None, popped: tuple[int, str] | None
) -> tuple[tuple[int, str] | None, int]:
    """The take, and how many jobs stay queued when it took none."""
    names = [queue_name_of(key) for key in queue_keys]
    keys = [key for key, name in zip(queue_keys, names, strict=True) for key in _queue_keys(key, name)]
    keys += [USAGE_KEY, USAGE_AT_KEY, RUNNING_KEY, QUOTA_KEY, HOURLY_KEY]
    base = [len(queue_keys), half_life or half_life_s(), Job.redis_job_namespace_prefix, STALE_RUNNING_S]
    base += [REQUEUED_AFTER_S]
    per_queue = [value for name in names for value in (name, queue_index_owner_key(name, ""))]
    while True:
        put_back = [popped[0] + 1, popped[1]] if popped else [0, ""]
        code, value = _TAKE(keys=keys, args=[*base, *put_back, *per_queue], client=connection)
        popped = None  # back on its queue (and in the index) now
        code = int(code)
        if code == _REINDEX:
            reindex_queue(connection, names[int(value) - 1])
        elif code == 0:
            return None, int(value)
        elif code > 0:
            return (code - 1, as_text(value)), 0


def _queue_keys(queue_key: str, queue_name: str) -> list[str]:
    return [queue_key, *index_keys(queue_name), queue_index_checked_key(queue_name)]


def charge_gpu_time(connection: redis.Redis, job_id: str, ended: bool) -> float:
    """Charge the owner of a running (or just ended) job for the GPU time since its last charge."""
    keys = [USAGE_KEY, USAGE_AT_KEY, RUNNING_KEY, HOURLY_KEY]
    return float(connection.eval(CHARGE_LUA, len(keys), *keys, job_id, half_life_s(), 1 if ended else 0))


def decayed_usage(connection: redis.Redis, half_life: float | None = None) -> dict[str, float]:
    """Every owner's GPU seconds decayed to now (Redis's clock), running jobs' uncharged time included."""
    half_life = half_life or half_life_s()
    seconds, micros = connection.time()
    now = seconds + micros / 1e6
    usage = {as_text(k): float(v) for k, v in connection.hgetall(USAGE_KEY).items()}
    usage_at = {as_text(k): float(v) for k, v in connection.hgetall(USAGE_AT_KEY).items()}
    decayed = {
        owner: value * 2 ** (-max(0.0, now - usage_at.get(owner, now)) / half_life) for owner, value in usage.items()
    }
    for owner, last in running_entries(connection).values():
        decayed[owner] = decayed.get(owner, 0.0) + max(0.0, now - last)
    return decayed


def gpu_seconds_since(connection: redis.Redis, since: float) -> dict[str, float]:
    """Every owner's charged GPU seconds in the hours from `since` (whole hours) to now."""
    first_hour = int(since // 3600)
    totals: dict[str, float] = {}
    for field, seconds in connection.hgetall(HOURLY_KEY).items():
        owner, _, hour = as_text(field).rpartition("\t")
        if hour.isdigit() and int(hour) >= first_hour:
            totals[owner] = totals.get(owner, 0.0) + float(seconds)
    return totals


def running_entries(connection: redis.Redis) -> dict[str, tuple[str, float]]:
    """job id -> (owner, time of its last charge) for the jobs that hold a GPU now."""
    entries = {}
    for job_id, entry in connection.hgetall(RUNNING_KEY).items():
        owner, _, last = as_text(entry).rpartition("\t")
        entries[as_text(job_id)] = (owner, float(last or 0))
    return entries


class FairShareQueue(Queue):
    """RQ's Queue whose `dequeue_any` (what rq.Worker calls to get its next job) takes by fair share.

    `dequeue_any` is the classmethod rq.Worker.dequeue_job_and_maintain_ttl calls through the
    worker's `queue_class`; overriding it leaves the rest of RQ's job life (registries, executions,
    retries) as it is. With RUNYARD_SCHEDULING=fifo it is RQ's own.

    Every job RQ puts on a FairShareQueue goes through `push_job_id` (enqueue, enqueue_many, a
    retry, a requeue, a dependent made ready), which also adds it to the queue's owner index
    (worker.queue_index) in the same transaction; RQ's unique enqueue pushes in its own script,
    so `_enqueue_job` indexes after it.
    """

    def push_job_id(self, job_id: str, pipeline: Any = None, at_front: bool = False) -> None:
        if pipeline is not None:
            super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
            index_job(pipeline, self.name, job_id, at_front)
            return
        with self.connection.pipeline() as own:
            super().push_job_id(job_id, pipeline=own, at_front=at_front)
            index_job(own, self.name, job_id, at_front)
            own.execute()

    def _enqueue_job(self, job: Job, pipeline: Any = None, at_front: bool = False, unique: bool = False) -> Job:
        # rq internal (rq 3.0 Queue._enqueue_job): the one step every enqueue and requeue takes.
        job = super()._enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        if unique and self._is_async:  # pushed by RQ's save_unique_job script, not push_job_id
            index_job(self.connection, self.name, job.id, at_front)
        return job

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: redis.Redis,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        queues = list(queues)
        if not fair_share_enabled():
            return super().dequeue_any(queues, timeout, connection, job_class, serializer, death_penalty_class)
        half_life = half_life_s()
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = [queue.key for queue in queues]
        popped = None
        while True:
            taken, still_queued = _take(connection, keys, half_life, popped)
            popped = None
            if taken is not None:
                index, job_id = taken
                # rq internal (rq 3.0 Queue._fetch_dequeued_job): RQ's own post-pop step, shared by
                # its dequeue_any. It fetches the job with the worker's job class, returns None for
                # a job deleted meanwhile and attaches job_id/queue to a fetch error (worker.allow_listed_job's
                # quarantine reads them).
                fetched = cls._fetch_dequeued_job(
                    connection,
                    queues[index].key,
                    job_id,
                    job_class=job_class,
                    serializer=serializer,
                    death_penalty_class=death_penalty_class,
                )
                if fetched is not None:
                    return fetched
                connection.hdel(RUNNING_KEY, job_id)
                continue
            if deadline is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                # What RQ's BLPOP-based dequeue raises on a timeout; the worker loop expects it.
                raise DequeueTimeout(timeout, keys)
            if still_queued:  # jobs wait for their owners' quotas: ask again shortly
                time.sleep(min(POLL_INTERVAL_S, left))
                continue
            # Every queue is empty: block like RQ does until a job arrives, then hand it to the
            # take (which puts it back first), so it starts as quickly as with RQ's dequeue.
            arrived = connection.blpop(keys, max(1, int(left)))
            if arrived is None:
                raise DequeueTimeout(timeout, keys)
            popped = (keys.index(as_text(arrived[0])), as_text(arrived[1]))
