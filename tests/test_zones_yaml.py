"""yamlsource: the libyaml event fast path builds exactly what the full loader builds."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from dnsoverride import yamlsource

SAMPLES = [
    "",
    "# only a comment\n",
    "a: 1\nb: 0x1f\nc: 1_000\nd: 0o17\ne: 1.5\nf: .inf\ng: -.5e3\nh: 1:20\n",
    "yes: no\nOn: off\nt: true\nn: ~\ne:\nq: 'null'\nqq: \"1\"\n",
    "records:\n  a.example: {A: 10.0.0.1, ttl: 30}\n  b.example:\n    A: [10.0.0.2, 10.0.0.3]\n",
    "records:\n  a.example: {A: 1.2.3.4}\n  a.example: {A: 1.2.3.5}\n  A.example: {}\n",
    "list:\n  - 1\n  - [2, 3]\n  - {x: y}\n  -\n  - 'q'\n",
    "a: 10.0.0.1\nb: -1\nc: +.inf\nd: 0b101\ne: 1_0.5\nf: NULL\ng: True\nh: 1.2.3\ni: 0o8\n",
    "1: int key\n1.0: float key\ntrue: bool key\n~: null key\n",
    "a: &anchor {x: 1}\nb: *anchor\n",
    "a: !!str 5\nb: !!int '7'\n",
    "when: 2024-01-02\n",
    "<<: {a: 1}\nb: 2\n",
    "? [complex, key]\n: value\n",
    "--- 1\n--- 2\n",
    "--- {a: 1}\n...\n",
    "a: |\n  text\n  more\nb: >\n  folded\n",
    "a: [1, 2\n",
    "a: b: c\n",
    "a:\n  - 1\n - 2\n",
    "\ta: 1\n",
]


def _full(text: str) -> Any:
    try:
        return ("ok", yaml.load(text, Loader=yamlsource._LineLoader))
    except yaml.YAMLError as error:
        return ("error", type(error), str(error))


def _shape(value: Any) -> Any:
    """The value plus every line number it carries, for an exact comparison."""
    if isinstance(value, yamlsource.LineMap):
        return (
            "map",
            value.line,
            [(k, type(k), value.key_lines[k], _shape(v)) for k, v in value.items()],
            value.duplicates,
        )
    if isinstance(value, yamlsource.LineList):
        return ("list", value.line, value.item_lines, [_shape(v) for v in value])
    return (type(value), value)


@pytest.mark.parametrize("text", SAMPLES)
def test_fast_path_matches_full_loader(text: str) -> None:
    expected = _full(text)
    try:
        got: Any = ("ok", yamlsource.load(text))
    except yamlsource.YamlSyntaxError as error:
        assert expected[0] == "error", (text, error)
        return
    assert expected[0] == "ok"
    assert _shape(got[1]) == _shape(expected[1])


@pytest.mark.parametrize("text", [t for t in SAMPLES if _full(t)[0] == "error"])
def test_errors_carry_the_same_line(text: str) -> None:
    with pytest.raises(yamlsource.YamlSyntaxError) as fast:
        yamlsource.load(text)
    error = _full(text)
    with pytest.raises(yaml.MarkedYAMLError) as full:
        yaml.load(text, Loader=yamlsource._LineLoader)
    mark = full.value.problem_mark or full.value.context_mark
    assert mark is not None and fast.value.line == mark.line + 1, error


def test_the_fast_path_is_taken() -> None:
    # Fails if the event builder silently fell back for ordinary zone text.
    text = "records:\n  a.example: {A: 10.0.0.1}\n"
    original = yamlsource._LineLoader
    try:
        yamlsource._LineLoader = None  # type: ignore[assignment,misc]
        assert yamlsource.load(text) == {"records": {"a.example": {"A": "10.0.0.1"}}}
    finally:
        yamlsource._LineLoader = original  # type: ignore[misc]
