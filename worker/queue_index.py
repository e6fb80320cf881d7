"""The owner index of each RQ queue: per owner, their queued job ids in order, so a take is O(owners).

RQ's queue list (rq:queue:<name>) stays the source of truth: `rq info` and rq-dashboard list every
job, and a job leaves the queue only when it leaves that list. Beside it, for each queue:
- `jobs`: the set of job ids in the index;
- `owners`: the set of owners with indexed jobs;
- `owner:<owner>`: that owner's indexed job ids, oldest first (a job put back at the front of
  RQ's list goes to the front of its owner's list too).

Every runyard enqueue goes through FairShareQueue (worker.fair_share), whose `push_job_id` adds
the job to the index in the same transaction as RQ's push. The fair-share take pops the chosen
owner's oldest id and LREMs it from RQ's list; an id that is no longer queued there (cancelled,
deleted by rq-dashboard, taken by a FIFO worker) is a stale entry the take drops and skips.

Jobs put on RQ's list by other tools (`rq requeue`, rq-dashboard's requeue, a plain rq.Queue) are
not indexed. The take notices it cheaply: more ids listed than indexed (LLEN > SCARD). It then
asks for a reindex, which walks RQ's list and the index in chunks of REINDEX_CHUNK ids, each its
own short Redis command, indexing what is missing (appended to its owner's list, in list order)
and dropping what is no longer queued. Duplicate ids on RQ's list can never be indexed twice; the
excess a reindex could not index is remembered for CHECKED_TTL_S so that it does not run again
for nothing, and a mismatch of any kind (stale entries too) is reconciled at most that often.
"""

from __future__ import annotations

import time

import redis
from redis.commands.core import Script
from rq import Queue
from rq.job import Job
from rq.utils import as_text

from contracts.keys import (
    queue_index_checked_key,
    queue_index_jobs_key,
    queue_index_lock_key,
    queue_index_owner_key,
    queue_index_owners_key,
)

REINDEX_CHUNK = 250  # ids per reindex command: ~30 µs each (the owner read), so a few ms
REINDEX_PASSES = 3  # a take that removes a job during a pass can hide a neighbour from it: walk again
CHECKED_TTL_S = 60
LOCK_TTL_MS = 10_000
OWNER_FIELD = "runyard_owner"  # a field on RQ's job hash rq:job:<id>: the job's owner, cached

# Lua shared by the take, the enqueue and the reindex. rq internals relied on (rq 3.0): a job is
# the hash Job.redis_job_namespace_prefix + id, whose `meta` field is the JSON serializer's output
# (JSONSerializer, so cjson can read the owner publish wrote there).
OWNER_LUA = """
-- RQ's JobStatus values. A record with another status is one RQ cannot read: it stays indexed and
-- a take hands it to the worker's fetch, which quarantines it (skipped, it would sit on RQ's list
-- for ever).
local rq_statuses = {queued = true, started = true, finished = true, failed = true, deferred = true,
                     scheduled = true, stopped = true, canceled = true}
local function no_longer_queued(status, origin, queue_name)
  if status and not rq_statuses[status] then return false end
  return (status and status ~= 'queued') or (origin and origin ~= queue_name)
end
local function owner_of(job_key)
  -- A record that is not a hash (a teammate's tool wrote it) has no owner; a take hands it to the
  -- worker's fetch, which quarantines it instead of this script failing every dequeue.
  if redis.call('TYPE', job_key).ok ~= 'hash' then return '' end
  local owner = redis.call('HGET', job_key, 'OWNER_FIELD')
  if owner then return owner end
  owner = ''
  local meta = redis.call('HGET', job_key, 'meta')
  if meta then
    local ok, decoded = pcall(cjson.decode, meta)
    if ok and type(decoded) == 'table' and type(decoded.owner) == 'string' then owner = decoded.owner end
  end
  redis.call('HSET', job_key, 'OWNER_FIELD', owner)
  return owner
end
local function index_job(jobs_key, owners_key, owner_prefix, job_prefix, id, at_front)
  if redis.call('SADD', jobs_key, id) == 0 then return 0 end
  local owner = owner_of(job_prefix .. id)
  redis.call(at_front and 'LPUSH' or 'RPUSH', owner_prefix .. owner, id)
  redis.call('SADD', owners_key, owner)
  return 1
end
""".replace("OWNER_FIELD", OWNER_FIELD)

# KEYS: jobs, owners. ARGV: owner list prefix, job key prefix, job id, 1 to put it first.
_INDEX = Script(
    None,
    (
        OWNER_LUA
        + """
return index_job(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4] == '1')
"""
    ).encode(),
)

# KEYS: jobs, owners. ARGV: owner list prefix, then job id and owner pairs (appended in order).
_INDEX_MANY = Script(
    None,
    b"""
for i = 2, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then
    redis.call('RPUSH', ARGV[1] .. ARGV[i + 1], ARGV[i])
    redis.call('SADD', KEYS[2], ARGV[i + 1])
  end
end
return 0
""",
)

# KEYS: queue, jobs, owners. ARGV: owner list prefix, job key prefix, queue name, chunk size,
# phase (`list`: index what RQ's list holds from offset ARGV[6]; `stale`: drop indexed ids no
# longer queued, SSCAN cursor ARGV[6]). Returns {next offset or cursor, 0 when the phase is done}.
_REINDEX_CHUNK = Script(
    None,
    (
        OWNER_LUA
        + """
local queue_key, jobs_key, owners_key = KEYS[1], KEYS[2], KEYS[3]
local owner_prefix, job_prefix, queue_name = ARGV[1], ARGV[2], ARGV[3]
local chunk, phase, at = tonumber(ARGV[4]), ARGV[5], ARGV[6]
if phase == 'list' then
  local start = tonumber(at)
  local ids = redis.call('LRANGE', queue_key, start, start + chunk - 1)
  for _, id in ipairs(ids) do index_job(jobs_key, owners_key, owner_prefix, job_prefix, id, false) end
  if #ids < chunk then return {'0', 0} end
  return {tostring(start + chunk), 1}
end
local scanned = redis.call('SSCAN', jobs_key, at, 'COUNT', chunk)
for _, id in ipairs(scanned[2]) do
  local key = job_prefix .. id
  local kind = redis.call('TYPE', key).ok
  if kind == 'none' then
    redis.call('SREM', jobs_key, id)
  elseif kind == 'hash' then
    local status = redis.call('HGET', key, 'status')
    local origin = redis.call('HGET', key, 'origin')
    if no_longer_queued(status, origin, queue_name) then redis.call('SREM', jobs_key, id) end
  end
end
return {scanned[1], scanned[1] == '0' and 0 or 1}
"""
    ).encode(),
)


def queue_name_of(queue_key: str) -> str:
    """The RQ queue name of an RQ queue key (rq:queue:<name>)."""
    return queue_key.removeprefix(Queue.redis_queue_namespace_prefix)


def index_keys(queue_name: str) -> list[str]:
    """The index keys a script gets for `queue_name`: jobs, owners."""
    return [queue_index_jobs_key(queue_name), queue_index_owners_key(queue_name)]


def index_job(client: redis.Redis, queue_name: str, job_id: str, at_front: bool = False) -> None:
    """Add a job just put on `queue_name`'s RQ list to its owner's list (a pipeline queues it)."""
    args = [queue_index_owner_key(queue_name, ""), Job.redis_job_namespace_prefix, job_id, 1 if at_front else 0]
    _INDEX(keys=index_keys(queue_name), args=args, client=client)


def index_jobs(client: redis.Redis, queue_name: str, jobs: list[tuple[str, str]]) -> None:
    """Add jobs just appended to `queue_name`'s RQ list, (job id, owner) in list order, in one command."""
    args = [queue_index_owner_key(queue_name, ""), *(value for job in jobs for value in job)]
    _INDEX_MANY(keys=index_keys(queue_name), args=args, client=client)


def reindex_queue(connection: redis.Redis, queue_name: str) -> bool:
    """Index what `queue_name`'s RQ list holds and the index lacks, drop what it no longer holds.

    One process at a time per queue; another one waits for it to finish. False when it waited.
    """
    lock = queue_index_lock_key(queue_name)
    token = f"{time.time()}"
    if not connection.set(lock, token, nx=True, px=LOCK_TTL_MS):
        deadline = time.monotonic() + LOCK_TTL_MS / 1000
        while connection.exists(lock) and time.monotonic() < deadline:
            time.sleep(0.02)
        return False
    queue_key = f"{Queue.redis_queue_namespace_prefix}{queue_name}"
    keys = [queue_key, *index_keys(queue_name)]
    base = [queue_index_owner_key(queue_name, ""), Job.redis_job_namespace_prefix, queue_name, REINDEX_CHUNK]
    try:
        for _ in range(REINDEX_PASSES):
            for phase in ("list", "stale"):
                at, more = "0", 1
                while more:
                    at, more = _REINDEX_CHUNK(keys=keys, args=[*base, phase, at], client=connection)
                    at = as_text(at)
                    connection.pexpire(lock, LOCK_TTL_MS)
            listed, indexed = connection.llen(queue_key), connection.scard(keys[1])
            connection.set(queue_index_checked_key(queue_name), max(0, listed - indexed), ex=CHECKED_TTL_S)
            if listed <= indexed:
                break
    finally:
        if as_text(connection.get(lock) or b"") == token:
            connection.delete(lock)
    return True


def indexed_owners(connection: redis.Redis, queue_name: str) -> dict[str, list[str]]:
    """owner -> their indexed job ids on `queue_name`, oldest first (stale entries included)."""
    owners = sorted(as_text(owner) for owner in connection.smembers(queue_index_owners_key(queue_name)))
    return {
        owner: [as_text(job_id) for job_id in connection.lrange(queue_index_owner_key(queue_name, owner), 0, -1)]
        for owner in owners
    }
