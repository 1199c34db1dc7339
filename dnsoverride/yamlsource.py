"""YAML loading that remembers line numbers, for `file:line: reason` error messages.

PyYAML's plain `safe_load` forgets where each value came from and silently keeps the
last of two duplicate keys. Zone files and the daemon config both need both facts, so
this loader builds `LineMap`/`LineList` (a dict/list that also knows the 1-based line of
itself, of each key and of each item) and records duplicate keys instead of dropping them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)


class LineMap(dict[Any, Any]):
    """A YAML mapping; `line` is where it starts, `key_lines[key]` where each key is."""

    line: int
    key_lines: dict[Any, int]
    duplicates: list[tuple[Any, int]]


class LineList(list[Any]):
    """A YAML sequence; `line` is where it starts, `item_lines[i]` where each item is."""

    line: int
    item_lines: list[int]


class YamlSyntaxError(Exception):
    """The text is not YAML; `line` is 1-based, `reason` is PyYAML's problem text."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"{line}: {reason}")
        self.line = line
        self.reason = reason


# libyaml's scanner/parser when present (about 8x faster on large zone sets); the
# constructors below run in Python either way, so lines and errors are the same.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_Base):  # type: ignore[valid-type,misc]
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineMap:
        result = LineMap()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.duplicates = []
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain values", key_node.start_mark
                )
            if key in result:
                result.duplicates.append((key, line))
                continue
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = line
        return result

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> LineList:
        result = LineList(self.construct_object(child, deep=True) for child in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


_LineLoader.add_constructor("tag:yaml.org,2002:map", _LineLoader.construct_mapping)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _LineLoader.construct_sequence)


class _UnsupportedError(Exception):
    """The text uses YAML that only the full loader handles (anchors, tags, ...)."""


_CParser = getattr(getattr(yaml, "_yaml", None), "CParser", None)
_resolver = yaml.resolver.Resolver()
_constructor = yaml.constructor.SafeConstructor()
# Plain scalars whose first character no implicit resolver looks at are strings.
_RESOLVED_BY_FIRST = frozenset(k for k in _resolver.yaml_implicit_resolvers if k)
_SCALARS = {
    tag: _constructor.yaml_constructors[tag]
    for tag in (
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
    )
}


def _scalar(event: ScalarEvent) -> Any:
    if event.anchor is not None or event.tag is not None:
        raise _UnsupportedError
    value = event.value
    if not event.implicit[0] or (value and value[0] not in _RESOLVED_BY_FIRST):
        return value
    # What Resolver.resolve does for a plain scalar, minus its per-call list building.
    resolvers = _resolver.yaml_implicit_resolvers.get(value[:1], ())
    tag = next((tag for tag, regexp in resolvers if regexp.match(value)), None)
    if tag is None:
        return value
    construct = _SCALARS.get(tag)
    if construct is None:  # timestamps, merge keys: rare, left to the full loader
        raise _UnsupportedError
    return construct(_constructor, yaml.ScalarNode(tag, value))


def _node(get: Any, event: Any) -> Any:
    """The value starting at `event`, built straight from libyaml's events."""
    kind = type(event)
    if kind is ScalarEvent:
        return _scalar(event)
    if event.anchor is not None or getattr(event, "tag", None) is not None:
        raise _UnsupportedError  # an alias, or a tagged or anchored collection
    if kind is MappingStartEvent:
        mapping = LineMap()
        mapping.line = event.start_mark.line + 1
        key_lines: dict[Any, int] = {}
        duplicates: list[tuple[Any, int]] = []
        mapping.key_lines, mapping.duplicates = key_lines, duplicates
        while True:
            key_event: Any = get()
            line = key_event.start_mark.line + 1
            if type(key_event) is not ScalarEvent:
                if type(key_event) is MappingEndEvent:
                    return mapping
                raise _UnsupportedError  # a collection as a key: the full loader says why
            key = _scalar(key_event)
            value = get()
            value = _scalar(value) if type(value) is ScalarEvent else _node(get, value)
            if key in mapping:
                duplicates.append((key, line))
            else:
                mapping[key] = value
                key_lines[key] = line
    if kind is SequenceStartEvent:
        sequence = LineList()
        sequence.line = event.start_mark.line + 1
        sequence.item_lines = lines = []
        while True:
            item: Any = get()
            if type(item) is SequenceEndEvent:
                return sequence
            lines.append(item.start_mark.line + 1)
            sequence.append(_node(get, item))
    raise _UnsupportedError


def _load_events(text: str) -> Any:
    """One document from libyaml's event stream, without PyYAML's Python composer and
    constructor (3x faster on big zone sets). Raises _UnsupportedError for anything beyond
    plain mappings, sequences and untagged scalars, which `load` then gives to the full
    loader, so both always agree."""
    get = _CParser(text).get_event  # type: ignore[misc]
    get()  # stream start
    if type(get()) is StreamEndEvent:
        return None
    document = _node(get, get())
    get()  # document end
    if type(get()) is not StreamEndEvent:
        raise _UnsupportedError  # several documents: the full loader reports it
    return document


def load(text: str) -> Any:
    """Parse one YAML document; mappings and sequences come back as LineMap/LineList."""
    try:
        if _CParser is not None:
            try:
                return _load_events(text)
            except _UnsupportedError:
                pass
        return yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlSyntaxError(line, error.problem or str(error)) from None
    except yaml.YAMLError as error:
        raise YamlSyntaxError(1, str(error)) from None


def load_file(path: Path) -> Any:
    """`load` on a file's text (UTF-8)."""
    return load(path.read_text(encoding="utf-8"))
