"""Stopping a run from outside, between optimizer steps; torch-free so workers can import it cheaply.

The trainer asks a `should_stop` callback after every optimizer step (the step boundary) and,
with `boundary="epoch"`, before each epoch (the epoch boundary: the last epoch's checkpoint is
written, nothing is lost by stopping here). A reason stops training with TrainingInterrupted;
the last finished epoch's checkpoint remains, and a resumed run starts after it (see
trainer.checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts.epoch_report import EpochReport

SHUTDOWN = "shutdown"  # the worker is going down: keep the checkpoint, run the rest later
CANCELLED = "cancelled"  # a user cancelled the run
PREEMPTED = "preempted"  # a `high` job needs this GPU: keep the checkpoint, run the rest later
LOST = "lost"  # this process no longer owns the job (it was requeued elsewhere): stop quietly

STEP_BOUNDARY = "step"  # after an optimizer step: the epoch's training so far is re-done on resume
EPOCH_BOUNDARY = "epoch"  # before an epoch: nothing is re-done
# Before an attempt trains anything (its set-up: imports, data, model, before the W&B run starts):
# nothing is re-done either, so a step or an epoch request stops here.
SETUP_BOUNDARY = "setup"


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary because `should_stop` gave a reason.

    `epoch` is the last finished epoch: its checkpoint is on disk and a resumed run starts after it.
    """

    def __init__(self, reason: str, epoch: int):
        super().__init__(f"training stopped after epoch {epoch}: {reason}")
        self.reason = reason
        self.epoch = epoch


@dataclass
class ResumeInfo:
    """Where a run starts: after `start_epoch` (0 = from scratch), with these earlier reports.

    `adjustments` are the out-of-memory batch changes this run made so far (see trainer.oom);
    `fallbacks` say which checkpoints would not load or fetch, and what was done instead.
    """

    start_epoch: int = 0
    history: list[EpochReport] = field(default_factory=list)
    checkpoint: str | None = None
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
