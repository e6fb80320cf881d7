"""Polite GPU use, decided from NVML's answers (a fake NVML here: this machine has no GPU)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.helpers import isolated_env, kill_worker, run_cli, start_worker, tiny_spec, wait_for
from worker import gpu
from worker.gpu import GpuCheck, busy_reason, pinned_gpu
from worker.heartbeat import heartbeat_key

GIB = 1024**3


class FakeNvml:
    """Answers NVML's three calls for one or more GPUs; `processes[i]` lists (pid, bytes or None)."""

    def __init__(self, total_gib: float = 16, used_gib: float = 0.5, processes=None):
        self.total = int(total_gib * GIB)
        self.used = int(used_gib * GIB)
        self.processes = processes or {}
        self.asked = []

    def nvmlDeviceGetHandleByIndex(self, index):
        self.asked.append(index)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self.total, used=self.used, free=self.total - self.used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.processes.get(handle, [])]


def test_an_idle_gpu_is_free():
    assert busy_reason(FakeNvml(), 0, 0.25) is None


def test_another_process_holding_more_than_the_threshold_makes_the_worker_wait():
    nvml = FakeNvml(processes={1: [(4242, 6 * GIB)]})
    reason = busy_reason(nvml, 1, 0.25)
    assert reason == "GPU 1: 1 other process(es) (pid 4242) hold 6.0 of 16.0 GiB, more than 25%"
    assert nvml.asked == [1]


def test_a_small_notebook_below_the_threshold_does_not_block_the_gpu():
    assert busy_reason(FakeNvml(processes={0: [(7, 2 * GIB), (8, 1 * GIB)]}), 0, 0.25) is None


def test_when_nvml_hides_per_process_memory_the_device_total_decides():
    hidden = {0: [(7, None)]}
    assert busy_reason(FakeNvml(used_gib=12, processes=hidden), 0, 0.25) is not None
    assert busy_reason(FakeNvml(used_gib=1, processes=hidden), 0, 0.25) is None


def test_the_worker_waits_until_the_other_process_leaves(monkeypatch):
    nvml = FakeNvml(processes={0: [(4242, 10 * GIB)]})
    beats = []

    def leave_after_two_polls():
        beats.append(1)
        if len(beats) == 2:
            nvml.processes = {}

    monkeypatch.setattr(gpu.time, "sleep", lambda seconds: None)
    GpuCheck(nvml, 0, 0.25).wait_until_free(leave_after_two_polls)
    assert len(beats) == 2  # the worker kept its heartbeat while it waited


@pytest.mark.parametrize("visible, expected", [("", None), ("3", 3), ("0,1", None), ("GPU-1a2b", None)])
def test_only_a_worker_pinned_to_one_gpu_checks_it_and_cpu_workers_skip(monkeypatch, visible, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert pinned_gpu() == expected
    if expected is None:
        assert GpuCheck.from_environment() is None


class FailingNvml(FakeNvml):
    def __init__(self, error: BaseException):
        super().__init__()
        self.error = error

    def nvmlDeviceGetMemoryInfo(self, handle):
        raise self.error


def test_an_nvml_hiccup_lets_the_worker_take_jobs_but_a_stop_request_goes_through():
    from rq.exceptions import StopRequested

    assert GpuCheck(FailingNvml(RuntimeError("NVML_ERROR_UNKNOWN")), 0, 0.25).wait_until_free() >= 0
    # RQ raises StopRequested from its signal handler wherever the worker is when Ctrl-C comes.
    with pytest.raises(StopRequested):
        GpuCheck(FailingNvml(StopRequested()), 0, 0.25).wait_until_free()


def test_while_it_waits_the_check_says_why_and_forgets_it_once_the_gpu_is_free(monkeypatch):
    nvml = FakeNvml(processes={0: [(4242, 10 * GIB)]})
    check = GpuCheck(nvml, 0, 0.25)
    seen = []

    def leave_after_one_poll():
        seen.append(check.waiting)  # what the worker's heartbeat publishes meanwhile
        nvml.processes = {}

    monkeypatch.setattr(gpu.time, "sleep", lambda seconds: None)
    check.wait_until_free(leave_after_one_poll)
    assert seen == ["GPU 0: 1 other process(es) (pid 4242) hold 10.0 of 16.0 GiB, more than 25%"]
    assert check.waiting is None


@pytest.mark.parametrize("value, expected", [(None, 30.0), ("2", 2.0), ("0", 0.5), ("soon", 30.0)])
def test_the_poll_interval_comes_from_the_environment_within_bounds(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("RUNYARD_GPU_POLL_SECONDS", raising=False)
    else:
        monkeypatch.setenv("RUNYARD_GPU_POLL_SECONDS", value)
    assert gpu.poll_seconds() == expected


# A stand-in for nvidia-ml-py in a worker process: GPU 0 (16 GiB) with the compute processes the
# JSON file FAKE_NVML_STATE lists as [[pid, bytes], ...].
FAKE_PYNVML = """
import json, os
from types import SimpleNamespace

def _processes():
    with open(os.environ["FAKE_NVML_STATE"]) as handle:
        return json.load(handle)

def nvmlInit():
    pass

def nvmlDeviceGetHandleByIndex(index):
    return index

def nvmlDeviceGetMemoryInfo(handle):
    used = sum(size for _, size in _processes())
    return SimpleNamespace(total=16 * 1024**3, used=used, free=16 * 1024**3 - used)

def nvmlDeviceGetComputeRunningProcesses(handle):
    return [SimpleNamespace(pid=pid, usedGpuMemory=size) for pid, size in _processes()]
"""


def test_a_worker_on_a_busy_gpu_says_why_in_its_heartbeat_and_takes_the_job_once_it_is_free(
    redis_url, connection, demo_data, tmp_path
):
    fake = tmp_path / "fake-nvml"
    fake.mkdir()
    (fake / "pynvml.py").write_text(FAKE_PYNVML)
    state = tmp_path / "nvml.json"
    state.write_text(json.dumps([[4242, 10 * GIB]]))
    env = isolated_env(redis_url, tmp_path / "home") | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])),
        "CUDA_VISIBLE_DEVICES": "0",  # a GPU worker's pinning; the job itself trains on the CPU
        "FAKE_NVML_STATE": str(state),
        "RUNYARD_GPU_POLL_SECONDS": "0.5",
        "RUNYARD_HEARTBEAT_TTL": "3",
    }
    spec = tiny_spec(demo_data, device="cpu")
    spec.pop("pretrained")
    options = [arg for key, value in spec.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    published = run_cli("publish", "--no-pretrained", *options, "--json", env=env)
    assert published.returncode == 0, published.stderr
    job = Job.fetch(json.loads(published.stdout)["job_id"], connection=connection, serializer=JSONSerializer)
    worker = start_worker(env, "gpu-box", tmp_path / "worker.log", "--burst")
    try:

        def gpu_wait():
            beat = connection.get(heartbeat_key("gpu-box"))
            return beat and json.loads(beat).get("gpu_wait")

        reason = wait_for(gpu_wait, 60, "the heartbeat to say why the worker waits")
        assert reason == "GPU 0: 1 other process(es) (pid 4242) hold 10.0 of 16.0 GiB, more than 25%"
        assert job.get_status(refresh=True).value == "queued"  # not taken while the GPU is held

        state.write_text("[]")  # the colleague's notebook lets go
        worker.wait(timeout=120)
        assert job.get_status(refresh=True).value == "finished"
        assert not json.loads(connection.get(heartbeat_key("gpu-box")) or "{}").get("gpu_wait")
    finally:
        if worker.poll() is None:
            kill_worker(worker.pid)
        worker.wait()
