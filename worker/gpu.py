"""Polite GPU use: a worker takes no job while another process holds much of its GPU's memory.

Before each dequeue a GPU worker asks NVML (nvidia-ml-py) how much memory the compute processes
on its GPU hold; above the threshold (RUNYARD_GPU_BUSY_FRACTION, default 0.25, `worker
--gpu-busy-above`) it waits and asks again (every RUNYARD_GPU_POLL_SECONDS, default 30), so a
colleague's notebook is not pushed into an out-of-memory error. While it waits, the reason is in
the worker's heartbeat record (`gpu_wait`) for whoever wonders why. The worker's own parent never
touches CUDA and its work horse has exited by then, so whatever NVML lists belongs to someone else.
CPU workers skip the check.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from rq.exceptions import StopRequested

log = logging.getLogger("runyard.gpu")

DEFAULT_BUSY_FRACTION = 0.25
POLL_SECONDS = 30.0
GIB = 1024**3


def busy_fraction() -> float:
    """The share of GPU memory others may hold before a worker waits (RUNYARD_GPU_BUSY_FRACTION)."""
    return _bounded_setting("RUNYARD_GPU_BUSY_FRACTION", DEFAULT_BUSY_FRACTION, 0.0, 1.0)


def poll_seconds() -> float:
    """Seconds between NVML checks while the GPU is busy (RUNYARD_GPU_POLL_SECONDS, default 30)."""
    return _bounded_setting("RUNYARD_GPU_POLL_SECONDS", POLL_SECONDS, 0.5, 3600.0)


def _bounded_setting(variable: str, default: float, low: float, high: float) -> float:
    """The number in environment `variable`, kept within [low, high]; `default` when unset or not a number."""
    try:
        value = float(os.environ.get(variable, default))
    except ValueError:
        return default
    return min(max(value, low), high)


def pinned_gpu() -> int | None:
    """The one GPU index CUDA_VISIBLE_DEVICES pins this worker to; None on CPU workers."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return int(value) if value.isdigit() else None


def busy_reason(nvml: Any, index: int, fraction: float) -> str | None:
    """Why GPU `index` is too busy to take a job (others hold > fraction of its memory), or None."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
    reported = [process.usedGpuMemory for process in processes if process.usedGpuMemory is not None]
    # Inside some containers NVML hides per-process memory; the device total used is the fallback.
    held = sum(reported) if len(reported) == len(processes) else memory.used
    if not processes or held <= fraction * memory.total:
        return None
    pids = ", ".join(str(process.pid) for process in processes[:5])
    return (
        f"GPU {index}: {len(processes)} other process(es) (pid {pids}) hold {held / GIB:.1f} of "
        f"{memory.total / GIB:.1f} GiB, more than {fraction:.0%}"
    )


class GpuCheck:
    """NVML's view of one GPU, asked before every dequeue."""

    def __init__(self, nvml: Any, index: int, fraction: float, poll_seconds: float = POLL_SECONDS):
        self.nvml = nvml
        self.index = index
        self.fraction = fraction
        self.poll_seconds = poll_seconds
        self.waiting: str | None = None  # why the worker is waiting now (None: it is not)

    @classmethod
    def from_environment(cls) -> GpuCheck | None:
        """The check for this worker's pinned GPU; None on CPU workers or without NVML."""
        index = pinned_gpu()
        if index is None:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as error:  # no driver, no library: nothing to be polite about
            log.warning("GPU %d: NVML unavailable (%s); not checking for other processes", index, error)
            return None
        return cls(pynvml, index, busy_fraction(), poll_seconds())

    def wait_until_free(self, while_waiting: Callable[[], None] = lambda: None) -> float:
        """Block while others hold the GPU; returns the seconds waited. Logs when waiting starts and ends."""
        started = time.monotonic()
        told = None
        while True:
            try:
                reason = busy_reason(self.nvml, self.index, self.fraction)
            except StopRequested:  # the worker's stop, raised by RQ's signal handler: not an NVML error
                raise
            except Exception as error:  # NVML hiccup: do not hold the queue hostage
                log.warning("GPU %d: NVML query failed (%s); taking jobs anyway", self.index, error)
                self.waiting = None
                return time.monotonic() - started
            self.waiting = reason
            if reason is None:
                if told:
                    log.info("GPU %d is free again after %.0f s; taking jobs", self.index, time.monotonic() - started)
                return time.monotonic() - started
            if told is None:
                log.info("%s; waiting before taking a job", reason)
                told = reason
            while_waiting()
            time.sleep(self.poll_seconds)
