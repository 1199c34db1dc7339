"""YAML loading that remembers line numbers, for `file:line: reason` error messages.

PyYAML's plain `safe_load` forgets where each value came from and silently keeps the
last of two duplicate keys. Zone files and the daemon config both need both facts, so
this loader builds `LineMap`/`LineList` (a dict/list that also knows the 1-based line of
itself, of each key and of each item) and records duplicate keys instead of dropping them.
"""

from __future__ import annotations

import re
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

    # Slots: a zone set builds one per name, and slot attributes are set twice as fast.
    __slots__ = ("duplicates", "key_lines", "line")

    line: int
    key_lines: dict[Any, int]
    # Usually none: a shared empty tuple then, to spare a list per mapping.
    duplicates: list[tuple[Any, int]] | tuple[()]


class LineList(list[Any]):
    """A YAML sequence; `line` is where it starts, `item_lines[i]` where each item is."""

    __slots__ = ("item_lines", "line")

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


_NO_DUPLICATES: tuple[()] = ()


class _LineLoader(_Base):  # type: ignore[valid-type,misc]
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineMap:
        result = LineMap()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.duplicates = _NO_DUPLICATES
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str | int | float | bool) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, "mapping keys must be plain values", key_node.start_mark
                )
            if key in result:
                if not result.duplicates:
                    result.duplicates = []
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
_constructor = yaml.constructor.SafeConstructor()
_SCALARS = {
    tag: _constructor.yaml_constructors[tag]
    for tag in (
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
    )
}
# Resolver.resolve for a plain scalar, as one regex per first character: its resolvers'
# patterns as named alternatives in their order, so the first that matches names the tag
# (`lastgroup`), as Resolver's loop would, for one match call instead of one per resolver.
_RESOLVERS = {
    first: re.compile(
        "|".join(f"(?P<r{i}>{regexp.pattern})" for i, (_, regexp) in enumerate(resolvers)),
        re.X,
    )
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_RESOLVER_TAGS = {
    first: {f"r{i}": tag for i, (tag, _) in enumerate(resolvers)}
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}


def _resolve(value: str) -> Any:
    """A plain scalar that some implicit resolver may claim (null, bool, int, float)."""
    first = value[:1]
    match = _RESOLVERS[first].match(value)
    if match is None:
        return value
    tag = _RESOLVER_TAGS[first][str(match.lastgroup)]
    construct = _SCALARS.get(tag)
    if construct is None:  # timestamps, merge keys: rare, left to the full loader
        raise _UnsupportedError
    return construct(_constructor, yaml.ScalarNode(tag, value))


def _scalar(event: ScalarEvent) -> Any:
    if event.anchor is not None or event.tag is not None:
        raise _UnsupportedError
    value = event.value
    if event.implicit[0] and (not value or value[0] in _RESOLVERS):
        return _resolve(value)
    return value


def _mapping(get: Any, start: Any) -> LineMap:
    # The hot loop of a zone set (a few events per name): the scalar case of `_node` is
    # spelled out here, with attribute lookups bound to locals.
    mapping = LineMap()
    mapping.line = start.start_mark.line + 1
    mapping.key_lines = key_lines = {}
    mapping.duplicates = _NO_DUPLICATES
    resolved_by_first = _RESOLVERS
    scalar_event = ScalarEvent
    while True:
        event: Any = get()
        line = event.start_mark.line + 1
        if type(event) is not scalar_event:
            if type(event) is MappingEndEvent:
                return mapping
            raise _UnsupportedError  # a collection as a key: the full loader says why
        if event.anchor is not None or event.tag is not None:
            raise _UnsupportedError
        key = event.value
        if event.implicit[0] and (not key or key[0] in resolved_by_first):
            key = _resolve(key)
        event = get()
        if type(event) is scalar_event:
            if event.anchor is not None or event.tag is not None:
                raise _UnsupportedError
            value = event.value
            if event.implicit[0] and (not value or value[0] in resolved_by_first):
                value = _resolve(value)
        else:
            value = _node(get, event)
        if key in mapping:
            if not mapping.duplicates:
                mapping.duplicates = []
            mapping.duplicates.append((key, line))
        else:
            mapping[key] = value
            key_lines[key] = line


def _node(get: Any, event: Any) -> Any:
    """The value starting at `event`, built straight from libyaml's events."""
    kind = type(event)
    if kind is ScalarEvent:
        return _scalar(event)
    if event.anchor is not None or getattr(event, "tag", None) is not None:
        raise _UnsupportedError  # an alias, or a tagged or anchored collection
    if kind is MappingStartEvent:
        return _mapping(get, event)
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
