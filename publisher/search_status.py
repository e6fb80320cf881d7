"""One search at a glance: each point's state and progress, and the search's leaderboard.

Reads what schedule-search wrote (the search's definition and its points hash, keys in
worker.results), RQ's jobs, and runyard's run records for points whose RQ job has expired.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import redis
from rich.table import Table
from rq.job import Job, JobStatus

from contracts.job_meta import read_job_meta
from contracts.keys import run_key, search_points_key
from worker.asha import asha_runs
from worker.readable_jobs import fetch_jobs
from worker.results import get_search, leaderboard
from worker.search_stop import search_stopped

POINT_STATES = ("queued", "running", "finished", "pruned", "paused", "promoted", "failed", "missing")
FAILED_STATUSES = (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
ALL_ROWS = 100_000
DEFAULT_LIMIT = 50
URGENT_STATES = ("running", "failed", "missing")  # shown first when not every point fits
SCAN_COUNT = 2000  # points per state script call: a few milliseconds of Redis each

# One step of a scan of a search's points hash, each point's state computed in Redis (as
# _point_state names it: a finished job is pruned when its meta says so; a job RQ forgot is its
# run record's status, or missing). KEYS: points hash. ARGV: cursor, count, job key prefix, run
# record prefix. Returns the next cursor, then "state|index|fold position|point id" per point.
STATES_SCRIPT = """
local job_prefix, run_prefix = ARGV[3], ARGV[4]
local reply = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[2])
local out = {reply[1]}
local items = reply[2]
for i = 1, #items, 2 do
  local claim = cjson.decode(items[i + 1])
  local key = job_prefix .. claim.job_id
  -- A record that is not a hash is quarantined, not read: HGET's type error counts as no status.
  local status = redis.pcall('HGET', key, 'status')
  if type(status) == 'table' then status = false end
  local state = 'queued'
  if not status then
    local record = redis.call('GET', run_prefix .. claim.run_name)
    state = 'missing'
    if record then
      state = cjson.decode(record).status or 'finished'
    end
  elseif status == 'finished' then
    state = 'finished'
    local meta = redis.call('HGET', key, 'meta')
    if meta and string.find(meta, '"status": *"pruned"') then
      state = 'pruned'
    elseif meta and string.find(meta, '"status": *"paused"') then
      state = 'paused'  -- an ASHA run paused at its rung
    end
  elseif status == 'started' then
    state = 'running'
  elseif status == 'failed' or status == 'stopped' or status == 'canceled' then
    state = 'failed'
  end
  local info = claim.info
  local fold = info.fold
  if fold == nil or fold == cjson.null then
    fold = info.kind == 'aggregate' and 1000000 or -1
  end
  out[#out + 1] = state .. '|' .. info.index .. '|' .. fold .. '|' .. items[i]
end
return out
"""


def _point_state(job: Job | None, record: dict[str, Any] | None) -> tuple[str, str | None]:
    """(state, detail) of a point from its RQ job, or from its run record once RQ forgot the job."""
    if job is None:
        if record is not None:
            return record.get("status", "finished"), None
        return "missing", "no job: re-run the search to enqueue it"
    status = job.get_status(refresh=False)
    meta = read_job_meta(job.meta, job.id)
    if status == JobStatus.FINISHED:
        return (meta.status if meta.status in ("pruned", "paused") else "finished"), None
    if status == JobStatus.STARTED:
        return "running", job.worker_name
    if status in FAILED_STATUSES:
        return "failed", meta.failure_reason or str(status.value)
    if status == JobStatus.DEFERRED:
        return "queued", "waiting for its folds"
    return "queued", None


def point_states(connection: redis.Redis, name: str) -> dict[str, tuple[str, tuple[int, int]]]:
    """Point id -> (state, table position) of every point of search `name`, scanned in Redis."""
    script = connection.register_script(STATES_SCRIPT)
    found: dict[str, tuple[str, tuple[int, int]]] = {}
    cursor = "0"
    arguments = [SCAN_COUNT, Job.redis_job_namespace_prefix, run_key("")]
    while True:
        reply = script(keys=[search_points_key(name)], args=[cursor, *arguments])
        for item in reply[1:]:
            state, index, fold, point_id = item.decode().split("|", 3)
            found[point_id] = (state, (int(float(index)), int(float(fold))))
        cursor = reply[0].decode()
        if cursor == "0":
            return found


def collect_search_status(connection: redis.Redis, name: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any] | None:
    """Search `name`'s counts per state, and up to `limit` points in detail; None if no such search.

    Every point's state is counted (in Redis); the detailed rows (state, epoch, metric, params)
    are all points when there are at most `limit`, else the running, failed and missing ones
    first, then the others in order, up to `limit` (0: every point). Only those are read here.
    """
    definition = get_search(connection, name)
    states = point_states(connection, name)
    if definition is None and not states:
        return None
    metric = (definition or {}).get("metric") or {"name": "val_f1", "goal": "maximize"}
    is_asha = ((definition or {}).get("early_terminate") or {}).get("type") == "asha"
    if is_asha:
        states = _with_promotions(connection, name, states)
    ordered_ids = sorted(states, key=lambda point_id: states[point_id][1])
    counts = Counter(state for state, _position in states.values())
    if limit and len(ordered_ids) > limit:
        urgent = [point_id for point_id in ordered_ids if states[point_id][0] in URGENT_STATES]
        rest = [point_id for point_id in ordered_ids if states[point_id][0] not in URGENT_STATES]
        chosen = set((urgent + rest)[:limit])
        ordered_ids = [point_id for point_id in ordered_ids if point_id in chosen]
    raw_claims = connection.hmget(search_points_key(name), ordered_ids) if ordered_ids else []
    ordered = [(point_id, json.loads(raw)) for point_id, raw in zip(ordered_ids, raw_claims, strict=True) if raw]
    jobs = fetch_jobs(connection, [claim["job_id"] for _id, claim in ordered])
    raw_records = connection.mget([run_key(claim["run_name"]) for _id, claim in ordered]) if ordered else []
    rows = []
    for (point_id, claim), job, raw in zip(ordered, jobs, raw_records, strict=True):
        record = json.loads(raw) if raw else None
        state, detail = _point_state(job, record)
        meta = (job.meta if job is not None else {}) or {}
        progress = meta.get("progress") or {}
        value = None
        if record is not None:
            value = (record.get("metric") or {}).get("best")
        elif progress:
            value = progress.get(f"best_{metric['name']}", progress.get(metric["name"]))
        rows.append(
            {
                "index": claim["info"]["index"],
                "point": point_id,
                "kind": claim["info"]["kind"],
                "run_name": claim["run_name"],
                "job_id": claim["job_id"],
                "state": state,
                "detail": detail,
                "epoch": (record or {}).get("epochs_completed") or progress.get("epoch"),
                "epochs": progress.get("epochs") or meta.get("epochs"),
                "metric": value,
                "params": (record or {}).get("params") or meta.get("params") or claim["info"]["params"],
            }
        )
    if is_asha:
        _add_rungs(connection, name, rows)
    return {
        "search": name,
        "definition": definition,
        "metric": metric,
        "points": len(states),
        "counts": {state: counts.get(state, 0) for state in POINT_STATES},
        # A paused ASHA run is done until a later rung decision promotes it.
        "done": counts.get("finished", 0) + counts.get("pruned", 0) + counts.get("paused", 0),
        "shown": len(rows),
        "stopped": search_stopped(connection, name),
        "rows": rows,
    }


def _with_promotions(
    connection: redis.Redis, name: str, states: dict[str, tuple[str, tuple[int, int]]]
) -> dict[str, tuple[str, tuple[int, int]]]:
    """An ASHA search's point states, with `promoted` for a point whose promotion has not started yet."""
    runs = asha_runs(connection, name)
    return {
        point_id: (
            "promoted"
            if (runs.get(point_id) or {}).get("state") == "promoted" and state in ("queued", "paused", "missing")
            else state,
            position,
        )
        for point_id, (state, position) in states.items()
    }


def _add_rungs(connection: redis.Redis, name: str, rows: list[dict[str, Any]]) -> None:
    """An ASHA search's rows get the rung each run reached or is promoted to, and `promoted` while queued."""
    runs = asha_runs(connection, name)
    for row in rows:
        run = runs.get(row["point"]) or {}
        row["rung"] = run.get("rung", 0)
        if run.get("state") == "promoted" and row["state"] in ("queued", "paused", "missing"):
            row["state"], row["detail"] = "promoted", f"to rung {row['rung']}"
        elif row["state"] == "running":
            row["detail"] = f"to rung {row['rung']} on {row['detail']}"
        elif row["state"] == "paused":
            row["detail"] = f"paused at rung {row['rung']}"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def _parameter_names(definition: dict[str, Any] | None, rows: list[dict[str, Any]]) -> list[str]:
    names = list((definition or {}).get("parameters") or {})
    return names or sorted({name for row in rows for name in row.get("params") or {}})


def search_status_table(status: dict[str, Any]) -> Table:
    """The points of a search with state, epoch and metric: what `runyard status --search` prints."""
    counts = ", ".join(f"{count} {state}" for state, count in status["counts"].items() if count)
    method = (status["definition"] or {}).get("method", "?")
    title = f"search {status['search']} ({method}): {status['done']}/{status['points']} done; {counts}"
    stopped = status.get("stopped")
    table = Table(title=title, caption=f"STOPPED: {stopped['reason']}" if stopped else None)
    parameters = _parameter_names(status["definition"], status["rows"])
    rungs = any("rung" in row for row in status["rows"])
    for column in (
        "#",
        "run",
        "state",
        *(["rung"] if rungs else []),
        "epoch",
        status["metric"]["name"],
        *parameters,
        "note",
    ):
        table.add_column(column, justify="right" if column in ("#", "epoch") else "left", overflow="fold")
    for row in status["rows"]:
        epoch = f"{row['epoch'] or 0}/{row['epochs'] or '?'}" if row["kind"] != "aggregate" else "-"
        params = [_fmt(row["params"].get(name)) for name in parameters]
        note = row["detail"] or ("" if row["kind"] in ("run", "trial") else row["kind"])
        rung = [str(row.get("rung", "-"))] if rungs else []
        table.add_row(
            str(row["index"]), row["run_name"], row["state"], *rung, epoch, _fmt(row["metric"]), *params, note
        )
    return table


def search_leaderboard(connection: redis.Redis, name: str, limit: int = ALL_ROWS) -> list[dict[str, Any]]:
    """The search's finished points (k-fold sets as one row), best first by the search's metric.

    An ASHA search ranks by the deepest rung reached first: a run paused at rung 0 has not earned
    its place above one that trained to the end, whatever its early metric.
    """
    rows = leaderboard(connection, limit=ALL_ROWS, search=name)
    rows.sort(key=lambda row: (row.get("asha") or {}).get("rung", 0), reverse=True)  # stable: metric order kept
    return rows[:limit]


def search_leaderboard_table(rows: list[dict[str, Any]], name: str, definition: dict[str, Any] | None) -> Table:
    """Best first; a k-fold set shows mean ± std over its folds."""
    metric = ((definition or {}).get("metric") or {}).get("name", "val_f1")
    table = Table(title=f"search {name}: best {metric} first")
    parameters = _parameter_names(definition, rows)
    for column in ("#", "run", "status", metric, *parameters, "epochs"):
        table.add_column(column, justify="right" if column in ("#", "epochs") else "left")
    for rank, row in enumerate(rows, 1):
        if row.get("kind") == "kfold":
            value = f"{_fmt(row['mean'][metric])} ± {_fmt(row['std'][metric])} (k={row['k']})"
        else:
            value = _fmt((row.get("metric") or {}).get("best", row["best"].get("val_f1")))
        params = [_fmt((row.get("params") or {}).get(parameter)) for parameter in parameters]
        status = row.get("status", "finished")
        if row.get("asha") and status == "paused":
            status = f"paused at rung {row['asha']['rung']}"
        table.add_row(
            str(rank),
            row["run_name"],
            status,
            value,
            *params,
            str(row.get("epochs_completed", "-")),
        )
    return table
