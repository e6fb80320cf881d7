"""Random search: `run_cap` distinct seeded draws from the space (the same seed draws the same points)."""

from __future__ import annotations

import random
from collections.abc import Iterator

from contracts.spec import SpecError, load_spec
from publisher.options import merge
from schedule_search.config import SearchError, nest, prefixed
from schedule_search.methods.base import Expansion, SearchMethod, register_method
from schedule_search.point_ids import PointIdSet
from schedule_search.points import Point, SearchPoints, describe_params

RANDOM_ATTEMPTS = 20  # draws per wanted point before a random search settles for fewer distinct points


@register_method
class RandomSearch(SearchMethod):
    """Seeded independent draws; a point drawn twice runs once."""

    name = "random"
    needs_run_cap = True

    def expand(self, expansion: Expansion) -> SearchPoints:
        wanted = expansion.config.run_cap or 0

        def make(check: bool) -> Iterator[Point]:
            # Drawn again on each pass from the same seed: the same points in the same order.
            rng = random.Random(expansion.seed)
            seen = PointIdSet()  # 8 bytes a drawn point
            for _attempt in range(wanted * RANDOM_ATTEMPTS):
                params = {key: parameter.draw(rng) for key, parameter in expansion.searched.items()}
                index = len(seen) + 1
                run_name = f"{expansion.name}-{index:0{max(3, len(str(index)))}d}"
                try:
                    # Every draw is a new value: each point's spec is validated in full.
                    spec = load_spec(merge(expansion.base, nest(params)) | {"run_name": run_name})
                except SpecError as error:
                    where = f"{expansion.source}: point {index} ({describe_params(params)}): "
                    raise SearchError(prefixed(where, str(error))) from None
                point_id = spec.spec_hash()
                if not seen.add(point_id):
                    continue  # the space is small enough to draw a point twice; one run is enough
                yield Point(point_id, index, params, spec.to_payload(), run_name)
                if len(seen) == wanted:
                    break
            if check and len(seen) < wanted:
                expansion.warnings.append(
                    f"the space has only {len(seen)} distinct points; run_cap {wanted} cannot be reached"
                )

        return SearchPoints(make)
