"""Compute settings: the CUDA choices (channels_last, bf16 / fp16 autocast) run on the CPU here,
and the defaults for threads and DataLoader workers share a box's cores without oversubscribing.

No GPU on this machine: `plan_compute` for a CUDA device is checked with torch's bf16 query
answered by hand (the one thing a GPU would answer); everything else runs for real.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contracts.spec import SpecError, load_spec
from runyard.cli.worker import worker_slots
from tests.helpers import run_cli, tiny_spec
from trainer import compute, cores
from trainer.compute import ComputePlan, plan_compute, prepare_model
from trainer.train import Trainer


@pytest.fixture(autouse=True)
def quiet_env(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the trainer leaves threads alone when this is set
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+GradScaler"])
def test_channels_last_and_mixed_precision_train_an_epoch_on_the_cpu(demo_data, dtype):
    spec = load_spec(tiny_spec(demo_data, pictures=False, num_workers=0))
    plan = ComputePlan(channels_last=True, amp_dtype=dtype)
    trainer = Trainer(spec, compute_plan=plan)
    convolution = next(module for module in trainer.model.modules() if isinstance(module, torch.nn.Conv2d))
    assert convolution.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    trainer.model.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    assert trainer.autocast.scaler.is_enabled() == (dtype == torch.float16)
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}

    result = trainer.fit()

    images, logits = seen[0]
    assert images.is_contiguous(memory_format=torch.channels_last) and logits.dtype == dtype
    assert math.isfinite(result["last"]["val_loss"])
    saved = torch.load(Path(result["run_dir"]) / "checkpoints" / "last.pt", weights_only=True)
    assert any(not torch.equal(before[name], saved["model"][name]) for name in before), "no weight was trained"
    assert saved["scaler"].get("scale") is not None if dtype == torch.float16 else saved["scaler"] == {}


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_on_cuda_the_plan_is_channels_last_amp_and_cudnn_autotuning_unless_deterministic(
    monkeypatch, demo_data, native_bf16, dtype
):
    asked = []

    def bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    spec = load_spec(tiny_spec(demo_data))
    plan = plan_compute(spec, torch.device("cuda"))
    assert plan == ComputePlan(channels_last=True, amp_dtype=dtype, compile=False, cudnn_benchmark=True)
    assert asked == [False]  # emulated bf16 (a V100) is slower than fp16: it does not count
    exact = plan_compute(load_spec(tiny_spec(demo_data, deterministic=True, amp=False)), torch.device("cuda"))
    assert exact.cudnn_benchmark is False and exact.amp_dtype is None
    assert plan_compute(spec, torch.device("cpu")) == ComputePlan()


def test_compile_wraps_the_forward_but_checkpoints_keep_the_plain_modules_names():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    forward = prepare_model(model, ComputePlan(compile=True))
    assert forward is not model and forward._orig_mod is model  # compiled lazily, on the first call
    assert all(not key.startswith("_orig_mod") for key in model.state_dict())
    assert prepare_model(model, ComputePlan()) is model


def test_spec_fields_for_the_cache_and_compile_do_not_change_the_spec_hash(demo_data):
    spec = load_spec(tiny_spec(demo_data))
    assert spec.image_cache == "memory" and spec.compile is False
    same = load_spec(tiny_spec(demo_data, image_cache="disk", compile=True))
    assert same.spec_hash() == spec.spec_hash()


def test_an_unknown_image_cache_is_refused_by_the_spec_and_by_publish_with_the_choices(demo_data):
    with pytest.raises(SpecError) as refused:
        load_spec(tiny_spec(demo_data, image_cache="ram"))
    assert refused.value.fields == ["image_cache"] and "'memory'" in str(refused.value)
    result = run_cli("publish", "--model", "test_efficientnet", "--data-dir", str(demo_data), "--image-cache", "ram")
    assert result.returncode == 2 and "'ram' is not one of 'none', 'memory', 'disk'" in result.stderr


@pytest.mark.parametrize(
    "device, share, loader_workers, threads",
    [
        ("cpu", 1, 0, 1),
        ("cpu", 2, 1, 1),
        ("cpu", 8, 2, 6),
        ("cpu", 64, 4, 60),
        ("cuda", 1, 1, None),
        ("cuda", 16, 8, None),
    ],
)
def test_defaults_split_a_share_of_cores_between_loader_workers_and_threads(device, share, loader_workers, threads):
    assert cores.default_loader_workers(device, share) == loader_workers
    if threads is not None:
        assert cores.default_torch_threads(loader_workers, share) == threads
        assert loader_workers + threads <= max(share, 1)


def test_cpu_workers_get_threads_that_leave_room_for_their_loader_workers(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    slots = worker_slots(None, True, 2, "box")
    assert [env["OMP_NUM_THREADS"] for _, env in slots] == ["3", "3"]  # 4 cores each: 1 loader worker + 3
    assert all(env["RUNYARD_WORKERS_PER_BOX"] == "2" for _, env in slots)


def test_without_omp_num_threads_a_cpu_run_uses_the_cores_its_loader_workers_leave(demo_data, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cores, "available_cores", lambda: 4)
    compute.configure_backends(ComputePlan(), torch.device("cpu"), loader_workers=1)
    assert torch.get_num_threads() == 3


DENORMAL_PROBE = """
import json, sys, torch
from contracts.spec import load_spec
from trainer.train import Trainer
probe = lambda: float(torch.tensor([1e-39]) * 2)  # a float32 denormal, kept unless flushed
before = probe()
Trainer(load_spec(json.loads(sys.argv[1])))
torch.set_num_threads(2)
print(json.dumps({"before": before, "after": probe(), "threads": float((torch.full((1 << 16,), 1e-39) * 2).sum())}))
"""


def test_every_training_run_flushes_denormal_floats_to_zero(demo_data, tmp_path):
    """A fresh process (as a work horse, `runyard train` or a benchmark is): denormals stay until a
    Trainer is built, then are zero, also in torch's intra-op threads started after it."""
    spec = tiny_spec(demo_data, pictures=False, num_workers=0, output_dir=str(tmp_path / "runs"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    probe = subprocess.run(
        [sys.executable, "-c", DENORMAL_PROBE, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=120
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout.splitlines()[-1])
    assert found["before"] > 0
    assert found["after"] == 0.0
    assert found["threads"] == 0.0
