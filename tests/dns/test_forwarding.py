"""Forwarding honesty against a scripted upstream on a real loopback UDP socket.

dnsmasq and unbound always answer correctly; to prove that a wrong reply is ignored
and that identical questions in flight share one upstream query, the upstream here is
a real socket in a thread whose replies the test chooses.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from tests.support.peers import dnsoverride_serve, events
from tests.support.ports import free_port
from tests.support.waits import poll

pytestmark = pytest.mark.e2e

CLIENTS = 10


class ScriptedUpstream:
    """Answers `*.slow.test` only when released, after two forged replies; NXDOMAIN otherwise."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", self.port))
        self.seen: list[tuple[int, int, str]] = []  # (source port, id, name)
        self.held: list[tuple[dns.message.Message, tuple[str, int]]] = []
        self.first_held = threading.Event()
        self.release = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.05)
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except TimeoutError:
                if self.release.is_set() and self.held:
                    self._answer_held()
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            name = query.question[0].name.to_text()
            self.seen.append((peer[1], query.id, name))
            if name.endswith("slow.test."):
                self.held.append((query, peer))
                self.first_held.set()
                continue
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.NXDOMAIN)
            self.sock.sendto(reply.to_wire(), peer)

    def _answer_held(self) -> None:
        for query, peer in self.held:
            wrong_id = dns.message.make_response(query)
            wrong_id.id = (query.id + 1) % 65536
            wrong_id.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "203.0.113.66")
            )
            self.sock.sendto(wrong_id.to_wire(), peer)
            other = dns.message.make_query("evil.example", "A")
            other.id = query.id
            forged = dns.message.make_response(other)
            evil = dns.rrset.from_text("evil.example.", 60, "IN", "A", "203.0.113.67")
            forged.answer.append(evil)
            self.sock.sendto(forged.to_wire(), peer)
            good = dns.message.make_response(query)
            good.answer.append(
                dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.55")
            )
            self.sock.sendto(good.to_wire(), peer)
        self.held.clear()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


def test_one_upstream_query_for_identical_questions_and_forged_replies_ignored(
    tmp_path: Path, scripted: ScriptedUpstream
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    with dnsoverride_serve(tmp_path, zones, [f"127.0.0.1:{scripted.port}"]) as server:
        clients = []
        for _ in range(CLIENTS):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.settimeout(5)
            query = dns.message.make_query("a.slow.test", "A")
            client.sendto(query.to_wire(), (server.host, server.port))
            clients.append((client, query))
        assert scripted.first_held.wait(5)
        # Let the other nine reach the server before releasing the one upstream query.
        probe = dns.message.make_query("ready.nx.example", "A")
        assert server.query(probe.question[0].name.to_text()).rcode() == dns.rcode.NXDOMAIN
        scripted.release.set()
        for client, query in clients:
            with client:
                reply = dns.message.from_wire(client.recv(65535))
            assert reply.id == query.id
            assert [rdata.to_text() for rrset in reply.answer for rdata in rrset] == ["192.0.2.55"]
        slow = [entry for entry in scripted.seen if entry[2] == "a.slow.test."]
        assert len(slow) == 1
        # Distinct questions: fresh random IDs and source ports.
        for index in range(8):
            server.query(f"n{index}.nx.example")
        others = [entry for entry in scripted.seen if entry[2].endswith("nx.example.")]
        assert len({port for port, _, _ in others}) >= len(others) - 1
        assert len({query_id for _, query_id, _ in others}) >= len(others) - 1


def _framed(message: dns.message.Message) -> bytes:
    wire = message.to_wire()
    return struct.pack("!H", len(wire)) + wire


def _read_framed(sock: socket.socket) -> dns.message.Message:
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data

    (length,) = struct.unpack("!H", exactly(2))
    return dns.message.from_wire(exactly(length))


def test_pipelined_tcp_queries_are_answered_out_of_order(
    tmp_path: Path, scripted: ScriptedUpstream
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  over.example: {A: 10.0.0.1}\n")
    with (
        dnsoverride_serve(tmp_path, zones, [f"127.0.0.1:{scripted.port}"]) as server,
        socket.create_connection((server.host, server.port), timeout=5) as sock,
    ):
        slow = dns.message.make_query("b.slow.test", "A")
        local = dns.message.make_query("over.example", "A")
        forwarded = dns.message.make_query("c.nx.example", "A")
        # One segment, three queries: the slow one first.
        sock.sendall(_framed(slow) + _framed(local) + _framed(forwarded))
        assert scripted.first_held.wait(5)
        first, second = _read_framed(sock), _read_framed(sock)
        assert {first.id, second.id} == {local.id, forwarded.id}
        by_id = {first.id: first, second.id: second}
        assert [str(rdata) for rrset in by_id[local.id].answer for rdata in rrset] == ["10.0.0.1"]
        assert by_id[forwarded.id].rcode() == dns.rcode.NXDOMAIN
        scripted.release.set()
        last = _read_framed(sock)
        assert last.id == slow.id
        assert [str(rdata) for rrset in last.answer for rdata in rrset] == ["192.0.2.55"]
        # Same connection, still open, and a repeat is a cache hit answered in order.
        sock.sendall(_framed(local))
        assert _read_framed(sock).id == local.id


def test_sigterm_lets_a_forwarded_query_in_flight_finish(
    tmp_path: Path, scripted: ScriptedUpstream
) -> None:
    """A cold miss begun without a task (`Resolver.miss`) is still answered when SIGTERM
    arrives while its upstream query is out: shutdown waits (≤ 2 s) for the queries in
    flight, not only for tasks. Without `Resolver.in_flight` in the wait, the client got
    no answer: the socket was closed first."""
    zones = tmp_path / "zones"
    zones.mkdir()
    with (
        dnsoverride_serve(tmp_path, zones, [f"127.0.0.1:{scripted.port}"]) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        client.settimeout(5)
        query = dns.message.make_query("b.slow.test", "A")
        client.sendto(query.to_wire(), (server.host, server.port))
        assert scripted.first_held.wait(5)
        server.process.send_signal(signal.SIGTERM)
        poll(lambda: bool(events(server, "stopping")), 5, "stopping logged")
        scripted.release.set()
        reply = dns.message.from_wire(client.recv(65535))
        assert server.process.wait(5) == 0
    assert reply.id == query.id
    assert [rdata.to_text() for rrset in reply.answer for rdata in rrset] == ["192.0.2.55"]
