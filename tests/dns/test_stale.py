"""Serve-stale (RFC 8767) without holding on to it: stale answers go out at once, with
30 s TTLs (never 0), while every upstream is down, and a recovered upstream's answer
replaces them within seconds (the answer cache reuses a stale reply for `cache.stale_reuse`).

How answers age is tested in-process on an injected clock (the resolver's `clock`): TTLs
counting down, expiry, the stale window and the stale reuse, to the second and without
waiting. One end-to-end test runs the real daemon on its real clock."""

from __future__ import annotations

import time
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsoverride.dns.cache import STALE_TTL
from dnsoverride.dns.config import CacheConfig, ProbeConfig, ServeFlags, load_config
from dnsoverride.dns.forwarder import Forwarder
from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import load_zone_set
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, lying_upstream

NAME = "www.fwd.test"


def _answer(server: DnsPeer) -> tuple[list[str], int]:
    reply = server.query(NAME, timeout=3)
    assert reply.rcode() == dns.rcode.NOERROR
    (rrset,) = reply.answer
    return [str(rdata) for rdata in rrset], rrset.ttl


class _Upstream:
    """Answers `NAME A 192.0.2.1` with TTL 60 while `up`, SERVFAIL after; counts questions."""

    def __init__(self) -> None:
        self.up = True
        self.asked = 0

    def __call__(self, query: bytes, tcp: bool) -> bytes:
        message = dns.message.from_wire(query)
        reply = dns.message.make_response(message)
        self.asked += 1
        if self.up:
            reply.answer.append(
                dns.rrset.from_text(message.question[0].name, 60, "IN", "A", "192.0.2.1")
            )
        else:
            reply.set_rcode(dns.rcode.SERVFAIL)
        return reply.to_wire()


async def test_answers_age_expire_and_go_stale_on_the_injected_clock(tmp_path: Path) -> None:
    """The resolver on a clock the test turns: a cached answer's TTL counts down with it,
    expires at its TTL, is then served stale (TTL 30) while the upstream fails, reused
    from the answer cache for `cache.stale_reuse` only, and never past `cache.stale_ttl`."""
    now = [1000.0]
    upstream = _Upstream()
    with lying_upstream(upstream) as peer:
        config = load_config(None, ServeFlags(upstream=(peer.address,)))
        zone_set = load_zone_set(tmp_path)
        stats = DnsStats()
        forwarder = Forwarder.for_config(config, stats)
        resolver = Resolver(config, LiveZones(zone_set), forwarder, stats, clock=lambda: now[0])
        resolver.route(Routing(config, zone_set))

        async def ask() -> tuple[int, list[str], int]:
            query = dns.message.make_query(NAME, "A", use_edns=0)
            data = await resolver.resolve(query.to_wire(), "127.0.0.1", False)
            assert data is not None
            reply = dns.message.from_wire(data)
            records = [str(rdata) for rrset in reply.answer for rdata in rrset]
            return reply.rcode(), records, min((r.ttl for r in reply.answer), default=-1)

        assert await ask() == (dns.rcode.NOERROR, ["192.0.2.1"], 60)
        now[0] += 42
        assert await ask() == (dns.rcode.NOERROR, ["192.0.2.1"], 18)  # aged, from the cache
        assert upstream.asked == 1
        upstream.up = False
        now[0] += 18  # the 60 s are over: asked again, failing, so stale
        assert await ask() == (dns.rcode.NOERROR, ["192.0.2.1"], STALE_TTL)
        asked = upstream.asked
        assert asked > 1
        now[0] += 1  # within `stale_reuse`: the stale reply is reused (aged), not asked again
        assert config.cache.stale_reuse > 1
        assert await ask() == (dns.rcode.NOERROR, ["192.0.2.1"], STALE_TTL - 1)
        assert upstream.asked == asked
        now[0] += config.cache.stale_reuse  # reuse over: the upstream is asked again
        assert await ask() == (dns.rcode.NOERROR, ["192.0.2.1"], STALE_TTL)
        assert upstream.asked > asked
        now[0] = 1000 + 60 + config.cache.stale_ttl  # past the stale window: nothing to serve
        assert await ask() == (dns.rcode.SERVFAIL, [], -1)


@pytest.mark.e2e
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
