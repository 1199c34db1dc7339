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


def load(text: str) -> Any:
    """Parse one YAML document; mappings and sequences come back as LineMap/LineList."""
    try:
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
