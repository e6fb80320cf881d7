"""CUDA out of memory: shrink the batch, keep the effective batch, try again in the same process.

A run that does not fit halves `batch_size` and doubles `grad_accum_steps` (training batch), or
halves `valid_batch_size` (evaluation), frees what the failed attempt held and continues from
its last checkpoint, down to the spec's `min_batch_size`. Each adjustment is recorded in the
result and the W&B config.

RUNYARD_FAULT_OOM_ABOVE_BATCH is a test-only fault injection: when set to N, a training batch
of more than N images raises torch.OutOfMemoryError as if the GPU had run out. It exists so the
retry path can be tested on machines without a GPU; never set it in production.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

from contracts.spec import ExperimentSpec

FAULT_OOM_ABOVE_BATCH = "RUNYARD_FAULT_OOM_ABOVE_BATCH"


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's out-of-memory error (and the allocator's older RuntimeError form)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "CUDA out of memory" in str(error)


def inject_fault(batch_rows: int) -> None:
    """Test-only: raise an out-of-memory error for batches above RUNYARD_FAULT_OOM_ABOVE_BATCH."""
    limit = os.environ.get(FAULT_OOM_ABOVE_BATCH)
    if limit and limit.isdigit() and batch_rows > int(limit):
        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by {FAULT_OOM_ABOVE_BATCH}={limit}: batch of {batch_rows} images)"
        )


def smaller_batch(spec: ExperimentSpec, phase: str) -> tuple[ExperimentSpec, dict[str, Any]] | None:
    """The spec with half the batch for `phase` ("train" or "eval"), or None at the floor.

    Training keeps its effective batch (batch_size x grad_accum_steps) by doubling accumulation.
    """
    floor = spec.min_batch_size
    if phase == "eval":
        if spec.valid_batch_size // 2 < floor:
            return None
        changes = {"valid_batch_size": spec.valid_batch_size // 2}
    else:
        if spec.batch_size // 2 < floor or spec.batch_size % 2:
            return None
        changes = {"batch_size": spec.batch_size // 2, "grad_accum_steps": spec.grad_accum_steps * 2}
    before = {key: getattr(spec, key) for key in changes}
    adjusted = ExperimentSpec.model_validate(spec.model_dump() | changes)
    return adjusted, {"phase": phase, "from": before, "to": changes}


def free_memory() -> None:
    """Release what a failed attempt held, so the next one starts with an empty GPU cache."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
