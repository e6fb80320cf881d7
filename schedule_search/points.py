"""A point of a search (one job to run exactly once), and a search's points as a stream.

A search of 100,000 points never holds them all: `SearchPoints` makes them again on each pass
from the method's generator (a grid's product, a random search's seeded draws), so publishing
holds one chunk of points and jobs at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from contracts.spec import NON_RESULT_FIELDS, ExperimentSpec, SpecError, load_spec
from schedule_search.config import SearchError, prefixed
from schedule_search.point_ids import PointIdSet
from schedule_search.point_specs import PointSpecs

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
    payload: dict[str, Any]  # the validated spec's JSON dump; a bayes trial's has the shared fields only
    run_name: str  # the name to reserve; `-2`, `-3` are appended when a failed point runs again
    kind: PointKind = "run"
    kfold_set: str | None = None
    fold: int | None = None
    depends_on: list[str] = field(default_factory=list)  # point ids (an aggregate's folds)

    @property
    def spec(self) -> ExperimentSpec:
        """The point's spec, validated again from its payload (publishing reads the payload)."""
        return load_spec(self.payload)


# A method's point generator: make(check) yields every point; with check=True it also refuses
# bad and duplicate points (SearchError) and says what the user should know (warnings).
PointMaker = Callable[[bool], Iterator[Point]]


class SearchPoints:
    """Every point of a search, made again on each iteration and never all held at once.

    `check()` makes them once, validating each and noting what a search needs to know about all of
    them (how many, their data dirs and epochs, whether any is a k-fold set); iterating again makes
    the same points without the checks.
    """

    def __init__(self, make: PointMaker) -> None:
        self._make = make
        self.count: int | None = None
        self.data_dirs: set[str] = set()
        self.epochs: set[int] = set()
        self.kfold_sets = False

    def check(self) -> SearchPoints:
        """Make every point once (SearchError names the bad ones); return self."""
        count = 0
        for point in self._make(True):
            count += 1
            self.data_dirs.add(point.payload["data_dir"])
            self.epochs.add(point.payload["epochs"])
            self.kfold_sets = self.kfold_sets or point.kind in ("fold", "aggregate")
        self.count = count
        return self

    def expanded(self, expand: Callable[[Point], list[Point]]) -> SearchPoints:
        """These points with each replaced by `expand(point)` (a k-fold set's folds and aggregate)."""
        return SearchPoints(lambda check: (each for point in self._make(check) for each in expand(point)))

    def __iter__(self) -> Iterator[Point]:
        return self._make(False)

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("the points are counted by check()")
        return self.count


def combination_points(
    name: str, combos: Callable[[], Iterator[dict[str, Any]]], total: int, source: str, specs: PointSpecs
) -> PointMaker:
    """A grid's point maker: a Point per params dict of `combos()`, its spec from `specs` (PointSpecs).

    Checking lists the first few bad points (SearchError) and refuses two points that train the
    same experiment.
    """
    width = max(3, len(str(total)))

    def first_index_of(point_id: str, before: int) -> int:
        """The index of the first point with `point_id` (made again: only a refused search needs it)."""
        for index, params in enumerate(itertools.islice(combos(), before - 1), 1):
            try:
                if specs.payload(params, f"{name}-{index:0{width}d}")[1] == point_id:
                    return index
            except SpecError:
                continue
        raise AssertionError(f"point {point_id} was seen before point {before}")  # pragma: no cover

    def make(check: bool) -> Iterator[Point]:
        errors, failed = [], 0
        seen = PointIdSet()  # while checking: 8 bytes a point
        for index, params in enumerate(combos(), 1):
            run_name = f"{name}-{index:0{width}d}"
            try:
                payload, point_id = specs.payload(params, run_name)
            except SpecError as error:
                failed += 1
                if len(errors) < REPORTED_ERRORS:
                    errors.append(prefixed(f"{source}: point {index} ({describe_params(params)}): ", str(error)))
                continue
            if check and not seen.add(point_id):
                twin = first_index_of(point_id, index)
                raise SearchError(duplicate_message(source, twin, index, params))
            yield Point(point_id, index, params, payload, run_name)
        if errors:
            more = f"\n{source}: ... and {failed - len(errors)} more points fail" if failed > len(errors) else ""
            raise SearchError("\n".join(errors) + more)

    return make


def duplicate_message(source: str, twin: int, index: int, params: dict[str, Any]) -> str:
    changed = sorted(key for key in params if key.split(".")[0] in NON_RESULT_FIELDS)
    return (
        f"{source}: points {twin} and {index} train the same experiment"
        + (f" (they differ only in {', '.join(changed)}, which do not change what is trained)" if changed else "")
        + ": drop the duplicate values"
    )


def describe_params(params: dict[str, Any]) -> str:
    """`lr=0.01, loss='f1'`: a point's params in an error message."""
    return ", ".join(f"{key}={value!r}" for key, value in params.items()) or "no parameters"
