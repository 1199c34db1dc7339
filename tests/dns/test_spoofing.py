"""Forwarding under a spoofing attack: replies forged with the upstream's address, sprayed
at the forwarding socket's port with every ID, never reach the cache.

Reproduces issue 10 item 8: knowing the port of an upstream query (here read from
/proc, as an attacker on the path or with a side channel would learn it), spraying the
65,536 IDs at it poisoned the cache in 3 of 4 tries (the forged address served to
everyone for a day); mismatched replies were ignored silently and the socket stayed
open for the whole attempt. Now every unwanted reply is counted, and after
`UNWANTED_LIMIT` of them the socket is dropped and the question asked again from a
fresh port with a fresh ID. The attack test fails on the code before the fix.

The forgeries are raw IPv4 packets (root only) from 127.0.0.1 with the upstream's port
as their source, on loopback.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from dnsoverride.dns.forwarder import UNWANTED_LIMIT
from tests.support.metrics import scrape
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

TRIES = 4
POISON = "6.6.6.6"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")


def _forwarding_ports(pid: int, upstream_port: int) -> set[int]:
    """Local ports of `pid`'s UDP sockets connected to 127.0.0.1:`upstream_port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    remote = f"0100007F:{upstream_port:04X}"
    with open("/proc/net/udp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[2] == remote and fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _forged_datagrams(name: str, source_port: int, target_port: int) -> Iterator[bytes]:
    """IPv4 packets 127.0.0.1:source_port -> 127.0.0.1:target_port, one per query ID,
    each a reply to `name A` carrying the poison with a day's TTL."""
    query = dns.message.make_query(name, "A", use_edns=0)
    reply = dns.message.make_response(query)
    reply.answer.append(dns.rrset.from_text(name + ".", 86400, "IN", "A", POISON))
    payload = bytearray(reply.to_wire())
    for query_id in range(65536):
        struct.pack_into("!H", payload, 0, query_id)
        udp = struct.pack("!HHHH", source_port, target_port, 8 + len(payload), 0) + payload
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(udp),
            query_id,
            0,
            64,
            socket.IPPROTO_UDP,
            0,
            socket.inet_aton("127.0.0.1"),
            socket.inet_aton("127.0.0.1"),
        )
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        yield header + udp


def _addresses(reply: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in reply.answer for rdata in rrset]


@needs_root
@pytest.mark.timeout(120)
def test_ids_sprayed_at_a_known_forwarding_port_never_poison_the_cache(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    metrics = free_port()
    # The upstream forwards victim.test to a black hole: its answer never comes, so every
    # reply on the forwarding socket is a forgery, and the attacker has all the time of
    # the attempt (3 s here) to spray.
    config = "timeout: 3.0\nattempt_timeout: 3.0\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        black_hole = f"--server=/victim.test/127.0.0.1#{hole.getsockname()[1]}"
        with (
            dnsmasq(tmp_path, black_hole, "--address=/fwd.test/192.0.2.1") as upstream,
            dnsoverride_serve(
                tmp_path,
                zones,
                [upstream.address],
                "--metrics",
                f"127.0.0.1:{metrics}",
                config=config,
            ) as server,
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw,
        ):
            poisoned = sum(
                _attack(server, upstream, raw, f"try{attempt}.victim.test")
                for attempt in range(TRIES)
            )
            unwanted = scrape(metrics).get(
                (
                    "dnsoverride_dns_upstream_unwanted_replies_total",
                    (("upstream", upstream.address),),
                ),
                0.0,
            )
            log_text = server.log_text()
    assert poisoned == 0
    # Each socket took UNWANTED_LIMIT forgeries before it was dropped; the rest of the
    # spray went to a closed port.
    assert unwanted >= TRIES * UNWANTED_LIMIT
    assert "upstream_replies_unwanted" in log_text
    assert "upstream_down" not in log_text  # forgeries are no evidence against it


def _attack(server: DnsPeer, upstream: DnsPeer, raw: socket.socket, name: str) -> int:
    """One try: a client asks `name`; every forwarding port seen meanwhile is sprayed with
    all 65,536 IDs. Returns 1 when the poison was served, to the client or afterwards."""
    replies: list[dns.message.Message] = []
    asking = threading.Thread(target=lambda: replies.append(server.query(name, timeout=10)))
    asking.start()
    sprayed: set[int] = set()
    while asking.is_alive():
        for port in _forwarding_ports(server.process.pid, upstream.port) - sprayed:
            sprayed.add(port)
            for packet in _forged_datagrams(name, upstream.port, port):
                while True:
                    try:
                        raw.sendto(packet, ("127.0.0.1", 0))
                        break
                    except BlockingIOError:  # the loopback queue is full: let it drain
                        time.sleep(0.0005)
        time.sleep(0.001)
    asking.join()
    assert sprayed, "no forwarding port seen"
    (reply,) = replies
    assert reply.rcode() in (dns.rcode.SERVFAIL, dns.rcode.NOERROR)
    later = server.query(name, source="127.0.0.2", timeout=10)  # what everyone else gets
    return int(POISON in _addresses(reply) or POISON in _addresses(later))


class _EchoUpstream:
    """A UDP upstream answering every A query with 192.0.2.9, recording the question
    names as they arrived (letter case included); `lowercase=True` answers with the
    question lowercased, like an upstream that does not preserve case."""

    def __init__(self, *, lowercase: bool) -> None:
        self.port = free_port()
        self.names: list[str] = []
        self._lowercase = lowercase
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(65535)
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text()
            self.names.append(name)
            reply = dns.message.make_response(query)
            if self._lowercase:
                reply.question[0].name = dns.name.from_text(name.lower())
            answer_name = reply.question[0].name
            reply.answer.append(dns.rrset.from_text(answer_name, 60, "IN", "A", "192.0.2.9"))
            self._sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("lowercase", [False, True])
def test_case_randomization_mixes_case_and_needs_it_echoed(tmp_path: Path, lowercase: bool) -> None:
    """`forward.case_randomization: true`: the upstream sees each letter's case chosen at
    random; a reply that does not echo it is unwanted (SERVFAIL when nothing else
    comes). Off (the default), the name goes out lowercase and either reply is taken."""
    zones = tmp_path / "zones"
    zones.mkdir()
    name = "abcdefghij.klmnopqrst.example"
    upstream = _EchoUpstream(lowercase=lowercase)
    try:
        for randomize in (True, False):
            config = f"forward: {{case_randomization: {str(randomize).lower()}}}\n"
            # Short: the start-up poll (0.2 s) must get its SERVFAIL from the lowercaser.
            config += "timeout: 0.3\nattempt_timeout: 0.15\n"
            upstream.names.clear()
            with dnsoverride_serve(
                tmp_path, zones, [f"127.0.0.1:{upstream.port}"], config=config
            ) as server:
                rcodes = set()
                for index in range(5):
                    reply = server.query(f"q{index}.{name}")
                    rcodes.add(dns.rcode.to_text(reply.rcode()))
                    if reply.rcode() == dns.rcode.NOERROR:
                        assert _addresses(reply) == ["192.0.2.9"]
                        assert reply.question[0].name.to_text() == f"q{index}.{name}."
            asked = [n for n in upstream.names if name in n.lower()]
            if randomize:
                assert any(n != n.lower() for n in asked), asked
                assert rcodes == ({"SERVFAIL"} if lowercase else {"NOERROR"})
            else:
                assert all(n == n.lower() for n in asked), asked
                assert rcodes == {"NOERROR"}
    finally:
        upstream.close()
