"""The byte-level relay (dnsoverride/dns/relay.py) against an upstream that lies in bytes.

dnsmasq and unbound only send well-formed replies; the upstream here is a real loopback
socket (`tests.peers.LyingUpstream`) whose reply bytes each test writes by hand:
compression pointers that loop or point forward, a record dnslib cannot re-encode behind
an OPT record that is not last, TTLs with the high bit set, records for names nobody
asked about. What a client gets is read with dnspython, which rejects a malformed
message as a stub resolver would.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from dnsoverride.dns import relay, wire
from dnsoverride.dns.udpexchange import SocketWatcher, UdpExchange
from tests.support.peers import DnsPeer, LyingUpstream, dnsoverride_serve, lying_upstream

OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
QUESTION = b"\xc0\x0c"  # a pointer to the question's name


@pytest.fixture
def lying(request: pytest.FixtureRequest) -> Iterator[LyingUpstream]:
    with lying_upstream(request.param) as upstream:
        yield upstream


def _reply(query: bytes, records: bytes, counts: tuple[int, int, int]) -> bytes:
    """A NOERROR reply to `query` (ID and question copied), then `records` as they are."""
    question_end = wire.question_end(query)
    head = query[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, *counts)
    return head + query[12:question_end] + records


def _record(owner: bytes, rtype: int, rdata: bytes, ttl: int = 300) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


def _bad_pointers(query: bytes, _tcp: bool) -> bytes | None:
    """Replies whose names a client cannot read, by the first label of the question:
    `loop`: record 2's owner points back into record 1's CNAME data, which points
    forward to record 2's owner; `forward`: a CNAME target pointing past the message;
    `header`: an owner pointing into the header (which the relay rebuilds)."""
    name = dns.message.from_wire(query).question[0].name
    label = name.labels[0]
    records_at = wire.question_end(query)
    if label == b"loop":
        cname_data_at = records_at + 12
        second_at = cname_data_at + 2
        first = _record(QUESTION, 5, struct.pack("!H", 0xC000 | second_at))
        second = _record(struct.pack("!H", 0xC000 | cname_data_at), 1, b"\x06\x06\x06\x06")
        return _reply(query, first + second, (2, 0, 0))
    if label == b"forward":
        return _reply(query, _record(QUESTION, 5, b"\xc3\xff"), (1, 0, 0))
    if label == b"header":
        return _reply(query, _record(b"\xc0\x05", 1, b"\x06\x06\x06\x06"), (1, 0, 0))
    return _reply(query, _record(QUESTION, 1, b"\xc0\x00\x02\x01"), (1, 0, 0))


@pytest.mark.parametrize("lying", [_bad_pointers], indirect=True)
@pytest.mark.e2e
def test_replies_a_client_cannot_read_are_not_relayed(tmp_path: Path, lying: LyingUpstream) -> None:
    """Compression pointers that loop, point forward or into the header: the relay checked
    only that each owner's first pointer points back, so it relayed (and cached) replies
    that dnspython rejects with BadPointer, where the dnslib path before it and unbound
    answer SERVFAIL. Fails on the code before the fix: the client cannot parse the reply."""
    zones = tmp_path / "zones"
    zones.mkdir()
    with dnsoverride_serve(tmp_path, zones, [lying.address]) as server:
        for label in ("loop", "forward", "header"):
            name = f"{label}.lie.test"
            upstream_reply = _bad_pointers(dns.message.make_query(name, "A").to_wire(), False)
            assert upstream_reply is not None
            if label != "header":  # what the upstream sends is unreadable as it is
                with pytest.raises(dns.name.BadPointer):
                    dns.message.from_wire(upstream_reply)
            for _ in range(2):
                reply = server.query(name)
                assert reply.rcode() == dns.rcode.SERVFAIL, (name, reply)
                assert not reply.answer
            # Never cached: the second query was asked upstream again.
            assert lying.asked.count(name + ".") >= 2
        good = server.query("good.lie.test")
        assert [rdata.to_text() for rrset in good.answer for rdata in rrset] == ["192.0.2.1"]


def _opt_first_then_unparsable(query: bytes) -> bytes:
    """A reply whose OPT record comes before another additional record, which has a label
    that is not UTF-8: the relay hands such a reply to dnslib, which cannot parse it."""
    answer = _record(QUESTION, 1, b"\xc0\x00\x02\x01")
    binary = _record(b"\x01\xff\x00", 1, b"\x01\x02\x03\x04")
    return _reply(query, answer + OPT + binary, (1, 0, 2))


async def test_a_reply_dnslib_cannot_parse_costs_only_its_own_question() -> None:
    """Five upstream queries whose replies arrive together (one batch of the nested epoll),
    the first of them the reply above. `relay.scan` let dnslib's DNSError escape: it
    escaped `SocketWatcher._ready` too, and the four well-formed replies behind it in the
    batch were never read (EPOLLONESHOT: not reported again), so all five timed out.
    Fails on the code before the fix."""
    loop = asyncio.get_running_loop()
    watcher = SocketWatcher(loop)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
        upstream.bind(("127.0.0.1", 0))
        exchanges = []
        outcomes: list[asyncio.Future[relay.Reply | Exception]] = []
        for index in range(5):
            outcomes.append(loop.create_future())
            packet = relay.query(
                index,
                wire.encode_name(f"n{index}.lie.test"),
                1,
                1,
                cd=False,
                opt=wire.opt_record(1232, False),
            )
            exchanges.append(
                UdpExchange(
                    watcher,
                    upstream.getsockname(),
                    packet,
                    deadline=loop.time() + 1.0,
                    exact_case=False,
                    unwanted=lambda: None,
                    unwanted_limit=3,
                    done=outcomes[-1].set_result,
                )
            )
        # Answer all five before the loop runs again: they are read in one batch.
        for index in range(5):
            query, peer = upstream.recvfrom(65535)
            good = _reply(query, _record(QUESTION, 1, b"\xc0\x00\x02\x01"), (1, 0, 0))
            upstream.sendto(_opt_first_then_unparsable(query) if index == 0 else good, peer)
        try:
            # malformed: as unwanted as a forgery
            assert isinstance(await outcomes[0], TimeoutError)
            for outcome in outcomes[1:]:
                answer = await outcome
                assert isinstance(answer, relay.Reply)
                assert answer.rcode == 0 and answer.answers == 1
        finally:
            for exchange in exchanges:
                exchange.close()
            watcher.close()


def _ttls(query: bytes, _tcp: bool) -> bytes:
    """One A record whose TTL the question's first label names: `high` 2^31 (the high
    bit set), `week` 604,800 (over the default `cache.max_ttl` of a day); others 300."""
    label = dns.message.from_wire(query).question[0].name.labels[0]
    ttl = {b"high": 0x80000000, b"week": 604800}.get(label, 300)
    return _reply(query, _record(QUESTION, 1, b"\xc0\x00\x02\x01", ttl), (1, 0, 0))


def _ttls_seen(server: DnsPeer, name: str) -> list[int]:
    """The TTLs of the reply to `name A` as sent (dnspython reads 2^31 and up as 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(3)
        client.sendto(dns.message.make_query(name, "A").to_wire(), (server.host, server.port))
        reply = client.recv(65535)
    return [ttl for _, ttl in wire.ttl_offsets(reply)]


@pytest.mark.parametrize("lying", [_ttls], indirect=True)
@pytest.mark.e2e
def test_ttls_over_the_bounds_never_reach_a_client(tmp_path: Path, lying: LyingUpstream) -> None:
    """RFC 2181 section 8: a TTL with the high bit set counts as 0. It was cached for a day
    (`cache.max_ttl`) and sent on as it came, then as 2,147,483,646 from the answer cache
    (unbound: 0, and not cached). A TTL over `cache.max_ttl` reached clients as it came,
    in the first reply and in every answer-cache hit, while response-cache hits were capped
    (unbound caps at `cache-max-ttl`). Fails on the code before the fix."""
    zones = tmp_path / "zones"
    zones.mkdir()
    with dnsoverride_serve(tmp_path, zones, [lying.address]) as server:
        for _ in range(2):
            assert _ttls_seen(server, "high.lie.test") == [0]
        assert lying.asked.count("high.lie.test.") == 2  # a TTL of 0 is never cached
        for _ in range(2):
            (ttl,) = _ttls_seen(server, "week.lie.test")
            assert 86390 <= ttl <= 86400
        assert lying.asked.count("week.lie.test.") == 1


def _with_strangers(query: bytes, _tcp: bool) -> bytes:
    """The answer to the question, plus A records of other names: one the zones override
    (registry-1.docker.io) and one they do not, each for a day."""
    question = dns.message.from_wire(query)
    reply = dns.message.make_response(question)
    name = question.question[0].name
    if name.labels[0] == b"real":
        reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.10"))
        for stranger in ("registry-1.docker.io.", "victim.lie.test."):
            reply.answer.append(dns.rrset.from_text(stranger, 86400, "IN", "A", "6.6.6.6"))
    else:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply.to_wire()


@pytest.mark.parametrize("lying", [_with_strangers], indirect=True)
@pytest.mark.e2e
def test_an_override_cname_answer_carries_only_its_chain(
    tmp_path: Path, lying: LyingUpstream
) -> None:
    """`alias.ci CNAME real.lie.test` with the target resolved upstream: the upstream's
    records for other names were appended to our authoritative answer, one of them
    `registry-1.docker.io A 6.6.6.6` against our own override of that name (unbound's
    local-data CNAME answers with the chain only). Nothing is cached for those names
    either way. Fails on the code before the fix."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(
        "records:\n  registry-1.docker.io: {A: 10.0.0.5}\n  alias.ci: {CNAME: real.lie.test}\n"
    )
    with dnsoverride_serve(tmp_path, zones, [lying.address]) as server:
        reply = server.query("alias.ci")
        assert reply.flags & dns.flags.AA
        assert [rrset.to_text() for rrset in reply.answer] == [
            "alias.ci. 60 IN CNAME real.lie.test.",
            "real.lie.test. 300 IN A 192.0.2.10",
        ]
        (override,) = server.query("registry-1.docker.io").answer
        assert [str(rdata) for rdata in override] == ["10.0.0.5"]
