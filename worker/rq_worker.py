"""RunyardWorker, the RQ Worker of one worker process, with its JSON serializer and allow-listed Job class.

`worker --gpus 0,1` starts one worker process per GPU (worker.process, see runyard.cli.worker) with
CUDA_VISIBLE_DEVICES pinned; each forks an RQ work horse per job, which is where torch runs (the
process imports torch once at start so that forks are quick, but never initialises CUDA).

On top of RQ's Worker, each process (each duty a small object, in the module named after it):
- beats a short-lived heartbeat and sweeps for other workers' abandoned jobs from two threads
  (worker.background: worker.heartbeat, worker.janitor), also while its horse trains;
- on the first SIGTERM/SIGINT asks its horse to stop at the next step boundary; the job keeps its
  checkpoint and is requeued, not failed. A second signal kills the horse and requeues the job
  (worker.shutdown);
- restarts RQ's scheduler process when it died and stops it in time (worker.scheduler_guard);
- charges a horse that died (OOM killer, segfault, kill -9) to the job's crash count;
- marks a job stopped by `runyard cancel` as canceled, and leaves alone a job a janitor took away
  (worker.failures);
- refuses payloads it cannot read without stopping (worker.allow_listed_job) and never unpickles; waits while
  another process holds its GPU (worker.gpu); with --follow-git, takes each job on its checkout's
  latest commit (worker.code_version): the dequeue policies (worker.dequeue_policy);
- rides out Redis outages: RQ's loop ends, this process reconnects with backoff and starts over
  (worker.outage);
- takes jobs by fair share between owners within quotas (worker.fair_share, worker.quotas: the
  queue class's dequeue_any), charges their GPU time, and preempts lower-priority jobs for a
  waiting `high` one (worker.preemption).
"""

from __future__ import annotations

import contextlib
import functools

from rq import Queue, Worker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now

from worker.allow_listed_job import AllowListedJob
from worker.background import BackgroundThreads
from worker.control import install_shutdown_handler
from worker.dequeue_policy import DequeuePolicy, FollowGit, GpuPoliteness, Quarantine, Taken, dequeue
from worker.failures import FailurePolicy
from worker.fair_share import FairShareQueue, charge_gpu_time
from worker.gpu import GpuCheck
from worker.heartbeat import REDIS_ERRORS, RUNYARD_MARK, heartbeat_key
from worker.janitor import requeue_job
from worker.outage import OutageWatch
from worker.preemption import clear_preemption
from worker.scheduler_guard import SchedulerGuard
from worker.shutdown import StopPolicy

__all__ = ["JOB_OPTIONS", "RunyardWorker", "ended_unexpectedly"]


# Every queue and job of a worker: JSON, never pickle; only runyard's entry points (worker.allow_listed_job).
JOB_OPTIONS = {"serializer": JSONSerializer, "job_class": AllowListedJob}


class RunyardWorker(Worker):
    """RQ's forking Worker with runyard's job class and serializer fixed, wired to the policies above."""

    queue_class = FairShareQueue  # which job comes next: rq.Worker dequeues through queue_class.dequeue_any
    dequeue_policies: list[DequeuePolicy]  # asked in order around each dequeue

    def __init__(self, queue_names: list[str], name: str, connection, follow_git: bool = False, **kwargs):
        queues = [self.queue_class(queue, connection=connection, **JOB_OPTIONS) for queue in queue_names]
        super().__init__(
            queues, name=name, connection=connection, queue_class=self.queue_class, **JOB_OPTIONS, **kwargs
        )
        self.outage = OutageWatch(name)
        self.stop_policy = StopPolicy(self)
        self.scheduler_guard = SchedulerGuard(self)
        self.threads = BackgroundThreads(self)
        self.failures = FailurePolicy(self)
        self.gpu_politeness = GpuPoliteness(GpuCheck.from_environment(), while_waiting=self.heartbeat)
        self.quarantine = Quarantine(lambda: self.connection, name)
        self.follow_git = FollowGit(follow_git, lambda: self.connection, self.log)
        self.dequeue_policies = [self.stop_policy, self.gpu_politeness, self.quarantine, self.follow_git]
        self.running: Taken | None = None  # the job the horse runs now
        self.executed_jobs = 0
        self.burst, self.max_jobs = False, None
        # Whether RQ's loop ended as asked (burst done, max_jobs, idle); RQ also ends it, and
        # returns normally, on an exception it did not expect: that exit must not look clean.
        self.loop_done = False
        self._execution_id: str | None = None

    def requeue(self, job_id: str, queue_name: str, execution_id: str, reason: str, count: bool = False):
        """Put back a job this worker started (`count`: as a crash); see worker.janitor.requeue_job."""
        return requeue_job(self.connection, job_id, queue_name, execution_id, reason=reason, by=self.name, count=count)

    # Lifecycle (the threads: worker.background; stops: worker.shutdown, worker.scheduler_guard)

    def work(self, burst: bool = False, *args, max_jobs: int | None = None, **kwargs):
        self.burst, self.max_jobs = burst, max_jobs
        return super().work(burst, *args, max_jobs=max_jobs, **kwargs)

    def bootstrap(self, *args, **kwargs):
        self.stop_policy.install_early_handlers()  # RQ installs its own only after bootstrapping
        super().bootstrap(*args, **kwargs)
        self.threads.start()

    def register_birth(self):
        super().register_birth()
        self.connection.hset(self.key, RUNYARD_MARK, heartbeat_key(self.name))

    def stop_scheduler(self):
        self.scheduler_guard.stop()

    def _shutdown(self):  # an rq internal, overridden: remember the stop before RQ raises it
        self.stop_policy.remember()
        super()._shutdown()

    def teardown(self):
        if self.is_horse:
            return
        self.threads.stop()
        try:
            super().teardown()
        except REDIS_ERRORS:
            if self.pubsub_thread:
                self.pubsub_thread.stop()

    # Redis trouble ends the loop quietly; runyard.cli.worker reconnects (worker.outage)

    def heartbeat(self, timeout=None, pipeline=None):
        with self.outage.ending_loop(unless_busy=self.running is not None):
            return super().heartbeat(timeout, pipeline)

    def check_for_suspension(self, burst: bool):
        with self.outage.ending_loop():
            return super().check_for_suspension(burst)

    def run_maintenance_tasks(self):
        try:
            with self.outage.ending_loop():
                return super().run_maintenance_tasks()
        except StopRequested:  # Ctrl-C or SIGTERM while idle (RQ raises it from its signal handler), or an outage
            raise
        except Exception as error:  # a record nobody can read must not stop the worker (RQ would quit)
            self.quarantine.maintenance_failed(error)
            self.last_cleaned_at = now()

    def maintain_heartbeats(self, job: Job, execution):
        # Called while the horse trains: an outage must not end the worker under a running job.
        beat, charge = super().maintain_heartbeats, functools.partial(charge_gpu_time, ended=False)
        self.outage.while_job_runs(job.id, lambda: beat(job, execution), lambda: charge(self.connection, job.id))

    # Dequeue (worker.dequeue_policy) and execution

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        take = functools.partial(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)
        taken = dequeue(self.dequeue_policies, take)
        if taken is None:
            self.loop_done = True  # burst mode found nothing, or max_idle_time passed
        return taken

    def prepare_execution(self, job: Job):
        execution = super().prepare_execution(job)
        self._execution_id = execution.id
        return execution

    def execute_job(self, job: Job, queue: Queue):
        self.running, self._execution_id = (job, queue), None
        try:
            super().execute_job(job, queue)
            self.executed_jobs += 1
            self.loop_done = self.max_jobs is not None and self.executed_jobs >= self.max_jobs
        except REDIS_ERRORS as error:
            self.running = None
            self.outage.job_interrupted(job, queue, self._execution_id, error)
        finally:
            self.running = None
            with contextlib.suppress(*REDIS_ERRORS):  # an outage costs the owner's last minutes only
                charge_gpu_time(self.connection, job.id, ended=True)  # the job no longer holds the GPU
                clear_preemption(self.connection, job.id)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        install_shutdown_handler()

    # Stop and failure (worker.shutdown, worker.failures)

    def handle_warm_shutdown_request(self):
        super().handle_warm_shutdown_request()
        self.stop_policy.ask_horse_to_stop()

    def request_force_stop(self, signum, frame):
        running, execution = self.running, self.execution
        try:
            super().request_force_stop(signum, frame)
        except SystemExit:
            self.stop_policy.requeue_after_cold_stop(running, execution)
            raise

    def handle_exception(self, job: Job, *exc_info):
        if not self.failures.log_expected(job, exc_info):
            super().handle_exception(job, *exc_info)

    def handle_work_horse_killed(self, job, retpid, ret_val, rusage):
        super().handle_work_horse_killed(job, retpid, ret_val, rusage)
        self.failures.crashed_job_id = job.id

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if not self.failures.settled(job, queue, execution, exc_string):
            super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)


def ended_unexpectedly(worker: RunyardWorker) -> bool:
    """Whether RQ's loop quit on its own (an unhandled exception), not as asked."""
    asked = worker.loop_done or worker.stop_policy.requested or worker.follow_git.restart_requested
    return not (asked or worker.outage.lost)
