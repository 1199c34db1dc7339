"""YAML loading for every file an admin edits (zone files, daemon configs): line numbers
for `file:line: reason` messages, and limits that hold whatever PyYAML version is installed.

PyYAML's plain `safe_load` forgets where each value came from, silently keeps the last of
two duplicate keys, and composes the document recursively: PyYAML 6.0.3's C composer dies
with SIGSEGV on a flow sequence nested ~60,000 deep, its Python composer raises
RecursionError, and an alias-heavy "billion laughs" file of 4 KB stands for 10^8 nodes
that every later walk of the data expands. So this module builds the document itself,
from the parser's event stream, without recursion and without PyYAML's composer or
constructor, and enforces:

- **nesting**: at most `MAX_DEPTH` collections inside each other, counting what aliases
  bring in (`YamlError` at the line that goes deeper);
- **aliases**: allowed (anchors and `<<` merge keys are common in hand-written YAML),
  but the nodes all aliases stand for together may not exceed `ALIAS_NODES` or one node
  per character read so far, whichever is more; a billion-laughs file stops at the alias
  that crosses the budget. Aliased values are shared, never copied.

Mappings and sequences come back as `LineMap`/`LineList` (a dict/list that also knows the
1-based line of itself, of each key and of each item), and duplicate keys are recorded
instead of dropped. Scalars resolve as PyYAML's SafeLoader resolves them (YAML 1.1:
`yes` is true, `010` is 8); the standard tags (`!!str`, `!!int`, ...) are honoured and
any other tag is an error. `brief()` shows a value in an error message without ever
expanding a large or aliased structure.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

# Zone files and configs nest 4-6 levels; 64 leaves room for anything hand-written and
# keeps every walk of the result (ours, repr, equality) far from Python's recursion limit.
MAX_DEPTH = 64
# What aliases may stand for in total, at least; beyond it, one node per character read.
# Go's yaml.v3 bounds aliases the same way (a ratio to the document's own size).
ALIAS_NODES = 10_000


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


class YamlError(Exception):
    """The text is not YAML we load; `line` is 1-based, `reason` says what is wrong
    (prefixed `YAML syntax error:` for what the parser rejects)."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(f"{line}: {reason}")
        self.line = line
        self.reason = reason


_NO_DUPLICATES: tuple[()] = ()
_NO_KEY = object()
_DONE = object()  # a flat mapping read to its end
_MERGE = object()  # a plain `<<` key (YAML 1.1 merge key)

_constructor = yaml.constructor.SafeConstructor()
_SCALARS = {
    tag: _constructor.yaml_constructors[tag]
    for tag in (
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
    )
}
_STR = "tag:yaml.org,2002:str"
_MAP_TAGS = frozenset({"tag:yaml.org,2002:map", None, "!"})
_SEQ_TAGS = frozenset({"tag:yaml.org,2002:seq", None, "!"})
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_KEY = "mapping keys must be plain values, not a mapping or a list"
# Resolver.resolve for a plain scalar, as one regex per first character: its resolvers'
# patterns as named alternatives in their order, so the first that matches names the tag
# (`lastgroup`), as Resolver's loop would, for one match call instead of one per resolver.
_ALTERNATIVES: dict[tuple[tuple[str, re.Pattern[str]], ...], re.Pattern[str]] = {}
for _resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.values():
    # Compiled once per distinct list (the ten digits share one): each is a large regex.
    _ALTERNATIVES.setdefault(
        tuple(_resolvers),
        re.compile(
            "|".join(f"(?P<r{i}>{regexp.pattern})" for i, (_, regexp) in enumerate(_resolvers)),
            re.X,
        ),
    )
_RESOLVERS = {
    first: _ALTERNATIVES[tuple(resolvers)]
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_RESOLVER_TAGS = {
    first: {f"r{i}": tag for i, (tag, _) in enumerate(resolvers)}
    for first, resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}


def _resolve(value: str) -> Any:
    """A plain scalar that some implicit resolver may claim (null, bool, int, float, ...)."""
    first = value[:1]
    match = _RESOLVERS[first].match(value)
    if match is None:
        return value
    tag = _RESOLVER_TAGS[first][str(match.lastgroup)]
    if tag == _MERGE_TAG:
        return _MERGE
    construct = _SCALARS.get(tag)
    if construct is None:  # `=` (the YAML 1.1 value key): nothing to construct
        return value
    return construct(_constructor, yaml.ScalarNode(tag, value))


def _tagged(event: ScalarEvent) -> Any:
    """A scalar with an explicit tag (`!!str 5`, `!!int '7'`)."""
    tag = event.tag or "!"
    if tag == _STR:
        return event.value
    if tag == "!":  # non-specific: PyYAML resolves it as if it were plain
        return _resolve(event.value)
    construct = _SCALARS.get(tag)
    if construct is None:
        raise YamlError(_line(event), f"YAML tag {_tag_name(tag)} is not supported here")
    try:
        return construct(_constructor, yaml.ScalarNode(tag, event.value))
    except (ValueError, TypeError, yaml.YAMLError):
        raise YamlError(
            _line(event), f"{brief(event.value)} is not a valid {_tag_name(tag)} value"
        ) from None


def _tag_name(tag: str | None) -> str:
    tag = tag or ""
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml") else tag


def _anchor(name: str) -> str:
    return name if len(name) <= 40 else name[:40] + "..."


def _line(event: Any) -> int:
    return int(event.start_mark.line) + 1


_CParser = getattr(getattr(yaml, "_yaml", None), "CParser", None)


class _PyParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's pure-Python event parser, for installs without libyaml (no composer)."""

    def __init__(self, text: str) -> None:
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


class _Builder:
    """Turns one document's events into LineMap/LineList/scalars, iteratively.

    The hot loop is `build`: a zone set is a few events per name, so the common cases
    (a scalar key or value) are spelled out there with locals; anchors, aliases, tags
    and merge keys take the slower helpers.
    """

    def __init__(self, get: Any) -> None:
        self.get = get
        self.anchors: dict[str, Any] = {}
        self.open_anchors: set[str] = set()
        self.alias_nodes = 0
        # id(collection) -> (collection, nodes, height) of what an alias stands for. The
        # entry keeps the collection alive: a redefined anchor's old one (a `<<` source
        # is in no other place) would be freed, and its id reused by a new collection.
        self.measured: dict[int, tuple[Any, int, int]] = {}

    # Over the size rules on purpose: the loop runs a few times per zone name (10^6 names),
    # and a call per event costs more than the whole loop body; see the class docstring.
    def build(self, event: Any) -> Any:  # noqa: PLR0912, PLR0915 - the inlined hot loop
        get = self.get
        scalar, mapping_start, sequence_start = ScalarEvent, MappingStartEvent, SequenceStartEvent
        line_map, line_list = LineMap, LineList
        resolvers = _RESOLVERS
        # One frame per open collection, innermost last: [the enclosing collection, its
        # pending key, that key's line, this collection's line as an item, its anchor,
        # its `<<` merge sources]. The innermost collection and its key live in locals.
        stack: list[list[Any]] = []
        container: Any = None
        key: Any = _NO_KEY
        key_line = 0
        while True:
            kind = type(event)
            if kind is scalar:
                if event.anchor is None and event.tag is None:
                    value = event.value
                    if event.implicit[0] and (not value or value[0] in resolvers):
                        value = _resolve(value)
                else:
                    value = self._special_scalar(event)
                if key is _NO_KEY and type(container) is line_map:
                    key, key_line = value, event.start_mark.line + 1  # `<<` stays a merge key
                    event = get()
                    continue
            elif kind is mapping_start or kind is sequence_start:
                line = event.start_mark.line + 1
                if key is _NO_KEY and type(container) is line_map:
                    raise YamlError(line, _COLLECTION_KEY)
                if len(stack) >= MAX_DEPTH:
                    raise YamlError(line, f"YAML nested deeper than {MAX_DEPTH} levels")
                anchor = event.anchor
                if (
                    kind is mapping_start
                    and anchor is None
                    and event.tag is None
                    and type(container) is line_map
                ):
                    # A mapping as a value: often flat (a zone name's `{A: 10.0.0.5}`),
                    # built here without a frame, or handed to the loop where it is not.
                    value, event, flat_key, flat_key_line = self._flat_mapping(line)
                    if flat_key is not _DONE:
                        stack.append([container, key, key_line, line, None, None])
                        container, key, key_line = value, flat_key, flat_key_line
                        continue
                    # Read to its end: placed below like any complete value.
                else:
                    stack.append([container, key, key_line, line, anchor, None])
                    if anchor is not None:
                        self.open_anchors.add(anchor)
                    container, key = _open(event, line, kind is mapping_start), _NO_KEY
                    event = get()
                    continue
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                value = container
                frame = stack.pop()
                if frame[5] is not None:
                    value = _merged(value, frame[5])
                if frame[4] is not None:
                    self.open_anchors.discard(frame[4])
                    self.anchors[frame[4]] = value
                container, key, key_line = frame[0], frame[1], frame[2]
                if type(container) is line_list:
                    container.append(value)
                    container.item_lines.append(frame[3])
                    event = get()
                    continue
            elif kind is AliasEvent:
                value = self._alias(event, len(stack))
            else:
                raise YamlError(_line(event), "YAML syntax error: unexpected event")
            # A complete value (scalar, alias or closed collection) for `container`.
            if value is _MERGE:  # `<<` outside a key is a plain string
                value = "<<"
            if container is None:
                return value
            if type(container) is line_list:
                container.append(value)
                container.item_lines.append(_line(event))
            elif key is _NO_KEY:
                if isinstance(value, LineMap | LineList):
                    raise YamlError(_line(event), _COLLECTION_KEY)
                key, key_line = value, _line(event)
            else:
                if key is _MERGE or key in container:
                    self._merge_or_duplicate(stack, container, key, key_line, value)
                else:
                    container[key] = value
                    container.key_lines[key] = key_line
                key = _NO_KEY
            event = get()

    def _flat_mapping(self, line: int) -> tuple[LineMap, Any, Any, int]:
        """Read a mapping's plain scalar pairs. Returns the mapping, its end event and
        `_DONE` when it ended; or, at the first thing that is not a plain pair, the
        mapping so far, that event and the key it belongs to (`_NO_KEY` if none)."""
        get, scalar, resolvers = self.get, ScalarEvent, _RESOLVERS
        mapping = LineMap()
        mapping.line = line
        mapping.key_lines = lines = {}
        mapping.duplicates = _NO_DUPLICATES
        while True:
            event: Any = get()
            kind = type(event)
            if kind is not scalar or event.anchor is not None or event.tag is not None:
                if kind is MappingEndEvent:
                    return mapping, event, _DONE, 0
                return mapping, event, _NO_KEY, 0
            key = event.value
            if event.implicit[0] and (not key or key[0] in resolvers):
                key = _resolve(key)
            key_line = event.start_mark.line + 1
            event = get()
            kind = type(event)
            if (
                key is _MERGE
                or kind is not scalar
                or event.anchor is not None
                or event.tag is not None
            ):
                return mapping, event, key, key_line
            value = event.value
            if event.implicit[0] and (not value or value[0] in resolvers):
                value = _resolve(value)
                if value is _MERGE:
                    value = "<<"
            if key in mapping:
                self._merge_or_duplicate([], mapping, key, key_line, value)
            else:
                mapping[key] = value
                lines[key] = key_line

    @staticmethod
    def _merge_or_duplicate(
        stack: list[list[Any]], container: LineMap, key: Any, key_line: int, value: Any
    ) -> None:
        """A `<<` merge key's value is kept to merge when the mapping ends; a key given
        twice is recorded, and its first value kept."""
        if key is _MERGE:
            frame = stack[-1]
            frame[5] = [*(frame[5] or ()), (value, key_line)]
            return
        if not container.duplicates:
            container.duplicates = []
        container.duplicates.append((key, key_line))

    def _special_scalar(self, event: ScalarEvent) -> Any:
        """A scalar with an anchor or a tag."""
        if event.tag is not None:
            value = _tagged(event)
        else:
            value = event.value
            if event.implicit[0]:
                value = _resolve(value)
        if event.anchor is not None:
            self.anchors[event.anchor] = value
        return value

    def _alias(self, event: Any, depth: int) -> Any:
        name = event.anchor
        if name in self.open_anchors:
            raise YamlError(
                _line(event), f"YAML alias *{_anchor(name)} refers to a node that contains it"
            )
        if name not in self.anchors:
            raise YamlError(
                _line(event), f"YAML alias *{_anchor(name)} is not defined before this point"
            )
        value = self.anchors[name]
        nodes, height = self._measure(value)
        if depth + height > MAX_DEPTH:
            raise YamlError(
                _line(event),
                f"YAML nested deeper than {MAX_DEPTH} levels (through *{_anchor(name)})",
            )
        self.alias_nodes += nodes
        budget = max(ALIAS_NODES, int(event.start_mark.index))
        if self.alias_nodes > budget:
            raise YamlError(
                _line(event),
                f"YAML aliases stand for more than {budget:,} nodes here (a 'billion laughs'?); "
                "write the values out or use fewer aliases",
            )
        return value

    def _measure(self, value: Any) -> tuple[int, int]:
        """(nodes, nesting height) of a finished value, aliases counted in full. Recursion
        is bounded: every finished value is at most MAX_DEPTH high."""
        if not isinstance(value, LineMap | LineList):
            return 1, 0
        known = self.measured.get(id(value))
        if known is not None:
            return known[1], known[2]
        nodes, height = 1, 0
        for item in value.values() if isinstance(value, LineMap) else value:
            item_nodes, item_height = self._measure(item)
            nodes += item_nodes + (1 if isinstance(value, LineMap) else 0)
            height = max(height, item_height)
        self.measured[id(value)] = (value, nodes, height + 1)
        return nodes, height + 1


def _open(event: Any, line: int, is_mapping: bool) -> LineMap | LineList:
    """An empty LineMap or LineList for a collection's start event."""
    if event.tag not in (_MAP_TAGS if is_mapping else _SEQ_TAGS):
        raise YamlError(line, f"YAML tag {_tag_name(event.tag)} is not supported here")
    if is_mapping:
        mapping = LineMap()
        mapping.line = line
        mapping.key_lines = {}
        mapping.duplicates = _NO_DUPLICATES
        return mapping
    sequence = LineList()
    sequence.line = line
    sequence.item_lines = []
    return sequence


def _merged(mapping: LineMap, sources: list[tuple[Any, int]]) -> LineMap:
    """`mapping` with its `<<` merge keys applied: keys of the merged mappings that it
    does not set itself, earlier sources first (as PyYAML's SafeLoader merges)."""
    merged = LineMap()
    merged.line = mapping.line
    merged.key_lines = {}
    merged.duplicates = mapping.duplicates
    for value, line in sources:
        items = value if isinstance(value, LineList) else [value]
        for item in items:
            if not isinstance(item, LineMap):
                raise YamlError(line, "YAML merge key '<<' takes a mapping or a list of mappings")
            for key, item_value in item.items():
                if key not in merged and key not in mapping:
                    merged[key] = item_value
                    merged.key_lines[key] = item.key_lines[key]
    merged.update(mapping)
    merged.key_lines.update(mapping.key_lines)
    return merged


def _events(text: str) -> Any:
    """The parser's `get_event`: libyaml's when present (about 8x faster on big zone
    sets), PyYAML's pure-Python one otherwise; neither recurses."""
    if _CParser is not None:
        return _CParser(text).get_event
    return _PyParser(text).get_event


def load(text: str) -> Any:
    """Parse one YAML document; mappings and sequences come back as LineMap/LineList.
    Raises YamlError for syntax errors and for anything beyond the limits above."""
    try:
        get = _events(text)
        get()  # stream start
        event = get()
        if type(event) is StreamEndEvent:
            return None
        if type(event) is not DocumentStartEvent:
            raise YamlError(_line(event), "YAML syntax error: expected a document")
        document = _Builder(get).build(get())
        if type(get()) is not DocumentEndEvent:
            raise YamlError(1, "YAML syntax error: unterminated document")
        event = get()
        if type(event) is not StreamEndEvent:
            raise YamlError(
                _line(event), "a file holds one YAML document, and a second one starts here"
            )
        return document
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise YamlError(line, f"YAML syntax error: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise YamlError(1, f"YAML syntax error: {brief(str(error))}") from None


def load_file(path: Path) -> Any:
    """`load` on a file's text (UTF-8)."""
    return load(path.read_text(encoding="utf-8"))


class _Brief(reprlib.Repr):
    """reprlib's bounded repr, also for LineMap/LineList (reprlib picks its method by the
    type's name, and would fall back to the full, expanding repr for the subclasses)."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 2
        self.maxdict = self.maxlist = 3
        self.maxstring = self.maxother = 60

    def repr_LineMap(self, value: LineMap, level: int) -> str:  # noqa: N802 - reprlib's naming
        return self.repr_dict(value, level)

    def repr_LineList(self, value: LineList, level: int) -> str:  # noqa: N802 - reprlib's naming
        return self.repr_list(value, level)


_brief = _Brief()


def brief(value: Any) -> str:
    """A short repr of `value` for messages: strings cut to 60 characters, at most three
    items of a mapping or list, two levels deep, whatever the value stands for."""
    return _brief.repr(value)
