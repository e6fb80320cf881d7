"""Scale: what publishing, status, cancel and the janitor fleet cost as work grows (issue 16).

Each size runs on a private redis-server with AOF on (appendfsync everysec), emptied first:
  - publishing a grid of N points (what `schedule-search FILE` calls: load_search, then
    publish_search, in a process of its own): wall time, the publisher's peak RSS
    (the process's own, from wait4), and Redis's SLOWLOG maximum (commands of 1 ms or more; 0: none):
    the longest the server was blocked by one command, and by one claim script call;
  - `runyard status --search NAME --json` on those N queued points;
  - `runyard cancel RUN_NAME` of the last point, with N queued: wall time and the commands Redis
    processed for it (INFO stats delta).
Then the fleet: K idle real worker processes (`python -m worker.process`, default janitor and
heartbeat settings) for a window; commands per second from INFO commandstats deltas, and a fit
of a*W + b*W^2 through them to model 100 and 400 workers.

Each step runs the CLI in a subprocess with PYTHONPATH set to a code tree: `--before TREE` (e.g.
a `git worktree add --detach /tmp/main-wt main`) runs main's code side by side with this tree's,
and the report starts with both trees' publishing figures in one table.

    python benchmarks/scale.py --sizes 10000,50000,100000 --fleet 1,4,8,16 --before /tmp/main-wt
    python benchmarks/scale.py --sizes 2000 --fleet 1,2 --window 15        # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import start_redis as start_private_redis  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    """A private redis-server with AOF on, logging every command of 1 ms or more to SLOWLOG.

    Not every command: 100,000 points are ~250,000 commands, more than a SLOWLOG of 200,000 keeps
    (the longest of the first ones went unseen), and a log of every command with its arguments
    holds hundreds of MB in the server itself, which makes its AOF-rewrite fork slower.
    """
    return start_private_redis(
        directory,
        *("--save", ""),
        *("--appendonly", "yes", "--appendfsync", "everysec"),
        *("--slowlog-log-slower-than", "1000", "--slowlog-max-len", "200000"),
    )


def tree_env(tree: Path, url: str, home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANDB_", "REDIS_URL"))}
    return env | {
        "PYTHONPATH": str(tree),
        "REDIS_URL": url,
        "RUNYARD_HOME": str(home),
        "WANDB_MODE": "disabled",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }


def cli(module_call: str, *args: str) -> list[str]:
    """A console script of the tree on PYTHONPATH (the installed ones import /work/main's code)."""
    return [sys.executable, "-c", f"import sys; {module_call}", *args]


RUNYARD = "from runyard.cli.main import main; sys.exit(main())"

# The same calls timed inside the process, imports excluded (on a busy 2-core box importing the
# CLI alone takes seconds of wall time): wall and CPU seconds of the call. The functions named
# exist with these signatures on main too.
TIMED = """
import json, os, sys, time
import redis
connection = redis.Redis.from_url(os.environ["REDIS_URL"])
what, argument = sys.argv[1], sys.argv[2]
if what == "publish":
    import schedule_search.methods.grid as grid
    from schedule_search.publish import publish_search
    from schedule_search.search import load_search
    grid.MAX_POINTS = max(grid.MAX_POINTS, int(os.environ.get("SCALE_POINTS", "0")))  # sizes past the limit
    call = lambda: publish_search(connection, load_search(argument))
elif what == "status":
    from publisher.search_status import collect_search_status
    call = lambda: collect_search_status(connection, argument)
else:
    from publisher.cancel import cancel_job, find_jobs
    call = lambda: [cancel_job(connection, job) for job in find_jobs(connection, [argument])]
wall, cpu = time.perf_counter(), time.process_time()
call()
print(json.dumps({"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}))
"""


def timed_call(what: str, argument: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Wall and CPU seconds of one publish, status or cancel call, run in the tree."""
    measured = run_measured([sys.executable, "-c", TIMED, what, argument], env, timeout)
    if measured.get("rc") != 0:
        return {"wall_s": None, "cpu_s": None}
    return json.loads(measured["stdout"].splitlines()[-1])


def run_measured(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Wall seconds and exit status of one process run in its tree; None figures past `timeout`."""
    started = time.perf_counter()
    # In the tree: `python -c` and `-m` put the current directory before PYTHONPATH.
    process = subprocess.Popen(
        command, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"seconds": None, "peak_mb": None, "rc": None, "timed_out": True}
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "rc": process.returncode, "stdout": stdout, "stderr": stderr[-2000:]}


def peak_rss_mb(command: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """run_measured plus the process's peak RSS, read by a wrapper whose only child it is."""
    wrapper = (
        "import os, subprocess, sys, json\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
        "out, err = p.communicate()\n"
        "import resource\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "report = {'peak_mb': round(peak), 'rc': p.returncode, 'err': err.decode()[-2000:], 'out': out.decode()}\n"
        "sys.stdout.write(json.dumps(report))\n"
    )
    measured = run_measured([sys.executable, "-c", wrapper, *command], env, timeout)
    if measured.get("timed_out"):
        return measured
    inner = json.loads(measured["stdout"])
    return {
        "seconds": measured["seconds"],
        "peak_mb": inner["peak_mb"],
        "rc": inner["rc"],
        "stderr": inner["err"],
        "stdout": inner["out"],
    }


def write_grid(path: Path, name: str, points: int, data_dir: Path) -> None:
    """A grid of `points` points: lr x seed (lr values first)."""
    seeds = 100
    lrs = max(1, points // seeds)
    lr_values = ", ".join(f"{1e-4 * (index + 1):.6g}" for index in range(lrs))
    seed_values = ", ".join(str(index) for index in range(seeds))
    path.write_text(
        f"name: {name}\nmethod: grid\n"
        f"fixed: {{model: test_resnet, pretrained: false, data_dir: {data_dir}, epochs: 1, resize: 32x32}}\n"
        f"parameters:\n  lr: {{values: [{lr_values}]}}\n  seed: {{values: [{seed_values}]}}\n"
    )


def slowlog(connection: redis.Redis) -> dict[str, Any]:
    """The longest command since the last reset (ms, and its name), and the longest script call."""
    entries = connection.slowlog_get(200000)
    longest = max(entries, key=lambda entry: entry["duration"], default={"duration": 0, "command": b"-"})
    scripts = [
        entry["duration"] for entry in entries if entry["command"].split(b" ")[0].upper() in (b"EVALSHA", b"EVAL")
    ]
    return {
        "slowlog_max_ms": round(longest["duration"] / 1000, 1),
        "slowlog_max_command": longest["command"].split(b" ")[0].decode(errors="replace"),
        "script_max_ms": round(max(scripts, default=0) / 1000, 1),
    }


def commands_processed(connection: redis.Redis) -> int:
    return int(connection.info("stats")["total_commands_processed"])


def measure_size(tree: Path, url: str, work: Path, points: int, timeout: float) -> dict[str, Any]:
    connection = redis.Redis.from_url(url, socket_timeout=300)
    connection.flushall(asynchronous=True)
    # Until Redis's background thread has freed the previous size's keys, every command waits on
    # it (the first claim call after 100,000 jobs took 100-370 ms): measure on a quiet server.
    deadline = time.monotonic() + 60
    while connection.info("memory").get("lazyfree_pending_objects") and time.monotonic() < deadline:
        time.sleep(0.05)
    home = work / "home"
    env = tree_env(tree, url, home)
    name = f"s{points}"
    search_file = work / f"{name}.yaml"
    write_grid(search_file, name, points, work / "data")
    row: dict[str, Any] = {"points": points}

    connection.slowlog_reset()
    # The call schedule-search makes (expand, validate, publish), timed inside its process.
    command = [sys.executable, "-c", TIMED, "publish", str(search_file)]
    published = peak_rss_mb(command, env | {"SCALE_POINTS": str(points)}, timeout)
    row["publish_s"], row["publish_peak_mb"] = published["seconds"], published["peak_mb"]
    if published.get("rc") not in (0, None):
        row["publish_error"] = published["stderr"][-500:]
    timed = json.loads(published["stdout"].splitlines()[-1]) if published.get("rc") == 0 else {}
    row["publish_call_wall_s"], row["publish_call_cpu_s"] = timed.get("wall_s"), timed.get("cpu_s")
    row |= {f"publish_{key}": value for key, value in slowlog(connection).items()}
    queued = sum(connection.llen(key) for key in connection.scan_iter("rq:queue:*"))
    row["queued"] = queued
    figures = f"{row['publish_s']} s (the call {row['publish_call_wall_s']} s, {row['publish_call_cpu_s']} CPU s)"
    figures += f", peak {row['publish_peak_mb']} MB, {queued} queued"
    log(f"  publish {points}: {figures}, slowlog max {row['publish_slowlog_max_ms']} ms")
    log(f"    ({row['publish_slowlog_max_command']}; claim script calls at most {row['publish_script_max_ms']} ms)")

    connection.slowlog_reset()
    status = run_measured(cli(RUNYARD, "status", "--search", name, "--json"), env, timeout)
    row["status_s"] = status["seconds"]
    row["status_slowlog_max_ms"] = slowlog(connection)["slowlog_max_ms"]
    row |= {f"status_call_{key}": value for key, value in timed_call("status", name, env, timeout).items()}
    call = f"{row['status_call_wall_s']} s ({row['status_call_cpu_s']} CPU s)"
    log(f"  status --search: {row['status_s']} s; the call {call}")

    last = f"{name}-{points:0{max(3, len(str(points)))}d}"
    before = commands_processed(connection)
    connection.slowlog_reset()
    cancelled = run_measured(cli(RUNYARD, "cancel", last, "--json"), env, timeout)
    row["cancel_s"] = cancelled["seconds"]
    row["cancel_commands"] = commands_processed(connection) - before - 1
    row["cancel_ok"] = cancelled.get("rc") == 0 and last in (cancelled.get("stdout") or "")
    log(f"  cancel {last}: {row['cancel_s']} s, {row['cancel_commands']} commands, ok={row['cancel_ok']}")
    before_last = f"{name}-{points - 1:0{max(3, len(str(points)))}d}"
    row |= {f"cancel_call_{key}": value for key, value in timed_call("cancel", before_last, env, timeout).items()}
    log(f"  cancel call ({before_last}): {row['cancel_call_wall_s']} s ({row['cancel_call_cpu_s']} CPU s)")
    return row


def commandstats(connection: redis.Redis) -> dict[str, int]:
    return {name: int(stats["calls"]) for name, stats in connection.info("commandstats").items()}


def measure_fleet(tree: Path, url: str, work: Path, workers: int, window: float) -> dict[str, Any]:
    """Commands per second of `workers` idle real workers, over `window` seconds after they settle."""
    connection = redis.Redis.from_url(url, socket_timeout=300)
    connection.flushall(asynchronous=True)
    # The queues a Redis that has seen publishing lists (each janitor sweep reads each of them).
    connection.sadd("rq:queues", "rq:queue:high", "rq:queue:default", "rq:queue:low")
    env = tree_env(tree, url, work / "home")
    processes = []
    for index in range(workers):
        command = [sys.executable, "-m", "worker.process", "--name", f"fleet-{index}"]
        processes.append(
            subprocess.Popen(
                command,
                env=env,
                cwd=tree,
                stdout=open(work / f"fleet-{index}.log", "w"),  # noqa: SIM115 (open while the worker lives)
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    try:
        deadline = time.monotonic() + 120 + 15 * workers
        while connection.hlen("runyard:workers") < workers and time.monotonic() < deadline:
            time.sleep(0.5)
        if connection.hlen("runyard:workers") < workers:
            log(f"  only {connection.hlen('runyard:workers')} of {workers} workers beat; see {work}/fleet-*.log")
        time.sleep(12)  # past the first janitor interval and a few heartbeats
        first, started = commandstats(connection), time.monotonic()
        time.sleep(window)
        last, elapsed = commandstats(connection), time.monotonic() - started
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    deltas = {name: last.get(name, 0) - first.get(name, 0) for name in last}
    deltas = {name.removeprefix("cmdstat_"): calls for name, calls in deltas.items() if calls > 0}
    deltas.pop("info", None)  # this benchmark's own reads
    total = sum(deltas.values())
    top = dict(sorted(deltas.items(), key=lambda item: -item[1])[:6])
    row = {"workers": workers, "commands_per_s": round(total / elapsed, 1), "top_commands": top}
    log(f"  fleet of {workers}: {row['commands_per_s']} commands/s; {top}")
    return row


def fit_fleet(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares c + a*W + b*W^2 through the measured fleet, and its value at 100 and 400 workers.

    c is what one fleet costs whatever its size (RQ's scheduler: one lock holder), a what each
    worker adds (its heartbeats, its RQ worker, its janitor's lease call), b what grows with W^2
    (every worker's janitor reading every worker's heartbeat).
    """
    import numpy as np

    sizes = np.array([row["workers"] for row in rows], dtype=float)
    rates = np.array([row["commands_per_s"] for row in rows], dtype=float)
    columns = [np.ones_like(sizes), sizes, sizes**2] if len(rows) >= 3 else [sizes, sizes**2]
    coefficients, *_ = np.linalg.lstsq(np.stack(columns, axis=1), rates, rcond=None)
    c, a, b = coefficients if len(rows) >= 3 else (0.0, *coefficients)
    return {
        "c": round(float(c), 2),
        "a_per_worker": round(float(a), 3),
        "b_per_worker_squared": round(float(b), 4),
        "model_100": round(float(c + a * 100 + b * 100**2)),
        "model_400": round(float(c + a * 400 + b * 400**2)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="10000,50000,100000",
        help="grid sizes, comma-separated (past 100,000 the publish raises the grid limit)",
    )
    parser.add_argument("--fleet", default="1,4,8,16", help="idle worker counts, comma-separated ('' skips)")
    parser.add_argument("--window", type=float, default=30, help="seconds each fleet is measured")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (e.g. main)")
    parser.add_argument("--before-sizes", help="sizes for the 'before' tree (default: --sizes)")
    parser.add_argument("--skip-after", action="store_true", help="measure only the --before tree")
    parser.add_argument("--timeout", type=float, default=300, help="seconds any one command may take")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    before_sizes = [int(size) for size in (args.before_sizes or args.sizes).split(",") if size]
    fleet = [int(count) for count in args.fleet.split(",") if count]
    trees = {} if args.skip_after else {"after": ROOT}
    trees |= {"before": args.before.resolve()} if args.before else {}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the redis-server
    work = Path(tempfile.mkdtemp(prefix="runyard-scale-"))
    (work / "data").mkdir()
    server, url = start_redis(work)
    results: dict[str, Any] = {"load_average": [round(value, 1) for value in os.getloadavg()], "trees": {}}
    try:
        for label, tree in trees.items():
            log(f"{label}: {tree}")
            found: dict[str, Any] = {"sizes": [], "fleet": []}
            for points in before_sizes if label == "before" else sizes:
                found["sizes"].append(measure_size(tree, url, work, points, args.timeout))
            for workers in fleet:
                found["fleet"].append(measure_fleet(tree, url, work, workers, args.window))
            if len(found["fleet"]) >= 2:
                found["fleet_model"] = fit_fleet(found["fleet"])
            results["trees"][label] = found
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_after"] = [round(value, 1) for value in os.getloadavg()]
    results["machine"] = {"cpu_cores": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
    print(json.dumps(results, indent=2) if args.json else report_text(results))
    return 0


def side_by_side(results: dict[str, Any]) -> list[str]:
    """Publishing at each size measured in both trees: CPU, peak RSS and the longest Redis command, before | after."""
    trees = results["trees"]
    if not {"before", "after"} <= set(trees):
        return []
    before = {row["points"]: row for row in trees["before"]["sizes"]}
    lines = [
        "== publishing, before | after",
        "| points | the call: CPU s | wall s | publisher peak MB | slowlog max ms |",
        "|---|---|---|---|---|",
    ]
    for row in trees["after"]["sizes"]:
        old = before.get(row["points"])
        if old is None:
            continue
        figures = [
            f"{old[key]} / {row[key]}"
            for key in ("publish_call_cpu_s", "publish_call_wall_s", "publish_peak_mb", "publish_slowlog_max_ms")
        ]
        lines.append(f"| {row['points']:,} | " + " | ".join(figures) + " |")
    return lines


def report_text(results: dict[str, Any]) -> str:
    lines = [f"machine {results['machine']}, load average {results['load_average']} -> {results['load_average_after']}"]
    lines += side_by_side(results)
    for label, found in results["trees"].items():
        lines.append(f"== {label}")
        lines.append(
            "| points | publish s (call; CPU) | publisher peak MB | slowlog max ms | claim call max ms "
            "| status --search s (call; CPU) | cancel RUN_NAME s (call; CPU) | cancel commands |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for row in found["sizes"]:
            publish = f"{row['publish_s']} ({row['publish_call_wall_s']}; {row['publish_call_cpu_s']})"
            status = f"{row['status_s']} ({row['status_call_wall_s']}; {row['status_call_cpu_s']})"
            cancel = f"{row['cancel_s']} ({row['cancel_call_wall_s']}; {row['cancel_call_cpu_s']})"
            redis_side = f"{row['publish_peak_mb']} | {row['publish_slowlog_max_ms']} | {row['publish_script_max_ms']}"
            lines.append(
                f"| {row['points']:,} | {publish} | {redis_side} | {status} | {cancel} | {row['cancel_commands']} |"
            )
        for row in found["fleet"]:
            lines.append(
                f"fleet of {row['workers']} idle workers: {row['commands_per_s']} commands/s {row['top_commands']}"
            )
        if "fleet_model" in found:
            model = found["fleet_model"]
            lines.append(
                f"model c + a*W + b*W^2: c={model['c']}, a={model['a_per_worker']}, b={model['b_per_worker_squared']}: "
                f"100 workers {model['model_100']} commands/s, 400 workers {model['model_400']} commands/s"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
