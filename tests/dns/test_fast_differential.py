"""The fast path against the parsed path, byte for byte, over generated queries.

`Resolver.fast` answers from finished reply bytes with the client's ID, question case
and COOKIE option spliced in; `_resolve_parsed` builds every reply with dnslib. Both
must send the same bytes and count the same labels for every query: the same names in
random letter case (0x20), QTYPEs differing in bit 0x20, other classes and flags, no
EDNS or EDNS with UDP sizes around and below 512, DO, client cookies (each address its
own, sometimes another's), server cookies issued earlier (replayed from elsewhere too)
and forged, other EDNS options beside the cookie, malformed COOKIE lengths, IPv4, IPv6
and refused clients, UDP and TCP, with answers of every size across the 512-byte
boundary (so our cookie decides whether a cached reply still fits or is truncated), on
a clock that moves past the cookies' re-issue and validity times, with response rate
limiting engaged. Server cookies are checked against a verifier without a memo: each
reply's is valid for the address it went to, and a valid one is echoed unchanged.

A client often asks its last question again (a new ID, the same bytes after it), as
stubs do, so remembered keys, verdicts and cookie tails are reused. Fails on main's
fast path in its counts (a cookie query whose cached reply no longer fits was counted
three times: as a hit, again by `resolve`'s own cache check, and by the slow path),
with the inline verdict check stripped of its address comparison, or the answer
cache's size check on a cookie tail taken out, and (the forwarded test) with a cookie
tail kept across TTL ageing (each checked so).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import dns.message
import pytest

from dnsoverride.dns.constants import COOKIE
from dnsoverride.dns.cookies import Cookies
from dnsoverride.dns.resolver import Resolver
from tests.support.peers import dnsmasq
from tests.support.resolvers import in_process_resolver

SECRET = b"s" * 16
WALL = 1_700_000_000.0  # the wall clock at monotonic time 0
TXT_SIZES = [*range(420, 500), 900, 1190, 1200, 3000]
# The EDNS options a query carries: what its COOKIE holds, other options beside it.
KINDS = ["none", "client", "client", "issued", "issued", "forged", "length", "ecs", "ecs+cookie"]
KINDS += ["two", "padding+cookie", "16", "40"]
HOSTS = ["10.0.0.1", "10.0.0.2", "127.0.0.1", "::1", "fd00::5", "192.0.2.9", "fe80::1%lo"]


def _zone(zones: Path) -> list[str]:
    lines = ["records:"]
    names = []
    for size in TXT_SIZES:
        names.append(f"t{size}.z.test")
        lines.append(f"  {names[-1]}: {{TXT: ['{'x' * size}']}}")
    for index in range(3):
        names.append(f"www{index}.Example.test")
        lines.append(f"  {names[-1]}: {{A: 10.0.0.{index + 1}, AAAA: 'fd00::{index + 1}'}}")
    lines.append("  '*.w.test': {A: 10.9.9.9}")
    names += ["a.w.test", "B.c.w.test"]
    (zones / "z.yaml").write_text("\n".join(lines) + "\n")
    return names


def _wire_name(name: str) -> bytes:
    return b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\0"


def _cookie(message: bytes) -> bytes | None:
    """The COOKIE option data of a message, None without one (or unparseable)."""
    try:
        parsed = dns.message.from_wire(message)
    except Exception:
        return None
    found = [bytes(option.to_wire()) for option in parsed.options if option.otype == COOKIE]
    return found[0] if found else None


class _Queries:
    """A reproducible stream of queries, server cookies taken from earlier replies."""

    def __init__(self, names: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.names = names
        self.clients = {host: self.rng.randbytes(8) for host in HOSTS}
        self.issued: list[bytes] = []
        self.last: dict[str, tuple[bytes, bool, bytes | None]] = {}  # by client

    def next(self) -> tuple[bytes, str, bool, bytes | None]:
        """A query, its client's address, whether over TCP, and the well-formed COOKIE
        option data it carries (None without one)."""
        rng = self.rng
        host = rng.choice(HOSTS)
        if host in self.last and rng.random() < 0.3:  # a stub asking again: a new ID
            query, tcp, cookie = self.last[host]
            return struct.pack("!H", rng.randrange(65536)) + query[2:], host, tcp, cookie
        name = "".join(
            c.upper() if rng.random() < 0.5 else c.lower() for c in rng.choice(self.names)
        )
        qtype = rng.choice([1, 1, 16, 16, 28, 65, 97, 255])
        qclass = rng.choice([1] * 12 + [3, 0x21])
        flags = rng.choice([0x0100, 0x0100, 0x0000, 0x0110, 0x0120, 0x0130, 0x8100, 0x0900])
        opt, additional, cookie = b"", 0, None
        if rng.random() < 0.8:
            additional = 1
            client = (
                self.clients[host]
                if rng.random() < 0.9
                else rng.choice(list(self.clients.values()))
            )
            options, cookie = self._options(client)
            udp = rng.choice([0, 100, 511, 512, 513, 530, 560, 1232, 4096, 65535])
            version = 0 if rng.random() < 0.97 else 1
            do = 0x80 if rng.random() < 0.3 else 0
            opt = struct.pack("!BHHBBBBH", 0, 41, udp, 0, version, do, 0, len(options)) + options
        header = struct.pack("!HHHHHH", rng.randrange(65536), flags, 1, 0, 0, additional)
        query = header + _wire_name(name) + struct.pack("!HH", qtype, qclass) + opt
        tcp = rng.random() < 0.15
        self.last[host] = query, tcp, cookie
        return query, host, tcp, cookie

    def _options(self, client: bytes) -> tuple[bytes, bytes | None]:
        """EDNS options for a query from `client`, and its well-formed COOKIE's data."""
        rng = self.rng
        kind = rng.choice(KINDS)
        ecs = struct.pack("!HH", 8, 4) + b"\x00\x01\x18\x00"
        if kind in ("issued", "forged") and self.issued:
            server = rng.choice(self.issued)
            sent = server if kind == "issued" else server[:-1] + bytes((server[-1] ^ 1,))
            return _option(sent), sent
        if kind == "length":  # malformed: FORMERR
            return _option(rng.randbytes(rng.choice([1, 7, 9, 15, 41, 48]))), None
        if kind == "two":  # two COOKIE options: FORMERR
            return _option(client) * 2, None
        cookie = {
            "client": client,
            "ecs+cookie": client,
            "padding+cookie": client,
            "16": client + rng.randbytes(8),
            "40": client + rng.randbytes(32),
        }.get(kind)
        options = b"" if cookie is None else _option(cookie)
        if kind.startswith("ecs"):
            options = ecs + options
        if kind == "padding+cookie":
            options += struct.pack("!HH", 12, 3) + bytes(3)
        return options, cookie

    def saw(self, reply: bytes) -> None:
        cookie = _cookie(reply)
        if cookie is None or cookie in self.issued:
            return
        if cookie[:8] in self.clients.values():
            self.issued = [*self.issued[-29:], cookie]


def _option(data: bytes) -> bytes:
    return struct.pack("!HH", COOKIE, len(data)) + data


async def _parsed(resolver: Resolver, query: bytes, host: str, tcp: bool) -> bytes | None:
    """The reply of the parsed path alone (no answer cache), rate limited like `resolve`."""
    reply = await resolver._resolve_parsed(query, host, tcp)
    if reply is None or tcp:
        return reply
    now = resolver._now()
    return resolver._rate_limited(reply, query, resolver._keys(query), host, now) or None


CONFIG = """\
allow: [10.0.0.0/8, 127.0.0.0/8, '::1/128', 'fd00::/8']
ratelimit: {rate: 3, slip: 2, exempt: []}
"""


async def _compare(
    tmp_path: Path, names: list[str], count: int, upstream: str = "127.0.0.1:9"
) -> tuple[int, Resolver]:
    """Send `count` generated queries for `names` through `fast` (then `resolve`) of one
    resolver and the parsed path of another, asserting the same reply and cookie rules
    for each and the same counts at the end: how many `fast` answered, and the parsed
    path's resolver."""
    config = tmp_path / "dns.yaml"
    config.write_text(CONFIG)
    monotonic = [1000.0]
    resolvers = []
    for _ in range(2):
        resolver = in_process_resolver(
            tmp_path / "zones", upstream, config_file=config, clock=lambda: monotonic[0]
        )
        resolver.cookies = Cookies(secret=SECRET, clock=lambda: WALL + monotonic[0])
        resolvers.append(resolver)
    fast, parsed = resolvers
    queries = _Queries(names, seed=7)
    answered_fast = 0
    for index in range(count):
        monotonic[0] += queries.rng.choice([0.0, 0.01, 0.3, 1.0, 7.0])
        if queries.rng.random() < 0.003:
            monotonic[0] += 900.0  # past the re-issue time, now and then past validity
        query, host, tcp, sent = queries.next()
        reply = fast.fast(query, host, tcp)
        answered_fast += reply is not None
        if reply is None:
            reply = await fast.resolve(query, host, tcp)
        expected = await _parsed(parsed, query, host, tcp)
        reply = None if reply is None else bytes(reply) or None
        assert reply == expected, (index, host, tcp, query.hex())
        if not reply:
            continue
        queries.saw(reply)
        returned = _cookie(reply)
        if returned is None:
            # Only FORMERR and the rate limit's TC replies (never longer than the query) go
            # without our cookie to a client that sent one.
            assert sent is None or reply[3] & 0x0F == 1 or reply[2] & 0x02, index
            continue
        verifier = Cookies(secret=SECRET, clock=lambda: WALL + monotonic[0])
        assert sent is not None and returned[:8] == sent[:8]
        assert verifier.valid(returned, host, monotonic[0]), (index, host)
        if len(sent) == 24 and Cookies(secret=SECRET, clock=lambda: WALL + monotonic[0]).valid(
            sent, host, monotonic[0]
        ):
            assert returned == sent, (index, host)
    assert fast.stats.queries == parsed.stats.queries
    assert fast.stats.query_errors == parsed.stats.query_errors
    assert (fast.ratelimit.truncated, fast.ratelimit.dropped) == (
        parsed.ratelimit.truncated,
        parsed.ratelimit.dropped,
    )
    return answered_fast, parsed


async def test_fast_path_replies_equal_the_parsed_paths_byte_for_byte(tmp_path: Path) -> None:
    """Local answers (overrides, a wildcard, synthesized ANY, REFUSED)."""
    (tmp_path / "zones").mkdir()
    answered_fast, parsed = await _compare(tmp_path, _zone(tmp_path / "zones"), 4000)
    assert answered_fast > 500 and parsed.ratelimit.dropped > 50  # both paths exercised


@pytest.mark.e2e
async def test_forwarded_answers_ageing_in_the_cache_equal_the_parsed_paths(
    tmp_path: Path,
) -> None:
    """Forwarded answers from dnsmasq (TTL 300), aged in the answer cache as the clock
    moves (and expired, asked again), TXT answers across the 512-byte boundary: the fast
    path's aged reply and cookie tail equal the parsed path's, which ages the response
    cache's copy."""
    (tmp_path / "zones").mkdir()
    local = _zone(tmp_path / "zones")[-6:]  # a few overrides among the forwarded names
    options = ["--local-ttl=300", "--address=/a.fwd.test/192.0.2.1"]
    names = ["a.fwd.test", "b.a.fwd.test", *local]
    for size in range(420, 500, 3):
        names.append(f"t{size}.fwd.test")
        options.append(f"--txt-record={names[-1]},{'x' * 200},{'y' * (size - 200)}")
    with dnsmasq(tmp_path, *options) as upstream:
        answered_fast, _ = await _compare(tmp_path, names, 2000, upstream.address)
    assert answered_fast > 200
