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

# W&B's job_type of each kind of run runyard makes; the UI groups and filters runs by it.
JOB_TYPES = ("train", "fold", "aggregate", "infer", "compare")  # compare: a search's comparison picture


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
        if job_type not in JOB_TYPES:
            raise ValueError(f"job_type {job_type!r} is not one of {', '.join(JOB_TYPES)}")
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

    @property
    def next_step(self) -> int:
        """The first step this run still accepts: past what a resumed online run holds, else 0."""
        try:
            return int(self.run.starting_step or 0) if self.run is not None else 0
        except Exception:
            return 0

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

    def log_artifact(
        self,
        path: Path,
        name: str,
        kind: str,
        aliases: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Log one file (best checkpoint: kind "model"; submission CSV: kind "submission") as an artifact.

        The file is referenced where it lies, not copied into W&B's staging area: checkpoints are
        large, and the run dir keeps them until `wandb sync` (or the online upload) has read them.
        A missing file is skipped with a warning.
        """
        path = Path(path)
        if self.run is None:
            return
        if not path.is_file():
            log.warning("W&B artifact %s skipped: %s does not exist", name, path)
            return

        def upload(run):
            import wandb

            artifact = wandb.Artifact(name, type=kind, metadata=metadata or {})
            artifact.add_file(str(path), policy="immutable", skip_cache=True)
            run.log_artifact(artifact, aliases=aliases or None)

        self._call(upload)

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
