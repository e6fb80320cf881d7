"""A search file expanded into its points, every spec validated, before anything touches Redis.

`load_search(path)` reads the file (schedule_search.config), checks every parameter against the
spec, and expands it with the method the file names (schedule_search.methods: grid, random,
bayes). A point with kfold.k > 1 fans out into folds plus an aggregate. The points are checked
once here and made again, lazily, when they are published (schedule_search.points.SearchPoints).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic_core import to_jsonable_python

from contracts.keys import optuna_study_prefix
from contracts.search_payload import AshaSettings, Metric, SearchPayload, StudySettings
from contracts.spec import SpecError, load_spec
from publisher.options import merge
from schedule_search.config import (
    SearchConfig,
    SearchError,
    base_spec,
    default_name,
    default_seed,
    flatten_parameters,
    parse_config,
    prefixed,
    read_search_file,
)
from schedule_search.fold_fan_out import fan_out
from schedule_search.methods import METHODS, Expansion, get_method
from schedule_search.methods.asha import PROMOTERS
from schedule_search.parameters import Parameter, ParameterError
from schedule_search.points import Point, SearchPoints


@dataclass
class Search:
    """A validated search: its name, how it ranks points, and every point to run."""

    name: str
    method: str
    source: str
    config: SearchConfig
    metric: Metric
    parameters: dict[str, Parameter]  # the searched ones (constants are in every spec)
    points: SearchPoints  # made again on each iteration, never all held
    study: StudySettings | None
    warnings: list[str]
    asha: AshaSettings | None = None  # its runs pause at rungs and the best are promoted

    def payload(self, point: Point) -> dict[str, Any]:
        """The `search` argument of the point's job (worker.search_trial.SearchPayload)."""
        kfold_set = point.kfold_set if point.kind == "fold" else None
        # The search's own fields are validated and dumped once (the payload's template); a point
        # adds only its id, params (JSON-ready as pydantic's dump makes them) and k-fold set.
        own = {"point": point.id, "params": to_jsonable_python(point.params), "kfold_set": kfold_set}
        return self._payload_template | own

    @cached_property
    def _payload_template(self) -> dict[str, Any]:
        return SearchPayload(name=self.name, point="", metric=self.metric, study=self.study, asha=self.asha).model_dump(
            mode="json"
        )

    def definition(self) -> dict[str, Any]:
        """What `runyard status/leaderboard/compare --search` need to know about the search."""
        early = self.study.early_terminate if self.study else None
        early_terminate = early.model_dump() if early else None
        if self.asha is not None:
            early_terminate = self.asha.model_dump(exclude={"rung"}) | {"rungs": self.asha.rung_epochs()}
        return {
            "name": self.name,
            "method": self.method,
            "source": self.source,
            "metric": self.metric.model_dump(),
            "parameters": {name: p.model_dump(exclude_none=True) for name, p in self.parameters.items()},
            "run_cap": self.config.run_cap,
            "early_terminate": early_terminate,
            "study": {"name": self.study.name, "prefix": self.study.prefix} if self.study else None,
            "points": len(self.points),
        }


def load_search(path: str | Path) -> Search:
    """Read, validate and expand a search file; SearchError names every problem and nothing is queued."""
    path = Path(path)
    data = read_search_file(path)
    source = path.name
    config = parse_config(data, source)
    method = get_method(config.method)
    method.check(config, source)
    name = config.name or default_name(path, data)
    flat = flatten_parameters(config.parameters, source)
    constants = {key: parameter.value for key, parameter in flat.items() if parameter.is_constant}
    searched = {key: parameter for key, parameter in flat.items() if not parameter.is_constant}

    warnings = []
    if config.program is not None or config.command is not None:
        warnings.append("program/command are ignored: runyard workers run runyard's trainer on each point's spec")
    base = base_spec(config, constants, path.parent, source)
    if base.pop("run_name", None):
        warnings.append("run_name in the base spec is ignored: the search names each point's run")
    group_is_default = not (base.get("wandb") or {}).get("group")
    if group_is_default:
        base = merge(base, {"wandb": {"group": name}})
    try:
        shared = load_spec(base)
    except SpecError as error:
        raise SearchError(prefixed(f"{source}: base/fixed: ", str(error))) from None

    kfold_searched = any(key == "kfold" or key.startswith("kfold.") for key in searched)
    if not method.fans_out_kfold and (shared.kfold.k > 1 or kfold_searched):
        fanning = " or ".join(other.name for other in METHODS.values() if other.fans_out_kfold)
        raise SearchError(f"{source}: method: {method.name} does not fan out k-fold sets; use {fanning} with kfold.k")

    seed = config.seed if config.seed is not None else default_seed(name)
    points = method.expand(Expansion(name, base, searched, config, seed, source, warnings))
    points = points.expanded(lambda point: fan_out(point, group_is_default)).check()
    if config.early_terminate is not None and points.kfold_sets:
        raise SearchError(f"{source}: early_terminate: k-fold sets are not stopped early; drop one of the two")

    study, asha = None, None
    pruner = config.early_terminate if config.early_terminate and not config.early_terminate.promotes else None
    if config.early_terminate is not None and config.early_terminate.promotes:
        asha = PROMOTERS[config.early_terminate.type](config.early_terminate, method, points, source)
    if pruner is not None or method.samples_from_study:
        early = pruner.resolve(_max_epochs(points, searched)) if pruner else None
        try:
            bayes = method.sampler_settings(searched, config.run_cap, seed)
        except ParameterError as error:
            raise SearchError(prefixed(f"{source}: ", str(error))) from None
        study = StudySettings(
            name=f"runyard-{name}", prefix=optuna_study_prefix(name), early_terminate=early, bayes=bayes
        )
    return Search(name, config.method, str(path), config, config.metric, searched, points, study, warnings, asha)


def _max_epochs(points: SearchPoints, searched: dict[str, Parameter]) -> int:
    epochs = list(points.epochs)
    if "epochs" in searched:
        epochs += [int(value) for value in searched["epochs"].bounds()]
    return max(epochs)
