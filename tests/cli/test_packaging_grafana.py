"""packaging/grafana/dnsoverride.json: valid, and it only queries metrics the daemons expose."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.ports import free_port, silent_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "dnsoverride.json"
METRIC = re.compile(r"\b(dnsoverride_[a-z0-9_]+)\b")


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


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name the two daemons expose on /metrics, scraped from real processes.

    Families without samples yet (no traffic) still announce their TYPE, from which the
    sample names follow (a counter `x` is sampled as `x_total`, a histogram as `x_bucket`...).
    """
    base = tmp_path_factory.mktemp("daemons")
    zones = base / "zones"
    zones.mkdir()
    # A health-gated override, so the health-check families exist too (probing a closed
    # loopback port).
    (zones / "ci.yaml").write_text(
        "records:\n  registry-1.docker.io:\n    A: 127.0.0.1\n"
        f"    health: {{tcp: {free_port()}, interval: 1s, timeout: 1s}}\n"
    )
    dns_metrics, registry_metrics = free_port(), free_port()
    # Nothing is forwarded anywhere real: a port held (never read) for the daemons' life.
    held = contextlib.ExitStack()
    dead = held.enter_context(silent_port())
    commands = [
        [
            sys.executable, "-m", "dnsoverride", "serve", "--zones", str(zones),
            "--listen", f"127.0.0.1:{free_port()}", "--upstream", dead,
            "--metrics", f"127.0.0.1:{dns_metrics}",
        ],
        [
            sys.executable, "-m", "dnsoverride", "registry", "--storage", str(base / "store"),
            "--listen", f"127.0.0.1:{free_port()}", "--upstream", f"http://{dead}",
            "--max-size", "1G", "--metrics", f"127.0.0.1:{registry_metrics}",
        ],
    ]  # fmt: skip
    processes = [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for command in commands
    ]
    try:
        dns_text = _scrape(dns_metrics, processes[0])
        # The reload gauges appear with the first reload after start; ask for one.
        processes[0].send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "dnsoverride_zone_reload_last_success_timestamp_seconds" not in dns_text:
            assert time.monotonic() < deadline, "no successful reload after SIGHUP"
            time.sleep(0.1)
            dns_text = _scrape(dns_metrics, processes[0])
        texts = [dns_text, _scrape(registry_metrics, processes[1])]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        held.close()
    names: set[str] = set()
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def _scrape(port: int, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                return str(answer.read().decode())
        except OSError:
            assert process.poll() is None, f"{process.args!r} exited with {process.returncode}"
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.timeout(90)
@pytest.mark.e2e
def test_every_queried_metric_is_exposed_by_a_daemon(exposed: set[str]) -> None:
    queried = {name for query in _queries(_dashboard()) for name in METRIC.findall(query)}
    assert queried - exposed == set()


@pytest.mark.timeout(90)
@pytest.mark.e2e
def test_the_dashboard_covers_both_daemons(exposed: set[str]) -> None:
    """Guards the check above against a scrape that silently returns nothing, and keeps
    the dashboard from forgetting a whole daemon."""
    queried = {name for query in _queries(_dashboard()) for name in METRIC.findall(query)}
    for prefix in (
        "dnsoverride_dns_",
        "dnsoverride_zone_",
        "dnsoverride_health_",
        "dnsoverride_registry_",
    ):
        assert any(name.startswith(prefix) for name in exposed), prefix
        assert any(name.startswith(prefix) for name in queried), prefix
