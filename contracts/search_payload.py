"""The `search` payload a search point's job carries: which search and point, and how it is run.

schedule_search builds it, the worker reads it (worker.search_trial, worker.asha): one definition
both sides share, torch-free and redis-free.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.plugins import PromoterName, PrunerName

# What a search may optimise: the per-epoch numbers the trainer reports, with the natural goal.
METRICS: dict[str, Literal["maximize", "minimize"]] = {
    "val_f1": "maximize",
    "val_acc": "maximize",
    "val_loss": "minimize",
    "train_acc": "maximize",
    "train_loss": "minimize",
}


class AshaSettings(BaseModel):
    """A point's ASHA rungs (min_iter * eta**k epochs below max_iter, then max_iter) and the rung its job trains to."""

    model_config = ConfigDict(extra="forbid")

    type: PromoterName = "asha"
    min_iter: int = Field(ge=1)
    eta: int = Field(ge=2)
    max_iter: int = Field(ge=1)
    rung: int = Field(0, ge=0)  # this job's rung: 0 for a new point, k + 1 for a promotion out of rung k
    points: int | None = Field(None, ge=1)  # the search's points: once all reported, the search can end

    @model_validator(mode="after")
    def _rungs_fit(self) -> AshaSettings:
        if self.min_iter >= self.max_iter:
            raise ValueError(f"min_iter {self.min_iter} must be below max_iter {self.max_iter}")
        if self.rung >= len(self.rung_epochs()):
            raise ValueError(f"rung {self.rung}: the rungs are 0..{len(self.rung_epochs()) - 1}")
        return self

    def rung_epochs(self) -> list[int]:
        """The epoch of each rung; the last is max_iter, where a run finishes."""
        epochs, epoch = [], self.min_iter
        while epoch < self.max_iter:
            epochs.append(epoch)
            epoch *= self.eta
        return [*epochs, self.max_iter]

    @property
    def top_rung(self) -> int:
        return len(self.rung_epochs()) - 1

    def pause_epoch(self) -> int | None:
        """Where this job pauses; None on the top rung (it trains to the end)."""
        return None if self.rung == self.top_rung else self.rung_epochs()[self.rung]


class Metric(BaseModel):
    """The number a search ranks points by, and whether higher or lower is better."""

    model_config = ConfigDict(extra="forbid")

    name: str = "val_f1"
    goal: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _known_metric(self) -> Metric:
        if self.name not in METRICS:
            raise ValueError(f"unknown metric {self.name!r}; choose one of: {', '.join(METRICS)}")
        if self.goal is None:
            self.goal = METRICS[self.name]
        return self

    def better(self, first: float, second: float) -> float:
        """The better of two values."""
        return max(first, second) if self.goal == "maximize" else min(first, second)

    def score(self, value: float) -> float:
        """A number where higher is better: what leaderboards sort by."""
        return value if self.goal == "maximize" else -value


class EarlyTerminate(BaseModel):
    """Early stopping in epochs: a run is checked at min_iter * eta**k epochs (see contracts.plugins.PRUNERS)."""

    model_config = ConfigDict(extra="forbid")

    type: PrunerName
    min_iter: int = Field(ge=1)
    max_iter: int = Field(ge=1)
    eta: int = Field(ge=2)


class BayesSettings(BaseModel):
    """What a worker needs to sample a point: the space as Optuna distributions (JSON) and TPE's settings."""

    model_config = ConfigDict(extra="forbid")

    space: dict[str, str]
    json_params: list[str] = []  # choices that are lists or mappings travel as JSON strings
    seed: int
    n_startup_trials: int = Field(ge=1)


class StudySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    prefix: str  # Redis key prefix of the study's journal
    early_terminate: EarlyTerminate | None = None
    bayes: BayesSettings | None = None


class SearchPayload(BaseModel):
    """The `search` argument of a search point's job: which search and point, and how it is run."""

    model_config = ConfigDict(extra="forbid")

    name: str
    point: str
    params: dict[str, Any] = {}
    metric: Metric = Field(default_factory=Metric)
    study: StudySettings | None = None
    kfold_set: str | None = None  # the k-fold set a fold belongs to (its aggregate ranks the set)
    asha: AshaSettings | None = None  # the point pauses at its rung and waits to be promoted (worker.asha)
