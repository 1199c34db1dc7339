"""`serve --metrics`: the counters move by exactly the traffic sent."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.peers import dnsmasq, dnsoverride_serve, free_port


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def queries(samples: dict, source: str, qtype: str = "A", rcode: str = "NOERROR") -> float:
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
