"""Serve-stale (RFC 8767) without holding on to it: stale answers go out at once, with
30 s TTLs (never 0), while every upstream is down, and a recovered upstream's answer
replaces them within seconds (the answer cache reuses a stale reply for `cache.stale_reuse`)."""

from __future__ import annotations

import time
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from dnsoverride.dns.cache import STALE_TTL
from dnsoverride.dns.config import CacheConfig, ProbeConfig
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve

NAME = "www.fwd.test"


def _answer(server: DnsPeer) -> tuple[list[str], int]:
    reply = server.query(NAME, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    return [str(rdata) for rdata in rrset], rrset.ttl


@pytest.mark.timeout(60)
def test_stale_while_down_then_fresh_soon_after_recovery(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", "--local-ttl=1") as upstream:
        port = upstream.port
        with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
            assert _answer(server) == (["192.0.2.1"], 1)
            upstream.stop()
            time.sleep(1.1)  # the 1 s TTL runs out: from now on only stale can answer
            for _ in range(5):
                started = time.monotonic()
                addresses, ttl = _answer(server)
                assert addresses == ["192.0.2.1"]  # stale: the upstream is gone
                assert STALE_TTL - 3 <= ttl <= STALE_TTL
                assert time.monotonic() - started < 1.0
                time.sleep(0.3)
            with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.2", "--local-ttl=1", port=port):
                recovered = time.monotonic()
                while _answer(server)[0] != ["192.0.2.2"]:
                    assert time.monotonic() - recovered < STALE_TTL / 2, "still stale"
                    time.sleep(0.1)
                took = time.monotonic() - recovered
    # Within the stale reuse time plus a probe round and a little slack; not 30 s.
    assert took <= CacheConfig().stale_reuse + ProbeConfig().interval + 2.0, (
        f"fresh after {took:.1f} s"
    )
