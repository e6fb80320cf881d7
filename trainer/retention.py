"""What `runyard gc` deletes from the run store: checkpoints no one needs once a run is over.

Kept: every file of a run that is not finished (it may be resumed), and the best.pt of each
finished run. Dropped: a finished run's last.pt and previous.pt (only a resume reads them) and,
with `keep_top`, the best.pt of the finished runs of a search outside its top N by best val F1.
A run with a manifest loses the entries from its manifest first, then the files, so a reader
never meets a manifest that names a missing file.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from trainer.store import RunStore


@dataclass
class Deletion:
    """One checkpoint to delete, and why."""

    run_name: str
    kind: str  # last | previous | best
    path: str  # relative to the run
    size: int
    reason: str


def plan_deletions(store: RunStore, keep_top: int | None = None) -> list[Deletion]:
    """Every checkpoint retention drops, without deleting anything."""
    runs = {name: described for name in store.run_names() if (described := store.describe(name))}
    finished = {name: run for name, run in runs.items() if run.get("status") == "finished"}
    plan = []
    for name, run in sorted(finished.items()):
        for kind in ("last", "previous"):
            entry = (run.get("checkpoints") or {}).get(kind)
            if entry:
                plan.append(Deletion(name, kind, entry["path"], entry.get("size", 0), "the run is finished"))
    if keep_top is not None:
        by_search: dict[str, list[tuple[float, str]]] = defaultdict(list)
        for name, run in finished.items():
            if run.get("search"):
                by_search[run["search"]].append((float((run.get("best") or {}).get("val_f1", -1.0)), name))
        for search, ranked in by_search.items():
            for place, (score, name) in enumerate(sorted(ranked, reverse=True), 1):
                entry = (finished[name].get("checkpoints") or {}).get("best")
                if place > keep_top and entry:
                    reason = f"place {place} in search {search} (val F1 {score:.4f}), outside the top {keep_top}"
                    plan.append(Deletion(name, "best", entry["path"], entry.get("size", 0), reason))
    return plan


def apply_deletions(store: RunStore, plan: list[Deletion]) -> None:
    """Delete what `plan_deletions` listed: manifest entries first, then the files."""
    by_run: dict[str, list[Deletion]] = defaultdict(list)
    for deletion in plan:
        by_run[deletion.run_name].append(deletion)
    for run_name, deletions in by_run.items():
        manifest: dict[str, Any] | None = store.read_manifest(run_name)
        if manifest is not None:
            for deletion in deletions:
                manifest.get("checkpoints", {}).pop(deletion.kind, None)
            store.write_manifest(run_name, manifest)
        for deletion in deletions:
            store.delete(run_name, deletion.path)
