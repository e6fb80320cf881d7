"""ASHA's rung decisions in the real Redis: the rung-report Lua script, fed by hand-made jobs, no training."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.keys import asha_pending_key, search_points_key
from worker.asha import (
    PROMOTION_LEASE_S,
    AshaSettings,
    asha_runs,
    enqueue_promotions,
    recover_promotions,
    report_rung,
    root_job_id,
)

SEARCH = "s"
SETTINGS = AshaSettings(min_iter=1, eta=3, max_iter=9)  # rungs at 1, 3 and 9 epochs


def paused_job(connection: redis.Redis, point: str, rung: int = 0) -> Job:
    """A finished job of `point` as a worker leaves it at `rung` (what the template is copied from)."""
    search = {"name": SEARCH, "point": point, "asha": SETTINGS.model_copy(update={"rung": rung}).model_dump()}
    job_id = f"job-{point}" + (f"-rung{rung}" if rung else "")
    job = Job.create(
        "worker.jobs.run_experiment",
        kwargs={"spec": {"run_name": f"run-{point}"}, "search": search},
        connection=connection,
        serializer=JSONSerializer,
        id=job_id,
        origin="default",
        meta={"run_name": f"run-{point}", "search": SEARCH, "point": point},
    )
    job.save()
    connection.hset(
        search_points_key(SEARCH), point, json.dumps({"job_id": f"job-{point}", "run_name": f"run-{point}"})
    )
    return job


def report(connection: redis.Redis, point: str, score: float, rung: int = 0, points: int | None = None) -> list[str]:
    """`point` reached `rung` with `score`: the points promoted by that report."""
    settings = SETTINGS.model_copy(update={"rung": rung, "points": points})
    promotions = report_rung(
        connection, SEARCH, point, settings, score, f"run-{point}", paused_job(connection, point, rung)
    )
    return [promotion.point for promotion in promotions]


def test_a_rung_promotes_its_best_third_as_results_arrive_and_never_one_run_twice(connection):
    assert report(connection, "a", 0.5) == []
    assert report(connection, "b", 0.4) == []
    assert report(connection, "c", 0.3) == ["a"]  # 3 results: the top 1 goes on at once
    assert report(connection, "d", 0.2) == []
    assert report(connection, "e", 0.1) == []
    assert report(connection, "f", 0.05) == ["b"]  # the top 2 of 6: a already promoted, b now
    states = asha_runs(connection, SEARCH)
    assert {point: state["state"] for point, state in states.items()} == {
        "a": "promoted",
        "b": "promoted",
        "c": "paused",
        "d": "paused",
        "e": "paused",
        "f": "paused",
    }
    assert states["a"]["rung"] == 1 and states["a"]["job_id"] == "job-a-rung1"


def test_a_paused_run_that_a_later_better_informed_decision_would_promote_is_promoted_then(connection):
    for point, score in (("a", 0.5), ("b", 0.1), ("c", 0.4)):
        report(connection, point, score)
    # a was promoted; c (0.4) is second. With 6 results the rung promotes its top 2: c, paused until now.
    assert report(connection, "d", 0.0) == []
    assert report(connection, "e", 0.0) == []
    assert report(connection, "f", 0.0) == ["c"]
    # A promoted run's report at the next rung promotes from there: 3 results at rung 1 -> its best.
    assert report(connection, "a", 0.7, rung=1) == []
    assert report(connection, "c", 0.8, rung=1) == []
    # Late and better: each enters the rung's top third on arrival and goes on, although a and c
    # already used the rung's first two places (asynchronous ASHA promotes more than 1/eta then).
    assert [report(connection, point, 0.9) for point in ("g", "h", "i")] == [["g"], ["h"], ["i"]]
    states = asha_runs(connection, SEARCH)
    assert [point for point, state in sorted(states.items()) if state["state"] == "promoted"] == ["g", "h", "i"]
    assert (states["a"]["state"], states["a"]["rung"], states["b"]["state"]) == ("paused", 1, "paused")


def test_once_every_point_reported_and_nothing_is_on_its_way_the_deepest_rungs_best_goes_to_the_end(connection):
    """4 points, eta 3: rung 1 holds one run, fewer than eta, so the rule of thirds alone would finish none."""
    assert [report(connection, point, score, points=4) for point, score in (("a", 0.5), ("b", 0.4), ("c", 0.3))] == [
        [],
        [],
        ["a"],
    ]
    assert report(connection, "d", 0.2, points=4) == []  # a is still on its way to rung 1
    assert report(connection, "a", 0.6, rung=1, points=4) == ["a"]  # the search can learn nothing more: a goes on
    assert report(connection, "a", 0.7, rung=2, points=4) == []
    states = asha_runs(connection, SEARCH)
    assert (states["a"]["state"], states["b"]["state"]) == ("finished", "paused")


def test_two_workers_reporting_at_the_same_moment_promote_each_run_exactly_once(redis_url):
    """Thirty runs report rung 0 from six threads at once, each with its own connection: 10 promotions, each once."""
    scores = {f"p{index:02d}": index / 30 for index in range(30)}
    for point in scores:
        paused_job(redis.Redis.from_url(redis_url), point)
    promoted: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def reporter(points: list[str]) -> None:
        connection = redis.Redis.from_url(redis_url)
        start.wait()
        for point in points:
            job = Job.fetch(f"job-{point}", connection=connection, serializer=JSONSerializer)
            promotions = report_rung(connection, SEARCH, point, SETTINGS, scores[point], f"run-{point}", job)
            with lock:
                promoted.extend(promotion.point for promotion in promotions)

    points = list(scores)
    threads = [threading.Thread(target=reporter, args=(points[index::6],)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(promoted) == len(set(promoted))  # no run promoted twice
    # Every run in the final top 10 is promoted (none skipped), whatever order the reports came in.
    best = sorted(scores, key=scores.get, reverse=True)[:10]
    assert set(best) <= set(promoted)
    states = asha_runs(redis.Redis.from_url(redis_url), SEARCH)
    assert {point for point, state in states.items() if state["state"] == "promoted"} == set(promoted)


def test_a_promotion_is_enqueued_once_at_the_front_and_resumes_up_to_the_next_rung(connection):
    waiting = Queue("default", connection=connection, serializer=JSONSerializer).enqueue_call(
        "worker.jobs.run_experiment", kwargs={"spec": {}}
    )
    for point, score in (("a", 0.5), ("b", 0.4), ("c", 0.3)):
        promotions = report_rung(
            connection, SEARCH, point, SETTINGS, score, f"run-{point}", paused_job(connection, point)
        )
    assert enqueue_promotions(connection, promotions) == ["job-a-rung1"]
    assert enqueue_promotions(connection, promotions) == []  # the same promotion again: RQ's unique id refuses it
    queue = Queue("default", connection=connection, serializer=JSONSerializer)
    assert queue.job_ids == ["job-a-rung1", waiting.id]  # before the new point that was waiting
    job = Job.fetch("job-a-rung1", connection=connection, serializer=JSONSerializer)
    assert job.kwargs["search"]["asha"]["rung"] == 1 and job.kwargs["spec"] == {"run_name": "run-a"}
    assert (job.meta["rung"], job.meta["rung_epochs"], job.meta["promoted_from_job"]) == (1, 3, "job-a")
    # A re-publish reads the claim: it now names the promotion's job, not the paused one.
    claim = json.loads(connection.hget(search_points_key(SEARCH), "a"))
    assert claim["job_id"] == "job-a-rung1" and claim["run_name"] == "run-a"
    assert root_job_id("job-a-rung1") == root_job_id("job-a-rung2") == "job-a"


def test_a_promotion_whose_enqueue_was_lost_is_enqueued_by_the_next_caller_after_its_lease(connection):
    for point, score in (("a", 0.5), ("b", 0.4), ("c", 0.3)):
        report(connection, point, score)  # the promotion of a is decided, and its enqueue "lost"
    assert recover_promotions(connection, SEARCH, SETTINGS) == []  # within its lease: someone is on it
    connection.zadd(asha_pending_key(SEARCH), {"a": 1.0})  # decided long ago (more than the lease)
    assert PROMOTION_LEASE_S < 10**9
    assert recover_promotions(connection, SEARCH, SETTINGS) == ["job-a-rung1"]
    assert recover_promotions(connection, SEARCH, SETTINGS) == []  # leased again: not enqueued twice
    assert Queue("default", connection=connection, serializer=JSONSerializer).job_ids == ["job-a-rung1"]


@pytest.mark.parametrize(
    ("settings", "rungs"),
    [({"min_iter": 1, "eta": 3, "max_iter": 9}, [1, 3, 9]), ({"min_iter": 2, "eta": 2, "max_iter": 10}, [2, 4, 8, 10])],
)
def test_rungs_are_min_iter_times_powers_of_eta_then_max_iter(settings, rungs):
    asha = AshaSettings(**settings)
    assert asha.rung_epochs() == rungs and asha.pause_epoch() == rungs[0]
    assert AshaSettings(**settings, rung=len(rungs) - 1).pause_epoch() is None  # the top rung trains to the end


def test_an_asha_point_stops_at_its_rungs_epoch_ends_paused_and_its_record_names_the_rung():
    from tests.test_search_trial import report as epoch_report
    from worker.search_trial import SearchTrial, parse_payload

    payload = {"name": SEARCH, "point": "p", "asha": SETTINGS.model_copy(update={"rung": 1}).model_dump()}
    trial = SearchTrial(None, parse_payload(payload))
    assert [trial.should_stop(epoch_report(epoch, 0.1 * epoch)) for epoch in (2, 3)] == [False, True]
    assert trial.finish({"stopped_early": True, "best": {"val_f1": 0.3}}) == "paused"
    fields = trial.summary_fields("paused")
    assert fields["asha"] == {"rung": 1, "rung_epochs": 3, "state": "paused"}
    assert fields["search_score"] == pytest.approx(0.3)
    top = SearchTrial(None, parse_payload(payload | {"asha": SETTINGS.model_copy(update={"rung": 2}).model_dump()}))
    assert not any(top.should_stop(epoch_report(epoch, 0.5)) for epoch in range(4, 10))  # the top rung runs to the end
    assert top.finish({"stopped_early": False, "best": {"val_f1": 0.5}}) == "finished"
