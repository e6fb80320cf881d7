"""ASHA: `early_terminate: {type: asha, min_iter, eta, max_iter}` on a grid or random search.

Where a pruner stops the runs below the top 1/eta of a rung for good, ASHA pauses every run at
each rung and promotes the best 1/eta to resume from their checkpoints (worker.asha runs it).
This module checks the search file and turns its block into the rungs the points carry.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError

from contracts.search_payload import AshaSettings
from schedule_search.config import EarlyTerminateConfig, SearchError
from schedule_search.methods.base import SearchMethod
from schedule_search.points import SearchPoints


def asha_settings(
    config: EarlyTerminateConfig, method: SearchMethod, points: SearchPoints, source: str
) -> AshaSettings:
    """The rungs of an ASHA search; SearchError names the key and the fix when they cannot work."""
    where = f"{source}: early_terminate"
    if method.samples_from_study:
        raise SearchError(f"{where}: asha promotes grid or random points; use method: grid or random")
    if config.s is not None:
        raise SearchError(f"{where}: asha has no `s`: give min_iter (the first rung's epochs) instead")
    epochs = sorted(points.epochs)
    if len(epochs) > 1:
        raise SearchError(
            f"{where}: asha needs every point to train the same epochs (they train {epochs}): do not search epochs"
        )
    max_iter = config.max_iter or epochs[0]
    if max_iter != epochs[0]:
        raise SearchError(
            f"{where}: max_iter {max_iter} differs from the points' epochs {epochs[0]}: a promoted run resumes up to"
            f" its spec's epochs, so set fixed.epochs: {max_iter} (or drop max_iter)"
        )
    try:
        return AshaSettings(
            type="asha", min_iter=config.min_iter or 1, eta=config.eta, max_iter=max_iter, points=len(points)
        )
    except ValidationError as error:
        message = "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
        raise SearchError(f"{where}: {message}: lower min_iter or train more epochs") from None


# The search side of each contracts.plugins.PROMOTERS name (the worker's: worker.asha.PROMOTERS).
PROMOTERS: dict[str, Callable[[EarlyTerminateConfig, SearchMethod, SearchPoints, str], AshaSettings]] = {
    "asha": asha_settings
}
