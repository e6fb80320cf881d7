"""K-fold fan-out: a point whose spec has kfold.k = K becomes K fold points and one aggregate.

The folds are ordinary runs (kfold.fold = 0..K-1) that any free worker takes; the aggregate
(worker.jobs.aggregate_folds) depends on them and reports mean ± std of their metrics. The set
is one W&B group unless the spec names a group itself.
"""

from __future__ import annotations

from dataclasses import replace

from contracts.spec import ExperimentSpec, load_spec
from schedule_search.points import Point


def aggregate_id(spec: ExperimentSpec) -> str:
    """The aggregate's point id: the set's spec hash, marked so it never equals a fold's."""
    return f"kfold-{spec.spec_hash()}"


def fan_out(point: Point, group_is_default: bool) -> list[Point]:
    """The point itself when k = 1; else its K folds followed by their aggregate."""
    if point.payload["kfold"]["k"] <= 1:
        return [point]
    spec = point.spec
    set_name = point.run_name
    payload = spec.to_payload()
    if group_is_default:
        payload["wandb"] = payload["wandb"] | {"group": set_name}
    set_spec = load_spec(payload)
    folds = []
    for fold in range(spec.kfold.k):
        fold_spec = load_spec(payload | {"kfold": {"k": spec.kfold.k, "fold": fold}})
        folds.append(
            replace(
                point,
                id=fold_spec.spec_hash(),
                payload=fold_spec.to_payload(),
                run_name=f"{set_name}-fold{fold}",
                kind="fold",
                kfold_set=set_name,
                fold=fold,
            )
        )
    aggregate = replace(
        point,
        id=aggregate_id(set_spec),
        payload=set_spec.to_payload(),
        kind="aggregate",
        depends_on=[fold.id for fold in folds],
    )
    return [*folds, aggregate]
