"""How the model computes on its device, decided once per run from the spec and the device.

On CUDA: channels_last memory format (convolutions run NHWC on tensor cores), mixed precision
(bfloat16 on GPUs that have it natively, Ampere on; float16 with a GradScaler before that, e.g.
V100: torch's bf16 check counts emulation as support, and emulated bf16 is slower than fp32),
cuDNN autotuning unless the spec asks for deterministic kernels, and torch.compile when the spec
opts in. On the CPU: float32, the default memory format, and torch's intra-op threads set to the
cores the DataLoader workers leave (trainer.cores) unless OMP_NUM_THREADS says otherwise.
Every run flushes denormal floats to zero: as weights and gradients shrink over the epochs, more
of them fall below float32's normal range, and x86 CPUs compute those many times slower (cpu-2:
test_resnet at batch 1 went from 16 s to 45 s an epoch by epoch 5; flat with the flush).
Tests build a ComputePlan by hand to run the CUDA choices (channels_last, bf16/fp16) on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from contracts.spec import ExperimentSpec
from trainer import cores


@dataclass(frozen=True)
class ComputePlan:
    """channels_last: model and inputs NHWC; amp_dtype: autocast dtype (None: float32);
    compile: torch.compile the training forward; cudnn_benchmark: let cuDNN pick kernels by timing."""

    channels_last: bool = False
    amp_dtype: torch.dtype | None = None
    compile: bool = False
    cudnn_benchmark: bool = False


def cuda_amp_dtype() -> torch.dtype:
    """bfloat16 where the GPU computes it natively, else float16 (which needs a GradScaler)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def plan_compute(spec: ExperimentSpec, device: torch.device) -> ComputePlan:
    """The plan for `spec` on `device` (see the module docstring)."""
    cuda = device.type == "cuda"
    return ComputePlan(
        channels_last=cuda,
        amp_dtype=cuda_amp_dtype() if cuda and spec.amp else None,
        compile=spec.compile,
        cudnn_benchmark=cuda and not spec.deterministic,
    )


def configure_backends(plan: ComputePlan, device: torch.device, loader_workers: int) -> None:
    """Process-wide settings: denormals flushed to zero; cuDNN autotuning on CUDA; on the CPU, intra-op threads."""
    # Before any parallel op: threads torch starts later inherit the flag from this one.
    torch.set_flush_denormal(True)
    if plan.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores.default_torch_threads(loader_workers))


def prepare_model(model: nn.Module, plan: ComputePlan) -> Callable[..., torch.Tensor]:
    """Put `model` in the plan's memory format (in place) and return what to call for training:
    the model itself, or its compiled forward (the module, its state_dict and checkpoints stay
    the uncompiled ones)."""
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if plan.compile else model


def prepare_input(images: torch.Tensor, plan: ComputePlan) -> torch.Tensor:
    """A batch in the plan's memory format."""
    return images.contiguous(memory_format=torch.channels_last) if plan.channels_last else images
