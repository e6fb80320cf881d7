"""A point of a search: one job to run exactly once, identified within its search by `id`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from publisher.options import merge
from schedule_search.config import SearchError, nest, prefixed
from trainer.spec import NON_RESULT_FIELDS, ExperimentSpec, SpecError, load_spec

REPORTED_ERRORS = 5  # bad points listed in one error; the rest are counted

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


def validated_points(
    name: str,
    base: dict[str, Any],
    combos: list[dict[str, Any]],
    source: str,
    duplicates_are_errors: bool,
    first_index: int = 1,
) -> list[Point]:
    """A Point per params dict, each spec validated; SearchError lists the first few bad points."""
    width = max(3, len(str(first_index + len(combos) - 1)))
    points, errors, failed = [], [], 0
    by_hash: dict[str, Point] = {}
    for offset, params in enumerate(combos):
        index = first_index + offset
        run_name = f"{name}-{index:0{width}d}"
        try:
            spec = load_spec(merge(base, nest(params)) | {"run_name": run_name})
        except SpecError as error:
            failed += 1
            if len(errors) < REPORTED_ERRORS:
                errors.append(prefixed(f"{source}: point {index} ({describe_params(params)}): ", str(error)))
            continue
        point = Point(spec.spec_hash(), index, params, spec, run_name)
        twin = by_hash.get(point.id)
        if twin is not None and duplicates_are_errors:
            changed = sorted(key for key in params if key.split(".")[0] in NON_RESULT_FIELDS)
            raise SearchError(
                f"{source}: points {twin.index} and {index} train the same experiment"
                + (
                    f" (they differ only in {', '.join(changed)}, which do not change what is trained)"
                    if changed
                    else ""
                )
                + ": drop the duplicate values"
            )
        by_hash[point.id] = point
        points.append(point)
    if errors:
        more = f"\n{source}: ... and {failed - len(errors)} more points fail" if failed > len(errors) else ""
        raise SearchError("\n".join(errors) + more)
    return points


def describe_params(params: dict[str, Any]) -> str:
    """`lr=0.01, loss='f1'`: a point's params in an error message."""
    return ", ".join(f"{key}={value!r}" for key, value in params.items()) or "no parameters"
