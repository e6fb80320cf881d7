"""One RQ worker process: the JSON serializer, the allow-listed Job class, runyard's log format.

`worker --gpus 0,1` starts one of these per GPU (python -m worker.process) with
CUDA_VISIBLE_DEVICES pinned; each forks an RQ work horse per job, which is where torch runs (the
process imports torch once at start so that forks are quick, but never initialises CUDA).

On top of RQ's Worker, each process:
- beats a short-lived heartbeat and sweeps for other workers' abandoned jobs from two threads
  (worker.heartbeat, worker.janitor), also while its horse trains;
- on the first SIGTERM/SIGINT asks its horse to stop at the next step boundary; the job keeps its
  checkpoint and is requeued, not failed. A second signal kills the horse and requeues the job;
- charges a horse that died (OOM killer, segfault, kill -9) to the job's crash count;
- marks a job stopped by `runyard cancel` as canceled, and leaves alone a job a janitor took away;
- refuses payloads it cannot read without stopping (worker.job) and never unpickles;
- waits while another process holds its GPU (worker.gpu);
- rides out Redis outages: RQ's loop ends, this process reconnects with backoff and starts over;
- with --follow-git, takes each job on its checkout's latest commit (worker.code_version);
- takes jobs by fair share between owners within quotas (worker.fair_share, worker.quotas: the
  queue class's dequeue_any), charges their GPU time, and preempts lower-priority jobs for a
  waiting `high` one (worker.preemption).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now

from contracts.job_meta import read_job_meta, set_failure
from trainer.data import DataError
from trainer.spec import SpecError
from worker.code_version import CODE_DIR, fast_forward, loaded_code_state
from worker.connection import RedisUnavailable, connect, mask_url, redis_url
from worker.control import SHUTDOWN_SIGNAL, cancel_key, install_shutdown_handler
from worker.embedded import NO_RETRY
from worker.fair_share import FairShareQueue, charge_gpu_time
from worker.gpu import GpuCheck
from worker.heartbeat import REDIS_ERRORS, RUNYARD_MARK, Heartbeat, heartbeat_key, separate_client
from worker.janitor import Janitor, requeue_abandoned, requeue_job
from worker.job import AllowListedJob, RefusedJob, forbid_pickle, quarantine_unreadable
from worker.jobs import JobCancelled, JobLost, OutOfMemory, StorageFailure
from worker.logs import LOG_FORMAT, setup_worker_logging
from worker.preemption import Preemptor, clear_preemption

__all__ = ["LOG_FORMAT", "RunyardWorker", "main", "unique_worker_name"]

RECONNECT_BACKOFF_S = (1, 2, 4, 8, 15, 30, 60)
# RQ stretches its connection's socket timeout past its blocking dequeue; the heartbeat and
# janitor threads get their own client (never shared with the forked horse) that fails faster.
THREAD_SOCKET_TIMEOUT_S = 5
# How long a stopping worker waits for its RQ scheduler process before killing it.
SCHEDULER_STOP_GRACE_S = 10
# Every Redis command of a worker (and of its work horse, which inherits the connection) retries
# for about half a minute, so a Redis restart passes unnoticed by a job that is finishing.
PATIENT_RETRY = Retry(ExponentialBackoff(cap=8, base=0.5), retries=7)

# Failures whose message is the whole story (see handle_exception).
EXPECTED_FAILURES = (RefusedJob, SpecError, DataError, StorageFailure, JobCancelled, JobLost, OutOfMemory)

log = logging.getLogger("runyard.worker")


class RunyardWorker(Worker):
    """RQ's forking Worker with runyard's job class and serializer fixed, and the duties above."""

    # The dequeue policy: rq.Worker takes its next job through queue_class.dequeue_any.
    queue_class = FairShareQueue

    def __init__(self, queue_names: list[str], name: str, connection, **kwargs):
        queues = [
            self.queue_class(queue, connection=connection, serializer=JSONSerializer, job_class=AllowListedJob)
            for queue in queue_names
        ]
        super().__init__(
            queues,
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            job_class=AllowListedJob,
            queue_class=self.queue_class,
            **kwargs,
        )
        self.redis_lost: BaseException | None = None  # why the work loop ended, when Redis was the reason
        self.heartbeat_thread: Heartbeat | None = None
        self.janitor: Janitor | None = None
        self.preemptor: Preemptor | None = None
        self.gpu = GpuCheck.from_environment()
        self.executed_jobs = 0
        self.unregistered_job: tuple[Job, Queue] | None = None  # popped, not yet started, when Redis went
        self.interrupted_job: tuple[Job, Queue, str] | None = None  # (job, queue, execution id) ditto, started
        self._running: tuple[Job, Queue] | None = None
        self._execution_id: str | None = None
        self._crashed_job_id: str | None = None
        self._redis_warned = False
        self.follow_git = False
        self.restart_requested = False
        # Whether RQ's loop ended as asked (burst done, max_jobs, idle); RQ also ends it, and
        # returns normally, on an exception it did not expect: that exit must not look clean.
        self.loop_done = False
        self._max_jobs: int | None = None
        self._burst = False
        self._scheduler_stopping = False
        self._scheduler_lock = threading.Lock()

    # Lifecycle -------------------------------------------------------------------------------

    def work(self, burst: bool = False, *args, max_jobs: int | None = None, **kwargs):
        self._max_jobs = max_jobs
        self._burst = burst
        return super().work(burst, *args, max_jobs=max_jobs, **kwargs)

    def ended_unexpectedly(self) -> bool:
        """Whether RQ's loop quit on its own (an unhandled exception), not as asked."""
        return not (self.loop_done or self._stop_requested or self.restart_requested or self.redis_lost)

    def bootstrap(self, *args, **kwargs):
        # RQ installs its signal handlers only after bootstrapping (and starting its scheduler);
        # a stop asked for meanwhile is remembered and honoured before the first dequeue.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop_before_work)
        super().bootstrap(*args, **kwargs)
        # No retries here: a failed beat must be noticed at once (the janitor then holds off for a
        # TTL, see worker.janitor) and the next beat is only seconds away anyway.
        threads_connection = separate_client(self.connection, THREAD_SOCKET_TIMEOUT_S, NO_RETRY)
        self.heartbeat_thread = Heartbeat(
            threads_connection, self.name, self._heartbeat_details, after_beat=self._keep_scheduler_alive
        )
        self.heartbeat_thread.beat()
        self.heartbeat_thread.start()
        # Jobs still registered under this name belong to a predecessor that died (names are unique
        # among live workers): requeue them now rather than after a heartbeat TTL.
        try:
            requeue_abandoned(self.connection, by=self.name, dead_names=frozenset({self.name}))
        except REDIS_ERRORS:
            pass  # the janitor thread sweeps soon
        except Exception as error:  # a record nobody can read must not stop a worker at start-up
            log.warning("%s: start-up sweep skipped: %s: %s", self.name, type(error).__name__, error)
        self.janitor = Janitor(threads_connection, self.name, self.heartbeat_thread)
        self.janitor.start()
        self.preemptor = Preemptor(threads_connection, self.name, self.queue_names())
        self.preemptor.start()

    def register_birth(self):
        super().register_birth()
        self.connection.hset(self.key, RUNYARD_MARK, heartbeat_key(self.name))

    def _stop_before_work(self, signum, frame):
        if os.getpid() != self.pid and self.scheduler is not None:
            # RQ's scheduler process, forked from this worker, got the worker's stop (SIGTERM) before
            # it installed its own handlers: stop the scheduler, or the worker waits on it forever.
            self.scheduler.request_stop()
            return
        log.info("%s: warm shut down requested while starting; stopping before taking a job", self.name)
        self._shutdown_requested_date = now()
        self._stop_requested = True

    def _keep_scheduler_alive(self) -> None:
        """Restart RQ's scheduler process when it died (a Redis outage ends its loop with an error).

        RQ itself only notices at its registry maintenance, every 10 minutes and never while a
        job runs; this runs on the heartbeat thread's cadence. Relies on RQScheduler._process
        (rq 3, see the pin in pyproject.toml).
        """
        scheduler = self.scheduler
        if scheduler is None or self._burst or self._scheduler_stopping or self._stop_requested:
            return
        process = scheduler._process
        if process is None or process.is_alive():
            return  # another worker's scheduler holds the locks, or ours is running
        log.warning(
            "%s: RQ's scheduler (pid %s) died with exit code %s; restarting it",
            self.name,
            process.pid,
            process.exitcode,
        )
        with self._scheduler_lock:
            if self._scheduler_stopping:
                return
            scheduler._process = None
            try:
                scheduler.acquire_locks(auto_start=True)
            except REDIS_ERRORS as error:
                scheduler._process = process  # try again at the next beat
                log.warning("%s: scheduler not restarted yet: Redis unreachable (%s)", self.name, error)

    def stop_scheduler(self):
        with self._scheduler_lock:
            self._scheduler_stopping = True
        # RQ joins its scheduler process without a time limit; a scheduler that missed its stop
        # would keep this worker from exiting. It holds nothing worth waiting for (its locks
        # expire), so after a grace period it is killed.
        process = self.scheduler._process if self.scheduler is not None else None
        if process is None or process.pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(process.pid, signal.SIGTERM)
        process.join(SCHEDULER_STOP_GRACE_S)
        if process.is_alive():
            log.warning(
                "%s: RQ's scheduler (pid %d) did not stop in %d s; killing it",
                self.name,
                process.pid,
                SCHEDULER_STOP_GRACE_S,
            )
            process.kill()
            process.join()

    def _shutdown(self):
        # An idle worker's stop is RQ raising StopRequested from its signal handler, wherever the
        # loop happens to be; code that catches broadly (logging's handleError, for one) can swallow
        # it. Remembering the request too lets the loop and the dequeue below still honour it.
        self._stop_requested = True
        super()._shutdown()

    def teardown(self):
        if self.is_horse:
            return
        if self.janitor is not None:
            self.janitor.stop()
        if self.preemptor is not None:
            self.preemptor.stop()
        if self.heartbeat_thread is not None:
            self.heartbeat_thread.stop(forget=True)
        try:
            super().teardown()
        except REDIS_ERRORS:
            if self.pubsub_thread:
                self.pubsub_thread.stop()

    def _heartbeat_details(self) -> dict:
        running = self._running
        details = {"horse_pid": self.horse_pid or None, "job_id": running[0].id if running else None}
        if self.gpu is not None and self.gpu.waiting:
            details["gpu_wait"] = self.gpu.waiting  # why this idle worker takes no job
        return details

    # Redis trouble: end the loop quietly and let main() reconnect -----------------------------

    def _redis_failed(self, error: BaseException):
        self.redis_lost = error
        raise StopRequested() from None

    def heartbeat(self, timeout=None, pipeline=None):
        try:
            return super().heartbeat(timeout, pipeline)
        except REDIS_ERRORS as error:
            if self._running is None:
                self._redis_failed(error)
            # While a horse trains the loop must not end; the heartbeat thread speaks for this worker.

    def check_for_suspension(self, burst: bool):
        try:
            return super().check_for_suspension(burst)
        except REDIS_ERRORS as error:
            self._redis_failed(error)

    def run_maintenance_tasks(self):
        try:
            return super().run_maintenance_tasks()
        except REDIS_ERRORS as error:
            self._redis_failed(error)
        except StopRequested:  # Ctrl-C or SIGTERM while idle: RQ raises this from its signal handler
            raise
        except Exception as error:  # a record nobody can read must not stop the worker (RQ would quit)
            if getattr(error, "job_id", None) is not None:
                with contextlib.suppress(*REDIS_ERRORS):
                    quarantine_unreadable(self.connection, error)
            log.warning("%s: registry maintenance skipped: %s: %s", self.name, type(error).__name__, error)
            self.last_cleaned_at = now()

    def maintain_heartbeats(self, job: Job, execution):
        # Called while the horse trains: an outage must not end the worker under a running job.
        try:
            super().maintain_heartbeats(job, execution)
            charge_gpu_time(self.connection, job.id, ended=False)
            if self._redis_warned:
                log.info("%s: Redis is back", self.name)
            self._redis_warned = False
        except REDIS_ERRORS as error:
            if not self._redis_warned:
                log.warning("%s: Redis unreachable while job %s runs (%s); still training", self.name, job.id, error)
            self._redis_warned = True

    # Dequeue: polite GPU use, unreadable payloads moved aside ----------------------------------

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """RQ's dequeue once the GPU is free; a record nobody can read is moved aside, not fatal."""
        while True:
            if self._stop_requested:  # asked while the raise from the signal handler went astray
                raise StopRequested()
            if self.gpu is not None:
                self.gpu.wait_until_free(self.heartbeat)
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except REDIS_ERRORS:
                raise
            except Exception as error:
                if getattr(error, "job_id", None) is None:  # not about one job's record: a real failure
                    raise
                quarantine_unreadable(self.connection, error)
                continue
            if result is None:
                self.loop_done = True  # burst mode found nothing, or max_idle_time passed
            return self._on_latest_code(result)

    def _on_latest_code(self, result):
        """With follow_git, a job is only taken on the checkout's latest commit.

        The check runs after a job arrives, not before waiting: a worker idle for a day must not
        start that day's job on the code it started with. When the checkout moved, the job goes
        back to the front of its queue and the worker stops so that `main` re-executes it.
        """
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

    def prepare_execution(self, job: Job):
        execution = super().prepare_execution(job)
        self._execution_id = execution.id
        return execution

    def execute_job(self, job: Job, queue: Queue):
        self._running = (job, queue)
        self._execution_id = None
        try:
            super().execute_job(job, queue)
            self.executed_jobs += 1
            if self._max_jobs is not None and self.executed_jobs >= self._max_jobs:
                self.loop_done = True
        except REDIS_ERRORS as error:
            if self._execution_id is not None:
                self.interrupted_job = (job, queue, self._execution_id)
            else:
                self.unregistered_job = (job, queue)
            self._running = None
            self._redis_failed(error)
        finally:
            self._running = None
            self._gpu_released(job)

    def _gpu_released(self, job: Job) -> None:
        """The job no longer holds the GPU: charge its owner, drop a request to preempt it."""
        with contextlib.suppress(*REDIS_ERRORS):  # an outage costs the owner's last minutes only
            charge_gpu_time(self.connection, job.id, ended=True)
            clear_preemption(self.connection, job.id)

    # The work horse -----------------------------------------------------------------------------

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        install_shutdown_handler()

    # Shutdown: warm (checkpoint + requeue at the next step), then cold -------------------------

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        if self.horse_pid and self._running:
            log.info(
                "%s: asking job %s to stop at the next step boundary; it will be requeued with its checkpoint "
                "(signal again to stop at once)",
                self.name,
                self._running[0].id,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.horse_pid, SHUTDOWN_SIGNAL)

    def request_force_stop(self, signum, frame):
        running, execution = self._running, self.execution
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            if running is not None and execution is not None:
                job, queue = running
                requeue_job(
                    self.connection,
                    job.id,
                    queue.name,
                    execution.id,
                    reason=f"worker {self.name} was stopped at once",
                    by=self.name,
                    count=False,
                )
            raise

    # Failures -----------------------------------------------------------------------------------

    def handle_exception(self, job: Job, *exc_info):
        # A refused payload, a bad spec, missing data, a cancel: one line with the reason says it
        # all; tracebacks stay for the failures that are bugs.
        if exc_info[0] is not None and issubclass(exc_info[0], EXPECTED_FAILURES):
            reason = read_job_meta(job.meta, job.id).failure_reason or exc_info[0].__name__
            log.warning("%s: job %s failed (%s): %s", self.name, job.id, reason, str(exc_info[1]).splitlines()[0])
            call_exception_handlers(self._exc_handlers, job, *exc_info)
            return
        super().handle_exception(job, *exc_info)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        self._crashed_job_id = job.id

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if self.is_horse and os.getppid() != self.pid:
            # This horse's worker died: a janitor requeues the job once the worker's heartbeat
            # lapses, and recording a failure now would pre-empt that.
            log.warning("job %s: its worker process died; leaving the job to the janitors", job.id)
            return
        if execution is not None and not self._owns(job, execution):
            log.warning(
                "%s: job %s was requeued while this worker ran it; leaving it to its new owner", self.name, job.id
            )
            self.executions.pop(execution.id, None)
            return
        if self._crashed_job_id == job.id and execution is not None:
            self._crashed_job_id = None
            outcome = requeue_job(
                self.connection,
                job.id,
                queue.name,
                execution.id,
                reason=f"its work horse died on {self.name} ({exc_string.strip()})",
                by=self.name,
                count=True,
            )
            if outcome is not None:
                return
        meta = read_job_meta(job.meta if self.is_horse else job.get_meta(refresh=True), job.id)
        if meta.failure_reason == "cancelled" or self.connection.exists(cancel_key(job.id)):
            self._finish_cancelled(job, execution)
            return
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _owns(self, job: Job, execution) -> bool:
        registry = StartedJobRegistry(job.origin, connection=self.connection)
        return self.connection.zscore(registry.key, execution.composite_key) is not None

    def _finish_cancelled(self, job: Job, execution) -> None:
        """A cancelled job ends as RQ's `canceled` (not failed, not retried), its reason in meta."""
        self._stopped_job_id = None
        if read_job_meta(job.meta, job.id).failure_reason != "cancelled":  # stopped by `runyard cancel --force`
            set_failure(job.meta, "cancelled", "cancelled by `runyard cancel --force`: its work horse was killed")
        with self.connection.pipeline() as pipeline:
            job.set_status(JobStatus.CANCELED, pipeline=pipeline)
            job.save(pipeline=pipeline)
            CanceledJobRegistry(job.origin, connection=self.connection, serializer=self.serializer).add(
                job, pipeline=pipeline
            )
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.delete(cancel_key(job.id))
            pipeline.execute()
        log.info("%s: job %s cancelled; its checkpoint is kept", self.name, job.id)


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


def wait_for_redis(url: str, reason: BaseException) -> redis.Redis:
    """Reconnect with backoff, one log line per try (URL masked, no traceback)."""
    shown = mask_url(url)
    for attempt in range(10**9):
        delay = RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)]
        log.warning("lost Redis at %s (%s); reconnecting in %d s", shown, str(reason).splitlines()[0], delay)
        time.sleep(delay)
        try:
            connect(url, start_embedded=False)
        except RedisUnavailable as error:
            reason = error
            continue
        log.info("reconnected to Redis at %s", shown)
        return patient_connection(url)
    raise AssertionError("unreachable")


def patient_connection(url: str) -> redis.Redis:
    """A client for `url` whose commands ride out a Redis restart (see PATIENT_RETRY)."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, retry=PATIENT_RETRY)


def recover_after_outage(connection: redis.Redis, worker: RunyardWorker) -> None:
    """Once Redis is back: give back what the worker held when it went away.

    A job it had popped but not started goes back on its queue; one whose execution it had
    started (its horse finished or died while Redis was down, the outcome unrecorded) is requeued
    to resume from its checkpoint, not charged as a crash. Its old registration is closed, so
    the next worker in this process reuses its name.
    """
    if worker.unregistered_job is not None:
        restore_popped_job(connection, *worker.unregistered_job)
    if worker.interrupted_job is not None:
        job, queue, execution_id = worker.interrupted_job
        requeue_job(
            connection,
            job.id,
            queue.name,
            execution_id,
            reason=f"Redis went away while it ran on {worker.name}",
            by=worker.name,
            count=False,
        )
    with contextlib.suppress(*REDIS_ERRORS):
        worker.register_death()


def restore_popped_job(connection: redis.Redis, job: Job, queue: Queue) -> None:
    """Put back a job this worker popped but could not register before Redis went away."""
    try:
        status = connection.hget(job.key, "status")
        if status and status.decode() == JobStatus.QUEUED and connection.lpos(queue.key, job.id) is None:
            registry = StartedJobRegistry(queue.name, connection=connection)
            if not any(entry.decode().startswith(f"{job.id}:") for entry in connection.zrange(registry.key, 0, -1)):
                FairShareQueue(queue.name, connection=connection).push_job_id(job.id, at_front=True)  # indexed too
                log.info("put job %s back on %s: it was dequeued when Redis went away", job.id, queue.name)
    except REDIS_ERRORS:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.process", description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--queues", default="high,default,low")
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
    if worker.ended_unexpectedly():
        # A supervisor's Restart=on-failure must see this; RQ already logged the traceback.
        log.error("%s stopped unexpectedly (see the error above); exiting with status 1", worker.name)
        return 1
    if worker.restart_requested:
        # The same pid, so the supervising `worker` command keeps waiting on it; the new image
        # imports the fast-forwarded code.
        log.info("follow-git: restarting %s on the new code", worker.name)
        sys.stdout.flush()
        command = process_command(*(argv if argv is not None else sys.argv[1:]))
        os.execv(command[0], command)
    return 0


def _serve(args: argparse.Namespace) -> RunyardWorker | None:
    """Run RunyardWorkers until one ends for a reason other than Redis (see wait_for_redis).

    Returns the last worker, or None when Redis could not be reached at start.
    """
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
    code = loaded_code_state()  # before any job: the commit whose code this process imported
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

    queue_names = [queue.strip() for queue in args.queues.split(",") if queue.strip()]
    jobs_left = args.max_jobs
    while True:
        worker = None
        try:
            name = unique_worker_name(connection, args.name)
            worker = RunyardWorker(queue_names, name=name, connection=connection)
            worker.follow_git = args.follow_git
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
            lost = worker.redis_lost
        except REDIS_ERRORS as error:
            lost = error
            if worker is not None:
                worker.teardown()
        if lost is None or (worker is not None and worker._stop_requested):  # done, or asked to stop
            return worker
        if jobs_left is not None and worker is not None:
            jobs_left = max(1, jobs_left - worker.executed_jobs)
        connection = wait_for_redis(url, lost)
        if worker is not None:
            worker.connection = connection
            recover_after_outage(connection, worker)


if __name__ == "__main__":
    sys.exit(main())
