"""How both daemons read a config file: one idiom, so both report alike.

A config file is line-tracked YAML (`yamlsource`, with its nesting and alias limits).
Each section (a mapping) is read by the parser that sits beside its dataclass, through a
`Section`: typed readers (`integer`, `duration`, `size`, `endpoint`, ...) that parse with
the one grammar (`grammar`) and, for a bad value, record a `Problem` at the value's line
naming the key (`cache: max_ttl: ...`) and read on. Unknown keys are problems too, with a
did-you-mean. What was read lands in `Section.values`, keyword arguments for the section's
dataclass, so a key left out takes the dataclass's default: defaults live only there.
Every problem of a file is collected and raised together as one `ConfigError`.

Values given on the command line are read by `Flags` with the same grammar; their
problems name the flag (`--listen: ...`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dnsoverride.common import grammar, yamlsource
from dnsoverride.common.errors import ConfigError, Problem, UserError
from dnsoverride.common.grammar import Endpoint, EndpointRule, GrammarError, IPNetwork
from dnsoverride.common.yamlsource import LineList, LineMap, brief

T = TypeVar("T")


def number_text(value: float) -> str:
    """A bound in a message: `30`, `0.05`, `2147483647` (never `2.14748e+09`)."""
    return str(int(value)) if value == int(value) else f"{value:g}"


def require_file(path: Path, label: str) -> None:
    """UserError unless `path` is a file: `LABEL: does not exist` (or `is a directory, not
    a file`). `label` names the path as the user gave it: the flag with its value
    (`--config conf.yaml`) on the command line, `config file PATH` elsewhere."""
    if path.is_file():
        return
    if path.is_dir():
        raise UserError(f"{label}: is a directory, not a file")
    if path.exists():
        raise UserError(f"{label}: is not a regular file")
    raise UserError(f"{label}: does not exist")


def unknown_key(key: object, known: Sequence[str]) -> str:
    """The reason for an unknown key: the closest known one, else the list of them."""
    # Imported for a config with a mistake in it, not by every daemon that starts.
    import difflib

    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {brief(key)} (did you mean {close[0]!r}?)"
    return f"unknown key {brief(key)} (known: {', '.join(known)})"


class Document:
    """One config file being read: its path and every problem found in it so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []

    def add(self, line: int, reason: str) -> None:
        self.problems.append(Problem(str(self.path), line, reason))

    def top(self, keys: Sequence[str]) -> Section | None:
        """The file's top-level section, None when the file is empty or not YAML we read
        (the problem recorded). An unreadable file is a UserError: there is nothing to
        report lines of."""
        try:
            document = yamlsource.load_file(self.path)
        except yamlsource.YamlError as error:
            self.add(error.line, error.reason)
            return None
        except OSError as error:
            raise UserError(f"config file {self.path}: cannot read: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise UserError(f"config file {self.path}: not UTF-8 text: {error}") from None
        if document is None:
            return self.blank(keys)
        if not isinstance(document, LineMap):
            self.add(1, "the config must be a mapping of settings")
            return None
        return Section(self, document, "", keys)

    def blank(self, keys: Sequence[str]) -> Section:
        """A top-level section with no settings (no file, or an empty one)."""
        mapping = LineMap()
        mapping.line, mapping.key_lines, mapping.duplicates = 1, {}, ()
        return Section(self, mapping, "", keys)

    def raise_problems(self, *more: Problem) -> None:
        """ConfigError with this file's problems and `more` (a flag's), in file order."""
        problems = [*self.problems, *more]
        if problems:
            raise ConfigError(
                sorted(problems, key=lambda problem: (problem.file, problem.line or 0))
            )


class Section:
    """One mapping of a config file; see the module docstring.

    `where` prefixes every message (`cache`, `upstreams[2]`; "" at the top level); `keys`
    are the keys it may hold. A reader given a key that is absent returns None and
    records nothing; given a bad value, it records the problem and returns None.
    """

    def __init__(
        self, document: Document, mapping: LineMap, where: str, keys: Sequence[str]
    ) -> None:
        self.document = document
        self.mapping = mapping
        self.where = where
        self.keys = tuple(keys)
        self.values: dict[str, Any] = {}
        for key, line in mapping.duplicates:
            self.add(line, f"duplicate key {brief(key)} (first at line {mapping.key_lines[key]})")
        for key in mapping:
            if key not in self.keys:
                self.document.add(mapping.key_lines[key], self._prefixed(unknown_key(key, keys)))

    @property
    def line(self) -> int:
        """Where the section starts."""
        return self.mapping.line

    def __contains__(self, key: str) -> bool:
        return key in self.mapping

    def raw(self, key: str) -> Any:
        """The value of `key` as YAML gave it (None when absent)."""
        return self.mapping.get(key)

    def line_of(self, key: str) -> int:
        """The line of `key`, or of the section when it is absent."""
        return self.mapping.key_lines.get(key, self.mapping.line)

    def _prefixed(self, reason: str) -> str:
        return f"{self.where}: {reason}" if self.where else reason

    def add(self, line: int, reason: str) -> None:
        """Record a problem of this section at `line`."""
        self.document.add(line, self._prefixed(reason))

    def problem(self, key: str, reason: str) -> None:
        """Record a problem of `key`'s value, at its line."""
        self.add(self.line_of(key), f"{key}: {reason}")

    def read(self, key: str, parse: Callable[[Any], T]) -> T | None:
        """`parse(value)` of `key` (GrammarError or ValueError: a problem), kept in `values`."""
        if key not in self.mapping:
            return None
        try:
            value = parse(self.mapping[key])
        except ValueError as error:
            self.problem(key, str(error))
            return None
        self.values[key] = value
        return value

    def integer(self, key: str, low: int, high: int) -> int | None:
        def parse(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise GrammarError(f"expected an integer from {low} to {high}, not {brief(value)}")
            return value

        return self.read(key, parse)

    def duration(self, key: str, low: float, high: float, *, whole: bool = False) -> float | None:
        """Seconds from `low` to `high` (whole seconds if `whole`, returned as an int)."""

        def parse(value: Any) -> float:
            unit = "whole seconds" if whole else "seconds"
            bounds = f"expected a number from {number_text(low)} to {number_text(high)} {unit}"
            try:
                seconds = grammar.parse_duration(value)
            except GrammarError:
                raise GrammarError(
                    f"{bounds} (a duration: {grammar.DURATION_FORMS}), not {brief(value)}"
                ) from None
            if not low <= seconds <= high or (whole and seconds != int(seconds)):
                raise GrammarError(f"{bounds}, not {brief(value)}")
            return int(seconds) if whole else seconds

        return self.read(key, parse)

    def size(self, key: str, low: int, high: int, *, unit_required: bool = True) -> int | None:
        def parse(value: Any) -> int:
            size = grammar.parse_size(value, unit_required=unit_required)
            if not low <= size <= high:
                raise GrammarError(
                    f"{brief(value)} is {size:,} bytes: expected {low:,} to {high:,}"
                )
            return size

        return self.read(key, parse)

    def boolean(self, key: str) -> bool | None:
        def parse(value: Any) -> bool:
            if not isinstance(value, bool):
                raise GrammarError(f"expected true or false, not {brief(value)}")
            return value

        return self.read(key, parse)

    def text(self, key: str, what: str) -> str | None:
        """A non-empty string; `what` names it in the problem (`a directory path`)."""

        def parse(value: Any) -> str:
            if not isinstance(value, str) or not value:
                raise GrammarError(f"expected {what}, not {brief(value)}")
            return value

        return self.read(key, parse)

    def required_text(self, key: str, what: str) -> str | None:
        """`text`, recording a problem at the section's line when `key` is missing."""
        if key not in self.mapping:
            self.add(self.line, f"{key!r} is required")
            return None
        return self.text(key, what)

    def endpoint(self, key: str, rule: EndpointRule) -> Endpoint | None:
        return self.read(key, lambda value: grammar.parse_endpoint(value, rule))

    def each(self, key: str, parse: Callable[[Any], T]) -> tuple[T, ...] | None:
        """`parse` of every item of `key`'s list (a single value is a list of one), each
        problem at its item's line; kept in `values` as a tuple of the good ones."""
        if key not in self.mapping:
            return None
        value = self.mapping[key]
        items = value if isinstance(value, list) else [value]
        lines = getattr(value, "item_lines", None) or [self.line_of(key)] * len(items)
        parsed = []
        for item, line in zip(items, lines, strict=True):
            try:
                parsed.append(parse(item))
            except ValueError as error:
                self.add(line, f"{key}: {error}")
        if len(parsed) != len(items):
            return None
        result = tuple(parsed)
        self.values[key] = result
        return result

    def endpoints(self, key: str, rule: EndpointRule) -> tuple[Endpoint, ...] | None:
        return self.each(key, lambda value: grammar.parse_endpoint(value, rule))

    def networks(self, key: str) -> tuple[IPNetwork, ...] | None:
        return self.each(key, grammar.parse_network)

    def strings(self, key: str) -> tuple[str, ...] | None:
        def parse(value: Any) -> str:
            if not isinstance(value, str):
                raise GrammarError(f"expected a string, not {brief(value)}")
            return value

        return self.each(key, parse)

    def section(self, key: str, keys: Sequence[str], where: str | None = None) -> Section | None:
        """The mapping under `key` as a Section (None, with a problem, if it is not one)."""
        if key not in self.mapping:
            return None
        value = self.mapping[key]
        name = where or self._prefixed(key)
        if not isinstance(value, LineMap):
            self.document.add(
                self.line_of(key), f"{name}: expected a mapping with {', '.join(keys)}"
            )
            return None
        return Section(self.document, value, name, keys)

    def sections(self, key: str, keys: Sequence[str]) -> Iterator[Section]:
        """Each mapping of the list under `key`, as `key[index]` Sections; a value that is
        not a list, or an item that is not a mapping, is a problem."""
        if key not in self.mapping:
            return
        value = self.mapping[key]
        if not isinstance(value, LineList):
            self.problem(key, f"expected a list of mappings with {', '.join(keys)}")
            return
        for index, (item, line) in enumerate(zip(value, value.item_lines, strict=True)):
            where = self._prefixed(f"{key}[{index}]")
            if not isinstance(item, LineMap):
                self.document.add(line, f"{where}: expected a mapping with {', '.join(keys)}")
                continue
            yield Section(self.document, item, where, keys)


class Flags:
    """Command-line values read with the same grammar; each problem names its flag."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def read(self, flag: str, value: T | None, parse: Callable[[T], Any]) -> Any:
        """`parse(value)`, or None when the flag was not given or is bad (recorded)."""
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as error:
            self.problems.append(Problem(flag, None, str(error)))
            return None

    def each(self, flag: str, values: Sequence[T], parse: Callable[[T], Any]) -> tuple[Any, ...]:
        """`parse` of every value of a repeatable flag (the good ones)."""
        parsed = (self.read(flag, value, parse) for value in values)
        return tuple(value for value in parsed if value is not None)
