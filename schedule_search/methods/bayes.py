"""Bayes search: `run_cap` trial slots whose params a worker samples from the search's Optuna study (TPE).

The space itself is turned into Optuna distributions by schedule_search.bayes.
"""

from __future__ import annotations

from collections.abc import Iterator

from contracts.search_payload import BayesSettings
from contracts.spec import SpecError, load_spec
from publisher.options import merge
from schedule_search.bayes import bayes_settings, corner_points
from schedule_search.config import SearchError, nest, prefixed
from schedule_search.methods.base import Expansion, SearchMethod, register_method
from schedule_search.parameters import Parameter
from schedule_search.points import REPORTED_ERRORS, Point, SearchPoints, describe_params


@register_method
class BayesSearch(SearchMethod):
    """Adaptive: each trial's params come from TPE, fitted to the trials that finished (and are running)."""

    name = "bayes"
    needs_run_cap = True
    fans_out_kfold = False
    samples_from_study = True

    def expand(self, expansion: Expansion) -> SearchPoints:
        """run_cap trial slots; the space's corners are validated now so a worker's sample is a valid spec."""
        name, base, source = expansion.name, expansion.base, expansion.source
        errors = []
        for params in corner_points(expansion.searched):
            try:
                load_spec(merge(base, nest(params)))
            except SpecError as error:
                errors.append(prefixed(f"{source}: parameters ({describe_params(params)}): ", str(error)))
                if len(errors) >= REPORTED_ERRORS:
                    break
        if errors:
            raise SearchError("\n".join(dict.fromkeys(errors)))
        run_cap = expansion.config.run_cap or 0
        width = max(3, len(str(run_cap)))
        # The slots' specs differ only in the run name's digits: validated once, for the first.
        shared = load_spec(base | {"run_name": f"{name}-t{1:0{width}d}"}).to_payload()

        def make(check: bool) -> Iterator[Point]:
            for index in range(1, run_cap + 1):
                slot = f"t{index:0{width}d}"
                run_name = f"{name}-{slot}"
                yield Point(slot, index, {}, shared | {"run_name": run_name}, run_name, kind="trial")

        return SearchPoints(make)

    def sampler_settings(self, searched: dict[str, Parameter], run_cap: int | None, seed: int) -> BayesSettings | None:
        return bayes_settings(searched, run_cap or 0, seed)
