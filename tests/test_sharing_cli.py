"""Owners, quotas and wait reasons from the user's side: `publish --owner`, `runyard quota`, `status`.

Real redis-server and the real console scripts; the one worker here is a real RQ worker record
(registered, busy) so that the wait reasons see the cluster a user would, without training.
"""

from __future__ import annotations

import json

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

from contracts.spec import load_spec
from publisher.queue import publish_context, publish_experiment
from publisher.sharing import wait_reasons
from tests.helpers import isolated_env, run_cli, tiny_spec, write_search
from worker.fair_share import charge_gpu_time, take_job_id
from worker.quotas import set_quota


def publish(connection: redis.Redis, demo_data, owner: str, **spec) -> Job:
    return publish_experiment(connection, load_spec(tiny_spec(demo_data, **spec)), context=publish_context(owner))


def busy_worker(connection: redis.Redis, name: str = "box1-gpu0") -> Worker:
    queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in ("high", "default", "low")]
    worker = Worker(queues, name=name, connection=connection)
    worker.register_birth()
    worker.set_state("busy")
    return worker


def test_publish_records_the_owner_from_the_option_or_runyard_user(redis_url, tmp_path, demo_data, connection):
    env = isolated_env(redis_url, tmp_path / "home")
    args = ["--no-pretrained", "--data-dir", str(demo_data / "train"), "--epochs", "1", "--json"]
    named = run_cli("publish", *args, "--owner", "alice", "--no-preempt", env=env)
    assert named.returncode == 0, named.stderr
    from_env = run_cli("publish", *args, env=env | {"RUNYARD_USER": "bob"})
    assert json.loads(from_env.stdout)["owner"] == "bob"
    job = Job.fetch(json.loads(named.stdout)["job_id"], connection=connection, serializer=JSONSerializer)
    assert job.meta["owner"] == "alice" and job.meta["preemptible"] is False
    assert job.kwargs["context"]["owner"] == "alice"


def test_publish_refuses_an_owner_that_is_not_a_user_name_and_enqueues_nothing(redis_url, tmp_path, connection):
    env = isolated_env(redis_url, tmp_path / "home")
    result = run_cli("publish", "--no-pretrained", "--owner", "alice smith", env=env)
    assert result.returncode == 2
    assert "--owner / RUNYARD_USER: owner 'alice smith' is not a user name" in result.stderr
    assert not Queue("default", connection=connection).count


def test_quota_set_list_and_unset(redis_url, tmp_path):
    env = isolated_env(redis_url, tmp_path / "home")
    assert run_cli("runyard", "quota", "set", "alice", "2", env=env).returncode == 0
    listed = run_cli("runyard", "quota", "--json", env=env)
    assert json.loads(listed.stdout) == {"alice": 2}
    assert "quota for alice removed" in run_cli("runyard", "quota", "unset", "alice", env=env).stdout
    assert "no quotas" in run_cli("runyard", "quota", env=env).stdout


def test_quota_refuses_a_negative_cap_and_a_bad_owner(redis_url, tmp_path):
    env = isolated_env(redis_url, tmp_path / "home")
    negative = run_cli("runyard", "quota", "set", "alice", "-1", env=env)
    assert negative.returncode == 2 and "-1" in negative.stderr
    bad = run_cli("runyard", "quota", "set", "a:b c", "1", env=env)
    assert bad.returncode == 2 and "is not a user name" in bad.stderr


def test_each_queued_job_says_why_it_waits(connection, demo_data):
    set_quota(connection, "alice", 1)
    first_alice = publish(connection, demo_data, "alice")
    second_alice = publish(connection, demo_data, "alice")
    bob = publish(connection, demo_data, "bob")
    carol = publish(connection, demo_data, "carol")
    assert wait_reasons(connection)[bob.id] == "no worker serves queue 'default'"
    busy_worker(connection)
    assert take_job_id(connection, [Queue("default", connection=connection).key])[1] == first_alice.id
    connection.hset(first_alice.key, "status", "started")
    charge_gpu_time(connection, first_alice.id, ended=False)
    connection.hset("runyard:fairshare:usage", "bob", 3600)  # bob used an hour, carol nothing

    reasons = wait_reasons(connection)
    assert reasons[second_alice.id] == "alice is at their quota 1/1"
    assert reasons[bob.id] == "behind carol: fair share"
    assert reasons[carol.id] == "all GPUs busy"


def test_status_owners_lists_running_queued_gpu_hours_and_share(redis_url, tmp_path, connection, demo_data):
    env = isolated_env(redis_url, tmp_path / "home")
    set_quota(connection, "bob", 3)
    for owner in ("alice", "bob", "bob"):
        publish(connection, demo_data, owner)
    taken = take_job_id(connection, [Queue("default", connection=connection).key])[1]
    connection.hset(Job.key_for(taken), "status", "started")
    seconds, _micros = connection.time()
    connection.hset("runyard:fairshare:running", taken, f"alice\t{seconds - 360}")  # taken 6 minutes ago
    assert charge_gpu_time(connection, taken, ended=True) >= 360
    result = run_cli("runyard", "status", "--owners", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["owner"]: row for row in json.loads(result.stdout)["owners"]}
    assert rows["alice"]["queued"] == 0 and rows["alice"]["gpu_hours"] >= 0.1 and rows["alice"]["share"] == 1.0
    assert rows["bob"] | {"gpu_hours": 0} == {
        "owner": "bob",
        "running": 0,
        "queued": 2,
        "gpu_hours": 0,
        "share": 0.0,
        "fair_share_usage_h": 0.0,
        "quota": 3,
    }
    table = run_cli("runyard", "status", "--owners", env=env)
    assert "alice" in table.stdout and "100%" in table.stdout


def test_schedule_search_refuses_a_bad_runyard_user_and_enqueues_nothing(redis_url, tmp_path, demo_data, connection):
    env = isolated_env(redis_url, tmp_path / "home") | {"RUNYARD_USER": "not a name"}
    search = write_search(tmp_path / "search.yaml", demo_data, {"lr": {"values": [0.001, 0.003]}}, name="owned")
    result = run_cli("schedule-search", str(search), env=env)
    assert result.returncode == 2
    assert "RUNYARD_USER: owner 'not a name' is not a user name" in result.stderr
    assert not Queue("default", connection=connection).count
    assert not connection.keys("runyard:search:owned*")  # no claim left behind


def test_schedule_search_owner_option_owns_every_point_and_a_bad_one_enqueues_nothing(
    redis_url, tmp_path, demo_data, connection
):
    env = isolated_env(redis_url, tmp_path / "home") | {"RUNYARD_USER": "bob"}
    search = write_search(tmp_path / "search.yaml", demo_data, {"lr": {"values": [0.001, 0.003]}}, name="owned")
    refused = run_cli("schedule-search", str(search), "--owner", "alice smith", env=env)
    assert (
        refused.returncode != 0 and "--owner / RUNYARD_USER: owner 'alice smith' is not a user name" in refused.stderr
    )
    assert connection.llen("rq:queue:default") == 0
    result = run_cli("schedule-search", str(search), "--owner", "alice", "--json", env=env)
    assert result.returncode == 0, result.stderr
    jobs = [
        Job.fetch(job["job_id"], connection=connection, serializer=JSONSerializer)
        for job in json.loads(result.stdout)["jobs"]
    ]
    assert len(jobs) == 2 and {job.meta["owner"] for job in jobs} == {"alice"}  # not RUNYARD_USER's bob


def test_status_owners_refuses_a_window_longer_than_gpu_hours_are_kept(redis_url, tmp_path):
    result = run_cli(
        "runyard", "status", "--owners", "--window", "1000", env=isolated_env(redis_url, tmp_path / "home")
    )
    assert result.returncode == 2 and "--window" in result.stderr and "168" in result.stderr
