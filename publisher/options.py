"""Command-line options generated from ExperimentSpec's fields, so the spec stays the one source.

Each field becomes `--field-name` (nested ones `--wandb-project`); help text and the shown
default come from the field. Options default to "not given", so a `--config` file's values are
only overridden by options the user typed.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from contracts.spec import ExperimentSpec, SpecError
from publisher.yaml_file import YamlFileError, read_yaml_file


def iter_fields(model: type[BaseModel] = ExperimentSpec, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted path, field) for every leaf field, nested models flattened."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from iter_fields(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        remaining = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return remaining[0] if len(remaining) == 1 else annotation
    return annotation


def _click_type(annotation: Any) -> Any:
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
        annotation = _without_none(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(arg) for arg in typing.get_args(annotation)], case_sensitive=False)
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    return click.STRING  # str, sizes (260x260) and comma lists


def _shown_default(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return "x".join(str(part) for part in default)
    if isinstance(default, list):
        return ",".join(default) or "none"
    return str(default).lower() if isinstance(default, bool) else str(default)


def option_name(path: str) -> str:
    return "--" + path.replace(".", "-").replace("_", "-")


def _parameter_name(path: str) -> str:
    return path.replace(".", "__")


def spec_options(command: Callable) -> Callable:
    """Decorate a click command with one option per spec field."""
    for path, info in reversed(list(iter_fields())):
        name = option_name(path)
        help_text = f"{info.description or path}.  [default: {_shown_default(info)}]"
        if _without_none(info.annotation) is bool:
            flag = f"{name}/--no-{name[2:]}"
            decorator = click.option(flag, _parameter_name(path), default=None, help=help_text)
        else:
            decorator = click.option(
                name, _parameter_name(path), type=_click_type(info.annotation), default=None, help=help_text
            )
        command = decorator(command)
    return command


def given_options(parameters: dict[str, Any]) -> dict[str, Any]:
    """The spec options the user typed, as a nested dict ({'wandb': {'project': ...}})."""
    overrides: dict[str, Any] = {}
    for path, _info in iter_fields():
        value = parameters.get(_parameter_name(path))
        if value is None:
            continue
        target = overrides
        *parents, leaf = path.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return overrides


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` into a copy of `base`."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) mapping of spec fields; dotted keys (`wandb.project`) are nested."""
    path = Path(path)
    try:
        data = read_yaml_file(path)
    except YamlFileError as error:
        raise SpecError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec file must be a mapping of field: value, not a {type(data).__name__}")
    nested: dict[str, Any] = {}
    for key, value in data.items():
        *parents, leaf = str(key).split(".")
        target = nested
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return nested
