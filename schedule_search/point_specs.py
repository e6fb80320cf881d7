"""Each grid point's spec from checks made once per distinct value, not a full validation per point.

A grid's points differ only in their searched values. `PointSpecs` validates the first point in
full, then each distinct value of a parameter once, in that first point's context: the value's
fields as the spec dumps them, or its error. A point's payload is the first point's with each of
its values' fields put in, and its id is the spec hash of that payload (`ExperimentSpec.spec_hash`
made from cached JSON pieces). This is the full validation's answer because every field validator
of the spec reads its own field only, and the spec's cross-field checks read only the fields of
contracts.spec.CROSS_FIELD_CHECKS: parameters on those fields (or on one nested block, such as
kfold.k and kfold.fold) are checked together, per distinct combination. A value that changes a
field other than its own makes the rest of the search fall back to a full validation per point
(as does a first point that fails: its errors are reported point by point).
tests/test_search_point_specs.py compares both ways on grids over every kind of field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from contracts.spec import CROSS_FIELD_CHECKS, NON_RESULT_FIELDS, SpecError, load_spec
from publisher.options import merge
from schedule_search.config import nest


class PointSpecs:
    """Spec payloads and ids of a grid's points, each distinct value checked once (see the module doc)."""

    def __init__(self, base: dict[str, Any], first: dict[str, Any]) -> None:
        self.base = base
        self.exact = False  # True: every point validated in full
        try:
            first_spec = load_spec(merge(base, nest(first)))
        except SpecError:
            self.exact = True  # the first point is bad: report the points one by one
            return
        self.first_params = first
        self.first = first_spec.to_payload()
        tops = {key: key.split(".")[0] for key in first}
        # Checked together: the parameters on the spec's cross-field checks, and those on one block.
        self.cross = tuple(key for key in first if tops[key] in CROSS_FIELD_CHECKS)
        by_block: dict[str, list[str]] = {}
        for key in first:
            if key not in self.cross:
                by_block.setdefault(tops[key], []).append(key)
        self.parts = [tuple(keys) for keys in by_block.values()] + ([self.cross] if self.cross else [])
        self.searched_fields = set(tops.values())
        # The spec hash's canonical JSON, a piece per top-level field in sorted order.
        self.hashed = sorted(key for key in self.first if key not in NON_RESULT_FIELDS)
        self.position = {key: number for number, key in enumerate(self.hashed)}
        self.pieces = [json_fragment(key, self.first[key]) for key in self.hashed]
        # Per part: its values' key (value_key) -> (the fields they set, [(position, piece)]) or an error.
        self._checked: list[dict[Any, tuple[dict[str, Any], list[tuple[int, str]]] | SpecError]] = []
        for keys in self.parts:  # the first point's values are checked with it
            fields = {key.split(".")[0] for key in keys}
            checked = ({field: self.first[field] for field in fields}, self._pieces(fields))
            self._checked.append({value_key(tuple(first[key] for key in keys)): checked})

    def payload(self, params: dict[str, Any], run_name: str) -> tuple[dict[str, Any], str]:
        """(the spec's JSON dump with `run_name`, its spec hash) for a point; SpecError if it is invalid."""
        if not self.exact:
            built = self._from_parts(params, run_name)
            if built is not None:
                return built
        spec = load_spec(merge(self.base, nest(params)) | {"run_name": run_name})
        return spec.to_payload(), spec.spec_hash()

    def _from_parts(self, params: dict[str, Any], run_name: str) -> tuple[dict[str, Any], str] | None:
        payload, pieces, problems = dict(self.first), self.pieces.copy(), []
        for number, keys in enumerate(self.parts):
            values = tuple([params[key] for key in keys])
            key = value_key(values)
            checked = self._checked[number].get(key)
            if checked is None:
                checked = self._check(number, keys, values, key)
                if self.exact:
                    return None
            if isinstance(checked, SpecError):
                problems.append(str(checked))
                continue
            payload.update(checked[0])
            for position, piece in checked[1]:
                pieces[position] = piece
        if problems:
            raise SpecError("\n".join(dict.fromkeys(problems)))
        payload["run_name"] = run_name
        canonical = "{" + ",".join(pieces) + "}"
        return payload, hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def _check(
        self, number: int, keys: tuple[str, ...], values: tuple[Any, ...], key: Any
    ) -> tuple[dict[str, Any], list[tuple[int, str]]] | SpecError:
        """The fields `values` of `keys` set in a spec (and their hash pieces), or its error; kept for later points."""
        try:
            dump = load_spec(
                merge(self.base, nest(self.first_params | dict(zip(keys, values, strict=True))))
            ).to_payload()
        except SpecError as error:
            self._checked[number][key] = error
            return error
        own = {key.split(".")[0] for key in keys}
        changed = {field for field, value in dump.items() if value != self.first[field]}
        # Only the cross-field checks' fields may set another field (batch_size: min_batch_size's
        # default), and never one that another parameter sets.
        others = changed - own
        if others and (keys != self.cross or others & self.searched_fields):
            self.exact = True  # the parameters are not independent: validate each point in full
            return SpecError("")
        fields = {field: dump[field] for field in own | changed}
        checked = self._checked[number][key] = (fields, self._pieces(fields, dump))
        return checked

    def _pieces(self, fields: set[str] | dict[str, Any], dump: dict[str, Any] | None = None) -> list[tuple[int, str]]:
        dump = dump if dump is not None else self.first
        return [(self.position[field], json_fragment(field, dump[field])) for field in fields if field in self.position]


def json_fragment(key: str, value: Any) -> str:
    """`"key":value` as the spec hash's canonical JSON writes a top-level field."""
    return json.dumps(key) + ":" + json.dumps(value, sort_keys=True, separators=(",", ":"))


def value_key(values: tuple[Any, ...]) -> Any:
    """A dict key telling apart values that compare equal but validate differently (1, 1.0, True)."""
    key = tuple([(type(value), value) for value in values])
    try:
        hash(key)
    except TypeError:  # a list or mapping value
        return json.dumps(values, sort_keys=True, default=repr)
    return key
