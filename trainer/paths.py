"""Where runyard keeps its files on a box: RUNYARD_HOME (default ~/.runyard)."""

from __future__ import annotations

import os
from pathlib import Path


def runyard_home() -> Path:
    """The directory for the embedded Redis, run dirs and demo data; RUNYARD_HOME overrides it."""
    return Path(os.environ.get("RUNYARD_HOME") or Path.home() / ".runyard").expanduser()


def runs_root(output_dir: str | None) -> Path:
    """Where run dirs go: the spec's output_dir if set, else $RUNYARD_HOME/runs."""
    return Path(output_dir).expanduser() if output_dir else runyard_home() / "runs"
