"""The interface every search method implements, and the registry `method:` names are looked up in.

A method turns a validated search file into the points to publish (`expand`). Grid and random
know every point's params at publish time; bayes publishes trial slots whose params a worker
samples from the search's Optuna study (`sampler_settings`). A method whose study decides as the
search runs keeps its space under its name (`samples_from_study`): publishing another space under
the same name is refused. ASHA is not a way of choosing points but of running them (pause at
rungs, promote the best): it is an early_terminate type, in schedule_search.methods.asha.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from contracts.search_payload import BayesSettings
from schedule_search.config import SearchConfig, SearchError
from schedule_search.parameters import Parameter
from schedule_search.points import SearchPoints


@dataclass
class Expansion:
    """What a method expands: the search's name, the shared spec fields and the searched parameters."""

    name: str
    base: dict[str, Any]  # spec fields every point shares
    searched: dict[str, Parameter]  # by dotted spec field name
    config: SearchConfig
    seed: int
    source: str  # the file name, for error messages
    warnings: list[str]  # a method appends what the user should know but need not fix


class SearchMethod(ABC):
    """One way of choosing a search's points."""

    name: ClassVar[str]
    needs_run_cap: ClassVar[bool] = False  # the number of points is not implied by the space
    fans_out_kfold: ClassVar[bool] = True  # a point with kfold.k > 1 becomes folds plus an aggregate
    samples_from_study: ClassVar[bool] = False  # a study samples the params while the search runs

    def check(self, config: SearchConfig, source: str) -> None:
        """Refuse a search file this method cannot run (SearchError naming the key and the fix)."""
        if self.needs_run_cap and config.run_cap is None:
            raise SearchError(f"{source}: run_cap: a {self.name} search needs run_cap, the number of points to run")

    @abstractmethod
    def expand(self, expansion: Expansion) -> SearchPoints:
        """Every point to publish, made lazily; `check()` on it validates each (SearchError lists the bad ones)."""

    def sampler_settings(self, searched: dict[str, Parameter], run_cap: int | None, seed: int) -> BayesSettings | None:
        """What a worker needs to sample a point's params; None when the params are fixed at publish time."""
        return None


METHODS: dict[str, SearchMethod] = {}


def register_method(method: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: make `method` available as `method: <its name>` in search files."""
    METHODS[method.name] = method()
    return method


def get_method(name: str) -> SearchMethod:
    """The registered method `name`; SearchError with the choices otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise SearchError(f"method: unknown search method {name!r}; choose one of: {', '.join(METHODS)}") from None


def keeps_space(name: str | None) -> bool:
    """Whether a search published with method `name` keeps its space (False for names not known here)."""
    method = METHODS.get(name or "")
    return method is not None and method.samples_from_study
