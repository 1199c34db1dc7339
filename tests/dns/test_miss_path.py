"""The cold miss without a task (`Resolver.miss`), in process against a real dnsmasq.

A UDP query for a name no override answers is begun inside `datagram_received` and
answered from the forwarder's callback (issue 13: cold misses). These check what it
must keep of `resolve`: the reply (ID, question in the client's case, records), the
answer cache filled for the next query, the queries it must leave to `resolve`
(overridden names, refused clients, every upstream down), the response cache, and a
bug in the reply's making costing one SERVFAIL (counted), not a silent drop.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
import structlog.testing

from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.udpexchange import SocketWatcher
from tests.support.peers import DnsPeer, dnsmasq
from tests.support.resolvers import in_process_resolver

pytestmark = pytest.mark.e2e

CLIENT = ("127.0.0.1", 40000)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.7", "--local-ttl=300") as peer:
        yield peer


async def _resolver(tmp_path: Path, upstream: str, allow: str = "127.0.0.0/8") -> Resolver:
    zones = tmp_path / "zones"
    zones.mkdir(parents=True, exist_ok=True)
    (zones / "z.yaml").write_text("records:\n  over.fwd.test: {A: 10.0.0.1}\n")
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(f"allow: [{allow}]\n")
    return in_process_resolver(zones, upstream, config_file)


class _Client:
    """What `miss` sends, as a future per call."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def send(self, reply: bytes, addr: Any) -> None:
        self.replies.put_nowait((reply, addr))

    async def reply(self) -> dns.message.Message:
        data, addr = await asyncio.wait_for(self.replies.get(), 5)
        assert addr == CLIENT
        return dns.message.from_wire(data)


async def test_a_cold_miss_is_answered_and_cached_without_a_task(
    tmp_path: Path, upstream: DnsPeer
) -> None:
    resolver = await _resolver(tmp_path, upstream.address)
    client = _Client()
    query = dns.message.make_query("Cold.FWD.test", "A")
    data = query.to_wire()
    assert resolver.fast(data, CLIENT[0]) is None
    tasks = len(asyncio.all_tasks())
    assert resolver.miss(data, CLIENT, client.send)
    assert len(asyncio.all_tasks()) == tasks  # no task for it
    reply = await client.reply()
    assert reply.id == query.id
    assert reply.question[0].name.to_text() == "Cold.FWD.test."  # the client's case
    assert [rdata.to_text() for rrset in reply.answer for rdata in rrset] == ["192.0.2.7"]
    assert not resolver.in_flight()
    # The next identical query is a fast-path hit; another ID, the same answer.
    again = dns.message.make_query("cold.fwd.test", "A")
    hit = resolver.fast(again.to_wire(), CLIENT[0])
    assert hit is not None
    assert dns.message.from_wire(hit).id == again.id
    # Another name: from the upstream; then, once a new zone generation has retired
    # the answer cache, from the response cache within the call.
    other = dns.message.make_query("other.fwd.test", "A").to_wire()
    assert resolver.miss(other, CLIENT, client.send)
    assert (await client.reply()).rcode() == dns.rcode.NOERROR
    resolver.zones.swap(resolver.zones.current)
    assert resolver.fast(other, CLIENT[0]) is None
    hits = resolver.responses.hits
    assert resolver.miss(other, CLIENT, client.send)
    assert client.replies.qsize() == 1  # answered within the call
    assert resolver.responses.hits == hits + 1


async def test_what_the_miss_path_leaves_to_resolve(tmp_path: Path, upstream: DnsPeer) -> None:
    resolver = await _resolver(tmp_path, upstream.address)
    client = _Client()
    overridden = dns.message.make_query("over.fwd.test", "A").to_wire()
    assert not resolver.miss(overridden, CLIENT, client.send)
    refused = await _resolver(tmp_path / "r", upstream.address, allow="10.0.0.0/8")
    assert not refused.miss(
        dns.message.make_query("x.fwd.test", "A").to_wire(), CLIENT, client.send
    )
    # The same question while it is being answered: waits for it in `resolve`.
    first = dns.message.make_query("same.fwd.test", "A").to_wire()
    assert resolver.miss(first, CLIENT, client.send)
    assert not resolver.miss(first, CLIENT, client.send)
    await client.reply()
    assert client.replies.empty()


async def test_a_bug_making_the_reply_costs_one_servfail(
    tmp_path: Path, upstream: DnsPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before `_answer_miss` caught it, an exception in the forwarder's callback went to
    the event loop's handler (a traceback) and the client got nothing."""
    resolver = await _resolver(tmp_path, upstream.address)
    client = _Client()

    def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(resolver, "_fresh", broken)
    query = dns.message.make_query("bug.fwd.test", "A")
    assert resolver.miss(query.to_wire(), CLIENT, client.send)
    reply = await client.reply()
    assert reply.id == query.id
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert resolver.stats.query_errors["internal"] == 1
    assert not resolver.in_flight()


async def test_a_bug_going_on_after_the_first_exchange_is_logged_and_answered(
    tmp_path: Path, upstream: DnsPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dnsmasq REFUSES the AAAA (no upstream of its own), so the question goes on in a
    task after its first exchange; a bug there fails the question (SERVFAIL for the
    client, the question not left in flight) with one `forward_failed` line, not a
    silent task exception."""
    resolver = await _resolver(tmp_path, upstream.address)
    client = _Client()

    async def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(resolver.forwarder, "_ask_all", broken)
    query = dns.message.make_query("refused.fwd.test", "AAAA")
    with structlog.testing.capture_logs() as logs:
        assert resolver.miss(query.to_wire(), CLIENT, client.send)
        reply = await client.reply()
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert [entry["error"] for entry in logs if entry["event"] == "forward_failed"] == [
        "RuntimeError: bug"
    ]
    assert not resolver.in_flight()


async def test_a_bug_on_every_question_is_one_log_line_a_while(
    tmp_path: Path, upstream: DnsPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug that every question going on after its first exchange meets (an upstream
    that REFUSES them all can make every question take that path) costs one
    `forward_failed` line per `failure_log_interval`, the others counted in its
    `suppressed`, as `query_failed` does for the resolver; every client still gets its
    SERVFAIL. On s13-dns at 1d2c3b0: one line per question (three here)."""
    resolver = await _resolver(tmp_path, upstream.address)
    client = _Client()

    async def broken(*_args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(resolver.forwarder, "_ask_all", broken)
    with structlog.testing.capture_logs() as logs:
        for index in range(3):
            query = dns.message.make_query(f"refused{index}.fwd.test", "AAAA")
            assert resolver.miss(query.to_wire(), CLIENT, client.send)
            assert (await client.reply()).rcode() == dns.rcode.SERVFAIL
    failed = [entry for entry in logs if entry["event"] == "forward_failed"]
    assert len(failed) == 1
    assert failed[0]["error"] == "RuntimeError: bug"


async def test_a_bug_reading_upstream_sockets_is_one_log_line_a_while() -> None:
    """An exception from a socket's callback (a bug reading an upstream's datagram)
    costs one `upstream_exchange_failed` line a while, and the sockets after it are
    still read. On s13-dns at 1d2c3b0: one line per datagram (three here)."""
    watcher = SocketWatcher(asyncio.get_running_loop())
    called: list[int] = []
    all_called = asyncio.Event()

    def broken() -> None:
        called.append(1)
        if len(called) == 3:
            all_called.set()
        raise RuntimeError("bug")

    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
    try:
        with structlog.testing.capture_logs() as logs:
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
                watcher.watch(sock.fileno(), broken)
                sock.sendto(b"x", sock.getsockname())
            await asyncio.wait_for(all_called.wait(), 5)
    finally:
        for sock in sockets:
            watcher.forget(sock.fileno())
            sock.close()
        watcher.close()
    failed = [entry for entry in logs if entry["event"] == "upstream_exchange_failed"]
    assert len(failed) == 1
    assert failed[0]["error"] == "RuntimeError: bug"


async def test_a_bug_at_one_deadline_does_not_stall_the_later_ones() -> None:
    """Deadlines share one queue and one timer: an exception from one expiry must not
    stop the ones after it (questions left hanging with no reply and no line until some
    new query set the timer again). On s13-dns at 1d2c3b0 the exception went to the
    loop's handler (a traceback) and the later deadline never fired."""
    loop = asyncio.get_running_loop()
    watcher = SocketWatcher(loop)
    expired = asyncio.Event()

    def broken() -> None:
        raise RuntimeError("bug")

    now = loop.time()
    try:
        with structlog.testing.capture_logs() as logs:
            watcher.expire_at(now + 0.05, broken)
            watcher.expire_at(now + 0.1, expired.set)
            await asyncio.wait_for(expired.wait(), 2)
    finally:
        watcher.close()
    failed = [entry for entry in logs if entry["event"] == "upstream_exchange_failed"]
    assert [entry["error"] for entry in failed] == ["RuntimeError: bug"]
