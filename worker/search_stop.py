"""Stopping a search whose points all fail the same way: a bad data dir fails a few, not 10,000.

Every data error of a search's point is counted by its message in Redis; when one message has
come STOP_AFTER_DATA_ERRORS times, the search is stopped: one record with the reason (shown by
`runyard status --search`), its queued points are cancelled (failure_reason `search_stopped`),
and a point dequeued meanwhile fails at once without training. Publishing the search again
(after fixing the data) clears the stop and re-runs the cancelled points.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from rq.job import JobStatus

from contracts.job_meta import set_failure
from contracts.keys import search_data_errors_key, search_points_key, search_stopped_key
from trainer.data import DataError
from worker.readable_jobs import fetch_jobs

STOP_AFTER_DATA_ERRORS = 3
CANCEL_CHUNK = 500
WAITING_STATES = (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED)
MESSAGE_CHARS = 500  # a message is counted by its start; a bad data dir's is the same for every point

# KEYS: error counts (hash), stop record. ARGV: message, limit, stop record JSON.
# Returns 1 when this error stopped the search (exactly one caller sees 1).
RECORD_SCRIPT = """
local count = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if count >= tonumber(ARGV[2]) and redis.call('SET', KEYS[2], ARGV[3], 'NX') then
  return 1
end
return 0
"""


class SearchStopped(DataError):
    """The point's search was stopped after repeated identical data errors; the point did not train."""


def record_data_error(connection: redis.Redis, search: str, message: str, run_name: str | None = None) -> bool:
    """Count one data error of `search`; True when it is the one that stops the search."""
    message = message[:MESSAGE_CHARS]
    reason = (
        f"stopped after {STOP_AFTER_DATA_ERRORS} points failed with the same data error: {message} "
        "(fix the data, then publish the search again)"
    )
    record = json.dumps({"reason": reason, "message": message, "at": time.time(), "last_run": run_name})
    script = connection.register_script(RECORD_SCRIPT)
    keys = [search_data_errors_key(search), search_stopped_key(search)]
    return bool(script(keys=keys, args=[message, STOP_AFTER_DATA_ERRORS, record]))


def search_stopped(connection: redis.Redis, search: str) -> dict[str, Any] | None:
    """The stop record of `search` ({reason, message, at, last_run}), or None while it runs."""
    raw = connection.get(search_stopped_key(search))
    return json.loads(raw) if raw else None


def clear_stop(connection: redis.Redis | redis.client.Pipeline, search: str) -> None:
    """Forget the stop and the error counts (publishing the search again does this)."""
    connection.delete(search_stopped_key(search), search_data_errors_key(search))


def cancel_waiting_points(connection: redis.Redis, search: str) -> int:
    """Cancel every queued, deferred or scheduled job of the search's points; how many were cancelled."""
    cancelled = 0
    job_ids = [json.loads(claim)["job_id"] for claim in connection.hvals(search_points_key(search))]
    for start in range(0, len(job_ids), CANCEL_CHUNK):
        jobs = fetch_jobs(connection, job_ids[start : start + CANCEL_CHUNK])
        for job in jobs:
            if job is None or job.get_status(refresh=False) not in WAITING_STATES:
                continue
            set_failure(job.meta, "search_stopped", f"search {search} was stopped before this point ran")
            job.save_meta()
            try:
                job.cancel()
            except Exception:  # a worker took it meanwhile: it fails at its start instead
                continue
            cancelled += 1
    return cancelled
