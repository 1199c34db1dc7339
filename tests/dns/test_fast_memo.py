"""The fast path's memos (issue 13): `wire.QueryKeys` (a query's key and COOKIE option by
its bytes after the ID) and `Cookies`' verdicts per client and cookie.

A memo must never answer one query with another's key: QTYPEs differing in bit 0x20
(issue 10's HTTPS/TYPE97 collision), classes, letter case, DO, the UDP size, the EDNS
options. A remembered cookie verdict must end when the cookie's validity ends, and a
forged or another client's cookie is never valid however often it is sent. Both memos
are bounded. Checked to fail against a memo keyed by lowercased bytes (the QTYPE tests)
and against verdicts that never expire (the validity tests). The fast path reads the
verdict memo inline and the answer cache remembers each entry's last cookie tail: the
tests of those fail with the inline host or expiry check taken out, with the remembered
tail kept across TTL ageing, with the size check on it left out, and with the memo never
cleared (each checked so).
"""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import dnslib
import pytest

from dnsoverride.dns import wire
from dnsoverride.dns.cache import COOKIE_TAIL_REPLY, AnswerCache
from dnsoverride.dns.constants import COOKIE
from dnsoverride.dns.cookies import MEMO_SIZE, Cookies
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
    return wire.QueryKey(key, wire.tcp_key(key), cookie)


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
    """Wall clock and monotonic clock move together, as they do; a valid server cookie is
    echoed until 1800 s after its timestamp, then replaced by a fresh one while it stays
    valid (RFC 9018 4.3: the client may not have switched yet) until 3600 s, then it is
    not valid, however many times it was remembered as valid before. Fails on the code
    before this (a cookie 1800-3600 s old was not valid: its client lost the rate-limit
    exemption a proven address has)."""
    wall = [1_000_000.0]
    cookies = Cookies(secret=b"k" * 16, clock=lambda: wall[0])
    host = "192.0.2.7"
    issued = cookies.reply_option(b"client01", host, now=0.0)
    assert len(issued) == 24 and issued[:8] == b"client01"
    for elapsed in (0.0, 1.0, 900.0, 1797.0, 1798.0):
        wall[0] = 1_000_000.0 + elapsed
        assert cookies.valid(issued, host, now=elapsed), elapsed
        assert cookies.reply_option(issued, host, now=elapsed) == issued
    for elapsed in (1800.0, 1801.0, 3000.0, 3598.0):
        wall[0] = 1_000_000.0 + elapsed
        assert cookies.valid(issued, host, now=elapsed), elapsed
        fresh = cookies.reply_option(issued, host, now=elapsed)
        assert fresh[:8] == b"client01" and fresh != issued, elapsed
        assert cookies.valid(fresh, host, now=elapsed)
    for elapsed in (3600.0, 3601.0, 5000.0):
        wall[0] = 1_000_000.0 + elapsed
        assert not cookies.valid(issued, host, now=elapsed), elapsed
        fresh = cookies.reply_option(issued, host, now=elapsed)
        assert fresh[:8] == b"client01" and fresh != issued
        assert cookies.valid(fresh, host, now=elapsed)


def test_a_wall_clock_step_does_not_stretch_a_verdict() -> None:
    """The memo runs on the monotonic clock: a valid verdict is not kept past the
    cookie's validity (3600 s) of monotonic time (then the cookie's age is computed
    afresh from the wall clock, as without a memo)."""
    wall = [1_000_000.0]
    cookies = Cookies(secret=b"k" * 16, clock=lambda: wall[0])
    issued = cookies.reply_option(b"client01", "192.0.2.7", now=0.0)
    assert cookies.valid(issued, "192.0.2.7", now=10.0)
    wall[0] = 1_000_000.0 + 3700.0  # the wall clock moved on 3700 s, monotonic 3700 s too
    assert not cookies.valid(issued, "192.0.2.7", now=3700.0)


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
        assert len(cookies) <= 50


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
    message = dns.message.from_wire(bytes(reply))  # a REFUSED reply is a bytearray
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


async def test_the_fast_path_never_gives_one_clients_cookie_verdict_to_another(
    tmp_path: Path,
) -> None:
    """The verdict memo is keyed by the COOKIE option's bytes alone and read inline by
    `Resolver.fast`: a client replaying another's cookie (client and server part) from
    its own address, interleaved with the owner's queries so each finds the other's
    verdict in the memo, never gets it echoed (it gets a server cookie of its own,
    bound to its address), and the owner's stays valid and echoed throughout. Fails
    with the inline check's host comparison taken out (the replayer's reply echoes the
    owner's cookie)."""
    resolver = await _resolver(tmp_path)
    owner, replayer = "10.1.2.3", "10.9.8.7"  # both allowed: answers, not REFUSED
    first = _query(edns=True, options=_cookie_option(b"client01"))
    assert await resolver.resolve(first, owner, tcp=False)
    issued = _returned_cookie(resolver.fast(first, owner) or b"")
    full = _query(edns=True, options=_cookie_option(issued), query_id=9)
    for _ in range(4):
        mine = resolver.fast(full, owner)
        assert mine is not None and _returned_cookie(mine) == issued
        theirs = resolver.fast(full, replayer)
        assert theirs is not None
        replaced = _returned_cookie(theirs)
        assert replaced[:8] == b"client01" and replaced != issued
        now = resolver._loop.time()
        assert not resolver.cookies.valid(issued, replayer, now)
        assert resolver.cookies.valid(replaced, replayer, now)
        assert not resolver.cookies.valid(replaced, owner, now)


async def test_an_expired_server_cookie_is_not_echoed_from_the_memo(tmp_path: Path) -> None:
    """A valid server cookie's verdict, remembered on the fast path, is echoed while the
    cookie is younger than 1800 s (both clocks moving together, as they do), and from
    then on the query gets a fresh server cookie (the old one valid until 3600 s),
    though the memo held it as valid a moment before and the same bytes keep coming.
    Fails with the inline check's `until` comparison taken out (the expired cookie is
    echoed from the memo), and on the code before the hour's validity (RFC 9018 4.3)."""
    monotonic = [1000.0]
    wall = [1_700_000_000.0]
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  www.example.test: {A: 10.0.0.1}\n")
    resolver = in_process_resolver(zones, clock=lambda: monotonic[0])
    resolver.cookies = Cookies(secret=b"k" * 16, clock=lambda: wall[0])
    host = "10.0.0.7"
    first = _query(edns=True, options=_cookie_option(b"client01"))
    assert await resolver.resolve(first, host, tcp=False)
    issued = _returned_cookie(resolver.fast(first, host) or b"")
    full = _query(edns=True, options=_cookie_option(issued))
    for elapsed in (0.0, 1.0, 1000.0, 1798.0):
        monotonic[0], wall[0] = 1000.0 + elapsed, 1_700_000_000.0 + elapsed
        reply = resolver.fast(full, host)
        assert reply is not None and _returned_cookie(reply) == issued, elapsed
    for elapsed in (1800.0, 1801.0, 3000.0, 3600.0, 5000.0):
        monotonic[0], wall[0] = 1000.0 + elapsed, 1_700_000_000.0 + elapsed
        reply = resolver.fast(full, host)
        assert reply is not None
        fresh = _returned_cookie(reply)
        assert fresh[:8] == b"client01" and fresh != issued, elapsed
        # Replaced from 1800 s, still valid until 3600 s (RFC 9018 4.3).
        assert resolver.cookies.valid(issued, host, monotonic[0]) == (elapsed < 3600), elapsed
        assert resolver.cookies.valid(fresh, host, monotonic[0])


async def test_a_flood_of_distinct_cookies_keeps_the_memos_bounded(tmp_path: Path) -> None:
    """Three times as many distinct client cookies as the verdict memo holds (its real
    size, 16,384), from 1,000 addresses, through `fast`: the verdict memo and the query
    key memo stay within their sizes at every step, every reply carries its own query's
    client cookie, and a client that proved its address before the flood is still
    echoed its server cookie after it (its verdict made again when the memo was
    cleared)."""
    resolver = await _resolver(tmp_path)
    owner = "10.1.2.3"
    first = _query(edns=True, options=_cookie_option(b"owner001"))
    assert await resolver.resolve(first, owner, tcp=False)
    issued = _returned_cookie(resolver.fast(first, owner) or b"")
    flood = 3 * MEMO_SIZE
    for index in range(flood):
        client = struct.pack("!Q", index)
        host = f"10.{index % 4}.{index % 250}.{index % 251 + 1}"
        query = _query(edns=True, options=_cookie_option(client), query_id=index & 0xFFFF)
        reply = resolver.fast(query, host)
        # Our COOKIE option ends the reply: the client cookie, then 16 bytes of ours.
        assert reply is not None and reply[-24:-16] == client
        assert reply[3] & 0x0F == 0 and reply[6:8] == b"\x00\x01"  # the cached answer
        if index % 1000 == 0:
            assert _returned_cookie(reply)[:8] == client
        assert len(resolver.cookies) <= MEMO_SIZE
        assert len(resolver._keys) <= wire.KEY_MEMO_SIZE
    full = _query(edns=True, options=_cookie_option(issued))
    reply = resolver.fast(full, owner)
    assert reply is not None and _returned_cookie(reply) == issued


def _cached_forward(cache: AnswerCache, ttl: int, txt_size: int = 0) -> tuple[bytes, bytes]:
    """A forwarded-style answer (TTLs aged) to an EDNS query from a 1232-byte client,
    stored at time 0: the query and its key."""
    query = dnslib.DNSRecord.question("a.example", "A")
    query.add_ar(dnslib.EDNS0(udp_len=1232))
    reply = query.reply()
    reply.add_answer(dnslib.RR("a.example", rdata=dnslib.A("10.0.0.1"), ttl=ttl))
    if txt_size:
        text = dnslib.TXT([b"x" * 255] * (txt_size // 256) + [b"y" * (txt_size % 256)])
        reply.add_answer(dnslib.RR("a.example", dnslib.QTYPE.TXT, rdata=text, ttl=ttl))
    reply.ar = []
    packed = reply.pack() + wire.opt_record(1232, False)
    packed = packed[:10] + b"\x00\x01" + packed[12:]  # ARCOUNT: our OPT
    key = wire.fast_key(query.pack(), 1232)
    assert key is not None
    cache.store(0, key, packed, generation=1, now=0.0, ttl=ttl, counter=[0], age_ttls=True)
    return bytes(query.pack()), key


def _verdict_rdata(server_cookie: bytes) -> bytes:
    option = b"client01" + server_cookie
    return struct.pack("!HHH", 4 + len(option), COOKIE, len(option)) + option


def test_a_cached_answers_cookie_tail_follows_ttl_ageing_and_each_cookie() -> None:
    """The answer cache remembers the last cookie's tail per entry (by identity of the
    verdict's bytes): a hit with that cookie after the TTLs aged carries the aged TTLs,
    a hit with another cookie carries that cookie, not the remembered one, and both
    parse as the DNS message they should be. Fails when the remembered tail is not
    dropped as the TTLs age (the old TTL is served)."""
    cache = AnswerCache(10, views=1, udp_size=1232)
    query, key = _cached_forward(cache, ttl=300)
    mine, theirs = _verdict_rdata(b"\x01" * 16), _verdict_rdata(b"\x02" * 16)
    for now, cookie, ttl in (
        (1.0, mine, 299),
        (1.5, mine, 299),
        (11.0, mine, 289),
        (11.0, theirs, 289),
        (11.0, mine, 289),
        (100.0, mine, 200),
    ):
        reply = cache.lookup(0, key, query, 1, now, cookie=cookie)
        assert reply is not None
        parsed = dns.message.from_wire(reply)
        assert parsed.answer[0].ttl == ttl, now
        (option,) = parsed.options
        assert option.otype == COOKIE and option.to_wire() == cookie[6:]
    plain = cache.lookup(0, key, query, 1, 100.0)  # no cookie: no option
    assert plain is not None and not dns.message.from_wire(plain).options


def test_a_cookie_taking_a_cached_answer_over_the_clients_size_is_a_miss() -> None:
    """A cached UDP answer that fits the client's 1232 bytes only without our COOKIE
    option is a hit without a cookie and a miss (for the slow path to truncate) with
    one, each time (the remembered tail is only made for a cookie that fits)."""
    cache = AnswerCache(10, views=1, udp_size=1232)
    query, key = _cached_forward(cache, ttl=300, txt_size=1150)
    plain = cache.lookup(0, key, query, 1, 1.0)
    assert plain is not None and 1232 - 30 < len(plain) <= 1232
    cookie = _verdict_rdata(b"\x01" * 16)
    for _ in range(3):
        assert cache.lookup(0, key, query, 1, 1.0, cookie=cookie) is None
    assert cache.lookup(0, key, query, 1, 1.0) == plain


def test_a_cookie_reply_of_exactly_the_clients_size_is_a_hit_one_byte_more_a_miss() -> None:
    """At the boundary, byte by byte: cached answers whose reply with a 24-byte server
    cookie comes to 1,231, 1,232 and 1,233 bytes for a 1232-byte client are a hit, a
    hit and a miss, over UDP; over TCP all three are hits. Fails with the room for the
    cookie off by one either way (checked so)."""
    cookie = _verdict_rdata(b"\x01" * 16)  # 30 bytes: RDLENGTH, option header, 24 bytes
    for over in (-1, 0, 1):
        cache = AnswerCache(10, views=1, udp_size=1232)
        query, key = _cached_forward(cache, ttl=300, txt_size=1150)
        plain = cache.lookup(0, key, query, 1, 1.0)
        assert plain is not None
        # Grow the answer so that with the cookie it is 1232 + `over` bytes.
        query, key = _cached_forward(
            cache, ttl=300, txt_size=1150 + 1232 + over - (len(plain) - 2 + 30)
        )
        for _ in range(2):  # building the tail, then the remembered one
            reply = cache.lookup(0, key, query, 1, 1.0, cookie=cookie)
            if over > 0:
                assert reply is None, over
            else:
                assert reply is not None and len(reply) == 1232 + over
                assert reply.endswith(cookie[6:])
        tcp_key = wire.tcp_key(key)
        packed = cache._views[0][key].base
        cache.store(0, tcp_key, packed, generation=1, now=0.0, ttl=300, counter=[0], age_ttls=True)
        reply = cache.lookup(0, tcp_key, query, 1, 1.0, cookie=cookie)
        assert reply is not None and len(reply) == 1232 + over


def test_only_small_replies_remember_a_cookie_tail() -> None:
    """The remembered tail is a copy `cache.max_bytes` does not count: a reply over 512
    bytes is answered with each cookie correctly but keeps no copy (made per hit); one
    of 512 bytes or less keeps one."""
    cache = AnswerCache(10, views=1, udp_size=1232)
    big_query, big_key = _cached_forward(cache, ttl=300, txt_size=900)
    small_cache = AnswerCache(10, views=1, udp_size=1232)
    small_query, small_key = _cached_forward(small_cache, ttl=300)
    cookie = _verdict_rdata(b"\x01" * 16)
    for _ in range(2):
        big = cache.lookup(0, big_key, big_query, 1, 1.0, cookie=cookie)
        assert big is not None and len(big) > COOKIE_TAIL_REPLY and big.endswith(cookie[6:])
        small = small_cache.lookup(0, small_key, small_query, 1, 1.0, cookie=cookie)
        assert small is not None and small.endswith(cookie[6:])
    assert cache._views[0][big_key].cookie_rdata is None
    assert small_cache._views[0][small_key].cookie_rdata is cookie
