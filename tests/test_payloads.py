"""Nothing runs that was not published: injected and broken queue payloads are refused.

Anyone who can reach Redis can write a job. One real `worker --cpu --burst` run serves the
whole module: a dozen hostile or broken payloads, then one good experiment. Each bad one must
fail with a clear reason (failure_reason `spec_error`, no retry) or, when its record cannot
even be read, be moved aside; nothing it names may run; the worker must serve the good job.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq import Callback, Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contracts.keys import REFUSED_KEY
from contracts.spec import load_spec
from publisher.queue import publish_experiment
from tests.helpers import BIN, isolated_env, tiny_spec
from worker.allow_listed_job import refused_records
from worker.jobs import RUN_EXPERIMENT

WANDB_KEY = "local-" + "5ecret" * 8  # in the worker's environment only


class TouchOnUnpickle:
    """Unpickling this runs `touch marker`: proof that pickle was read if the file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Case:
    job_id: str
    message: str


@dataclass
class Served:
    connection: redis.Redis
    cases: dict[str, Case]
    good: Job
    broken_id: str
    markers: Path
    output: str
    returncode: int


def _spec(demo_data: Path, **changes) -> dict:
    return load_spec(tiny_spec(demo_data, run_name="good")).to_payload() | changes


@pytest.fixture(scope="module")
def served(redis_server, demo_data, tmp_path_factory) -> Served:
    connection = redis.Redis.from_url(redis_server)
    connection.flushall()
    home = tmp_path_factory.mktemp("payloads")
    markers = home / "markers"
    markers.mkdir()
    queue = Queue("default", connection=connection, serializer=JSONSerializer)
    cases: dict[str, Case] = {}

    def inject(label: str, message: str, func: str = RUN_EXPERIMENT, **kwargs) -> Job:
        job = queue.enqueue_call(func, description=label, **kwargs)
        cases[label] = Case(job.id, message)
        return job

    def overwrite_data(job: Job, data: bytes) -> None:
        connection.hset(job.key, "data", data)

    touch = f"touch {markers}/{{}}"
    inject(
        "builtins.eval",
        "refused to run 'builtins.eval'",
        "builtins.eval",
        args=(f"os.system('{touch.format('eval')}')",),
    )
    inject("os.system", "refused to run 'os.system'", "os.system", args=(touch.format("system"),))
    inject(
        "non-entry function",
        "refused to run 'worker.jobs._mark_failure'",
        "worker.jobs._mark_failure",
        args=(None, "x", "y", False),
    )
    inject(
        "failure callback elsewhere",
        "refused callback 'os.system'",
        kwargs={"spec": _spec(demo_data)},
        on_failure=Callback("os.system"),
    )
    inject(
        "success callback elsewhere",
        "refused callback 'os.system'",
        kwargs={"spec": _spec(demo_data)},
        on_success=Callback("os.system"),
    )
    pickled = inject("pickled payload", "is not runyard's JSON", kwargs={"spec": {}})
    overwrite_data(pickled, pickle.dumps((RUN_EXPERIMENT, TouchOnUnpickle(markers / "pickle"), [], {})))
    pickled_zlib = inject("pickled payload, compressed", "is not runyard's JSON", kwargs={"spec": {}})
    overwrite_data(pickled_zlib, zlib.compress(pickle.dumps(("os.system", None, [touch.format("zpickle")], {}))))
    garbage = inject("garbage bytes", "is not runyard's JSON", kwargs={"spec": {}})
    overwrite_data(garbage, b"\x00\xff\xfe not json at all \x80")
    not_a_call = inject("JSON that is not a call", "is not runyard's JSON", kwargs={"spec": {}})
    overwrite_data(not_a_call, json.dumps({"spec": {}}).encode())
    inject("method on an instance", "refused to run", kwargs={"spec": {}})
    connection.hset(
        Job.key_for(cases["method on an instance"].job_id),
        "data",
        json.dumps([RUN_EXPERIMENT, {"self": 1}, [], {"spec": {}}]).encode(),
    )
    inject(
        "unexpected arguments",
        "arguments do not fit worker.jobs.run_experiment",
        args=("rm -rf /",),
        kwargs={"shell": True},
    )
    inject("spec that is not an object", "`spec` must be a JSON object", kwargs={"spec": "rm -rf /"})
    inject(
        "spec with an unknown field",
        "learning_rate: unknown field",
        kwargs={"spec": _spec(demo_data) | {"learning_rate": 1}},
    )
    inject("spec with an invalid value", "lr: Input should be greater than 0", kwargs={"spec": _spec(demo_data, lr=-1)})
    inject(
        "spec with a secret",
        "wandb_api_key: looks like a secret",
        kwargs={"spec": _spec(demo_data) | {"wandb_api_key": "x"}},
    )
    broken = queue.enqueue_call(RUN_EXPERIMENT, kwargs={"spec": {}}, description="broken record")
    connection.hset(broken.key, "status", "pwned")  # RQ itself cannot restore this job

    good = publish_experiment(connection, load_spec(tiny_spec(demo_data)), context={})
    env = isolated_env(redis_server, home) | {"WANDB_API_KEY": WANDB_KEY, "WANDB_MODE": "offline"}
    worker = subprocess.run(
        [str(BIN / "worker"), "--cpu", "--burst"], env=env, capture_output=True, text=True, timeout=240
    )
    good.refresh()
    return Served(connection, cases, good, broken.id, markers, worker.stdout + worker.stderr, worker.returncode)


CASES = [
    "builtins.eval",
    "os.system",
    "non-entry function",
    "failure callback elsewhere",
    "success callback elsewhere",
    "pickled payload",
    "pickled payload, compressed",
    "garbage bytes",
    "JSON that is not a call",
    "method on an instance",
    "unexpected arguments",
    "spec that is not an object",
    "spec with an unknown field",
    "spec with an invalid value",
    "spec with a secret",
]


@pytest.mark.parametrize("label", CASES)
def test_injected_payload_fails_with_a_clear_reason_and_is_not_retried(served, label):
    case = served.cases[label]
    job = Job.fetch(case.job_id, connection=served.connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FAILED
    assert job.meta["failure_reason"] == "spec_error"
    assert case.message in job.meta["failure_message"]
    assert not job.retries_left


def test_nothing_an_injected_payload_names_ever_runs(served):
    assert list(served.markers.iterdir()) == []


def test_a_job_record_rq_cannot_read_is_moved_aside_without_stopping_the_worker(served):
    assert not served.connection.exists(Job.key_for(served.broken_id))
    assert served.connection.exists(f"{REFUSED_KEY}:{served.broken_id}")
    [record] = refused_records(served.connection)
    assert record["job_id"] == served.broken_id and "malformed" in record["reason"] and "pwned" in record["reason"]


def test_the_worker_survives_every_injection_and_serves_the_good_job(served):
    assert served.returncode == 0, served.output
    assert served.good.get_status() == JobStatus.FINISHED
    assert served.good.return_value()["epochs_completed"] == 1
    assert "found an unhandled exception" not in served.output


def everything_in_redis(connection: redis.Redis) -> bytes:
    """Every key and value in the database, raw."""
    dump: list = []
    for key in connection.scan_iter():
        kind = connection.type(key).decode()
        if kind == "string":
            values = [connection.get(key)]
        elif kind == "hash":
            values = [part for item in connection.hgetall(key).items() for part in item]
        elif kind == "list":
            values = connection.lrange(key, 0, -1)
        elif kind == "set":
            values = list(connection.smembers(key))
        elif kind == "zset":
            values = connection.zrange(key, 0, -1)
        else:  # stream
            values = [part for _id, fields in connection.xrange(key) for item in fields.items() for part in item]
        dump += [key, *values]
    raw = [item if isinstance(item, bytes) else str(item).encode() for item in dump]
    return b"\n".join(raw + [unpacked for item in raw if (unpacked := _unpack(item))])


def _unpack(value: bytes) -> bytes | None:
    """RQ stores job data zlib-compressed and exception text base64 + zlib: look inside both."""
    for decode in (lambda v: v, base64.b64decode):
        try:
            return zlib.decompress(decode(value))
        except (zlib.error, ValueError):
            continue
    return None


def test_the_workers_wandb_key_never_reaches_redis_the_logs_or_the_run_config(served):
    raw = everything_in_redis(served.connection)
    assert b"runyard:leaderboard" in raw  # the dump is real: the good job's records are in it
    assert b'"augmentation": "base"' in raw  # only inside the compressed job payloads
    assert WANDB_KEY.encode() not in raw
    assert WANDB_KEY not in served.output
    config = Path(served.good.return_value()["run_dir"]) / "spec.json"
    assert WANDB_KEY not in config.read_text()
