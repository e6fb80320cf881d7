"""Random search: `run_cap` distinct seeded draws from the space (the same seed draws the same points)."""

from __future__ import annotations

import random

from schedule_search.methods.base import Expansion, SearchMethod, register_method
from schedule_search.points import Point, validated_points

RANDOM_ATTEMPTS = 20  # draws per wanted point before a random search settles for fewer distinct points


@register_method
class RandomSearch(SearchMethod):
    """Seeded independent draws; a point drawn twice runs once."""

    name = "random"
    needs_run_cap = True

    def expand(self, expansion: Expansion) -> list[Point]:
        rng = random.Random(expansion.seed)
        wanted = expansion.config.run_cap or 0
        points: list[Point] = []
        seen: set[str] = set()
        for _attempt in range(wanted * RANDOM_ATTEMPTS):
            params = {key: parameter.draw(rng) for key, parameter in expansion.searched.items()}
            [point] = validated_points(
                expansion.name,
                expansion.base,
                [params],
                expansion.source,
                duplicates_are_errors=False,
                first_index=len(points) + 1,
            )
            if point.id in seen:
                continue  # the space is small enough to draw a point twice; one run is enough
            seen.add(point.id)
            points.append(point)
            if len(points) == wanted:
                break
        if len(points) < wanted:
            expansion.warnings.append(
                f"the space has only {len(points)} distinct points; run_cap {wanted} cannot be reached"
            )
        return points
