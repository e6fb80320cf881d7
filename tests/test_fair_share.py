"""The fair-share take on a real redis-server: who goes next, quotas, and no job taken twice.

These drive worker.fair_share's Lua take directly with job records shaped like RQ's (a hash with
`status` and `meta`, ids on rq:queue:<name>), so each rule is checked without training anything;
tests/test_scheduling.py runs the same rules through real workers.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.serializers import JSONSerializer

from worker.fair_share import (
    HOURLY_KEPT_H,
    HOURLY_KEY,
    RUNNING_KEY,
    USAGE_AT_KEY,
    USAGE_KEY,
    FairShareQueue,
    charge_gpu_time,
    decayed_usage,
    gpu_seconds_since,
    half_life_s,
    running_entries,
    take_job_id,
)
from worker.quotas import QuotaError, quotas, set_quota, unset_quota

QUEUE = "rq:queue:default"


def queue_jobs(connection: redis.Redis, owners: list[str], queue_key: str = QUEUE, prefix: str = "j") -> list[str]:
    """Job records (status queued, owner in meta as publish writes it) pushed in this order."""
    ids = []
    for number, owner in enumerate(owners):
        job_id = f"{prefix}{number}-{owner}"
        connection.hset(Job.key_for(job_id), mapping={"status": "queued", "meta": json.dumps({"owner": owner})})
        connection.rpush(queue_key, job_id)
        ids.append(job_id)
    return ids


def owner_of(job_id: str) -> str:
    return job_id.rsplit("-", 1)[1]


def start(connection: redis.Redis, job_id: str) -> None:
    connection.hset(Job.key_for(job_id), "status", "started")  # what RQ does once the worker runs it


def set_usage(connection: redis.Redis, owner: str, seconds: float) -> None:
    now = sum(part / 10**6 if index else part for index, part in enumerate(connection.time()))
    connection.hset(USAGE_KEY, owner, seconds)
    connection.hset(USAGE_AT_KEY, owner, now)


def test_the_owner_with_the_least_gpu_time_goes_first_oldest_job_first(connection):
    ids = queue_jobs(connection, ["alice", "alice", "alice", "bob", "carol", "bob"])
    set_usage(connection, "alice", 3600)
    set_usage(connection, "bob", 60)
    taken = [take_job_id(connection, [QUEUE])[1] for _ in range(3)]
    # carol (no usage) first, then bob's oldest, then bob again while alice's hour weighs more
    # than bob's minute plus his running job's few milliseconds.
    assert taken == [ids[4], ids[3], ids[5]]
    assert take_job_id(connection, [QUEUE])[1] == ids[0]
    assert connection.lrange(QUEUE, 0, -1) == [ids[1].encode(), ids[2].encode()]  # still listed for rq info


def test_equal_usage_goes_to_the_owner_running_fewer_jobs(connection):
    ids = queue_jobs(connection, ["alice"] * 4 + ["bob", "carol"])
    taken = [owner_of(take_job_id(connection, [QUEUE])[1]) for _ in range(3)]
    assert sorted(taken) == ["alice", "bob", "carol"]
    assert len(ids) - 3 == connection.llen(QUEUE)


def test_the_highest_non_empty_priority_is_served_first_whatever_the_usage(connection):
    queue_jobs(connection, ["alice"], "rq:queue:low", prefix="low")
    [high] = queue_jobs(connection, ["bob"], "rq:queue:high", prefix="high")
    set_usage(connection, "bob", 10**6)
    assert take_job_id(connection, ["rq:queue:high", "rq:queue:default", "rq:queue:low"]) == (0, high)


def test_an_owner_at_quota_is_skipped_and_others_use_the_worker(connection):
    ids = queue_jobs(connection, ["alice", "alice", "bob"])
    set_quota(connection, "alice", 1)
    first = take_job_id(connection, [QUEUE])[1]
    start(connection, first)
    assert owner_of(first) == "alice"
    assert take_job_id(connection, [QUEUE])[1] == ids[2]  # bob, though alice's job is older
    assert take_job_id(connection, [QUEUE]) is None  # alice is at 1/1
    charge_gpu_time(connection, first, ended=True)
    assert take_job_id(connection, [QUEUE])[1] == ids[1]
    assert quotas(connection) == {"alice": 1}
    assert unset_quota(connection, "alice") and not unset_quota(connection, "alice")


def test_gpu_time_is_charged_while_running_and_at_the_end(connection):
    [job_id] = queue_jobs(connection, ["alice"])
    take_job_id(connection, [QUEUE])
    start(connection, job_id)
    assert running_entries(connection)[job_id][0] == "alice"
    charged = charge_gpu_time(connection, job_id, ended=False)
    charged += charge_gpu_time(connection, job_id, ended=True)
    assert charged > 0
    assert decayed_usage(connection)["alice"] == pytest.approx(charged, rel=0.01)
    assert not connection.hexists(RUNNING_KEY, job_id)


def test_usage_halves_every_half_life(connection, monkeypatch):
    monkeypatch.setenv("RUNYARD_FAIRSHARE_HALF_LIFE", "90m")
    assert half_life_s() == 5400
    now = sum(part / 10**6 if index else part for index, part in enumerate(connection.time()))
    connection.hset(USAGE_KEY, "alice", 1000)
    connection.hset(USAGE_AT_KEY, "alice", now - 5400)
    assert decayed_usage(connection)["alice"] == pytest.approx(500, rel=0.01)


def test_a_bad_half_life_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("RUNYARD_FAIRSHARE_HALF_LIFE", "soon")
    with pytest.raises(ValueError, match="RUNYARD_FAIRSHARE_HALF_LIFE='soon'"):
        half_life_s()


def test_a_bad_owner_name_is_refused_for_a_quota(connection):
    with pytest.raises(QuotaError, match="not a user name"):
        set_quota(connection, "bob\tsmith", 1)


def test_four_concurrent_takers_never_take_one_job_twice(redis_url):
    """Four workers' takes at the same moment, 25 rounds of 80 jobs from 3 owners under a quota."""
    connection = redis.Redis.from_url(redis_url)
    for round_number in range(25):
        connection.flushdb()
        set_quota(connection, "carol", 2)
        ids = queue_jobs(connection, ["alice", "bob", "carol", "alice"] * 20, prefix=f"r{round_number}-")
        taken: list[str] = []
        barrier = threading.Barrier(4)

        def taker(taken=taken, barrier=barrier):
            client = redis.Redis.from_url(redis_url)
            barrier.wait()
            deadline = time.monotonic() + 20
            while (
                client.llen(QUEUE) and time.monotonic() < deadline
            ):  # None while carol is at her quota and the rest is taken
                result = take_job_id(client, [QUEUE])
                if result is None:
                    continue
                taken.append(result[1])
                if owner_of(result[1]) == "carol":
                    charge_gpu_time(client, result[1], ended=True)  # carol's job ends: room again

        threads = [threading.Thread(target=taker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(taken) == len(set(taken)) == len(ids), f"round {round_number}"
        assert connection.llen(QUEUE) == 0


def test_a_waiting_worker_blocks_until_a_job_arrives_and_takes_it(connection):
    queue = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    got: list = []
    waiter = threading.Thread(
        target=lambda: got.append(FairShareQueue.dequeue_any([queue], 10, connection, serializer=JSONSerializer))
    )
    waiter.start()
    time.sleep(0.3)  # the worker is blocked in BLPOP on an empty queue
    job = queue.enqueue_call("worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": "alice"})
    waiter.join(10)
    [(taken, taken_from)] = got
    assert taken.id == job.id and taken_from.name == "default"
    assert running_entries(connection)[job.id][0] == "alice"


def test_a_job_that_arrives_for_an_owner_at_quota_stays_queued(connection):
    set_quota(connection, "alice", 0)
    queue = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    threading.Timer(
        0.3, lambda: queue.enqueue_call("worker.jobs.run_experiment", kwargs={"spec": {}}, meta={"owner": "alice"})
    ).start()
    with pytest.raises(DequeueTimeout):
        FairShareQueue.dequeue_any([queue], 2, connection, serializer=JSONSerializer)
    assert queue.count == 1  # popped by the wait, put back by the take, still listed
    assert not running_entries(connection)


def test_a_job_that_ended_before_its_worker_charged_it_is_charged_by_the_next_take(connection):
    [job_id, other] = queue_jobs(connection, ["alice", "bob"])
    assert take_job_id(connection, [QUEUE])[1] == job_id
    start(connection, job_id)
    time.sleep(0.3)
    connection.hset(Job.key_for(job_id), "status", "finished")  # RQ marked it; its worker's charge is next
    assert take_job_id(connection, [QUEUE])[1] == other  # this take drops alice's entry...
    assert charge_gpu_time(connection, job_id, ended=True) == 0  # ...so her worker finds nothing to charge
    assert decayed_usage(connection)["alice"] >= 0.3  # but her GPU time was charged, not lost
    assert gpu_seconds_since(connection, time.time() - 60)["alice"] >= 0.3


def test_gpu_hours_older_than_anyone_reads_are_pruned_at_an_owners_first_charge_of_an_hour(connection):
    hour = int(time.time() // 3600)
    connection.hset(
        HOURLY_KEY,
        mapping={f"alice\t{hour - HOURLY_KEPT_H}": 50, f"bob\t{hour - HOURLY_KEPT_H + 1}": 70, f"carol\t{hour}": 5},
    )
    [job_id] = queue_jobs(connection, ["dave"])
    take_job_id(connection, [QUEUE])
    start(connection, job_id)
    time.sleep(0.05)
    charge_gpu_time(connection, job_id, ended=True)
    kept = {field.decode().split("\t")[0] for field in connection.hkeys(HOURLY_KEY)}
    assert kept == {"bob", "carol", "dave"}  # alice's hour is past the longest window read
    assert gpu_seconds_since(connection, time.time() - HOURLY_KEPT_H * 3600)["bob"] == 70
