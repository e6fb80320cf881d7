"""Which running job a waiting `high` job stops, on a real redis-server with real RQ worker records.

Each "busy worker" is an rq.Worker registered in Redis with an execution of a real job record
(what a worker writes when it starts a job), so worker.preemption reads the cluster a real
Preemptor would; tests/test_scheduling.py runs preemption end to end with training workers.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import utcformat

from contracts.spec import load_spec
from tests.helpers import tiny_spec
from trainer.interrupt import PREEMPTED, TrainingInterrupted
from trainer.train import train
from worker.control import JobControl
from worker.preemption import (
    may_preempt,
    preempt_for,
    preemption_request,
    queue_priority,
    record_preemption,
    set_queue_preemption,
)

QUEUES = ("high", "default", "low")


def running_job(connection: redis.Redis, name: str, queue_name: str, **meta) -> Job:
    """A job started on its own registered, busy worker (that serves high, default and low)."""
    queues = [Queue(queue, connection=connection, serializer=JSONSerializer) for queue in QUEUES]
    worker = Worker(queues, name=name, connection=connection, serializer=JSONSerializer)
    worker.register_birth()
    job = Queue(queue_name, connection=connection, serializer=JSONSerializer).enqueue_call(
        "worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": name} | meta
    )
    connection.lrem(f"rq:queue:{queue_name}", 1, job.id)  # taken
    worker.prepare_execution(job)  # what rq.Worker does as it starts the job
    worker.set_state("busy")
    started = datetime.now(timezone.utc) - timedelta(minutes=20)  # it has trained a while
    connection.hset(job.key, "started_at", utcformat(started))
    return job


def queue_high(connection: redis.Redis) -> Job:
    return Queue("high", connection=connection, serializer=JSONSerializer).enqueue_call(
        "worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": "dave"}
    )


def test_high_preempts_lower_priorities_of_its_own_pool_only():
    assert queue_priority("a100-high") == ("a100", "high") and queue_priority("default") == ("default", "normal")
    assert may_preempt("high", "low") and may_preempt("high", "default") and not may_preempt("high", "high")
    assert may_preempt("a100-high", "a100") and not may_preempt("a100-high", "default")
    assert not may_preempt("default", "low")


def test_the_lowest_priority_then_the_latest_checkpoint_is_stopped_once_per_high_job(connection):
    now = time.time()
    old_checkpoint = running_job(connection, "w1", "low", checkpoint_at=now - 600)
    fresh_checkpoint = running_job(connection, "w2", "low", checkpoint_at=now + 5)
    running_job(connection, "w3", "default", checkpoint_at=now + 5)
    high = queue_high(connection)

    assert preempt_for(connection, "high") == fresh_checkpoint.id
    assert preemption_request(connection, fresh_checkpoint.id)["by"] == high.id
    connection.delete(f"runyard:preempt:{fresh_checkpoint.id}")  # the victim stopped and requeued
    assert preempt_for(connection, "high") is None  # its worker takes the high job next: no second victim
    assert not connection.exists(f"runyard:preempt:{old_checkpoint.id}")


def test_no_preempt_jobs_preempted_jobs_without_a_new_epoch_and_protected_queues_are_spared(connection):
    running_job(connection, "w1", "low", preemptible=False)
    running_job(connection, "w2", "low", preempted_after_epoch=2, history=[{"epoch": 1}, {"epoch": 2}])
    spared_queue = running_job(connection, "w3", "default")
    set_queue_preemption(connection, "default", False)
    queue_high(connection)
    assert preempt_for(connection, "high") is None
    set_queue_preemption(connection, "default", True)
    assert preempt_for(connection, "high") == spared_queue.id


def test_nothing_is_preempted_while_a_worker_serving_the_queue_is_idle(connection):
    running_job(connection, "w1", "low")
    idle = Worker([Queue("high", connection=connection)], name="idle-one", connection=connection)
    idle.register_birth()
    idle.set_state("idle")
    queue_high(connection)
    assert preempt_for(connection, "high") is None


def test_auto_waits_for_an_epoch_boundary_that_is_close_and_stops_at_the_step_otherwise(connection, monkeypatch):
    now = time.time()
    # Both have 30 s epochs; `near` is 25 s into its epoch (5 s left), `far` 2 s (28 s left).
    near = running_job(connection, "w1", "low", checkpoint_at=now - 25, progress={"seconds": 30})
    far = running_job(connection, "w2", "low", checkpoint_at=now - 2, progress={"seconds": 30})
    high = queue_high(connection)
    monkeypatch.setenv("RUNYARD_PREEMPT_AUTO_WAIT", "10")
    assert preempt_for(connection, "high") == near.id  # nothing re-done, 5 s of wait
    assert preemption_request(connection, near.id)["stop_at"] == "epoch"

    connection.delete(f"runyard:preempt:{near.id}", f"runyard:preempt-for:{high.id}")
    monkeypatch.setenv("RUNYARD_PREEMPT_AUTO_WAIT", "1")  # neither epoch ends within 1 s
    assert preempt_for(connection, "high") == far.id  # the least training re-done: 2 s
    assert preemption_request(connection, far.id)["stop_at"] == "step"


def test_a_bad_stop_point_is_refused_naming_the_variable(connection, monkeypatch):
    running_job(connection, "w1", "low")
    queue_high(connection)
    monkeypatch.setenv("RUNYARD_PREEMPT_AT", "soon")
    with pytest.raises(ValueError, match="RUNYARD_PREEMPT_AT='soon' is not one of: step, epoch, auto"):
        preempt_for(connection, "high")


@pytest.mark.parametrize("stop_at", ["step", "epoch"])
def test_a_victim_asked_to_stop_at_the_epoch_boundary_finishes_its_epoch_and_redoes_nothing(
    connection, demo_data, tmp_path, monkeypatch, stop_at
):
    """Real training of a tiny model, asked to stop a few steps into epoch 2 (6 steps an epoch)."""
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    job = running_job(connection, "w1", "low")
    connection.hset(job.key, mapping={"status": "started", "worker_name": "w1"})  # as RQ marks a started job
    job.refresh()
    control = JobControl(job)
    calls = {"epoch": 0, "steps": 0}

    def should_stop(boundary: str = "step") -> str | None:
        if boundary == "epoch":
            calls["epoch"] += 1
        elif calls["epoch"] == 2:
            calls["steps"] += 1
            if calls["steps"] == 2:  # the Preemptor's request lands mid-epoch
                connection.set(f"runyard:preempt:{job.id}", json.dumps({"by": "h", "stop_at": stop_at}))
        return control.should_stop(force=True, boundary=boundary)

    spec = load_spec(tiny_spec(demo_data, epochs=3, run_name=f"victim-{stop_at}"))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(spec, should_stop=should_stop)
    assert stopped.value.reason == PREEMPTED
    record_preemption(job, stopped.value.epoch)
    [entry] = job.meta["preemptions"]
    assert entry["stop_at"] == stop_at
    if stop_at == "epoch":
        assert stopped.value.epoch == 2 and calls["steps"] == 6  # epoch 2 trained to its end
        assert entry["work_redone_s"] == 0
    else:
        assert stopped.value.epoch == 1 and calls["steps"] == 2  # stopped 2 steps into epoch 2
        assert entry["work_redone_s"] > 0
    assert entry["setup_s"] is not None and not connection.exists(f"runyard:preempt:{job.id}")


def test_at_equal_cost_the_victim_running_longest_goes_first_and_set_up_costs_the_whole_set_up(connection):
    """Jobs with no checkpoint in their attempt lose their whole set-up (SETUP_ESTIMATE_S) whenever asked."""
    now = datetime.now(timezone.utc)
    just_started = running_job(connection, "w1", "low")
    further_in = running_job(connection, "w2", "low")
    long_first_epoch = running_job(connection, "w3", "low")
    for job, ago in ((just_started, 0.5), (further_in, 3.0), (long_first_epoch, 600.0)):
        connection.hset(job.key, "started_at", utcformat(now - timedelta(seconds=ago)))
    high = queue_high(connection)
    # Both in set-up cost the set-up estimate; the one further in reaches its set-up's end first.
    assert preempt_for(connection, "high") == further_in.id

    connection.delete(f"runyard:preempt:{further_in.id}", f"runyard:preempt-for:{high.id}")
    checkpointed = running_job(connection, "w4", "low", checkpoint_at=time.time() - 1.0)
    assert preempt_for(connection, "high") == checkpointed.id  # 1 s of epoch re-done: less than any set-up


def test_a_request_standing_during_set_up_stops_the_run_before_its_w_and_b_run_starts(
    connection, demo_data, tmp_path, monkeypatch
):
    """Even an epoch-boundary request: nothing of the attempt is trained yet, so nothing is lost."""
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    job = running_job(connection, "w1", "low")
    connection.hset(job.key, mapping={"status": "started", "worker_name": "w1"})
    job.refresh()
    connection.set(f"runyard:preempt:{job.id}", json.dumps({"by": "h", "stop_at": "epoch"}))
    spec = load_spec(tiny_spec(demo_data, epochs=2, run_name="victim-setup"))
    with pytest.raises(TrainingInterrupted) as stopped:
        train(spec, should_stop=JobControl(job).should_stop)
    assert stopped.value.reason == PREEMPTED and stopped.value.epoch == 0
    run_dir = tmp_path / "runs" / "victim-setup"
    assert (run_dir / "spec.json").exists() and not (run_dir / "wandb").exists()
    record_preemption(job, stopped.value.epoch)
    [entry] = job.meta["preemptions"]
    assert entry["stop_at"] == "setup" and entry["work_redone_s"] == 0 and entry["seen_at"] <= entry["at"]
    assert entry["setup_s"] is not None  # all of the attempt so far was set-up, paid again on resume
