"""The fast path's memos (issue 13): `wire.QueryKeys` (a query's key and COOKIE option by
its bytes after the ID) and `Cookies`' verdicts per client and cookie.

A memo must never answer one query with another's key: QTYPEs differing in bit 0x20
(issue 10's HTTPS/TYPE97 collision), classes, letter case, DO, the UDP size, the EDNS
options. A remembered cookie verdict must end when the cookie's validity ends, and a
forged or another client's cookie is never valid however often it is sent. Both memos
are bounded. Checked to fail against a memo keyed by lowercased bytes (the QTYPE tests)
and against verdicts that never expire (the validity tests).
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import pytest

from dnsoverride.dns import wire
from dnsoverride.dns.constants import COOKIE
from dnsoverride.dns.cookies import Cookies
from dnsoverride.dns.resolver import Resolver
from tests.support.peers import dnsmasq, dnsoverride_serve
from tests.support.resolvers import in_process_resolver

COOKIE_OPTION = dns.edns.OptionType.COOKIE
NAME = b"\x03www\x07Example\x04test\x00"


def _query(
    qtype: int = 1,
    qclass: int = 1,
    *,
    name: bytes = NAME,
    query_id: int = 0x1234,
    edns: bool = False,
    do: bool = False,
    udp: int = 1232,
    options: bytes = b"",
) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = b""
    if edns:
        opt = struct.pack("!BHHBBBBH", 0, 41, udp, 0, 0, 0x80 if do else 0, 0, len(options))
    return header + name + struct.pack("!HH", qtype, qclass) + opt + options


def _cookie_option(data: bytes) -> bytes:
    return struct.pack("!HH", COOKIE, len(data)) + data


def _direct(data: bytes) -> wire.QueryKey | None:
    """What `QueryKeys` must return, computed without a memo."""
    key = wire.fast_key(data, 1232)
    if key is None:
        return None
    start = wire.options_start(key)
    cookie = wire.find_option(data, start, COOKIE) if len(data) > start else None
    limit = wire.key_udp_size(key) if key[wire.KEY_EDNS] else 512
    return wire.QueryKey(key, wire.tcp_key(key), cookie, limit)


def _variants() -> list[bytes]:
    names = [NAME, NAME.replace(b"Example", b"EXAMPLE"), NAME.replace(b"Example", b"example")]
    option_sets = [
        b"",
        _cookie_option(b"client01"),
        _cookie_option(b"client02"),
        _cookie_option(b"client01" + b"\x01\x00\x00\x00" + bytes(12)),
        struct.pack("!HH", 8, 4) + b"\x00\x01\x18\x00",  # ECS, no cookie
    ]
    queries = []
    for name, qtype, qclass in itertools.product(names, (65, 97, 67, 99, 1), (1, 3, 0x21)):
        queries.append(_query(qtype, qclass, name=name))
        for do, udp, options in itertools.product((False, True), (512, 1232, 4096), option_sets):
            queries.append(
                _query(qtype, qclass, name=name, edns=True, do=do, udp=udp, options=options)
            )
    return queries


def test_memo_gives_every_query_exactly_its_own_key() -> None:
    """Warmed with queries that differ only in QTYPE bit 0x20, class, case, DO, UDP size
    or EDNS options, the memo still answers each with the key computed from its own
    bytes, whatever its ID; twins (a key and its memo) agree across two rounds."""
    variants = _variants()
    keys = wire.QueryKeys(1232, size=len(variants) * 2)
    for round_ in range(2):
        for query_id, variant in enumerate(variants):
            data = struct.pack("!H", query_id ^ round_) + variant[2:]
            assert keys(data) == _direct(data), data
    assert len(keys) == len(variants)  # one entry per distinct query, IDs ignored
    https = keys(_query(65))
    type97 = keys(_query(97))
    assert https is not None and type97 is not None
    assert wire.key_qtype(https.udp) == 65 and wire.key_qtype(type97.udp) == 97
    cookied = keys(_query(edns=True, options=_cookie_option(b"client01")))
    assert cookied is not None and cookied.cookie == b"client01"
    other = keys(_query(edns=True, options=_cookie_option(b"client02")))
    assert other is not None and other.cookie == b"client02" and other.udp == cookied.udp


def test_memo_is_bounded_and_keeps_answering_right() -> None:
    keys = wire.QueryKeys(1232, size=100)
    for index in range(1000):
        name = b"\x04n%03d\x04test\x00" % (index % 1000)
        data = _query(name=name, edns=True, options=_cookie_option(b"%08d" % index))
        assert keys(data) == _direct(data)
        assert len(keys) <= 100
    assert keys(b"\x00" * 12) is None and len(keys) <= 100  # not memoised: no key


def test_cookie_verdict_ends_with_the_cookies_validity() -> None:
    """Wall clock and monotonic clock move together, as they do; a valid server cookie
    stays valid (and echoed) until 1800 s after its timestamp, then a new one is made,
    however many times it was remembered as valid before."""
    wall = [1_000_000.0]
    cookies = Cookies(secret=b"k" * 16, clock=lambda: wall[0])
    host = "192.0.2.7"
    issued = cookies.reply_option(b"client01", host, now=0.0)
    assert len(issued) == 24 and issued[:8] == b"client01"
    for elapsed in (0.0, 1.0, 900.0, 1797.0, 1798.0):
        wall[0] = 1_000_000.0 + elapsed
        assert cookies.valid(issued, host, now=elapsed), elapsed
        assert cookies.reply_option(issued, host, now=elapsed) == issued
    wall[0] = 1_000_000.0 + 1800.0
    assert not cookies.valid(issued, host, now=1800.0)
    fresh = cookies.reply_option(issued, host, now=1800.0)
    assert fresh[:8] == b"client01" and fresh != issued
    assert cookies.valid(fresh, host, now=1800.0)


def test_a_wall_clock_step_does_not_stretch_a_verdict() -> None:
    """The memo runs on the monotonic clock: a valid verdict is not kept past 1800 s of
    monotonic time even if the wall clock was stepped back meanwhile (then the cookie's
    age is computed afresh from the wall clock, as without a memo)."""
    wall = [1_000_000.0]
    cookies = Cookies(secret=b"k" * 16, clock=lambda: wall[0])
    issued = cookies.reply_option(b"client01", "192.0.2.7", now=0.0)
    assert cookies.valid(issued, "192.0.2.7", now=10.0)
    wall[0] = 1_000_000.0 + 1900.0  # the wall clock moved on 1900 s, monotonic 1900 s too
    assert not cookies.valid(issued, "192.0.2.7", now=1900.0)


def test_forged_and_borrowed_cookies_are_never_valid_however_often_sent() -> None:
    cookies = Cookies(secret=b"k" * 16, clock=lambda: 1_000_000.0)
    issued = cookies.reply_option(b"client01", "192.0.2.7", now=0.0)
    forged = issued[:16] + bytes(x ^ 0xFF for x in issued[16:])
    for now in range(5):
        assert not cookies.valid(forged, "192.0.2.7", now=float(now))
        assert not cookies.valid(issued, "192.0.2.8", now=float(now))  # another address
        replaced = cookies.reply_option(forged, "192.0.2.7", now=float(now))
        assert replaced[:8] == b"client01" and replaced != forged
        assert cookies.valid(replaced, "192.0.2.7", now=float(now))
    # Another secret (another server, a restart) never validates it either.
    assert not Cookies(secret=b"x" * 16, clock=lambda: 1_000_000.0).valid(
        issued, "192.0.2.7", now=0.0
    )


def test_cookie_memo_is_bounded() -> None:
    cookies = Cookies(secret=b"k" * 16, clock=lambda: 1_000_000.0, memo_size=50)
    for index in range(500):
        cookies.reply_option(b"%08d" % index, f"192.0.2.{index % 200}", now=0.0)
        assert len(cookies._memo) <= 50


@pytest.mark.e2e
def test_edns_and_cookie_hits_keep_qtypes_apart_over_real_sockets(tmp_path: Path) -> None:
    """Issue 10's collision (TYPE97's answer served for HTTPS) stays fixed with the memo
    in front of the key, for EDNS queries and cookie queries too, UDP and TCP, each
    asked several times (memo hits) with the two types interleaved."""
    zones = tmp_path / "zones"
    zones.mkdir()
    records = {65: "000100", 97: "c0ffee"}
    options = [f"--dns-rr=www.example.test,{rtype},{data}" for rtype, data in records.items()]
    with (
        dnsmasq(tmp_path, *options, "--local-ttl=300") as upstream,
        dnsoverride_serve(tmp_path, zones, [upstream.address]) as server,
    ):
        for _ in range(3):
            for cookie in (None, b"client01"):
                for rtype in (97, 65):
                    edns_options: list[dns.edns.Option] = []
                    if cookie is not None:
                        edns_options.append(dns.edns.GenericOption(COOKIE_OPTION, cookie))
                    query = dns.message.make_query(
                        "WWW.example.test",
                        dns.rdatatype.RdataType.make(rtype),
                        use_edns=0,
                        options=edns_options,
                    )
                    for reply in (
                        dns.query.udp(query, server.host, 3, server.port),
                        dns.query.tcp(query, server.host, 3, server.port),
                    ):
                        (rrset,) = reply.answer
                        assert rrset.rdtype == rtype
                        returned = [o for o in reply.options if o.otype == 10]
                        assert len(returned) == (cookie is not None)
                        if cookie is not None:
                            assert returned[0].to_wire()[:8] == cookie


async def _resolver(tmp_path: Path) -> Resolver:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  www.example.test: {A: 10.0.0.1}\n")
    return in_process_resolver(zones)


def _returned_cookie(reply: bytes) -> bytes:
    message = dns.message.from_wire(reply)
    (option,) = [o for o in message.options if o.otype == COOKIE]
    return bytes(option.to_wire())


async def test_cookie_queries_are_fast_path_hits_with_their_own_cookie(tmp_path: Path) -> None:
    """After one answer is cached, EDNS and cookie queries (client cookie alone, then
    client and server cookie, from two clients) are answered by `fast` (no slow path),
    each with its own ID and its own cookie; a forged server cookie is replaced, and
    another client's cookie is not echoed."""
    resolver = await _resolver(tmp_path)
    host, other = "127.0.0.1", "127.0.0.2"
    first = _query(edns=True, options=_cookie_option(b"client01"))
    assert await resolver.resolve(first, host, tcp=False)  # the slow path caches it
    for query_id in range(3):
        plain_edns = _query(edns=True, query_id=query_id)
        reply = resolver.fast(plain_edns, host)
        assert reply is not None and reply[:2] == plain_edns[:2]
        assert not [o for o in dns.message.from_wire(reply).options if o.otype == COOKIE]
    issued = _returned_cookie(resolver.fast(first, host) or b"")
    assert issued[:8] == b"client01" and len(issued) == 24
    full = _query(edns=True, options=_cookie_option(issued), query_id=7)
    for _ in range(3):
        reply = resolver.fast(full, host)
        assert reply is not None and reply[:2] == full[:2]
        assert _returned_cookie(reply) == issued  # valid: echoed unchanged
        assert resolver.cookies.valid(issued, host, resolver._loop.time())
    moved = resolver.fast(full, other)  # the same cookie from another address
    assert moved is not None and _returned_cookie(moved) != issued
    forged = issued[:16] + bytes(8)
    replaced = resolver.fast(_query(edns=True, options=_cookie_option(forged)), host)
    assert replaced is not None
    assert _returned_cookie(replaced)[:8] == b"client01"
    assert _returned_cookie(replaced) != forged
