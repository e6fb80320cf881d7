"""Where a search publish spends its CPU: expanding and validating, claiming, building and writing jobs.

Publishes an lr x seed grid (benchmarks/scale.py's) to a private redis-server, in this process,
and prints the CPU seconds of load_search, of the claim script calls and of the chunks' job
writes, the process's peak RSS, and the RQ floor: as many jobs enqueued with a prepared payload
through Queue.prepare_data + enqueue_many (what RQ's per-job API costs; publisher.job_batch
writes the same job hashes without it), and the claim calls' round trips early and late in the search.
`hiredis` in the output says whether redis-py had it.
Run it in the tree to measure (`cd TREE && PYTHONPATH=$PWD python benchmarks/publish_cpu.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import start_redis, write_grid


def cpu_of(totals: dict[str, float], name: str, function):
    """`function`, adding its CPU seconds to totals[name]."""

    def timed(*args, **kwargs):
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.process_time() - started

    return timed


def rq_floor(connection: redis.Redis, kwargs: dict, meta: dict, jobs: int, chunk: int) -> float:
    """CPU seconds of enqueueing `jobs` jobs of this payload and meta, `chunk` per transaction."""
    from rq import Queue, Retry
    from rq.serializers import JSONSerializer

    queue = Queue("floor", connection=connection, serializer=JSONSerializer)
    started = time.process_time()
    for _ in range(0, jobs, chunk):
        datas = [
            Queue.prepare_data(
                "worker.jobs.run_experiment",
                kwargs=kwargs,
                meta=dict(meta),
                job_id=str(uuid.uuid4()),
                timeout=3600,
                result_ttl=3600,
                failure_ttl=3600,
                retry=Retry(max=2),
                description="floor",
            )
            for _ in range(chunk)
        ]
        with connection.pipeline() as pipeline:
            queue.enqueue_many(datas, pipeline=pipeline)
            pipeline.execute()
    return time.process_time() - started


def wall_of(walls: list[float], function):
    """`function`, appending each call's wall seconds to `walls`."""

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            walls.append(time.perf_counter() - started)

    return timed


def claim_call_figures(walls: list[float]) -> dict[str, float]:
    """Median claim call (ms, the round trip) in the search's first and last tenth, and the longest:
    a claim that cost more as the search grows would show in last / first."""
    tenth = max(1, len(walls) // 10)
    return {
        "claim_calls": len(walls),
        "claim_ms_first_tenth": statistics.median(walls[:tenth]) * 1000 if walls else 0,
        "claim_ms_last_tenth": statistics.median(walls[-tenth:]) * 1000 if walls else 0,
        "claim_ms_max": max(walls, default=0) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=10000, help="grid size")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--no-floor", action="store_true", help="skip the RQ floor (minutes at 200,000 points)")
    parser.add_argument("--chunk", type=int, help="points per claim call and job write [schedule_search.publish.CHUNK]")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="runyard-publish-cpu-"))
    (work / "data").mkdir()
    server, url = start_redis(work)
    os.environ["RUNYARD_HOME"] = str(work / "home")
    try:
        from rq.job import Job
        from rq.serializers import JSONSerializer

        import schedule_search.methods.grid as grid
        import schedule_search.publish as publish
        from schedule_search.search import load_search

        publish.CHUNK = args.chunk or publish.CHUNK
        # A larger grid than a search file may ask for: how the publisher's memory grows past it.
        grid.MAX_POINTS = max(grid.MAX_POINTS, args.points)

        connection = redis.Redis.from_url(url)
        write_grid(work / "grid.yaml", "grid", args.points, work / "data")
        totals: dict[str, float] = {}
        claim_walls: list[float] = []
        publish.claim_points = wall_of(claim_walls, cpu_of(totals, "claim_s", publish.claim_points))
        publish._enqueue_runs = cpu_of(totals, "write_jobs_s", publish._enqueue_runs)
        started = time.process_time()
        search = load_search(work / "grid.yaml")
        figures = {"points": args.points, "load_search_s": time.process_time() - started}
        started = time.process_time()
        report = publish.publish_search(connection, search)
        figures["publish_search_s"] = time.process_time() - started
        figures |= totals
        figures |= claim_call_figures(claim_walls)
        figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the floor
        job = Job.fetch(report.first_jobs[0]["job_id"], connection=connection, serializer=JSONSerializer)
        if not args.no_floor:
            figures["rq_floor_s"] = rq_floor(connection, job.kwargs, job.meta, args.points, publish.CHUNK)
        figures["hiredis"] = "hiredis" in sys.modules
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    figures = {key: round(value, 2) if isinstance(value, float) else value for key, value in figures.items()}
    figures["chunk"] = publish.CHUNK
    figures["load_average"] = [round(value, 1) for value in os.getloadavg()]
    print(json.dumps(figures) if args.json else "\n".join(f"{key}: {value}" for key, value in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
