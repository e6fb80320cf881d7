"""The worker's policies one at a time: the dequeue policies, stop, outage, RQ's scheduler, failures.

Real Redis (the conftest's server, an empty database per test) and real RQ objects; only NVML is
faked (this machine has no GPU). Whole workers are exercised in tests/test_worker.py and friends.
"""

from __future__ import annotations

import logging
import multiprocessing
import subprocess
import sys

import pytest
import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from contracts.keys import refused_job_key, requeue_counter_key
from contracts.spec import SpecError, load_spec
from publisher.queue import publish_experiment
from tests.helpers import tiny_spec
from tests.test_gpu import GIB, FakeNvml
from worker.allow_listed_job import AllowListedJob
from worker.dequeue_policy import FollowGit, GpuPoliteness, Quarantine, dequeue
from worker.gpu import GpuCheck
from worker.outage import OutageWatch, recover_after_outage, restore_popped_job
from worker.rq_worker import RunyardWorker


def make_worker(connection: redis.Redis, name: str, queue: str = "default") -> RunyardWorker:
    return RunyardWorker([queue], name=name, connection=connection)


def publish(connection: redis.Redis, demo_data):
    return publish_experiment(connection, load_spec(tiny_spec(demo_data)), context={})


def start(worker: RunyardWorker, connection: redis.Redis):
    """Dequeue the next job as `worker` and register its execution, as RQ does before forking a horse."""
    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    execution = worker.prepare_execution(job)
    with connection.pipeline() as pipeline:
        job.prepare_for_execution(worker.name, pipeline)
        pipeline.execute()
    return job, queue, execution


class Recorder:
    """A dequeue policy that writes down when it is asked; `handles` errors of that type."""

    def __init__(self, name: str, calls: list[str], handles: type[Exception] | None = None):
        self.name, self.calls, self.handles = name, calls, handles

    def before_dequeue(self) -> None:
        self.calls.append(f"{self.name} before")

    def dequeue_failed(self, error: Exception) -> bool:
        self.calls.append(f"{self.name} failed")
        return self.handles is not None and isinstance(error, self.handles)

    def after_dequeue(self, taken):
        self.calls.append(f"{self.name} after")
        return taken


# The dequeue: every policy asked, in order -----------------------------------------------------


def test_dequeue_asks_every_policy_in_order_before_and_after_taking_a_job():
    calls: list[str] = []
    taken = dequeue([Recorder("a", calls), Recorder("b", calls)], lambda: ("job", "queue"))
    assert taken == ("job", "queue")
    assert calls == ["a before", "b before", "a after", "b after"]


def test_an_error_a_policy_dealt_with_means_dequeue_again_and_any_other_error_propagates():
    calls: list[str] = []
    answers = iter([LookupError("bad record"), ("job", "queue"), KeyError("other")])

    def take():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    policies = [Recorder("a", calls), Recorder("b", calls, handles=LookupError)]
    assert dequeue(policies, take) == ("job", "queue")
    assert calls == ["a before", "b before", "a failed", "b failed", "a before", "b before", "a after", "b after"]
    with pytest.raises(KeyError):  # a KeyError is a LookupError too, but nobody handles a real failure twice
        dequeue([Recorder("a", [])], take)


def test_a_redis_error_passes_every_policy_by_and_nothing_comes_back_when_the_queues_are_empty():
    calls: list[str] = []
    with pytest.raises(redis.ConnectionError):
        dequeue([Recorder("a", calls, handles=Exception)], lambda: (_ for _ in ()).throw(redis.ConnectionError()))
    assert calls == ["a before"]
    assert dequeue([Recorder("a", calls)], lambda: None) is None


# GPU politeness (NVML faked) -------------------------------------------------------------------


def test_a_worker_waits_while_another_process_holds_its_gpu_and_its_heartbeat_says_why(connection):
    worker = make_worker(connection, "gpu-wait-test")
    nvml = FakeNvml(processes={0: [(4242, 6 * GIB)]})
    worker.gpu_politeness.gpu = GpuCheck(nvml, 0, 0.25, poll_seconds=0)
    seen = []

    def the_notebook_closes():
        seen.append(worker.threads.details())
        nvml.processes = {}

    worker.gpu_politeness.while_waiting = the_notebook_closes
    worker.gpu_politeness.before_dequeue()
    assert [details["gpu_wait"] for details in seen] == [
        "GPU 0: 1 other process(es) (pid 4242) hold 6.0 of 16.0 GiB, more than 25%"
    ]
    assert worker.gpu_politeness.waiting is None
    assert "gpu_wait" not in worker.threads.details()


def test_a_cpu_worker_never_waits_for_a_gpu():
    policy = GpuPoliteness(None, while_waiting=lambda: pytest.fail("a CPU worker waited for a GPU"))
    policy.before_dequeue()
    assert policy.waiting is None


# Quarantine ------------------------------------------------------------------------------------


def test_a_queued_record_nobody_can_read_is_quarantined_and_the_worker_takes_the_next_job(connection, demo_data):
    bad, good = publish(connection, demo_data), publish(connection, demo_data)
    connection.hset(bad.key, "meta", b"\x00\xfe{not json")
    worker = make_worker(connection, "quarantine-test")
    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert job.id == good.id
    assert connection.exists(refused_job_key(bad.id))
    assert bad.id not in queue.get_job_ids()


def test_an_error_that_names_no_job_is_not_for_the_quarantine(connection):
    assert Quarantine(lambda: connection, "w").dequeue_failed(ValueError("disk on fire")) is False


# Follow git (real repositories: a bare origin and the worker's clone) ----------------------------


def git(directory, *args: str) -> str:
    identity = ("-c", "user.name=runyard tests", "-c", "user.email=tests@runyard.invalid")
    done = subprocess.run(["git", *identity, *args], cwd=directory, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_follow_git_puts_the_job_back_in_front_and_restarts_once_the_checkout_moved(connection, demo_data, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "code.py").write_text("A = 1\n")
    git(seed, "init", "--quiet", "--initial-branch=main")
    git(seed, "add", "--all")
    git(seed, "commit", "--quiet", "-m", "A")
    git(tmp_path, "clone", "--quiet", "--bare", str(seed), "origin.git")
    git(tmp_path, "clone", "--quiet", "origin.git", "worker-box")
    commit_a = git(seed, "rev-parse", "HEAD")
    first, second = publish(connection, demo_data), publish(connection, demo_data)
    worker = make_worker(connection, "follow-git-test")
    worker.follow_git = FollowGit(
        True, lambda: connection, worker.log, checkout=tmp_path / "worker-box", loaded_sha=lambda: commit_a
    )
    worker.dequeue_policies[-1] = worker.follow_git

    job, queue = worker.dequeue_job_and_maintain_ttl(timeout=1)  # nothing new upstream: taken
    assert job.id == first.id and not worker.follow_git.restart_requested
    (seed / "code.py").write_text("A = 2\n")
    git(seed, "commit", "--quiet", "-am", "B")
    git(seed, "push", "--quiet", str(tmp_path / "origin.git"), "main")
    with pytest.raises(StopRequested):
        worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert worker.follow_git.restart_requested
    assert git(tmp_path / "worker-box", "rev-parse", "HEAD") == git(seed, "rev-parse", "HEAD")
    assert queue.get_job_ids() == [second.id]  # back in front, for the restarted worker


def test_without_follow_git_the_checkout_is_never_touched(connection, demo_data, tmp_path):
    published = publish(connection, demo_data)
    policy = FollowGit(False, lambda: connection, logging.getLogger("test"), checkout=tmp_path / "no-such-checkout")
    worker = make_worker(connection, "no-follow-test")
    taken = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert policy.after_dequeue(taken) is taken and taken[0].id == published.id
    assert not policy.restart_requested


# Stop ------------------------------------------------------------------------------------------


def test_a_remembered_stop_is_honoured_before_the_next_dequeue(connection):
    worker = make_worker(connection, "stop-test")
    assert not worker.stop_policy.requested
    worker.stop_policy.remember()
    assert worker.stop_policy.requested
    with pytest.raises(StopRequested):
        worker.stop_policy.before_dequeue()


def test_a_cold_stop_requeues_the_running_job_to_resume_without_charging_a_crash(connection, demo_data):
    published = publish(connection, demo_data)
    worker = make_worker(connection, "cold-stop-test")
    job, queue, execution = start(worker, connection)
    worker.stop_policy.requeue_after_cold_stop(None, None)  # no job running: nothing to do
    worker.stop_policy.requeue_after_cold_stop((job, queue), execution)
    assert queue.get_job_ids() == [published.id]
    [entry] = AllowListedJob.fetch(job.id, connection=connection, serializer=JSONSerializer).meta["requeue_log"]
    assert entry["reason"] == "worker cold-stop-test was stopped at once" and entry["counted"] is False
    assert connection.get(requeue_counter_key(job.id)) is None


# Outage ----------------------------------------------------------------------------------------


def test_an_outage_while_idle_ends_the_loop_and_says_why_but_not_while_a_job_trains():
    watch = OutageWatch("outage-test")
    with watch.ending_loop(unless_busy=True):
        raise redis.ConnectionError("gone while training")
    assert watch.lost is None
    error = redis.ConnectionError("gone while idle")
    with pytest.raises(StopRequested), watch.ending_loop():
        raise error
    assert watch.lost is error


def test_an_outage_under_a_training_job_is_logged_once_and_its_end_once(caplog):
    watch = OutageWatch("outage-test")

    def down():
        raise redis.TimeoutError("timed out")

    with caplog.at_level(logging.INFO, logger="runyard.worker"):
        watch.while_job_runs("job-1", down)
        watch.while_job_runs("job-1", down)
        watch.while_job_runs("job-1", lambda: None)
        watch.while_job_runs("job-1", lambda: None)
    assert [record.getMessage() for record in caplog.records] == [
        "outage-test: Redis unreachable while job job-1 runs (timed out); still training",
        "outage-test: Redis is back",
    ]


def test_a_job_popped_when_redis_went_away_goes_back_on_its_queue_once(connection, demo_data):
    job = publish(connection, demo_data)
    queue = Queue(job.origin, connection=connection, serializer=JSONSerializer)
    connection.lrem(queue.key, 0, job.id)  # popped by the worker, never registered
    restore_popped_job(connection, job, queue)
    restore_popped_job(connection, job, queue)
    assert queue.get_job_ids() == [job.id]


def test_after_an_outage_the_interrupted_job_is_requeued_without_charging_a_crash(connection, demo_data):
    publish(connection, demo_data)
    worker = make_worker(connection, "interrupted-test")
    job, queue, execution = start(worker, connection)
    with pytest.raises(StopRequested):
        worker.outage.job_interrupted(job, queue, execution.id, redis.ConnectionError("gone"))
    recover_after_outage(connection, worker)
    assert queue.get_job_ids() == [job.id]
    [entry] = AllowListedJob.fetch(job.id, connection=connection, serializer=JSONSerializer).meta["requeue_log"]
    assert entry["reason"] == "Redis went away while it ran on interrupted-test" and entry["counted"] is False


# RQ's scheduler process ------------------------------------------------------------------------


def test_a_dead_rq_scheduler_is_restarted_until_the_worker_stops_it(connection):
    # A queue of its own: RQ's scheduler starts only when it gets the queue's lock, which a worker of
    # an earlier test on the shared redis-server may still hold.
    worker = make_worker(connection, "scheduler-test", queue="scheduler-test")
    worker.scheduler = RQScheduler(worker.queues, connection=connection)
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    worker.scheduler._process = dead
    worker.scheduler_guard.keep_alive()
    restarted = worker.scheduler._process
    assert restarted is not dead and restarted.is_alive()
    worker.scheduler_guard.stop()
    assert not restarted.is_alive()
    worker.scheduler_guard.keep_alive()  # stopping: not restarted again
    assert worker.scheduler._process is restarted


# Failures --------------------------------------------------------------------------------------


def test_an_expected_failure_is_one_line_and_still_runs_the_exception_handlers(connection, demo_data, caplog):
    job = publish(connection, demo_data)
    worker = make_worker(connection, "failure-test")
    handled = []
    worker.push_exc_handler(lambda job, *exc_info: handled.append(exc_info[0]))
    error = SpecError("lr: must be above 0")
    with caplog.at_level(logging.WARNING, logger="runyard.worker"):
        assert worker.failures.log_expected(job, (SpecError, error, None))
    assert handled == [SpecError]
    assert caplog.records[-1].getMessage() == f"failure-test: job {job.id} failed (SpecError): lr: must be above 0"
    assert not worker.failures.log_expected(job, (ValueError, ValueError("a bug"), None))
    assert handled == [SpecError]


# The process's command line --------------------------------------------------------------------


def test_the_command_line_an_earlier_runyard_re_executes_after_follow_git_still_starts_a_worker_process():
    # Before runyard.cli.worker held it, `worker` started (and a following worker re-executed) this bootstrap.
    bootstrap = "import sys; from worker.process import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", bootstrap, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m worker.process") and "--follow-git" in done.stdout
