"""How a worker ends a job that did not succeed: one log line for expected failures, and the
cases RQ must not record as failed (a dead horse is requeued as a crash, a cancel ends `canceled`,
a job requeued by a janitor meanwhile is left to its new owner).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import call_exception_handlers
from rq.registry import CanceledJobRegistry, StartedJobRegistry

from contracts.job_meta import read_job_meta, set_failure
from contracts.spec import SpecError
from trainer.data import DataError
from worker.allow_listed_job import RefusedJob
from worker.control import cancel_key
from worker.jobs import JobCancelled, JobLost, OutOfMemory, StorageFailure

if TYPE_CHECKING:
    from worker.rq_worker import RunyardWorker

# Failures whose message is the whole story: no traceback in the log.
EXPECTED_FAILURES = (RefusedJob, SpecError, DataError, StorageFailure, JobCancelled, JobLost, OutOfMemory)

log = logging.getLogger("runyard.worker")


class FailurePolicy:
    """What a worker does with a failed job before (or instead of) RQ's failure handling."""

    def __init__(self, worker: RunyardWorker):
        self.worker = worker
        self.crashed_job_id: str | None = None  # the job whose horse just died (OOM killer, segfault, kill -9)

    def log_expected(self, job: Job, exc_info: tuple) -> bool:
        """For an expected failure (a refused payload, a bad spec, missing data, a cancel), log one
        line and run the exception handlers; False for failures that are bugs (RQ logs a traceback)."""
        if exc_info[0] is None or not issubclass(exc_info[0], EXPECTED_FAILURES):
            return False
        reason = read_job_meta(job.meta, job.id).failure_reason or exc_info[0].__name__
        log.warning("%s: job %s failed (%s): %s", self.worker.name, job.id, reason, str(exc_info[1]).splitlines()[0])
        # rq.Worker.handle_exception logs a traceback and then calls `_exc_handlers`; RQ has no
        # public way to call the handlers without the traceback.
        call_exception_handlers(self.worker._exc_handlers, job, *exc_info)
        return True

    def settled(self, job: Job, queue: Queue, execution: Execution | None, exc_string: str) -> bool:
        """Whether the failure is settled here; False leaves it to RQ (failed, or retried)."""
        worker = self.worker
        if worker.is_horse and os.getppid() != worker.pid:
            # This horse's worker died: a janitor requeues the job once the worker's heartbeat
            # lapses, and recording a failure now would pre-empt that.
            log.warning("job %s: its worker process died; leaving the job to the janitors", job.id)
            return True
        if execution is not None and not self._owns(job, execution):
            log.warning(
                "%s: job %s was requeued while this worker ran it; leaving it to its new owner", worker.name, job.id
            )
            worker.executions.pop(execution.id, None)
            return True
        if self.crashed_job_id == job.id and execution is not None:
            self.crashed_job_id = None
            reason = f"its work horse died on {worker.name} ({exc_string.strip()})"
            if worker.requeue(job.id, queue.name, execution.id, reason, count=True) is not None:
                return True
        meta = read_job_meta(job.meta if worker.is_horse else job.get_meta(refresh=True), job.id)
        if meta.failure_reason == "cancelled" or worker.connection.exists(cancel_key(job.id)):
            self._finish_cancelled(job, execution)
            return True
        return False

    def _owns(self, job: Job, execution: Execution) -> bool:
        registry = StartedJobRegistry(job.origin, connection=self.worker.connection)
        return self.worker.connection.zscore(registry.key, execution.composite_key) is not None

    def _finish_cancelled(self, job: Job, execution: Execution | None) -> None:
        """A cancelled job ends as RQ's `canceled` (not failed, not retried), its reason in meta."""
        worker = self.worker
        # RQ's `_stopped_job_id` names the job that `send_stop_job_command` stopped; RQ's own
        # handle_job_failure clears it, and this path replaces that call.
        worker._stopped_job_id = None
        if read_job_meta(job.meta, job.id).failure_reason != "cancelled":  # stopped by `runyard cancel --force`
            set_failure(job.meta, "cancelled", "cancelled by `runyard cancel --force`: its work horse was killed")
        with worker.connection.pipeline() as pipeline:
            job.set_status(JobStatus.CANCELED, pipeline=pipeline)
            job.save(pipeline=pipeline)
            CanceledJobRegistry(job.origin, connection=worker.connection, serializer=worker.serializer).add(
                job, pipeline=pipeline
            )
            worker.cleanup_execution(job, pipeline=pipeline, execution=execution)
            pipeline.delete(cancel_key(job.id))
            pipeline.execute()
        log.info("%s: job %s cancelled; its checkpoint is kept", worker.name, job.id)
