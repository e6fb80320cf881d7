"""The meta of a runyard job (RQ's `job.meta`): every key a layer writes there, typed.

The publisher writes the identity (run name, spec hash, search point, `max_requeues`), the work
horse its progress and resume notes, janitors their requeues, and whoever ends a job early its
`failure_reason`. Readers (`runyard status`, the dashboard, janitors, other workers) may run
another version of runyard than the writer, so reading is lenient: `read_job_meta` never raises,
drops a value of the wrong type (and says which in `JobMeta.dropped` and the log) and keeps keys it
does not know. Writing is checked: `update_job_meta` and `set_failure` refuse a wrong value or an
unknown failure reason, because that is a bug in the writer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

FailureReason = Literal[
    "spec_error",  # the payload or its spec is invalid: no retry can fix it
    "data_error",  # the data dir is missing or broken
    "storage_error",  # the run's files cannot be written (disk full, read-only, no permission)
    "oom",  # CUDA out of memory even at min_batch_size
    "crashed",  # its worker died more often than max_requeues allows
    "cancelled",  # `runyard cancel`
    "code_error",  # an exception in runyard or the libraries it calls
    "fold_failed",  # a k-fold aggregate whose folds did not all finish
    "search_stopped",  # its search stopped after repeated identical data errors (worker.search_stop)
    "store_error",  # the final artifacts could not be made durable in the run store (RUNYARD_STORE)
]
FAILURE_REASONS: tuple[str, ...] = get_args(FailureReason)
FAILURE_MESSAGE_LENGTH = 2000
DEFAULT_MAX_REQUEUES = 3  # crashes of its worker a job survives (meta `max_requeues`)

log = logging.getLogger("runyard.contracts")


class JobMeta(BaseModel):
    """Every key runyard keeps in a job's meta; all optional, unknown keys kept as they are."""

    model_config = ConfigDict(extra="allow")

    # Written at publish time
    run_name: str | None = None
    spec_hash: str | None = None
    model: str | None = None
    epochs: int | None = None
    max_requeues: int | None = Field(None, ge=0)
    search: str | None = None
    point: str | None = None
    kind: str | None = None  # a search point's kind: run, fold or aggregate
    params: dict[str, Any] | None = None
    owner: str | None = None  # who the job's GPU time is charged to (fair share, quotas)
    preemptible: bool | None = None  # False: `publish --no-preempt`

    # Written by the work horse
    code: dict[str, Any] | None = None
    status: str | None = None  # finished, pruned or paused (an ASHA rung), once the run is recorded
    progress: dict[str, Any] | None = None  # the last epoch report
    history: list[dict[str, Any]] | None = None  # epoch, train_loss, val_f1 per epoch
    attempts: int | None = None
    resumed_from_epoch: int | None = None
    resume_note: str | None = None
    shutdowns: int | None = None
    shutdown_after_epoch: int | None = None
    oom_adjustments: list[dict[str, Any]] | None = None
    batch_adjustment: dict[str, Any] | None = None
    trial_number: int | None = None  # a bayes point's Optuna trial
    rung: int | None = Field(None, ge=0)  # an ASHA point's job: the rung it trains up to (0 = the first)
    rung_epochs: int | None = Field(None, ge=1)  # ... and that rung's epoch, where it pauses
    promoted_from_job: str | None = None  # an ASHA promotion: the job that paused at the rung below
    checkpoint_fallback: list[str] | None = None  # checkpoints that would not load at resume, and what was done
    artifacts_pending: int | None = None  # files written locally, not yet durable in the run store
    checkpoint_at: float | None = None  # when the last checkpoint was written (preemption picks the latest)

    # Written when a higher-priority job preempts this one
    preempted_by: str | None = None
    preempted_after_epoch: int | None = None
    preemptions: list[dict[str, Any]] | None = None
    preempt_stop: dict[str, Any] | None = None  # where the last preemption stopped (step or epoch) and the work re-done

    # Written by janitors
    requeues: int | None = None
    requeue_log: list[dict[str, Any]] | None = None

    # Written by whoever ends the job early. A reader keeps a reason it does not know (a newer
    # worker may have written it); writers use `set_failure`, which accepts only FAILURE_REASONS.
    failure_reason: str | None = None
    failure_message: str | None = None

    _dropped: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def dropped(self) -> dict[str, str]:
        """Keys whose stored value was invalid and was left out, with why."""
        return self._dropped


def read_job_meta(meta: Any, job_id: str | None = None) -> JobMeta:
    """A job's meta as stored, never raising: invalid values dropped (and logged), unknown keys kept."""
    if not isinstance(meta, Mapping):
        parsed = JobMeta()
        if meta is not None:
            parsed._dropped["<meta>"] = f"not a mapping ({type(meta).__name__})"
            log.warning("job %s: its meta is not a mapping (%s); read as empty", job_id or "-", type(meta).__name__)
        return parsed
    values = {str(key): value for key, value in meta.items()}
    dropped: dict[str, str] = {}
    for _ in range(len(JobMeta.model_fields) + 1):
        try:
            parsed = JobMeta.model_validate(values)
            break
        except ValidationError as error:
            for problem in error.errors():
                key = str(problem["loc"][0]) if problem["loc"] else "<meta>"
                dropped[key] = problem["msg"]
                values.pop(key, None)
    else:  # unreachable: each round drops at least one field
        parsed = JobMeta()
    if dropped:
        parsed._dropped.update(dropped)
        log.warning(
            "job %s: invalid meta left out: %s", job_id or "-", "; ".join(f"{k}: {v}" for k, v in dropped.items())
        )
    return parsed


def update_job_meta(meta: MutableMapping[str, Any], **changes: Any) -> MutableMapping[str, Any]:
    """Write `changes` into a job's meta dict after checking them against JobMeta; return the dict."""
    unknown = set(changes) - set(JobMeta.model_fields)
    if unknown:
        raise ValueError(f"not job meta keys: {', '.join(sorted(unknown))} (add them to contracts.job_meta.JobMeta)")
    checked = JobMeta.model_validate(changes)
    meta.update({key: getattr(checked, key) for key in changes})
    return meta


def set_failure(meta: MutableMapping[str, Any], reason: FailureReason, message: str) -> MutableMapping[str, Any]:
    """Record why a job failed in its meta dict (the message is cut to FAILURE_MESSAGE_LENGTH)."""
    if reason not in FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {reason!r}: use one of {', '.join(FAILURE_REASONS)}")
    return update_job_meta(meta, failure_reason=reason, failure_message=message[:FAILURE_MESSAGE_LENGTH])
