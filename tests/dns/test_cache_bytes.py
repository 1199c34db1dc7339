"""The caches are bounded in bytes, not only in entries.

Any CI job can ask for names of a domain whose servers it runs, answered with ~59 KB of
TXT each. Bounded at `cache.size` entries only (10,000 by default), the response cache
and the answer cache kept every such answer once each (the answer cache once per
variant of the question: TCP, RD, DO, CD, buffer size): ~170 MB per 1,000 names, ~1.7 GB
at the default size (measured: 46 -> 555 MB RSS after 3,000 names over TCP; unbound
bounds its message cache at 4 MB by default). Here the upstream is a real loopback
socket answering such TXT records, and the server runs with `cache.max_bytes` of 1 MiB.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from tests.support.metrics import scrape
from tests.support.peers import DnsPeer, dnsoverride_serve, lying_upstream
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

STRINGS = " ".join(['"' + "x" * 255 + '"'] * 230)  # 230 strings: 59,110 bytes of TXT data
NAMES = 60
MAX_BYTES = 1 << 20  # `max_bytes: 1M` in the config below
BIG = dns.name.from_text("big.test")


def _big_txt(data: bytes, tcp: bool) -> bytes:
    """TXT questions under `big.test`: a 59 KB record over TCP, TC over UDP."""
    query = dns.message.from_wire(data)
    reply = dns.message.make_response(query)
    question = query.question[0]
    if question.rdtype == dns.rdatatype.TXT and question.name.is_subdomain(BIG):
        if tcp:
            reply.answer.append(dns.rrset.from_text(question.name, 3600, "IN", "TXT", STRINGS))
        else:
            reply.flags |= dns.flags.TC
    return reply.to_wire(max_size=65535)


def _cache_entries(metrics_port: int) -> dict[str, float]:
    samples = scrape(metrics_port)
    return {
        cache: samples[("dnsoverride_dns_cache_entries", (("cache", cache),))]
        for cache in ("answer", "response")
    }


def _ask_over_tcp(server: DnsPeer, name: str) -> int:
    reply = server.query(name, "TXT", tcp=True)
    return sum(len(string) for rrset in reply.answer for rdata in rrset for string in rdata.strings)


def test_big_answers_are_cached_within_max_bytes(tmp_path: Path) -> None:
    """60 names with 59 KB answers, `cache.max_bytes` 1 MiB: each cache keeps at most
    1 MiB of them, the most recent; every answer is still complete. Fails on the code
    before the fix (no such key; with `cache.size` alone all 60 stay in both caches)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    metrics_port = free_port()
    with (
        lying_upstream(_big_txt) as upstream,
        dnsoverride_serve(
            tmp_path,
            zones,
            [upstream.address],
            "--metrics",
            f"127.0.0.1:{metrics_port}",
            config="cache: {max_bytes: 1M}\n",
        ) as server,
    ):
        for index in range(NAMES):
            assert _ask_over_tcp(server, f"n{index}.big.test") == 230 * 255
        entries = _cache_entries(metrics_port)
        assert 0 < entries["answer"] <= MAX_BYTES // 59_000
        assert 0 < entries["response"] <= MAX_BYTES // 59_000
        # The most recent answer is still cached, complete.
        assert _ask_over_tcp(server, f"n{NAMES - 1}.big.test") == 230 * 255
