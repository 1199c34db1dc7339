"""The byte-level relay (dnsoverride/dns/relay.py) against an upstream that lies in bytes.

dnsmasq and unbound only send well-formed replies; the upstream here is a real loopback
UDP socket whose reply bytes each test writes by hand: compression pointers that loop or
point forward, a record dnslib cannot re-encode behind an OPT record that is not last,
TTLs with the high bit set. What a client gets is read with dnspython, which rejects a
malformed message as a stub resolver would.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from dnsoverride.dns import relay, wire
from dnsoverride.dns.udpexchange import SocketWatcher, UdpExchange

OPT = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00"
QUESTION = b"\xc0\x0c"  # a pointer to the question's name


def _reply(query: bytes, records: bytes, counts: tuple[int, int, int]) -> bytes:
    """A NOERROR reply to `query` (ID and question copied), then `records` as they are."""
    question_end = wire.question_end(query)
    head = query[:2] + b"\x81\x80" + struct.pack("!HHHH", 1, *counts)
    return head + query[12:question_end] + records


def _record(owner: bytes, rtype: int, rdata: bytes, ttl: int = 300) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


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
        for index in range(5):
            packet = relay.query(
                index,
                wire.encode_name(f"n{index}.lie.test"),
                1,
                1,
                cd=False,
                do=False,
                udp_size=1232,
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
                )
            )
        # Answer all five before the loop runs again: they are read in one batch.
        for index in range(5):
            query, peer = upstream.recvfrom(65535)
            good = _reply(query, _record(QUESTION, 1, b"\xc0\x00\x02\x01"), (1, 0, 0))
            upstream.sendto(_opt_first_then_unparsable(query) if index == 0 else good, peer)
        try:
            with pytest.raises(TimeoutError):
                await exchanges[0].reply  # malformed: as unwanted as a forgery
            for exchange in exchanges[1:]:
                answer = await exchange.reply
                assert answer.rcode == 0 and answer.answers == 1
        finally:
            for exchange in exchanges:
                exchange.close()
            watcher.close()
