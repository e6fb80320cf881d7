"""The search file: a W&B sweep YAML, plus runyard's own keys.

    name: b2-losses                  # optional; default: the file's stem + a hash of its content
    method: grid                     # grid | random | bayes (schedule_search.methods)
    metric: {name: val_f1, goal: maximize}
    run_cap: 24                      # random/bayes: how many points (grid: at most this many)
    early_terminate: {type: hyperband, min_iter: 2, eta: 3}   # or asha (schedule_search.methods.asha)
    base: base-spec.yaml             # optional spec file (relative to this file), and/or
    fixed: {epochs: 30}              # spec fields given inline
    parameters: {...}                # see schedule_search.parameters
    queue: default                   # optional: overrides the spec's queue / priority
    priority: normal
    seed: 7                          # random/bayes; default derived from the name

W&B keys runyard has no use for (`program`, `command`) are accepted and ignored with a warning;
`project` / `entity` become the spec's wandb.project / wandb.entity. Everything is checked here,
before anything reaches Redis: a problem is a SearchError naming the key and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import zlib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contracts.plugins import EARLY_TERMINATE_TYPES, PROMOTERS, SEARCH_METHODS, SearchMethodName
from contracts.search_payload import EarlyTerminate, Metric
from contracts.spec import MAX_ERROR_LINES, NAME_PATTERN, SpecError, capped_lines, field_names
from publisher.options import merge, read_spec_file
from publisher.yaml_file import YamlFileError, read_yaml_file
from schedule_search.parameters import Parameter

SEARCH_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
IGNORED_WANDB_KEYS = ("program", "command")
# Set per point by the search itself.
UNSEARCHABLE = {"run_name": "the search names each point's run"}
# Names W&B sweeps often use for a spec field, for the "did you mean" hint.
COMMON_NAMES = {"learning_rate": "lr", "arch": "model", "architecture": "model", "img_size": "resize"}


class SearchError(ValueError):
    """The search file is wrong; each line of the message names a key or point and the fix."""


class EarlyTerminateConfig(BaseModel):
    """W&B's early_terminate block: hyperband with min_iter (or max_iter and s) and eta.

    As in W&B, a run is checked at min_iter, min_iter * eta, min_iter * eta**2, ... epochs and stops
    when it is not in the top 1/eta of the runs that reached that point (with max_iter and s, the
    first check is at max_iter / eta**s). `hyperband_brackets` uses Optuna's bracketed Hyperband.
    `asha` pauses runs at those rungs instead and promotes the best (schedule_search.methods.asha).
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    min_iter: int | None = Field(None, ge=1)
    max_iter: int | None = Field(None, ge=1)
    s: int | None = Field(None, ge=1)
    eta: int = Field(3, ge=2)
    strict: bool | None = None  # W&B's; runyard's pruner has one behaviour

    @model_validator(mode="after")
    def _known_type(self) -> EarlyTerminateConfig:
        if self.type not in EARLY_TERMINATE_TYPES:
            choices = ", ".join(EARLY_TERMINATE_TYPES)
            raise ValueError(f"unknown early_terminate type {self.type!r}; choose one of: {choices}")
        return self

    @property
    def promotes(self) -> bool:
        """Whether runs are paused and promoted (asha) rather than stopped by a pruner."""
        return self.type in PROMOTERS

    def resolve(self, max_epochs: int) -> EarlyTerminate:
        """Brackets in epochs: max_iter defaults to the most epochs any point trains."""
        max_iter = self.max_iter or max_epochs
        min_iter = self.min_iter or (max(1, max_iter // self.eta**self.s) if self.s else 1)
        if min_iter >= max_iter:
            raise SearchError(
                f"early_terminate: min_iter {min_iter} leaves nothing to stop before max_iter {max_iter} "
                "(the points' epochs): lower min_iter or train more epochs"
            )
        return EarlyTerminate(type=self.type, min_iter=min_iter, max_iter=max_iter, eta=self.eta)


class SearchConfig(BaseModel):
    """The search file's top level, as written (parameters are checked by `flatten_parameters`)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(pattern=SEARCH_NAME_PATTERN)] = None
    description: str | None = None
    method: SearchMethodName
    metric: Metric = Field(default_factory=Metric)
    run_cap: int | None = Field(None, ge=1, le=100_000)
    early_terminate: EarlyTerminateConfig | None = None
    base: str | None = None
    fixed: dict[str, Any] = {}
    parameters: dict[str, Any]
    queue: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None
    priority: Literal["high", "normal", "low"] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    program: Any = None
    command: Any = None
    project: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None
    entity: Annotated[str | None, Field(pattern=NAME_PATTERN)] = None

    @model_validator(mode="before")
    @classmethod
    def _metric_target(cls, data: Any) -> Any:
        # W&B's metric.target (stop the sweep once reached) has no runyard equivalent: drop it.
        if isinstance(data, dict) and isinstance(data.get("metric"), dict) and "target" in data["metric"]:
            data = dict(data) | {"metric": {k: v for k, v in data["metric"].items() if k != "target"}}
        return data

    @model_validator(mode="after")
    def _has_parameters(self) -> SearchConfig:
        if not self.parameters:
            raise ValueError("parameters: list at least one parameter to search")
        return self


def read_search_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path`; SearchError if unreadable."""
    path = Path(path)
    try:
        data = read_yaml_file(path)
    except YamlFileError as error:
        raise SearchError(str(error)) from None
    if not isinstance(data, dict):
        raise SearchError(f"{path}: a search file is a mapping (method:, parameters:, ...), not {type(data).__name__}")
    return data


def parse_config(data: dict[str, Any], source: str) -> SearchConfig:
    """Validate the top level; SearchError with one line per problem, prefixed by the file name."""
    try:
        return SearchConfig.model_validate(data)
    except ValidationError as error:
        lines = []
        items = error.errors()
        for item in items[:MAX_ERROR_LINES]:
            location = ".".join(str(part) for part in item["loc"]) or "search"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                valid = list(SearchConfig.model_fields)
                close = difflib.get_close_matches(str(item["loc"][-1]), valid, n=2)
                message = f"unknown key; did you mean {', '.join(close)}?" if close else ""
                message = message or f"unknown key; a search file has: {', '.join(valid)}"
            elif item["type"] == "missing":
                choices = f"{', '.join(SEARCH_METHODS[:-1])} or {SEARCH_METHODS[-1]}"
                message = "required" + (f": {choices}" if location == "method" else "")
            lines.append(f"{source}: {location}: {message}")
        raise SearchError(capped_lines(lines, len(items))) from None


def searchable_names() -> list[str]:
    """Spec fields a search may set: every leaf (`wandb.project`) and each nested block (`kfold`)."""
    leaves = field_names()
    return leaves + sorted({name.split(".")[0] for name in leaves if "." in name})


def closest_fields(name: str) -> list[str]:
    """The spec fields a mistyped parameter name most likely meant."""
    known = searchable_names()
    guesses = []
    leaf = name.rsplit(".", 1)[-1]
    for candidate in (COMMON_NAMES.get(name), COMMON_NAMES.get(leaf), leaf if leaf in known else None):
        if candidate and candidate not in guesses:
            guesses.append(candidate)
    guesses += [close for close in difflib.get_close_matches(name, known, n=3, cutoff=0.5) if close not in guesses]
    return guesses[:3]


def flatten_parameters(raw: dict[str, Any], source: str, prefix: str = "") -> dict[str, Parameter]:
    """Dotted name -> Parameter, nested `parameters:` blocks flattened; every name checked against the spec."""
    known = set(searchable_names())
    flat: dict[str, Parameter] = {}
    errors: list[str] = []
    for checked, (key, definition) in enumerate(raw.items()):
        if len(errors) >= MAX_ERROR_LINES:
            errors.append(f"... and {len(raw) - checked:,} more parameter(s) not checked; fix these first")
            break
        name = f"{prefix}{key}"
        where = f"{source}: parameters.{name}"
        if not isinstance(definition, dict):
            errors.append(f"{where}: must be a mapping such as {{values: [...]}} or {{value: ...}}, not {definition!r}")
            continue
        if "parameters" in definition:
            if set(definition) != {"parameters"} or not isinstance(definition["parameters"], dict):
                errors.append(f"{where}: a nested block has only `parameters:` (a mapping of its fields)")
                continue
            try:
                flat |= flatten_parameters(definition["parameters"], source, f"{name}.")
            except SearchError as error:
                errors.append(str(error))
            continue
        if name in UNSEARCHABLE:
            errors.append(f"{where}: cannot be searched ({UNSEARCHABLE[name]})")
            continue
        if name not in known:
            close = closest_fields(name)
            hint = f"did you mean {', '.join(close)}?" if close else "see `publish --help` for the spec's fields"
            errors.append(f"{where}: not a spec field; {hint}")
            continue
        try:
            flat[name] = Parameter.model_validate(definition)
        except ValidationError as error:
            for item in error.errors():
                field = ".".join(str(part) for part in item["loc"])
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] == "extra_forbidden":
                    message = "unknown key; a parameter has value, values, probabilities, distribution, min, max, q"
                errors.append(f"{where}{'.' + field if field else ''}: {message}")
    if errors:
        raise SearchError("\n".join(errors))
    return flat


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'wandb.project': 'x'} -> {'wandb': {'project': 'x'}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = str(key).split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        if isinstance(value, dict) and isinstance(target.get(leaf), dict):
            target[leaf] = merge(target[leaf], value)
        else:
            target[leaf] = value
    return nested


def base_spec(config: SearchConfig, constants: dict[str, Any], directory: Path, source: str) -> dict[str, Any]:
    """The fields every point shares: base file < fixed < constant parameters < the search's queue/priority/project."""
    base: dict[str, Any] = {}
    if config.base:
        path = Path(config.base).expanduser()
        path = path if path.is_absolute() else directory / path
        try:
            base = read_spec_file(path)
        except SpecError as error:
            raise SearchError(f"{source}: base: {error}") from None
    base = merge(base, nest(config.fixed))
    base = merge(base, nest(constants))
    top = {"queue": config.queue, "priority": config.priority}
    base = merge(base, {key: value for key, value in top.items() if value is not None})
    wandb = {"project": config.project, "entity": config.entity}
    return merge(base, {"wandb": {key: value for key, value in wandb.items() if value is not None}})


def default_name(source: Path, data: dict[str, Any]) -> str:
    """The file's stem and a hash of its content: the same file is the same search."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", source.stem).strip("-._")[:40] or "search"
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def default_seed(name: str) -> int:
    """A seed derived from the search's name, so re-running a random search draws the same points."""
    return zlib.crc32(name.encode()) % 2**31


def prefixed(prefix: str, message: str) -> str:
    """`message` with `prefix` on each of its lines."""
    return "\n".join(prefix + line for line in message.splitlines())
