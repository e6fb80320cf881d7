"""W&B logging that never prompts, never blocks a run and never fails one.

With no WANDB_API_KEY (and no WANDB_MODE) the run is logged offline into the run dir, to be
uploaded later with `wandb sync`. Any W&B error is logged once and tracking turns itself off.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """WANDB_MODE if set, else online with an API key and offline without one."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("online", "offline", "disabled"):
        return mode
    if mode == "dryrun":
        return "offline"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_run_id(run_name: str) -> str:
    """A W&B run id derived from the run name, so a resumed job continues the same W&B run."""
    return hashlib.sha1(run_name.encode()).hexdigest()[:16]


class WandbTracker:
    """A W&B run for one experiment; every method is a no-op once W&B has failed."""

    def __init__(
        self,
        run_name: str,
        run_dir: Path,
        config: dict[str, Any],
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        job_type: str = "train",
    ):
        self.mode = wandb_mode()
        self.run = None
        self.project = project or os.environ.get("WANDB_PROJECT") or "runyard"
        if self.mode == "disabled":
            return
        try:
            import wandb

            self.run = wandb.init(
                project=self.project,
                entity=entity or os.environ.get("WANDB_ENTITY") or None,
                group=group,
                tags=tags or None,
                name=run_name,
                id=wandb_run_id(run_name),
                resume="allow",
                job_type=job_type,
                config=config,
                dir=str(run_dir),
                mode=self.mode,
                settings=wandb.Settings(silent=True, console="off", init_timeout=90),
            )
        except Exception as error:
            log.warning("W&B disabled for this run: %s", error)
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._call(lambda run: run.log(metrics, step=step))

    def log_images(self, images: dict[str, Path], step: int | None = None) -> None:
        """Log image files (PNG) as W&B images under their names."""

        def log_files(run):
            import wandb

            run.log({name: wandb.Image(str(path)) for name, path in images.items()}, step=step)

        self._call(log_files)

    def summary(self, values: dict[str, Any]) -> None:
        def update(run):
            for key, value in values.items():
                run.summary[key] = value

        self._call(update)

    def finish(self, exit_code: int = 0) -> None:
        self._call(lambda run: run.finish(exit_code=exit_code))

    def describe(self) -> dict[str, Any]:
        """Where the run lives: its path online, or the offline dir and the command that uploads it."""
        if self.run is None:
            return {"mode": self.mode if self.mode == "disabled" else "failed"}
        info: dict[str, Any] = {"mode": self.mode, "id": self.run.id, "project": self.project}
        run_dir = str(Path(self.run.dir).parent)
        info["dir"] = run_dir
        if self.mode == "offline":
            info["sync"] = f"wandb sync {run_dir}"
        else:
            info["path"] = (
                "/".join(str(part) for part in self.run.path)
                if isinstance(self.run.path, (list, tuple))
                else self.run.path
            )
            info["url"] = getattr(self.run, "url", None)
        return info

    def _call(self, action) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:
            log.warning("W&B disabled for the rest of this run: %s", error)
            self.run = None
