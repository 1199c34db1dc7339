"""EDNS over real sockets with dnspython (and dig): DNS cookies (RFC 7873/9018) on both
the answer-cache fast path and the dnslib path, and BADVERS for unknown EDNS versions
(RFC 6891)."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve

pytestmark = pytest.mark.e2e

COOKIE = dns.edns.OptionType.COOKIE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsPeer]:
    workdir = tmp_path_factory.mktemp("edns")
    zones = workdir / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  over.example: {A: 10.0.0.1}\n")
    with (
        dnsmasq(workdir, "--address=/fwd.test/192.0.2.1", "--local-ttl=300") as upstream,
        dnsoverride_serve(workdir, zones, [upstream.address]) as peer,
    ):
        yield peer


def _ask(
    server: DnsPeer, name: str, cookie: bytes | None, *, tcp: bool = False, version: int = 0
) -> dns.message.Message:
    options: list[dns.edns.Option] = (
        [] if cookie is None else [dns.edns.GenericOption(COOKIE, cookie)]
    )
    query = dns.message.make_query(name, "A", use_edns=version, options=options)
    if tcp:
        return dns.query.tcp(query, server.host, 3, server.port)
    return dns.query.udp(query, server.host, 3, server.port)


def _cookie(reply: dns.message.Message) -> bytes | None:
    found = [option for option in reply.options if option.otype == COOKIE]
    assert len(found) <= 1
    return found[0].to_wire() if found else None


def _addresses(reply: dns.message.Message) -> list[str]:
    return [str(rdata) for rrset in reply.answer for rdata in rrset]


@pytest.mark.parametrize("name", ["over.example", "www.fwd.test"])
@pytest.mark.parametrize("tcp", [False, True])
def test_client_cookie_gets_its_own_cookie_back_from_cache_and_slow_path(
    server: DnsPeer, name: str, tcp: bool
) -> None:
    expected = ["10.0.0.1"] if name == "over.example" else ["192.0.2.1"]
    # The first of these misses the answer cache, the others hit it: each client must
    # get its own client cookie back, never the one the cached reply was built for.
    seen_server_cookies = set()
    for _ in range(2):
        for client in (os.urandom(8), os.urandom(8), os.urandom(8)):
            reply = _ask(server, name, client, tcp=tcp)
            assert reply.rcode() == dns.rcode.NOERROR and _addresses(reply) == expected
            cookie = _cookie(reply)
            assert cookie is not None and len(cookie) == 24
            assert cookie[:8] == client
            assert cookie[8:12] == b"\x01\x00\x00\x00"  # RFC 9018 version 1, reserved
            seen_server_cookies.add(cookie[8:])
    assert len(seen_server_cookies) == 6  # bound to the client cookie
    # No cookie sent: none returned, though cached replies were built for cookie queries.
    plain = _ask(server, name, None, tcp=tcp)
    assert _cookie(plain) is None and _addresses(plain) == expected


def test_a_valid_server_cookie_is_echoed_and_a_forged_one_replaced(server: DnsPeer) -> None:
    client = os.urandom(8)
    first = _cookie(_ask(server, "over.example", client))
    assert first is not None
    assert _cookie(_ask(server, "over.example", first)) == first
    assert _cookie(_ask(server, "www.fwd.test", first, tcp=True)) == first
    forged = first[:16] + bytes(8)
    reply = _ask(server, "over.example", forged)
    assert _addresses(reply) == ["10.0.0.1"]  # a bad server cookie is no reason to refuse
    fresh = _cookie(reply)
    assert fresh is not None and fresh[:8] == client and fresh[16:] != bytes(8)
    # Another client address never validates this cookie (the address is in the hash).
    query = dns.message.make_query(
        "over.example", "A", use_edns=0, options=[dns.edns.GenericOption(COOKIE, first)]
    )
    other = dns.query.udp(query, server.host, 3, server.port, source="127.0.0.2")
    moved = _cookie(other)
    assert moved is not None and moved[:8] == client and moved[16:] != first[16:]


@pytest.mark.parametrize("length", [0, 1, 7, 9, 15, 41])
def test_malformed_cookie_is_formerr(server: DnsPeer, length: int) -> None:
    """RFC 7873 5.2.2. Length 0 (the last option) was answered NOERROR without a cookie:
    dnslib drops a last option shorter than 5 bytes, so the check never saw it."""
    assert _ask(server, "over.example", os.urandom(length)).rcode() == dns.rcode.FORMERR


@pytest.mark.parametrize(
    "tail", [b"\x00", b"\x00\x0a\x00", b"\x00\x0a\x00\x08"], ids=["1", "3", "header"]
)
@pytest.mark.parametrize("first", [b"", b"\x00\x0a\x00\x08client01"], ids=["alone", "cookie"])
def test_opt_data_that_options_do_not_fill_is_formerr(
    server: DnsPeer, first: bytes, tail: bytes
) -> None:
    """An OPT RDATA ending in 1-3 bytes (no room for an option header) or in an option
    header whose data is missing (a COOKIE announcing 8 bytes, none there) is malformed
    (RFC 6891 6.1.2: options fill RDATA): FORMERR, after a cookie or alone. Was answered
    NOERROR: dnslib stops reading options at the last 4 bytes and drops them unread."""
    options = first + tail
    query = dns.message.make_query("over.example", "A", use_edns=0).to_wire()
    query = query[:-2] + len(options).to_bytes(2, "big") + options  # our OPT ends it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(query, (server.host, server.port))
        reply = sock.recv(65535)
    assert reply[:2] == query[:2] and reply[3] & 0x0F == dns.rcode.FORMERR


@pytest.mark.parametrize("cookie", [None, b"12345678"])
def test_unknown_edns_version_gets_badvers(server: DnsPeer, cookie: bytes | None) -> None:
    reply = _ask(server, "over.example", cookie, version=1)
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0  # the version we do speak
    assert reply.answer == []
    if cookie is not None:
        returned = _cookie(reply)
        assert returned is not None and returned[:8] == cookie
    # Version 0 right after still works, from either path.
    assert _addresses(_ask(server, "over.example", cookie)) == ["10.0.0.1"]


def test_dig_sees_a_good_cookie(server: DnsPeer) -> None:
    command = ["dig", "+cookie", "+tries=1", "+time=3", "-p", str(server.port)]
    for _ in range(2):  # the second answer comes from the answer cache
        result = subprocess.run(
            [*command, f"@{server.host}", "over.example", "A"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "status: NOERROR" in result.stdout
        assert "(good)" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsPeer]:
    """A server that allows 127.0.0.1 only: 127.0.0.2 is refused (on the fast path)."""
    workdir = tmp_path_factory.mktemp("edns-refused")
    zones = workdir / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  over.example: {A: 10.0.0.1}\n")
    config = "allow: [127.0.0.1/32]\nupstreams: ['127.0.0.1:9']\n"
    with dnsoverride_serve(workdir, zones, [], config=config) as peer:
        yield peer


@pytest.mark.parametrize("tcp", [False, True])
def test_refused_reply_carries_opt_and_cookie(strict: DnsPeer, tcp: bool) -> None:
    client = os.urandom(8)
    options: list[dns.edns.Option] = [dns.edns.GenericOption(COOKIE, client)]
    for _ in range(2):  # the second time from the client memo, still the fast path
        query = dns.message.make_query("over.example", "A", use_edns=0, options=options)
        send = dns.query.tcp if tcp else dns.query.udp
        reply = send(query, strict.host, 3, strict.port, source="127.0.0.2")
        assert reply.rcode() == dns.rcode.REFUSED and reply.answer == []
        assert reply.edns == 0 and reply.payload == 1232  # RFC 6891: an OPT for an OPT
        cookie = _cookie(reply)
        assert cookie is not None and len(cookie) == 24 and cookie[:8] == client
        # A real server cookie: sent back, it is valid and echoed unchanged.
        options = [dns.edns.GenericOption(COOKIE, cookie)]
        echoed = send(
            dns.message.make_query("over.example", "A", use_edns=0, options=options),
            strict.host,
            3,
            strict.port,
            source="127.0.0.2",
        )
        assert echoed.rcode() == dns.rcode.REFUSED and _cookie(echoed) == cookie
    # DO echoed, no cookie when none was sent, no OPT when the query had none.
    signed = dns.message.make_query("over.example", "A", want_dnssec=True)
    reply = dns.query.udp(signed, strict.host, 3, strict.port, source="127.0.0.2")
    assert reply.rcode() == dns.rcode.REFUSED and reply.edns == 0
    assert reply.ednsflags & dns.flags.DO and _cookie(reply) is None
    plain = dns.message.make_query("over.example", "A", use_edns=False)
    reply = dns.query.udp(plain, strict.host, 3, strict.port, source="127.0.0.2")
    assert reply.rcode() == dns.rcode.REFUSED and reply.edns == -1
    # The allowed client is answered as usual.
    assert _addresses(strict.query("over.example")) == ["10.0.0.1"]
