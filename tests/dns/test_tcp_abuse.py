"""TCP clients that send queries but never read the answers.

Reproduces issue 10 item 3: such a client was never closed (`writer.drain()` waited
outside any timeout); each held ~3 MB of kernel send queue and 2.5-4 MB of RSS, 512 of
them took the server to 1.32 GB, stalled UDP and got real TCP clients 0 of 5 answers,
and RSS stayed at 489 MB after they left (unbound closed them within 30 s). Now a
connection whose answers cannot be written within `tcp.idle_timeout` is closed, the
bytes queued for one are bounded by `tcp.max_queued`, and RSS comes back down. Fails
on the code before the fix.
"""

from __future__ import annotations

import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.support.dns_load import Probes, non_readers, press, rss_kib
from tests.support.peers import dnsmasq, dnsoverride_serve

pytestmark = pytest.mark.e2e

CLIENTS = 300
IDLE_TIMEOUT = 2.0
STRINGS = 16  # TXT strings of 250 octets: a ~4 KB answer per query


@pytest.mark.timeout(120)
def test_clients_that_never_read_are_closed_and_memory_comes_back(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    strings = ", ".join(f'"{index:03d}' + "x" * 247 + '"' for index in range(STRINGS))
    (zones / "z.yaml").write_text(
        f"records:\n  big.test: {{TXT: [{strings}]}}\n  small.test: {{A: 10.0.0.1}}\n"
    )
    config = f"tcp: {{idle_timeout: {IDLE_TIMEOUT}, max_connections: 512}}\n"
    with (
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", "--local-ttl=300") as upstream,
        dnsoverride_serve(tmp_path, zones, [upstream.address], config=config) as server,
    ):
        pid = server.process.pid
        for _ in range(3):
            dns.query.tcp(dns.message.make_query("big.test", "TXT"), server.host, 3, server.port)
        baseline = rss_kib(pid)
        abusers = non_readers(server.host, server.port, CLIENTS)
        peak = baseline
        answered = []
        with Probes(server, ["small.test"], interval=0.05) as probes:
            closed = press(abusers, seconds=IDLE_TIMEOUT + 20)
            peak = max(peak, rss_kib(pid))
            for _ in range(5):  # real TCP clients meanwhile
                query = dns.message.make_query("small.test", "A")
                reply = dns.query.tcp(query, server.host, 3, server.port)
                answered.append(reply.rcode() == dns.rcode.NOERROR and bool(reply.answer))
        for sock in abusers:
            sock.close()
        settled = time.monotonic() + 5
        while (after := rss_kib(pid)) - baseline >= 15_000 and time.monotonic() < settled:
            time.sleep(0.1)
    assert len(closed) == CLIENTS, f"{CLIENTS - len(closed)} never closed"
    # Closed once nothing moved for idle_timeout; filling the queues takes a moment first.
    assert max(closed.values()) <= IDLE_TIMEOUT + 6, sorted(closed.values())[-5:]
    assert all(answered)
    assert probes.success_within(0.1) >= 0.95, probes.summary()
    assert peak - baseline < 150_000, (baseline, peak)  # KiB: bounded while they press
    assert after - baseline < 15_000, (baseline, peak, after)  # and back down after
