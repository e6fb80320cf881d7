"""Copying a training run into the run store in a background thread, off the training loop.

After each epoch the trainer hands over its checkpoints (hard links to them, so the next epoch can
replace its files while these upload) and small files (copied); one thread uploads them in order,
then publishes the run's manifest. Epoch N's checkpoint uploads while epoch N+1 trains. A store
that fails is retried with backoff for as long as training goes on; `finish` waits for everything,
up to a deadline, and raises StoreError if the final artifacts are still not durable.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.store import MANIFEST, RunStore, StoreError, box_name, explain, file_digest

log = logging.getLogger("runyard.store")

STAGING = ".store-staging"
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 15.0
FINISH_TIMEOUT_S = float(os.environ.get("RUNYARD_STORE_TIMEOUT", "600"))
SKIPPED = ("checkpoints", STAGING)  # checkpoints go under never-reused names; staging is ours


class StoreSync:
    """Uploads one run's files to the store, in order, retrying; the manifest is written last."""

    def __init__(self, store: RunStore, run_name: str, run_dir: Path):
        self.store = store
        self.run_name = run_name
        self.run_dir = run_dir
        self.staging = run_dir / STAGING
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.tasks: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.manifest: dict[str, Any] | None = None
        self.deadline: float | None = None
        self.error: str | None = None  # the last failure while retrying, or the one that gave up
        self.gave_up = False
        self._sequence = 0
        self.thread = threading.Thread(target=self._serve, name=f"store-sync-{run_name}", daemon=True)
        self.thread.start()

    @property
    def pending(self) -> int:
        """Uploads not yet durable (queued or in progress)."""
        return self.tasks.unfinished_tasks

    def epoch(self, epoch: int, checkpoints: dict[str, Path], files: list[Path], best: dict[str, Any]) -> None:
        """Queue an epoch's checkpoints (`last`, and `best` when it improved) and small files."""
        staged = {kind: self._stage(path, link=True) for kind, path in checkpoints.items()}
        small = [(self._relative(path), self._stage(path, link=False)) for path in files if path.is_file()]
        self.tasks.put(lambda: self._publish_epoch(epoch, staged, small, best))

    def finish(self, status: str, summary: dict[str, Any] | None = None, timeout: float = FINISH_TIMEOUT_S) -> None:
        """Upload every file of the run dir and mark the run `status`; wait up to `timeout` seconds.

        Raises StoreError (naming the local copy) when they are not all durable by then.
        """
        self.tasks.put(lambda: self._publish_final(status, summary or {}))
        self.deadline = time.monotonic() + timeout
        self.tasks.put(None)
        self.thread.join()
        if self.gave_up:
            raise StoreError(
                f"{self.error}; the run's files are kept on this box at {self.run_dir} "
                f"(copy that dir to {self.store.run_url(self.run_name)} once the store is back)"
            )
        shutil.rmtree(self.staging, ignore_errors=True)

    def drop(self) -> None:
        """Stop without publishing anything more: this box no longer owns the run (it was requeued)."""
        self.gave_up = True
        self.tasks.put(None)
        shutil.rmtree(self.staging, ignore_errors=True)

    def _stage(self, path: Path, link: bool) -> Path:
        self._sequence += 1
        staged = self.staging / f"{self._sequence:06d}-{path.name}"
        if link:
            try:
                os.link(path, staged)  # no copy: the trainer replaces `path` by rename, never in place
                return staged
            except OSError:
                pass
        shutil.copy2(path, staged)
        return staged

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.run_dir).as_posix()

    def _serve(self) -> None:
        while True:
            task = self.tasks.get()
            try:
                if task is None:
                    return
                if not self.gave_up:
                    task()
            except StoreError as error:
                self.gave_up, self.error = True, str(error)
                log.error("%s", error)
            finally:
                self.tasks.task_done()

    def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        """Run `action` until it works; back off between tries; give up only past `deadline`."""
        wait, tries = RETRY_FIRST_S, 0
        while True:
            try:
                result = action()
                if tries:
                    log.info("store %s: %s done after %d retries", self.store.run_url(self.run_name), what, tries)
                self.error = None
                return result
            except Exception as error:
                tries += 1
                self.error = explain(self.store.url, error)
                if self.deadline is not None and time.monotonic() + wait > self.deadline:
                    raise StoreError(f"{what} failed: {self.error}") from None
                if tries == 1 or tries % 10 == 0:
                    log.warning("%s failed (%s); retrying, training goes on", what, self.error)
                time.sleep(wait)
                wait = min(wait * 2, RETRY_MAX_S)

    def _load_manifest(self) -> dict[str, Any]:
        if self.manifest is None:
            found = self._retrying("reading the manifest", lambda: self.store.read_manifest(self.run_name))
            self.manifest = found or {"run_name": self.run_name, "checkpoints": {}, "files": {}}
        return self.manifest

    def _upload(self, staged: Path, relative: str) -> dict[str, Any]:
        entry = file_digest(staged)
        self._retrying(f"uploading {relative}", lambda: self.store.put(staged, self.run_name, relative))
        staged.unlink(missing_ok=True)
        return entry

    def _publish_epoch(
        self, epoch: int, staged: dict[str, Path], small: list[tuple[str, Path]], best: dict[str, Any]
    ) -> None:
        manifest = self._load_manifest()
        before = {entry["path"] for entry in manifest["checkpoints"].values()}
        checkpoints = dict(manifest["checkpoints"])
        for kind, path in staged.items():
            relative = f"checkpoints/{kind}-e{epoch:04d}-{uuid.uuid4().hex[:8]}.pt"  # never reused, even on a re-run
            entry = self._upload(path, relative) | {"path": relative, "epoch": epoch}
            if kind == "last" and "last" in checkpoints and checkpoints["last"]["epoch"] < epoch:
                checkpoints["previous"] = checkpoints["last"]  # kept: a fallback if the newest will not load
            checkpoints[kind] = entry
        for relative, path in small:
            manifest["files"][relative] = self._upload(path, relative)
        manifest |= {"checkpoints": checkpoints, "status": "running", "epoch": epoch, "best": best}
        self._write_manifest(manifest)
        for stale in before - {entry["path"] for entry in checkpoints.values()}:
            self._retrying(f"deleting {stale}", lambda stale=stale: self.store.delete(self.run_name, stale))

    def _publish_final(self, status: str, summary: dict[str, Any]) -> None:
        manifest = self._load_manifest()
        for path in sorted(self.run_dir.rglob("*")):
            relative = self._relative(path)
            if not path.is_file() or relative.split("/", 1)[0] in SKIPPED or relative == MANIFEST:
                continue
            known = manifest["files"].get(relative)
            if known and known["size"] == path.stat().st_size and file_digest(path) == known:
                continue
            manifest["files"][relative] = self._upload(self._stage(path, link=False), relative)
        manifest |= {"status": status} | summary
        self._write_manifest(manifest)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest |= {"box": box_name(), "updated_at": time.time(), "store": self.store.run_url(self.run_name)}
        self._retrying("publishing the manifest", lambda: self.store.write_manifest(self.run_name, manifest))
