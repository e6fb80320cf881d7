"""An RQ Job that only ever imports runyard's own entry points.

Plain RQ imports and calls whatever `func_name` a payload in Redis names (`os.system` included),
and imports callbacks the same way. Workers use this class instead: a job naming anything outside
worker.jobs.ENTRY_POINTS / CALLBACKS fails with a clear reason and the worker goes on serving.
"""

from __future__ import annotations

from rq.job import Job

from worker.jobs import CALLBACKS, ENTRY_POINTS


class RefusedJob(RuntimeError):
    """The job names a function runyard does not run."""


class AllowListedJob(Job):
    @property
    def func(self):
        name = self.func_name
        if self.instance is not None or name not in ENTRY_POINTS:
            raise RefusedJob(
                f"refused to run {name!r}: runyard workers only run {', '.join(sorted(ENTRY_POINTS))} "
                "(publish experiments with `publish` or `schedule-search`)"
            )
        return super().func

    @property
    def success_callback(self):
        _check_callback(self._success_callback_name)
        return super().success_callback

    @property
    def failure_callback(self):
        _check_callback(self._failure_callback_name)
        return super().failure_callback

    @property
    def stopped_callback(self):
        _check_callback(self._stopped_callback_name)
        return super().stopped_callback


def _check_callback(name: str | None) -> None:
    if name and name not in CALLBACKS:
        raise RefusedJob(f"refused callback {name!r}: runyard workers only call {sorted(CALLBACKS) or 'none'}")
