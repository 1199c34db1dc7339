"""Answer building, the hand-written wire reads and the response cache, without sockets."""

from __future__ import annotations

from pathlib import Path

import dnslib
import pytest

from dnsoverride.dns import answer, relay, wire
from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.config import CacheConfig
from dnsoverride.dns.relay import Question
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.dns.zones.model import Overrides, ZoneFile


@pytest.fixture
def overrides(tmp_path: Path) -> Overrides:
    (tmp_path / "z.yaml").write_text(
        "records:\n"
        "  a.example: {A: [10.0.0.1, 10.0.0.2], ttl: 30}\n"
        "  alias.example: {CNAME: a.example}\n"
        "  out.example: {CNAME: www.upstream.test}\n"
    )
    return load_zone_set(tmp_path).select(None)


def looping() -> Overrides:
    """A CNAME loop, which the zone loader refuses: made by hand, in the loader's stored
    form ("LINE TTL QTYPE TEXT"), to show that answering one still ends (SERVFAIL)."""
    zone = ZoneFile(
        "z.yaml",
        "z.yaml",
        {"loop1.example": "1 60 5 loop2.example.", "loop2.example": "2 60 5 loop1.example."},
    )
    return Overrides(dict.fromkeys(zone.stored, zone))


def ask(overrides: Overrides, name: str, qtype: str) -> answer.LocalAnswer:
    request = dnslib.DNSRecord.question(name, qtype)
    entry = overrides.lookup(name.lower().rstrip("."))
    assert entry is not None
    return answer.local_answer(request, entry, overrides, serial=7)


def test_nodata_carries_a_soa_with_the_names_ttl(overrides: Overrides) -> None:
    local = ask(overrides, "a.example", "AAAA")
    assert local.forward is None
    assert local.reply.rr == []
    assert local.reply.header.aa == 1
    (soa,) = local.reply.auth
    assert soa.rtype == dnslib.QTYPE.SOA
    assert soa.ttl == 30
    assert soa.rdata.times[0] == 7


def test_cname_chain_local_and_upstream(overrides: Overrides) -> None:
    local = ask(overrides, "Alias.Example", "A")
    assert [(str(rr.rname), rr.rtype) for rr in local.reply.rr] == [
        ("Alias.Example.", dnslib.QTYPE.CNAME),
        ("a.example.", dnslib.QTYPE.A),
        ("a.example.", dnslib.QTYPE.A),
    ]
    out = ask(overrides, "out.example", "AAAA")
    assert out.forward == "www.upstream.test"
    assert len(out.reply.rr) == 1
    looped = ask(looping(), "loop1.example", "A")
    assert looped.reply.header.rcode == dnslib.RCODE.SERVFAIL


def test_truncation_keeps_opt_and_sets_tc(overrides: Overrides) -> None:
    reply = ask(overrides, "a.example", "A").reply
    edns = answer.ClientEdns(True, 512, False)
    packed = answer.pack(reply, edns, 1232, limit=40)
    parsed = dnslib.DNSRecord.parse(packed)
    assert parsed.header.tc == 1
    assert parsed.rr == []
    assert [rr.rtype for rr in parsed.ar] == [41]


def test_fast_key_is_case_insensitive_and_strict() -> None:
    upper = dnslib.DNSRecord.question("A.Example", "A").pack()
    lower = dnslib.DNSRecord.question("a.example", "A").pack()
    key_upper = wire.fast_key(upper, 1232)
    key_lower = wire.fast_key(lower, 1232)
    assert key_upper is not None
    assert key_upper == key_lower
    assert wire.key_question_end(key_upper) == len(upper)
    edns = dnslib.DNSRecord.question("a.example", "A")
    edns.add_ar(dnslib.EDNS0(udp_len=4096, flags="do"))
    key_edns = wire.fast_key(edns.pack(), 1232)
    assert key_edns is not None
    assert key_edns != key_lower
    assert key_edns[1:4] == bytes((0x81, 1232 >> 8, 1232 & 0xFF))
    assert wire.key_question_end(key_edns) == len(lower)
    # Trailing garbage may make a key, but no reply is ever stored under it.
    garbage = wire.fast_key(upper + b"x", 1232)
    assert garbage is not None
    cache = AnswerCache(10, views=1, udp_size=1232)
    reply = dnslib.DNSRecord.parse(upper).reply().pack()
    cache.store(0, garbage, reply, generation=1, now=0, ttl=9, counter=[0], age_ttls=False)
    assert len(cache) == 0
    assert wire.fast_key(upper[:-1], 1232) is None
    response = bytearray(upper)
    response[2] |= 0x80
    assert wire.fast_key(bytes(response), 1232) is None


def test_ttls_age_in_cached_bytes() -> None:
    reply = dnslib.DNSRecord.question("a.example", "A").reply()
    reply.add_answer(dnslib.RR("a.example", rdata=dnslib.A("10.0.0.1"), ttl=100))
    reply.add_ar(dnslib.EDNS0(udp_len=1232))
    packed = reply.pack()
    offsets = wire.ttl_offsets(packed)
    assert [ttl for _, ttl in offsets] == [100]
    aged = dnslib.DNSRecord.parse(wire.aged(packed, offsets, 42))
    assert aged.rr[0].ttl == 58
    assert aged.ar[0].rtype == 41


def test_answer_cache_splices_id_and_case_and_honours_generation() -> None:
    cache = AnswerCache(2, views=1, udp_size=1232)
    query = dnslib.DNSRecord.question("a.example", "A")
    packed = query.reply().pack()
    key = wire.fast_key(query.pack(), 1232)
    assert key is not None
    counter = [0]
    cache.store(0, key, packed, generation=1, now=0.0, ttl=10, counter=counter, age_ttls=False)
    other = dnslib.DNSRecord.question("A.EXAMPLE", "A")
    other.header.id = 4242
    hit = cache.lookup(0, key, other.pack(), 1, now=1.0)
    assert hit is not None
    parsed = dnslib.DNSRecord.parse(hit)
    assert parsed.header.id == 4242
    assert str(parsed.q.qname) == "A.EXAMPLE."
    assert counter == [1]
    assert cache.lookup(0, key, other.pack(), 2, now=1.0) is None  # zones swapped
    assert cache.lookup(0, key, other.pack(), 1, now=10.0) is None  # expired
    for name in ("b.example", "c.example"):  # bounded: the oldest goes
        extra = dnslib.DNSRecord.question(name, "A")
        extra_key = wire.fast_key(extra.pack(), 1232)
        assert extra_key is not None
        cache.store(
            0,
            extra_key,
            extra.reply().pack(),
            generation=1,
            now=0.0,
            ttl=10,
            counter=counter,
            age_ttls=False,
        )
    assert len(cache) == 2
    assert cache.lookup(0, key, other.pack(), 1, now=1.0) is None


def upstream_reply(rcode: int, ttl: int, soa_minimum: int | None = None) -> relay.Reply:
    reply = dnslib.DNSRecord.question("x.test", "A").reply()
    reply.header.rcode = rcode
    if rcode == dnslib.RCODE.NOERROR and soa_minimum is None:
        reply.add_answer(dnslib.RR("x.test", rdata=dnslib.A("192.0.2.1"), ttl=ttl))
    if soa_minimum is not None:
        soa = dnslib.SOA("ns.test", "h.test", (1, 2, 3, 4, soa_minimum))
        reply.add_auth(dnslib.RR("test", dnslib.QTYPE.SOA, rdata=soa, ttl=ttl))
    return relay.scan(reply.pack())


def test_response_cache_clamps_negative_caching_and_stale() -> None:
    cache = ResponseCache(
        CacheConfig(size=2, min_ttl=5, max_ttl=100, negative_max_ttl=50, stale_ttl=60)
    )
    key = Question(b"\x01x\x04test\x00", 1, 1, False, False)
    assert cache.put(key, upstream_reply(dnslib.RCODE.NOERROR, 1000), now=0) == 100
    assert cache.put(key, upstream_reply(dnslib.RCODE.NOERROR, 1), now=0) == 5
    assert cache.put(key, upstream_reply(dnslib.RCODE.NXDOMAIN, 3600, soa_minimum=20), now=0) == 20
    assert cache.put(key, upstream_reply(dnslib.RCODE.NXDOMAIN, 3600, soa_minimum=900), now=0) == 50
    assert cache.put(key, upstream_reply(dnslib.RCODE.NXDOMAIN, 3600), now=0) == 0  # no SOA
    assert cache.put(key, upstream_reply(dnslib.RCODE.SERVFAIL, 3600), now=0) == 0
    cache.put(key, upstream_reply(dnslib.RCODE.NOERROR, 10), now=0)
    fresh = cache.get(key, now=4)
    assert fresh is not None
    assert fresh[0].records().rr[0].ttl == 6
    assert cache.get(key, now=11) is None
    stale = cache.get_stale(key, now=11)
    assert stale is not None
    assert stale.records().rr[0].ttl == 30  # RFC 8767: above 0, recommended 30 s
    assert cache.get_stale(key, now=71) is None
    for index in range(3):  # LRU bound of 2
        name = f"\x02n{index}\x04test\x00".encode()
        cache.put(Question(name, 1, 1, False, False), upstream_reply(0, 10), now=0)
    assert len(cache) == 2
