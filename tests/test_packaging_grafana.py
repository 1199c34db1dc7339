"""packaging/grafana/dnsoverride.json: valid, and it only queries metrics the daemons define."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "packaging" / "grafana" / "dnsoverride.json"
METRIC = re.compile(r"\b(dnsoverride_[a-z0-9_]+)\b")
# A metric declared in the code: prometheus_client's Counter/Gauge/Histogram or the
# *MetricFamily classes custom collectors yield at scrape time.
DECLARED = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary)(?:MetricFamily)?\(\s*[\"'](dnsoverride_[a-z0-9_]+)[\"']"
)
SAMPLE_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_sum", "_count", "_created"),
    "Summary": ("", "_sum", "_count", "_created"),
}


def _declared_samples() -> set[str]:
    """Every sample name the daemons can expose, read from their source."""
    samples = set()
    for path in (ROOT / "dnsoverride").rglob("*.py"):
        for kind, name in DECLARED.findall(path.read_text()):
            base = name.removesuffix("_total") if kind == "Counter" else name
            samples.update(base + suffix for suffix in SAMPLE_SUFFIXES[kind])
    return samples


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str):
                if key in ("expr", "definition", "query"):
                    yield value
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_dashboard_is_importable_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "dnsoverride"
    assert dashboard["title"]
    assert "id" not in dashboard or dashboard["id"] is None  # importable into any Grafana
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for row in range(grid["y"], grid["y"] + grid["h"]):
            for column in range(grid["x"], grid["x"] + grid["w"]):
                assert (row, column) not in cells, (panel["title"], cells.get((row, column)))
                cells[(row, column)] = panel["title"]


def test_every_queried_metric_is_defined_by_a_daemon() -> None:
    queried = {name for query in _queries(_dashboard()) for name in METRIC.findall(query)}
    assert queried, "the dashboard queries no dnsoverride metric"
    declared = _declared_samples()
    assert queried - declared == set()


def test_the_checker_sees_the_daemons_metrics() -> None:
    """Guards the test above against a regex that silently matches nothing."""
    declared = _declared_samples()
    assert "dnsoverride_dns_queries_total" in declared
    assert "dnsoverride_dns_upstream_latency_seconds_bucket" in declared
    assert "dnsoverride_dns_queries" not in declared
