"""The idle footprint of `serve` (issue 13): no HTTP framework and no rich unless a
configuration needs one, with the admin listener and metrics configured.

Measured on the landed main before issue 13: 51.7 MB idle, aiohttp (admin listener,
health checks, the forwarder's TCP helper) and rich (imported by structlog) among its
modules; this test fails there. The RSS budget is generous (40 MB; 35.6 MB measured) so
that it trips on an import creeping back (aiohttp is 12 MB), not on noise.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from tests.support.peers import dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

RSS_BUDGET_KIB = 40 * 1024


def test_serve_with_metrics_loads_no_http_framework(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    port = free_port("127.0.0.1")
    with dnsmasq(tmp_path) as upstream:
        # A TCP health check (dnsmasq's TCP port: up) needs no HTTP client either.
        (zones / "z.yaml").write_text(
            f"records:\n  over.example:\n    A: 127.0.0.1\n    health: {{tcp: {upstream.port}}}\n"
        )
        with dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{port}"
        ) as server:
            assert server.query("over.example").answer  # serving
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert b"dnsoverride_dns_queries_total" in reply.read()
            pid = server.process.pid
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "/aiohttp/" not in maps  # its C extensions load with it
            status = Path(f"/proc/{pid}/status").read_text()
            rss = int(status.split("VmRSS:")[1].split()[0])
            assert rss < RSS_BUDGET_KIB, f"serve idles at {rss} KiB"
