"""Grid search: the cartesian product of every parameter's values, first parameter outermost."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

from schedule_search.config import SearchError
from schedule_search.methods.base import Expansion, SearchMethod, register_method
from schedule_search.parameters import ParameterError
from schedule_search.point_specs import PointSpecs
from schedule_search.points import SearchPoints, combination_points

MAX_POINTS = 100_000


@register_method
class GridSearch(SearchMethod):
    """Every combination once; `run_cap` keeps the first ones."""

    name = "grid"

    def expand(self, expansion: Expansion) -> SearchPoints:
        source, searched, run_cap = expansion.source, expansion.searched, expansion.config.run_cap
        errors = []
        for key, parameter in searched.items():
            try:
                parameter.grid_values()
            except ParameterError as error:
                errors.append(f"{source}: parameters.{key}: {error}")
        if errors:
            raise SearchError("\n".join(errors))
        total = math.prod(len(parameter.grid_values()) for parameter in searched.values())
        if total > MAX_POINTS and (run_cap is None or run_cap > MAX_POINTS):
            raise SearchError(
                f"{source}: the grid has {total:,} points, more than {MAX_POINTS:,}: set run_cap or trim it"
            )
        if run_cap is not None and run_cap < total:
            expansion.warnings.append(f"run_cap {run_cap} keeps the first {run_cap} of the grid's {total} points")
            total = run_cap
        keys = list(searched)
        values = [searched[key].grid_values() for key in keys]

        def combos() -> Iterator[dict[str, Any]]:
            # Made again on each pass (itertools.product is lazy): no list of every point's params.
            product = itertools.islice(itertools.product(*values), total)
            return (dict(zip(keys, combo, strict=True)) for combo in product)

        first = next(combos(), {})
        specs = PointSpecs(expansion.base, first)
        return SearchPoints(combination_points(expansion.name, combos, total, source, specs))
