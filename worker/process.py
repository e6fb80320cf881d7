"""One RQ worker process: the JSON serializer, the allow-listed Job class, runyard's log format.

`worker --gpus 0,1` starts one of these per GPU (python -m worker.process) with
CUDA_VISIBLE_DEVICES pinned; each forks an RQ work horse per job, which is where torch runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rq import Queue, Worker
from rq.serializers import JSONSerializer

from worker.connection import RedisUnavailable, connect, mask_url, redis_url
from worker.job import AllowListedJob

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class RunyardWorker(Worker):
    """RQ's forking Worker with runyard's job class and serializer fixed."""

    def __init__(self, queue_names: list[str], name: str, connection, **kwargs):
        queues = [
            Queue(queue, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
            for queue in queue_names
        ]
        super().__init__(
            queues,
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            job_class=AllowListedJob,
            **kwargs,
        )


def unique_worker_name(connection, name: str) -> str:
    """`name`, or name-2, name-3... when a live worker already has it (RQ refuses duplicates)."""
    candidate, suffix = name, 1
    while connection.exists(f"{Worker.redis_worker_namespace_prefix}{candidate}") and not connection.hexists(
        f"{Worker.redis_worker_namespace_prefix}{candidate}", "death"
    ):
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.process", description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--queues", default="high,default,low")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--max-jobs", type=int, default=None)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    try:
        connection = connect()
    except RedisUnavailable as error:
        print(f"worker: {error}", file=sys.stderr)
        return 1
    name = unique_worker_name(connection, args.name)
    queue_names = [queue.strip() for queue in args.queues.split(",") if queue.strip()]
    worker = RunyardWorker(queue_names, name=name, connection=connection)
    logging.getLogger("runyard.worker").info(
        "%s listening on %s at %s", name, ", ".join(queue_names), mask_url(redis_url(start_embedded=False))
    )
    worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level="INFO", with_scheduler=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
