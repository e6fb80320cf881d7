"""The per-owner index the fair-share take reads, on a real redis-server: kept at enqueue, stale
entries skipped, jobs other tools put on RQ's list found, and no job taken twice by 4 takers."""

from __future__ import annotations

import threading

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from contracts.keys import queue_index_jobs_key, queue_index_owners_key
from publisher.job_batch import JobBatch
from worker import queue_index
from worker.fair_share import FairShareQueue, take_job_id
from worker.queue_index import indexed_owners, reindex_queue

QUEUE = "rq:queue:default"
FUNC = "worker.jobs.run_experiment"


def enqueue(queue: Queue, owners: list[str], at_front: bool = False) -> list[str]:
    """Jobs as publish enqueues them (the owner in meta), one per owner in this order."""
    datas = [
        Queue.prepare_data(FUNC, kwargs={"spec": {}}, meta={"owner": owner}, at_front=at_front) for owner in owners
    ]
    return [job.id for job in queue.enqueue_many(datas)]


def test_enqueue_indexes_each_job_under_its_owner_in_queue_order(connection):
    queue = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    ids = enqueue(queue, ["alice", "bob", "alice", "carol", "alice"])
    [front] = enqueue(queue, ["alice"], at_front=True)  # a requeue at the front (preemption, shutdown)
    assert indexed_owners(connection, "default") == {
        "alice": [front, ids[0], ids[2], ids[4]],
        "bob": [ids[1]],
        "carol": [ids[3]],
    }
    assert connection.lrange(QUEUE, 0, -1)[0].decode() == front  # RQ's list is unchanged: rq info lists all


def test_four_concurrent_takers_drain_the_index_with_each_job_taken_once(redis_url):
    connection = redis.Redis.from_url(redis_url)
    queue = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    for round_number in range(10):
        ids = enqueue(queue, ["alice", "bob", "carol", "alice"] * 15)
        taken: list[str] = []
        barrier = threading.Barrier(4)

        def taker(taken=taken, barrier=barrier):
            client = redis.Redis.from_url(redis_url)
            barrier.wait()
            while (result := take_job_id(client, [QUEUE])) is not None:
                taken.append(result[1])

        threads = [threading.Thread(target=taker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(taken) == sorted(ids), f"round {round_number}"
        assert connection.llen(QUEUE) == 0
        assert indexed_owners(connection, "default") == {}  # nothing left behind for the next round
        assert connection.scard(queue_index_jobs_key("default")) == 0


def test_cancelled_and_deleted_jobs_are_stale_entries_the_take_skips(connection):
    queue = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    ids = enqueue(queue, ["alice", "alice", "alice", "bob"])
    reindex_queue(connection, "default")  # nothing to do; the take trusts the index for a while now
    queue.fetch_job(ids[0]).cancel()  # RQ removes it from its list, not from the index
    queue.fetch_job(ids[1]).delete()  # what rq-dashboard's delete does
    assert len(indexed_owners(connection, "default")["alice"]) == 3
    assert take_job_id(connection, [QUEUE]) == (0, ids[2])  # alice (ties go by name): her 2 stale skipped
    assert take_job_id(connection, [QUEUE]) == (0, ids[3])
    assert take_job_id(connection, [QUEUE]) is None
    assert indexed_owners(connection, "default") == {}


def test_jobs_other_tools_put_on_the_queue_are_indexed_in_chunks_and_taken(connection, monkeypatch):
    monkeypatch.setattr(queue_index, "REINDEX_CHUNK", 7)
    fair = FairShareQueue("default", connection=connection, serializer=JSONSerializer)
    plain = Queue("default", connection=connection, serializer=JSONSerializer)  # rq's own, as rq-dashboard
    [alice] = enqueue(fair, ["alice"])
    foreign = enqueue(plain, ["bob"] * 30 + ["carol"] * 20)
    connection.rpush(QUEUE, foreign[0])  # a duplicate id on RQ's list can never be indexed: no endless reindex
    assert indexed_owners(connection, "default") == {"alice": [alice]}
    first = take_job_id(connection, [QUEUE])
    index = indexed_owners(connection, "default")
    assert first == (0, alice)  # ties go by name
    assert index["bob"] == foreign[:30] and index["carol"] == foreign[30:]  # in RQ's order
    taken = [first[1]] + [take_job_id(connection, [QUEUE])[1] for _ in range(50)]
    assert sorted(taken) == sorted([alice, *foreign])
    assert connection.lrange(QUEUE, 0, -1) == [foreign[0].encode()]  # the duplicate: taken once, listed once
    assert connection.scard(queue_index_owners_key("default")) == 0


def test_a_search_chunk_written_as_a_job_batch_is_indexed_in_list_order(connection):
    batch = JobBatch(connection)
    for number, owner in enumerate(["alice", "bob", "alice"]):
        options = {"job_id": f"point-{number}", "description": f"run-{number}", "meta": {"owner": owner}}
        batch.add("default", FUNC, {"spec": {}}, options)
    with connection.pipeline() as pipeline:
        batch.write(pipeline)
        pipeline.execute()
    assert indexed_owners(connection, "default") == {"alice": ["point-0", "point-2"], "bob": ["point-1"]}
    assert take_job_id(connection, [QUEUE]) == (0, "point-0")  # alice (ties go by name), her oldest
