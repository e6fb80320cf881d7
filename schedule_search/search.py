"""A search file expanded into its points, every spec validated, before anything touches Redis.

`load_search(path)` reads the file (schedule_search.config), checks every parameter against the
spec, and expands: grid = the cartesian product of the values (first parameter outermost),
random = `run_cap` distinct seeded draws, bayes = `run_cap` trial slots whose params a worker
samples (schedule_search.bayes). A point with kfold.k > 1 fans out into folds plus an aggregate.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.keys import optuna_study_prefix
from publisher.options import merge
from schedule_search.bayes import bayes_settings, corner_points
from schedule_search.config import (
    SearchConfig,
    SearchError,
    base_spec,
    default_name,
    default_seed,
    flatten_parameters,
    nest,
    parse_config,
    read_search_file,
)
from schedule_search.kfold import fan_out
from schedule_search.parameters import Parameter, ParameterError
from schedule_search.points import Point
from trainer.spec import NON_RESULT_FIELDS, SpecError, load_spec
from worker.search_trial import Metric, SearchPayload, StudySettings

MAX_POINTS = 100_000
RANDOM_ATTEMPTS = 20  # draws per wanted point before a random search settles for fewer distinct points
REPORTED_ERRORS = 5


@dataclass
class Search:
    """A validated search: its name, how it ranks points, and every point to run."""

    name: str
    method: str
    source: str
    config: SearchConfig
    metric: Metric
    parameters: dict[str, Parameter]  # the searched ones (constants are in every spec)
    points: list[Point]
    study: StudySettings | None
    warnings: list[str]

    def payload(self, point: Point) -> dict[str, Any]:
        """The `search` argument of the point's job (worker.search_trial.SearchPayload)."""
        kfold_set = point.kfold_set if point.kind == "fold" else None
        return SearchPayload(
            name=self.name,
            point=point.id,
            params=point.params,
            metric=self.metric,
            study=self.study,
            kfold_set=kfold_set,
        ).model_dump(mode="json")

    def definition(self) -> dict[str, Any]:
        """What `runyard status/leaderboard/compare --search` need to know about the search."""
        early = self.study.early_terminate if self.study else None
        return {
            "name": self.name,
            "method": self.method,
            "source": self.source,
            "metric": self.metric.model_dump(),
            "parameters": {name: p.model_dump(exclude_none=True) for name, p in self.parameters.items()},
            "run_cap": self.config.run_cap,
            "early_terminate": early.model_dump() if early else None,
            "study": {"name": self.study.name, "prefix": self.study.prefix} if self.study else None,
            "points": len(self.points),
        }


def load_search(path: str | Path) -> Search:
    """Read, validate and expand a search file; SearchError names every problem and nothing is queued."""
    path = Path(path)
    data = read_search_file(path)
    source = path.name
    config = parse_config(data, source)
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
        raise SearchError(_prefixed(f"{source}: base/fixed: ", str(error))) from None

    kfold_searched = any(key == "kfold" or key.startswith("kfold.") for key in searched)
    if config.method == "bayes" and (shared.kfold.k > 1 or kfold_searched):
        raise SearchError(f"{source}: method: bayes does not fan out k-fold sets; use grid or random with kfold.k")

    seed = config.seed if config.seed is not None else default_seed(name)
    if config.method == "bayes":
        points = _bayes_points(name, base, searched, config, source)
    else:
        points = _expanded_points(name, base, searched, config, seed, source, warnings)
    if config.early_terminate is not None and any(point.spec.kfold.k > 1 for point in points):
        raise SearchError(f"{source}: early_terminate: k-fold sets are not stopped early; drop one of the two")
    points = [fanned for point in points for fanned in fan_out(point, group_is_default)]

    study = None
    if config.early_terminate is not None or config.method == "bayes":
        early = config.early_terminate.resolve(_max_epochs(points, searched)) if config.early_terminate else None
        bayes = None
        if config.method == "bayes":
            try:
                bayes = bayes_settings(searched, config.run_cap, seed)
            except ParameterError as error:
                raise SearchError(_prefixed(f"{source}: ", str(error))) from None
        study = StudySettings(
            name=f"runyard-{name}", prefix=optuna_study_prefix(name), early_terminate=early, bayes=bayes
        )
    return Search(name, config.method, str(path), config, config.metric, searched, points, study, warnings)


def _expanded_points(
    name: str,
    base: dict[str, Any],
    searched: dict[str, Parameter],
    config: SearchConfig,
    seed: int,
    source: str,
    warnings: list[str],
) -> list[Point]:
    if config.method == "grid":
        errors = []
        for key, parameter in searched.items():
            try:
                parameter.grid_values()
            except ParameterError as error:
                errors.append(f"{source}: parameters.{key}: {error}")
        if errors:
            raise SearchError("\n".join(errors))
        sizes = [len(parameter.grid_values()) for parameter in searched.values()]
        total = math.prod(sizes)
        if total > MAX_POINTS and (config.run_cap is None or config.run_cap > MAX_POINTS):
            raise SearchError(
                f"{source}: the grid has {total:,} points, more than {MAX_POINTS:,}: set run_cap or trim it"
            )
        if config.run_cap is not None and config.run_cap < total:
            warnings.append(f"run_cap {config.run_cap} keeps the first {config.run_cap} of the grid's {total} points")
            total = config.run_cap
        keys = list(searched)
        values = itertools.product(*[searched[key].grid_values() for key in keys])
        combos = [dict(zip(keys, combo, strict=True)) for combo in itertools.islice(values, total)]
        return _validated(name, base, combos, source, duplicates_are_errors=True)

    rng = random.Random(seed)
    wanted = config.run_cap
    points: list[Point] = []
    seen: set[str] = set()
    for _attempt in range(wanted * RANDOM_ATTEMPTS):
        params = {key: parameter.draw(rng) for key, parameter in searched.items()}
        [point] = _validated(name, base, [params], source, duplicates_are_errors=False, first_index=len(points) + 1)
        if point.id in seen:
            continue  # the space is small enough to draw a point twice; one run is enough
        seen.add(point.id)
        points.append(point)
        if len(points) == wanted:
            break
    if len(points) < wanted:
        warnings.append(f"the space has only {len(points)} distinct points; run_cap {wanted} cannot be reached")
    return points


def _validated(
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
                errors.append(_prefixed(f"{source}: point {index} ({_describe(params)}): ", str(error)))
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


def _bayes_points(
    name: str, base: dict[str, Any], searched: dict[str, Parameter], config: SearchConfig, source: str
) -> list[Point]:
    """run_cap trial slots; the space's corners are validated now so a worker's sample is a valid spec."""
    errors = []
    for params in corner_points(searched):
        try:
            load_spec(merge(base, nest(params)))
        except SpecError as error:
            errors.append(_prefixed(f"{source}: parameters ({_describe(params)}): ", str(error)))
            if len(errors) >= REPORTED_ERRORS:
                break
    if errors:
        raise SearchError("\n".join(dict.fromkeys(errors)))
    width = max(3, len(str(config.run_cap)))
    points = []
    for index in range(1, config.run_cap + 1):
        slot = f"t{index:0{width}d}"
        spec = load_spec(base | {"run_name": f"{name}-{slot}"})
        points.append(Point(slot, index, {}, spec, f"{name}-{slot}", kind="trial"))
    return points


def _max_epochs(points: list[Point], searched: dict[str, Parameter]) -> int:
    epochs = [point.spec.epochs for point in points]
    if "epochs" in searched:
        epochs += [int(value) for value in searched["epochs"].bounds()]
    return max(epochs)


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items()) or "no parameters"


def _prefixed(prefix: str, message: str) -> str:
    return "\n".join(prefix + line for line in message.splitlines())
