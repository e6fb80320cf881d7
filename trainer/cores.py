"""How a box's cores are shared: runyard workers, DataLoader workers and torch threads (no torch import).

`worker` sets RUNYARD_WORKERS_PER_BOX for the processes it starts; each then counts on its share
of the cores. On the CPU, torch's intra-op threads and the DataLoader workers split that share
and never exceed it: OpenMP threads spin-wait on each other, so on a busy box a step with more
threads than free cores can take many times longer than with one (cpu-2 measured two threads
~14x slower than one under load). A DataLoader worker is a separate process that never makes
the training threads wait, so the augmentation of the next batches overlaps the current step.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def workers_per_box() -> int:
    """runyard worker processes sharing this box (RUNYARD_WORKERS_PER_BOX, set by `worker`)."""
    try:
        return max(1, int(os.environ.get("RUNYARD_WORKERS_PER_BOX", "1")))
    except ValueError:
        return 1


def core_share(cores: int | None = None, workers: int | None = None) -> int:
    """Cores for one runyard worker: the box's, divided among its workers."""
    return max(1, (cores or available_cores()) // (workers or workers_per_box()))


def default_loader_workers(device_type: str, share: int | None = None) -> int:
    """DataLoader workers for one training process.

    GPU: all but one core of the share (up to 8): they decode in epoch 1 and feed uint8 batches;
    the GPU augments. CPU: one per four cores of the share (at least one from two cores on, up
    to 4), which decode in epoch 1 and augment the next batches while the threads train.
    """
    share = share or core_share()
    if device_type == "cuda":
        return max(1, min(8, share - 1))
    return 0 if share < 2 else min(4, max(1, share // 4))


def default_torch_threads(loader_workers: int, share: int | None = None) -> int:
    """torch intra-op threads for CPU training: the share's cores the DataLoader workers leave."""
    share = share or core_share()
    return max(1, share - loader_workers)
