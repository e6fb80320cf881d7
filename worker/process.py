"""One RQ worker process: the JSON serializer, the allow-listed Job class, runyard's log format.

`worker --gpus 0,1` starts one of these per GPU (python -m worker.process) with
CUDA_VISIBLE_DEVICES pinned; each forks an RQ work horse per job, which is where torch runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer

from worker.code_version import CODE_DIR, fast_forward, loaded_code_state
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
        self.follow_git = False
        self.restart_requested = False

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's dequeue; with follow_git, a job is only taken on the checkout's latest commit.

        The check runs after a job arrives, not before waiting: a worker idle for a day must not
        start that day's job on the code it started with. When the checkout moved, the job goes
        back to the front of its queue and the worker stops so that `main` re-executes it.
        """
        result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        if result is None or not self.follow_git:
            return result
        job, queue = result
        step = fast_forward(CODE_DIR)
        if step.error:
            self.log.warning("follow-git: cannot fast-forward %s (%s); running the current code", CODE_DIR, step.error)
        loaded = loaded_code_state()["git_sha"]
        if step.after and step.after != loaded:
            self.log.info(
                "follow-git: code moved %s -> %s; putting job %s back and restarting",
                (loaded or "?")[:10],
                step.after[:10],
                job.id,
            )
            with self.connection.pipeline() as pipeline:
                pipeline.lrem(queue.intermediate_queue_key, 1, job.id)  # where a single-queue worker parks it
                queue.push_job_id(job.id, pipeline=pipeline, at_front=True)
                pipeline.execute()
            self.restart_requested = True
            raise StopRequested()
        return result


def process_command(*args: str) -> list[str]:
    """The command line of one worker process, importing runyard from CODE_DIR whatever the cwd.

    `python -m worker.process` would put the current directory first on sys.path: started from
    inside another checkout, the worker would run that checkout's code, not the one it follows.
    """
    bootstrap = f"import sys; sys.path.insert(0, {str(CODE_DIR)!r}); from worker.process import main; sys.exit(main())"
    return [sys.executable, "-c", bootstrap, *args]


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
    parser.add_argument("--follow-git", action="store_true")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    try:
        connection = connect()
    except RedisUnavailable as error:
        print(f"worker: {error}", file=sys.stderr)
        return 1
    name = unique_worker_name(connection, args.name)
    queue_names = [queue.strip() for queue in args.queues.split(",") if queue.strip()]
    code = loaded_code_state()  # before any job: the commit whose code this process imported
    worker = RunyardWorker(queue_names, name=name, connection=connection)
    worker.follow_git = args.follow_git
    log = logging.getLogger("runyard.worker")
    log.info(
        "%s listening on %s at %s (code %s%s%s)",
        name,
        ", ".join(queue_names),
        mask_url(redis_url(start_embedded=False)),
        code["git_sha"][:10] if code["git_sha"] else "unknown: not a git checkout",
        ", uncommitted changes" if code["git_dirty"] else "",
        ", following git" if args.follow_git else "",
    )
    worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level="INFO", with_scheduler=True)
    if worker.restart_requested:
        # The same pid, so the supervising `worker` command keeps waiting on it; the new image
        # imports the fast-forwarded code.
        log.info("follow-git: restarting %s on the new code", name)
        sys.stdout.flush()
        command = process_command(*(argv if argv is not None else sys.argv[1:]))
        os.execv(command[0], command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
