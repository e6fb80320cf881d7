"""The one way runyard reads a YAML file a user wrote: spec files (`publish --config`, a search's
`base:`) and search files.

PyYAML's safe loader runs no code, but it still lets a small file cost minutes and gigabytes: an
alias (`*name`) repeats a whole subtree, so nine lines of nine aliases each stand for 10^9 values
once validation walks them ("billion laughs"). Here a file is refused, with its line where there is
one, when it is larger than MAX_BYTES, is not UTF-8, expands to more than MAX_VALUES values,
refers to itself, nests deeper than Python can follow, or gives one key twice in a mapping
(PyYAML keeps the last silently, so a typo'd override would win unseen).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 64 << 10  # 64 KiB: a spec is a few hundred bytes, a large grid search a few kilobytes
MAX_VALUES = 100_000  # scalars, lists and mappings after aliases are expanded
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(ValueError):
    """A YAML file runyard will not read; the message starts with the path (and line) and says the fix."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (`<<:` merges may still be overridden)."""

    # Not libyaml's CSafeLoader, though faster: its composer recurses in C and crashes the process
    # (SIGSEGV) on a file of 50,000 nested brackets, where PyYAML's raises RecursionError.

    source = "YAML"

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlFileError(
                    f"{self.source}: line {line}: key {key!r} is given twice (first on line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str | Path) -> Any:
    """The document in `path` (None when empty); YamlFileError naming the path, the line and the fix."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise YamlFileError(
                f"{path}: {size:,} bytes is more than runyard reads ({MAX_BYTES:,}); "
                "a spec or search file is a few kilobytes: is it the right file?"
            )
        raw = path.read_bytes()
    except OSError as error:
        raise YamlFileError(f"{path}: cannot read it ({error.strerror})") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise YamlFileError(
            f"{path}: line {line}: byte 0x{raw[error.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    """`text` as YAML with the limits above; YamlFileError prefixed by `source`."""
    loader = None
    try:
        loader = _StrictLoader(text)
        loader.source = source
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        raise YamlFileError(f"{source}:{_where(error, text)} is not valid YAML ({_problem(error)})") from None
    except RecursionError:
        raise YamlFileError(
            f"{source}: nested deeper than {sys.getrecursionlimit()} levels; a spec or search file is a few levels deep"
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root: Node, source: str) -> None:
    """Refuse a document whose aliases expand past MAX_VALUES values, or that contains itself."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_VALUES:
                line = node.start_mark.line + 1
                raise YamlFileError(
                    f"{source}: line {line}: holds more than {MAX_VALUES:,} values once its aliases (*name) are "
                    "expanded; a spec or search file holds far fewer: write out what you mean, or split the search"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YamlFileError(
                f"{source}: line {node.start_mark.line + 1}: an alias refers to the block it is inside; "
                "a spec or search file cannot contain itself"
            )
        on_path.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _where(error: yaml.YAMLError, text: str) -> str:
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f" line {mark.line + 1}"
    position = getattr(error, "position", None)  # a ReaderError: a character YAML does not allow
    return f" line {text[:position].count(chr(10)) + 1}" if isinstance(position, int) else ""


def _problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None)
    if problem:
        return str(problem)
    reason = getattr(error, "reason", None)
    character = getattr(error, "character", None)
    if reason and character is not None:
        return f"{reason}: character {character!r}"
    return str(error).splitlines()[0]
