"""Which code a box runs: the git commit of runyard's checkout, and fast-forwarding it.

Publisher and worker both record `git_state()` so a run says which commit published it and which
one trained it. `worker --follow-git` uses `fast_forward()` between jobs to keep a box on the
team's latest commit, as the original consumer did before each job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

GIT_TIMEOUT_S = 60  # a fetch over a slow link; never long enough to matter against a training job

# The checkout this code was imported from (worker/ sits at its top level).
CODE_DIR = Path(__file__).resolve().parent.parent


class FollowGitError(RuntimeError):
    """The checkout cannot follow its upstream; the message says why and what to do."""


def _git(directory: Path, *args: str, timeout: float = 5) -> str:
    return subprocess.run(
        ["git", *args], cwd=directory, capture_output=True, text=True, timeout=timeout, check=True
    ).stdout.strip()


def git_state(directory: Path | None = None) -> dict[str, Any]:
    """{"git_sha", "git_dirty"} of a checkout (runyard's own by default).

    Outside a checkout (an installed package, a Docker image) the commit is RUNYARD_GIT_SHA if set
    (the Dockerfile sets it from the GIT_SHA build argument), else None; dirty is then unknown.
    """
    directory = directory or CODE_DIR
    try:
        sha = _git(directory, "rev-parse", "HEAD")
        dirty = _git(directory, "status", "--porcelain", "--untracked-files=no")
        return {"git_sha": sha, "git_dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": os.environ.get("RUNYARD_GIT_SHA") or None, "git_dirty": None}


@lru_cache(maxsize=1)
def loaded_code_state() -> dict[str, Any]:
    """The checkout's state when this process first asked: the commit whose code it has imported.

    A worker calls it at start-up, so a later `git pull` in its checkout does not change what it
    reports until it restarts (which `--follow-git` does).
    """
    return git_state()


def compare_code(publisher: dict[str, Any] | None, worker: dict[str, Any]) -> dict[str, Any]:
    """Both sides' commits and whether the run trained on exactly the code it was published with."""
    publisher = {"git_sha": (publisher or {}).get("git_sha"), "git_dirty": (publisher or {}).get("git_dirty")}
    worker = {"git_sha": worker.get("git_sha"), "git_dirty": worker.get("git_dirty")}
    if not publisher["git_sha"] or not worker["git_sha"]:
        differs, reason = False, "unknown: not a git checkout"
    elif publisher["git_sha"] != worker["git_sha"]:
        differs, reason = True, f"published at {publisher['git_sha'][:10]}, trained at {worker['git_sha'][:10]}"
    elif publisher["git_dirty"] or worker["git_dirty"]:
        sides = [side for side, state in (("publisher", publisher), ("worker", worker)) if state["git_dirty"]]
        differs = True
        reason = f"same commit {worker['git_sha'][:10]}, but the {' and the '.join(sides)} had uncommitted changes"
    else:
        differs, reason = False, "same commit"
    return {"publisher": publisher, "worker": worker, "differs": differs, "reason": reason}


@dataclass
class FastForward:
    """What one `fast_forward()` did."""

    before: str
    after: str
    error: str | None = None

    @property
    def moved(self) -> bool:
        return self.before != self.after


def check_can_follow(directory: Path = CODE_DIR) -> str:
    """The upstream a checkout follows (`origin/main`); FollowGitError if it cannot follow one."""
    try:
        _git(directory, "rev-parse", "--git-dir")
    except (OSError, subprocess.SubprocessError):
        raise FollowGitError(
            f"{directory} is not a git checkout; install runyard with `git clone` to follow a branch"
        ) from None
    try:
        return _git(directory, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{upstream}")
    except (OSError, subprocess.SubprocessError):
        raise FollowGitError(
            f"the branch checked out in {directory} has no upstream; "
            "set one with `git branch --set-upstream-to=origin/main`"
        ) from None


def fast_forward(directory: Path = CODE_DIR) -> FastForward:
    """`git fetch` + fast-forward to the upstream. Never raises: a failure is reported in `.error`.

    Only fast-forwards: a checkout with local commits or conflicting edits stays as it is.
    """
    with _checkout_lock(directory):
        try:
            before = _git(directory, "rev-parse", "HEAD")
        except (OSError, subprocess.SubprocessError) as error:
            return FastForward("", "", f"git rev-parse failed: {_reason(error)}")
        try:
            _git(directory, "fetch", "--quiet", timeout=GIT_TIMEOUT_S)
            _git(directory, "merge", "--ff-only", "--quiet", "@{upstream}", timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as error:
            return FastForward(before, before, _reason(error))
        return FastForward(before, _git(directory, "rev-parse", "HEAD"))


@contextlib.contextmanager
def _checkout_lock(directory: Path):
    """One fast-forward at a time per checkout: the workers of one box share it, and git's own
    index.lock would make the second one fail instead of wait."""
    digest = hashlib.sha1(str(Path(directory).resolve()).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"runyard-follow-git-{digest}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(error: Exception) -> str:
    stderr = getattr(error, "stderr", None)
    lines = [line for line in (stderr or str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
