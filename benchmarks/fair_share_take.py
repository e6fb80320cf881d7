"""The fair-share take at 1k / 10k / 100k queued jobs: its longest Redis command (SLOWLOG).

Redis runs one command at a time, so the take's longest command is how long every other client
(workers' heartbeats, publishes, `runyard status`) may wait behind it. For each size: alice queues
90% of the jobs first, then bob and carol 5% each, alice has an hour of GPU time (so bob's and
carol's jobs, at the end of RQ's list, are the ones taken: the worst case for removing them from
the list), and 20 takes are timed. "foreign" puts the same jobs on the queue with rq's own Queue
(as `rq requeue` or rq-dashboard would, unindexed) and times the first take, which reindexes.

    python benchmarks/fair_share_take.py --sizes 1000,10000,100000

Everything is real: a redis-server, RQ's job records, worker.fair_share's take.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rq import Queue  # noqa: E402
from rq.serializers import JSONSerializer  # noqa: E402

from benchmarks.servers import start_redis  # noqa: E402
from contracts.keys import USAGE_AT_KEY, USAGE_KEY  # noqa: E402
from publisher.queue import queue as runyard_queue  # noqa: E402
from worker.fair_share import take_job_id  # noqa: E402

TAKES = 20
CHUNK = 1000
QUEUE_KEY = "rq:queue:default"


def owners_for(size: int) -> list[str]:
    """alice's flood first, then bob and carol in turns."""
    later = size // 20
    return ["alice"] * (size - 2 * later) + ["bob", "carol"] * later


def enqueue(queue: Queue, owners: list[str]) -> None:
    for start in range(0, len(owners), CHUNK):
        datas = [
            Queue.prepare_data("worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": owner})
            for owner in owners[start : start + CHUNK]
        ]
        queue.enqueue_many(datas)


def take_commands_us(connection: redis.Redis) -> list[int]:
    """Durations (µs) of the scripts SLOWLOG saw since its reset (every command is logged)."""
    entries = connection.slowlog_get(10**6)
    return [
        int(entry["duration"])
        for entry in entries
        if (entry["command"] or b"").split(b" ", 1)[0].upper() in (b"EVAL", b"EVALSHA")
    ]


def timed_takes(connection: redis.Redis, count: int) -> tuple[list[float], list[int]]:
    connection.slowlog_reset()
    walls = []
    for _ in range(count):
        started = time.perf_counter()
        assert take_job_id(connection, [QUEUE_KEY]) is not None
        walls.append((time.perf_counter() - started) * 1000)
    return walls, take_commands_us(connection)


def measure(size: int, work: Path, foreign: bool) -> dict:
    work.mkdir()
    process, url = start_redis(work, "--save", "", "--slowlog-log-slower-than", "0", "--slowlog-max-len", "1000000")
    connection = redis.Redis.from_url(url)
    try:
        if foreign:
            queue = Queue("default", connection=connection, serializer=JSONSerializer)
        else:
            queue = runyard_queue(connection, "default")
        enqueue(queue, owners_for(size))
        now = sum(part / 10**6 if index else part for index, part in enumerate(connection.time()))
        connection.hset(USAGE_KEY, "alice", 3600)
        connection.hset(USAGE_AT_KEY, "alice", now)
        result = {"queued": connection.llen(QUEUE_KEY), "kind": "foreign" if foreign else "runyard"}
        if foreign:
            walls, commands = timed_takes(connection, 1)
            result |= {"first_take_ms": round(walls[0], 1), "first_take_commands": len(commands)}
            result["first_take_longest_command_ms"] = round(max(commands) / 1000, 2)
        walls, commands = timed_takes(connection, TAKES)
        result |= {
            "take_wall_median_ms": round(statistics.median(walls), 2),
            "longest_command_ms": round(max(commands) / 1000, 2),
            "median_command_ms": round(statistics.median(commands) / 1000, 2),
        }
        return result
    finally:
        process.terminate()
        process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="queued jobs, comma-separated")
    parser.add_argument("--no-foreign", action="store_true", help="skip the jobs-put-by-rq runs")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="runyard-take-") as tmp:
        for size in (int(text) for text in args.sizes.split(",")):
            for foreign in (False,) if args.no_foreign else (False, True):
                results.append(measure(size, Path(tmp) / f"{size}-{foreign}", foreign))
                if not args.json:
                    print(json.dumps(results[-1]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
