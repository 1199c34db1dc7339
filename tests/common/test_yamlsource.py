"""yamlsource: the event builder agrees with PyYAML's own loader on ordinary YAML (values,
types and every line number), and holds its limits on hostile YAML whatever PyYAML does."""

from __future__ import annotations

import time
from typing import Any

import pytest
import yaml

from dnsoverride.common import yamlsource
from tests.support.yaml_bombs import laughs_through_redefined_anchors

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
    "a: &s text\nb: *s\nc: {x: *s}\n",
    "a: !!str 5\nb: !!int '7'\nc: !!float '1'\nd: !!bool 'yes'\ne: !!null ''\nf: ! 12\n",
    "a: !!map {x: 1}\nb: !!seq [1]\n",
    "when: 2024-01-02\nstamp: 2001-12-14t21:59:43.10-05:00\n",
    "<<: {a: 1}\nb: 2\n",
    "base: &b {a: 1, b: 2}\nmore: &m {c: 3, a: 9}\nx:\n  <<: [*b, *m]\n  b: 7\n",
    "base: &b {a: 1}\nx: {b: 2, <<: *b}\n",
    "? [complex, key]\n: value\n",
    "--- 1\n--- 2\n",
    "--- {a: 1}\n...\n",
    "a: |\n  text\n  more\nb: >\n  folded\n",
    "a: [1, 2\n",
    "a: b: c\n",
    "a:\n  - 1\n - 2\n",
    "\ta: 1\n",
    # Mappings as values are read flat until something is not a plain pair.
    "x: {a: 1, a: 2}\ny: {}\n",
    "x: {a: &s 1, b: *s}\n",
    "x: {a: 1, !!str b: 2}\n",
    "x: {a: {b: 1}, c: [2]}\nz: 3\n",
    "x: {<<: {a: 1}, b: 2}\n",
    "x:\n  a: 1\n  b:\n    - c\n  d: e\n",
    "a: *nowhere\n",
    "a: !custom 1\n",
]
# PyYAML loads these; we refuse them on purpose (no bytes, sets or pairs in our files).
REFUSED = ["a: !!binary aGVsbG8=\n", "a: !!set {x: null}\n", "a: !!omap [x: 1]\n"]


class _Oracle(yaml.SafeLoader):
    """PyYAML's pure-Python composer and constructor, building the same LineMap/LineList
    shapes: what `yamlsource` must agree with (fine for these small samples; it is the
    recursive composer that yamlsource does without)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Any:
        self.flatten_mapping(node)
        result = yamlsource.LineMap()
        result.line = node.start_mark.line + 1
        result.key_lines = {}
        result.duplicates = ()
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "collection key", key_node.start_mark
                )
            line = key_node.start_mark.line + 1
            if key in result and not getattr(key_node, "merged", False):
                if not result.duplicates:
                    result.duplicates = []
                result.duplicates.append((key, line))
                continue
            result[key] = self.construct_object(value_node, deep=True)
            result.key_lines[key] = line
        return result

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Merged pairs come first and the last one of a key wins; mark the merged key
        # nodes so that they are not counted as duplicates.
        before = {id(pair[0]) for pair in node.value}
        super().flatten_mapping(node)
        merged = [pair for pair in node.value if id(pair[0]) not in before]
        if not merged:
            return
        explicit = [pair for pair in node.value if id(pair[0]) in before]
        explicit_keys = {self.construct_object(k) for k, _ in explicit}
        last: dict[Any, tuple[Any, Any]] = {}
        for key_node, value_node in merged:  # the last merged pair wins, as in PyYAML
            key = self.construct_object(key_node)
            if key not in explicit_keys:
                key_node.merged = True
                last[key] = (key_node, value_node)
        node.value = [*last.values(), *explicit]

    def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> Any:
        result = yamlsource.LineList(self.construct_object(c, deep=True) for c in node.value)
        result.line = node.start_mark.line + 1
        result.item_lines = [child.start_mark.line + 1 for child in node.value]
        return result


_Oracle.add_constructor("tag:yaml.org,2002:map", _Oracle.construct_mapping)
_Oracle.add_constructor("tag:yaml.org,2002:seq", _Oracle.construct_sequence)


def _oracle(text: str) -> Any:
    try:
        return ("ok", yaml.load(text, Loader=_Oracle))
    except yaml.YAMLError as error:
        return ("error", error)


def _shape(value: Any) -> Any:
    """The value plus every line number it carries, for an exact comparison."""
    if isinstance(value, yamlsource.LineMap):
        return (
            "map",
            value.line,
            sorted(
                ((repr(k), type(k), value.key_lines[k], _shape(v)) for k, v in value.items()),
                key=repr,
            ),
            sorted(value.duplicates, key=repr),
        )
    if isinstance(value, yamlsource.LineList):
        return ("list", value.line, value.item_lines, [_shape(v) for v in value])
    return (type(value), value)


@pytest.mark.parametrize("text", SAMPLES)
def test_values_and_lines_match_pyyamls_loader(text: str) -> None:
    expected = _oracle(text)
    try:
        got = yamlsource.load(text)
    except yamlsource.YamlError as error:
        assert expected[0] == "error", (text, error)
        return
    assert expected[0] == "ok", (text, expected)
    assert _shape(got) == _shape(expected[1])


@pytest.mark.parametrize(
    "text",
    [t for t in SAMPLES if isinstance(_oracle(t)[1], yaml.MarkedYAMLError)],
)
def test_errors_carry_the_same_line(text: str) -> None:
    with pytest.raises(yamlsource.YamlError) as ours:
        yamlsource.load(text)
    error = _oracle(text)[1]
    mark = error.problem_mark or error.context_mark
    assert mark is not None and ours.value.line == mark.line + 1, (error, ours.value)


@pytest.mark.parametrize("text", REFUSED)
def test_tags_beyond_plain_data_are_refused(text: str) -> None:
    assert _oracle(text)[0] == "ok"
    with pytest.raises(yamlsource.YamlError, match=r"^1: YAML tag !!\w+ is not supported here"):
        yamlsource.load(text)


def test_an_alias_item_is_at_the_aliases_line() -> None:
    # PyYAML's nodes would say line 1 (the anchor) for both items.
    document = yamlsource.load("a: &s text\nc:\n  - *s\n  - *s\n")
    assert document["c"].item_lines == [3, 4]


def test_the_pure_python_parser_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    # Installs without libyaml use PyYAML's Python event parser: same builder, same limits
    # (its syntax error texts differ from libyaml's; the lines do not).
    with_c = [_result(text) for text in SAMPLES]
    monkeypatch.setattr(yamlsource, "_CParser", None)
    assert [_result(text) for text in SAMPLES] == with_c
    with pytest.raises(yamlsource.YamlError, match="nested deeper than 64"):
        yamlsource.load("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(yamlsource.YamlError, match="aliases stand for more than 10,000"):
        yamlsource.load(laughs(8))


def _result(text: str) -> Any:
    try:
        return _shape(yamlsource.load(text))
    except yamlsource.YamlError as error:
        syntax = error.reason.startswith("YAML syntax error")
        return (error.line, "syntax error" if syntax else error.reason)


def test_depth_limit_counts_collections_and_what_aliases_bring_in() -> None:
    ok = "a: " + "[" * 63 + "]" * 63  # and the document's mapping: 64 levels
    assert yamlsource.load(ok) is not None
    with pytest.raises(yamlsource.YamlError) as caught:
        yamlsource.load("a:\n  " + "[" * 64 + "]" * 64)
    assert (caught.value.line, caught.value.reason) == (2, "YAML nested deeper than 64 levels")
    # Each anchor is 40 deep, fine alone; an alias of it 40 deep inside another is 80.
    through = "x: &x " + "[" * 40 + "]" * 40 + "\ny: " + "[" * 40 + "*x" + "]" * 40 + "\n"
    with pytest.raises(yamlsource.YamlError, match=r"deeper than 64 levels \(through \*x\)"):
        yamlsource.load(through)


def laughs(levels: int, *, width: int = 9) -> str:
    """The classic billion laughs: each level a list of `width` aliases of the one below."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [8, 9])
def test_billion_laughs_stops_at_the_alias_over_budget(levels: int) -> None:
    started = time.process_time()
    with pytest.raises(yamlsource.YamlError) as caught:
        yamlsource.load(laughs(levels))
    assert time.process_time() - started < 0.5
    # l4 stands for 9^5 = 59,049 nodes: the first alias at line 5 crosses 10,000.
    assert caught.value.line == 5
    assert "YAML aliases stand for more than 10,000 nodes" in caught.value.reason
    assert len(caught.value.reason) < 200


def test_a_redefined_anchor_lends_its_count_to_nothing() -> None:
    """The alias budget memoised what each aliased collection stands for by `id()`, but a
    redefined anchor's old collection (a `<<` source, kept by nothing else) was freed, and
    its id reused by a new mapping: 1.3 KB with 9 levels loaded with 417 nodes charged for
    7,942,120,023, which the next `str()` of the value (a health `interval`) expanded.
    Fails on the code before the fix."""
    text = laughs_through_redefined_anchors(9)
    assert len(text) < 1400
    with pytest.raises(yamlsource.YamlError) as caught:
        yamlsource.load(text)
    assert "YAML aliases stand for more than 10,000 nodes" in caught.value.reason


def test_aliases_within_budget_are_shared_not_copied() -> None:
    # A defaults block used by many names: what anchors are for, well within budget.
    names = "\n".join(f"  host{i}.test: *defaults" for i in range(2000))
    document = yamlsource.load(f"defaults: &defaults {{A: 10.0.0.1, ttl: 30}}\nrecords:\n{names}\n")
    records = document["records"]
    assert len(records) == 2000
    assert all(body is document["defaults"] for body in records.values())


def test_alias_budget_grows_with_the_document() -> None:
    # 40,000 aliases of a 3-node mapping (120,000 nodes) in a 1.1 MB file: one node per
    # character read allows it, where a flat 10,000 would not.
    names = "\n".join(f"  host{i}.example.test: *d" for i in range(40_000))
    document = yamlsource.load(f"d: &d {{A: 10.0.0.1}}\nrecords:\n{names}\n")
    assert len(document["records"]) == 40_000


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a: &a [1, *a]\n", 1, "YAML alias *a refers to a node that contains it"),
        ("a: *b\nb: &b 1\n", 1, "YAML alias *b is not defined before this point"),
        ("a: !!binary aGVsbG8=\n", 1, "YAML tag !!binary is not supported here"),
        ("a: !!set {x: null}\n", 1, "YAML tag !!set is not supported here"),
        ("a: !!int nope\n", 1, "'nope' is not a valid !!int value"),
        ("a: 1\n--- \nb: 2\n", 2, "a file holds one YAML document, and a second one starts here"),
        ("? [a]\n: 1\n", 1, "mapping keys must be plain values, not a mapping or a list"),
        ("k: &k [1]\n*k : 2\n", 2, "mapping keys must be plain values, not a mapping or a list"),
        ("x:\n  <<: 5\n", 2, "YAML merge key '<<' takes a mapping or a list of mappings"),
    ],
)
def test_what_the_loader_refuses_is_one_line_with_a_reason(
    text: str, line: int, reason: str
) -> None:
    with pytest.raises(yamlsource.YamlError) as caught:
        yamlsource.load(text)
    assert (caught.value.line, caught.value.reason) == (line, reason)


def test_brief_never_expands_a_structure() -> None:
    document = yamlsource.load(laughs(3))  # 9^4 = 6,561 nodes behind l3: within budget
    shown = yamlsource.brief(document["l3"])
    assert len(shown) < 100
    assert shown.startswith("[[[")
    assert "..." in yamlsource.brief("x" * 10_000)
    assert len(yamlsource.brief("x" * 10_000)) < 70
    assert yamlsource.brief({"a": 1}) == "{'a': 1}"
