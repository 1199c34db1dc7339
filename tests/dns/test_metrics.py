"""`serve --metrics`: the counters move by exactly the traffic sent."""

from __future__ import annotations

import struct
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dns_load import flood
from tests.support.metrics import Samples, scrape
from tests.support.peers import dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e


def queries(samples: Samples, source: str, qtype: str = "A", rcode: str = "NOERROR") -> float:
    key = (
        "dnsoverride_dns_queries_total",
        (("qtype", qtype), ("rcode", rcode), ("source", source), ("view", "default")),
    )
    return samples.get(key, 0.0)


def test_query_counters_by_source(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  over.example: {A: 10.0.0.1}\n")
    metrics_port = free_port()
    with (
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", "--local-ttl=300") as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{metrics_port}"
        ) as server,
    ):
        before = scrape(metrics_port)
        for _ in range(3):
            server.query("over.example")
        for _ in range(4):
            server.query("www.fwd.test")
        after = scrape(metrics_port)
    assert queries(after, "override") - queries(before, "override") == 3
    assert queries(after, "upstream") - queries(before, "upstream") == 1
    assert queries(after, "cache") - queries(before, "cache") == 3
    upstream_name = (("upstream", upstream.address),)
    assert after[("dnsoverride_dns_upstream_latency_seconds_count", upstream_name)] >= 1
    assert after[("dnsoverride_dns_cache_entries", (("cache", "answer"),))] >= 2
    assert after[("dnsoverride_dns_cache_hits_total", (("cache", "answer"),))] >= 5


def test_query_label_sets_stay_bounded_over_every_qtype(tmp_path: Path) -> None:
    """Reproduces issue 10 item 7 (metrics): every one of the 65,536 QTYPEs, from an
    allowed client and from a refused one, created its own `queries_total` series
    (104,638 of them, 9.6 MB per scrape, +50 MB RSS). Now types dnslib names keep their
    name, the rest are `other`, and refused clients are counted without a type. Fails
    on the code before the fix."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  over.example: {A: 10.0.0.1}\n")
    metrics_port = free_port()
    config = "allow: [127.0.0.1/32]\n"
    with (
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", "--local-ttl=300") as upstream,
        dnsoverride_serve(
            tmp_path,
            zones,
            [upstream.address],
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            config=config,
        ) as server,
    ):
        name = b"\x04over\x07example\x00"
        packets = [
            struct.pack("!HHHHHH", qtype, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)
            for qtype in range(65536)
        ]
        # The allowed client's first query of each type takes the parsed path: slower.
        flood(server, packets, rate=20_000, seconds=65536 / 20_000)
        flood(server, packets, rate=40_000, seconds=65536 / 40_000, source="127.0.0.2")
        time.sleep(1)  # let the server catch up with its receive buffer
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    series = [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dnsoverride_dns_queries_total"
    ]
    answered = sum(sample.value for sample in series)
    assert answered > 20_000  # thousands of distinct types from each client arrived
    assert len(series) < 120, len(series)
    qtypes = {sample.labels["qtype"] for sample in series}
    assert {"A", "HTTPS", "other"} <= qtypes
    assert not [q for q in qtypes if q.startswith("TYPE")]
    refused = [sample for sample in series if sample.labels["rcode"] == "REFUSED"]
    assert [sample.labels["qtype"] for sample in refused] == [""]
    assert len(text) < 50_000
