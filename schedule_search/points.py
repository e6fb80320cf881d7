"""A point of a search: one job to run exactly once, identified within its search by `id`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainer.spec import ExperimentSpec

PointKind = Literal["run", "fold", "aggregate", "trial"]


@dataclass
class Point:
    """One job of a search.

    `id` is the spec hash for a run or a fold, `kfold-<hash>` for a k-fold set's aggregate and
    `t<NNN>` for a bayes trial slot (its params are sampled when a worker starts it).
    """

    id: str
    index: int  # 1-based position in the search, for run names and tables
    params: dict[str, Any]  # the searched values, by dotted spec field name
    spec: ExperimentSpec  # a bayes trial carries the shared fields; the worker adds the sampled ones
    run_name: str  # the name to reserve; `-2`, `-3` are appended when a failed point runs again
    kind: PointKind = "run"
    kfold_set: str | None = None
    fold: int | None = None
    depends_on: list[str] = field(default_factory=list)  # point ids (an aggregate's folds)
