"""One worker process, `python -m worker.process`: reach Redis and the run store, then serve.

It runs RunyardWorkers (worker.rq_worker) one after another while Redis comes and goes
(worker.outage), and restarts itself on new code for --follow-git. `worker` (runyard.cli.worker) starts
one per GPU with process_command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from rq import Worker

from worker.allow_listed_job import forbid_pickle
from worker.code_version import CODE_DIR, loaded_code_state
from worker.connection import RedisUnavailable, connect, mask_url, patient_connection, redis_url
from worker.heartbeat import REDIS_ERRORS
from worker.logs import setup_worker_logging

if TYPE_CHECKING:
    import redis

    from worker.rq_worker import RunyardWorker

log = logging.getLogger("runyard.worker")

# The queues a worker serves unless told otherwise, in the order it takes from them.
DEFAULT_QUEUES = "high,default,low"


def process_command(*args: str) -> list[str]:
    """The command line of one worker process, importing runyard from CODE_DIR whatever the cwd.

    `python -m worker.process` would put the current directory first on sys.path: started from
    inside another checkout, the worker would run that checkout's code, not the one it follows.
    """
    bootstrap = f"import sys; sys.path.insert(0, {str(CODE_DIR)!r}); from worker.process import main; sys.exit(main())"
    return [sys.executable, "-c", bootstrap, *args]


def unique_worker_name(connection: redis.Redis, name: str) -> str:
    """`name`, or name-2, name-3... when a live worker already has it (RQ refuses duplicates)."""
    candidate, suffix = name, 1
    while connection.exists(f"{Worker.redis_worker_namespace_prefix}{candidate}") and not connection.hexists(
        f"{Worker.redis_worker_namespace_prefix}{candidate}", "death"
    ):
        suffix += 1
        candidate = f"{name}-{suffix}"
    return candidate


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.process`: one worker process; the exit status a supervisor acts on.

    Also what a --follow-git worker of an earlier runyard re-executes after fast-forwarding.
    """
    from worker import rq_worker  # its docstring lists a worker process's duties: the --help text
    from worker.rq_worker import ended_unexpectedly

    parser = argparse.ArgumentParser(prog="python -m worker.process", description=rq_worker.__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--queues", default=DEFAULT_QUEUES)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--max-jobs", type=int, default=None)
    parser.add_argument("--follow-git", action="store_true")
    args = parser.parse_args(argv)

    setup_worker_logging()
    forbid_pickle()
    try:
        worker = _serve(args)
    except KeyboardInterrupt:  # Ctrl-C before RQ took over the signals: nothing to clean up yet
        return 0
    if worker is None:
        return 1
    if ended_unexpectedly(worker):
        # A supervisor's Restart=on-failure must see this; RQ already logged the traceback.
        log.error("%s stopped unexpectedly (see the error above); exiting with status 1", worker.name)
        return 1
    if worker.follow_git.restart_requested:
        # The same pid, so the supervising `worker` command keeps waiting on it; the new image
        # imports the fast-forwarded code.
        log.info("follow-git: restarting %s on the new code", worker.name)
        sys.stdout.flush()
        command = process_command(*(argv if argv is not None else sys.argv[1:]))
        os.execv(command[0], command)
    return 0


def _ready_to_train() -> tuple[str, redis.Redis] | None:
    """Redis reached, the run store writable and the training side imported; None (said why) if not."""
    try:
        url = redis_url(start_embedded=False)
        connect(url, start_embedded=False)  # one clear line now if Redis is not there at all
        connection = patient_connection(url)
    except RedisUnavailable as error:
        print(f"worker: {error}", file=sys.stderr)
        return None
    from trainer.store import StoreError, open_store

    try:  # a box that cannot write the run store would train runs no other box can resume or read
        log.info("worker: %s", open_store().check())
    except StoreError as error:
        print(f"worker: {error}; this worker takes no jobs", file=sys.stderr)
        return None
    # Import torch, timm and the trainer once, here: every forked work horse then starts training
    # at once instead of spending seconds on the same imports. Importing initialises no CUDA; only
    # the horse ever touches the GPU.
    try:
        import trainer.train  # noqa: F401
    except ModuleNotFoundError as error:  # a publishing-only install: no torch, torchvision or timm
        print(
            f"worker: {error}: this box has runyard's publishing side only; install the training side "
            "with pip install 'runyard[train]'",
            file=sys.stderr,
        )
        return None
    return url, connection


def _serve(args: argparse.Namespace) -> RunyardWorker | None:
    """Run RunyardWorkers until one ends for a reason other than Redis (see worker.outage).

    Returns the last worker, or None when Redis could not be reached at start.
    """
    code = loaded_code_state()  # before any job: the commit whose code this process imported
    ready = _ready_to_train()
    if ready is None:
        return None
    url, connection = ready
    from worker.outage import recover_after_outage, wait_for_redis
    from worker.rq_worker import RunyardWorker  # here: `worker --help` need not import the worker side

    queue_names = [queue.strip() for queue in args.queues.split(",") if queue.strip()]
    jobs_left = args.max_jobs
    while True:
        worker = None
        try:
            name = unique_worker_name(connection, args.name)
            worker = RunyardWorker(queue_names, name=name, connection=connection, follow_git=args.follow_git)
            log.info(
                "%s listening on %s at %s (code %s%s%s)",
                name,
                ", ".join(queue_names),
                mask_url(url),
                code["git_sha"][:10] if code["git_sha"] else "unknown: not a git checkout",
                ", uncommitted changes" if code["git_dirty"] else "",
                ", following git" if args.follow_git else "",
            )
            worker.work(burst=args.burst, max_jobs=jobs_left, logging_level="INFO", with_scheduler=True)
            lost = worker.outage.lost
        except REDIS_ERRORS as error:
            lost = error
            if worker is not None:
                worker.teardown()
        if lost is None or (worker is not None and worker.stop_policy.requested):  # done, or asked to stop
            return worker
        if jobs_left is not None and worker is not None:
            jobs_left = max(1, jobs_left - worker.executed_jobs)
        connection = wait_for_redis(url, lost)
        if worker is not None:
            recover_after_outage(connection, worker)


if __name__ == "__main__":
    sys.exit(main())
