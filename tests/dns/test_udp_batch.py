"""Batched UDP I/O (dns/udpbatch.py: recvmmsg/sendmmsg) against real clients.

The batched transport is what every daemon test runs on by default on Linux; these check
what it must keep of uvloop's path: the same replies, counts and query log lines for
every kind of query (against a daemon forced onto uvloop's transport with
`DNSOVERRIDE_UDP_BATCH=0`, the fallback), exact answers to a burst from many sources,
and replies the socket cannot take (EAGAIN) or refuses (an error for one datagram).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import random
import selectors
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
import structlog.testing
import uvloop

from dnsoverride.dns import udpbatch
from dnsoverride.dns.listener import UdpListener
from dnsoverride.dns.stats import DnsCollector
from tests.support.metrics import scrape
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, events
from tests.support.ports import free_port
from tests.support.resolvers import in_process_resolver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not udpbatch.available(), reason="no recvmmsg/sendmmsg here"),
]


def _on_uvloop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on uvloop, the daemon's loop, rather than pytest-asyncio's
    asyncio loop: their readers differ (libuv stops watching a socket in error, asyncio
    calls the reader) and so do their datagram transports (the fallback is uvloop's)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        uvloop.run(test(*args, **kwargs))

    return run


NAMES = 100
TXT = ", ".join(f'"{index:03d}' + "x" * 247 + '"' for index in range(4))


def _address(index: int) -> str:
    return f"10.0.{index // 250}.{index % 250 + 1}"


def _zones(directory: Path) -> Path:
    zones = directory / "zones"
    zones.mkdir(parents=True, exist_ok=True)
    records = "\n".join(
        f"  n{index}.batch.test: {{A: {_address(index)}}}" for index in range(NAMES)
    )
    (zones / "z.yaml").write_text(f"records:\n{records}\n  big.batch.test: {{TXT: [{TXT}]}}\n")
    return zones


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.7", "--local-ttl=300") as peer:
        yield peer


def _traffic(server: DnsPeer) -> list[tuple[Any, ...]]:
    """One of each kind of query, each sent after the last was answered (so both servers
    see them in one order); what each reply said, without its ID, cookie or TTLs."""
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes.fromhex("0102030405060708"))
    asked: list[tuple[str, dict[str, Any], str | None]] = [
        ("n1.batch.test", {}, None),  # the override, then the answer cache
        ("N1.Batch.TEST", {}, None),
        ("n1.batch.test", {"use_edns": 0}, None),
        ("n1.batch.test", {"use_edns": 0}, None),
        ("n2.batch.test", {"use_edns": 0, "options": [cookie]}, None),
        ("n2.batch.test", {"use_edns": 0, "options": [cookie]}, None),
        ("x.fwd.test", {}, None),  # forwarded, then from the answer cache
        ("x.fwd.test", {}, None),
        ("big.batch.test", {}, None),  # over 512 octets: truncated
        ("big.batch.test", {}, None),
        ("big.batch.test", {"use_edns": 0, "payload": 1232}, None),
        ("n3.batch.test", {}, "127.0.0.2"),  # outside `allow`: REFUSED
        ("n3.batch.test", {}, "127.0.0.2"),
    ]
    seen: list[tuple[Any, ...]] = []
    for name, options, source in asked:
        rdtype = "TXT" if name.startswith("big") else "A"
        query = dns.message.make_query(name, rdtype, **options)
        reply = dns.query.udp(query, server.host, 3, server.port, source=source)
        assert reply.id == query.id
        seen.append(
            (
                reply.rcode(),
                dns.flags.to_text(reply.flags),
                [q.to_text() for q in reply.question],
                sorted(str(rdata) for rrset in reply.answer for rdata in rrset),
                reply.edns,
                bool(reply.options),
            )
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # malformed: FORMERR
        sock.settimeout(3)
        sock.sendto(
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", (server.host, server.port)
        )
        seen.append((sock.recv(512)[:4].hex(),))
    return seen


def _run(tmp_path: Path, upstream: DnsPeer, batch: str) -> tuple[list[Any], Any, Any, str]:
    metrics = free_port()
    with dnsoverride_serve(
        tmp_path,
        _zones(tmp_path),
        [upstream.address],
        "--query-log",
        "--metrics",
        f"127.0.0.1:{metrics}",
        config="allow: [127.0.0.1/32]\n",
        env={"DNSOVERRIDE_UDP_BATCH": batch},
    ) as server:
        seen = _traffic(server)
        samples = {
            key: value
            for key, value in scrape(metrics).items()
            if key[0].startswith(
                (
                    "dnsoverride_dns_queries_total",
                    "dnsoverride_dns_query_errors_total",
                    "dnsoverride_dns_cache_hits_total",
                    "dnsoverride_dns_cache_misses_total",
                    "dnsoverride_dns_ratelimited_total",
                )
            )
        }
        logged = [
            {k: v for k, v in event.items() if k != "timestamp"}
            for event in events(server, "query")
        ]
        (started,) = events(server, "started")
    return seen, samples, logged, started["udp"]


def test_batched_and_uvloop_paths_answer_count_and_log_alike(
    tmp_path: Path, upstream: DnsPeer
) -> None:
    """Checked to fail with `fast` skipped on the batched path (every query through
    `not_fast`): the answer cache's miss counter differs (14 against 7)."""
    batched = _run(tmp_path / "batched", upstream, "1")
    fallback = _run(tmp_path / "uvloop", upstream, "0")
    assert batched[3] == "batched" and fallback[3] == "uvloop"
    assert batched[0] == fallback[0]  # replies
    assert batched[1] == fallback[1]  # metrics
    assert batched[2] == fallback[2]  # query log lines
    assert any(event["source"] == "answer_cache" for event in batched[2])
    assert sum(1 for reply in batched[0][:-1] if reply[0] == dns.rcode.REFUSED) == 2
    truncated = [reply for reply in batched[0][:-1] if "TC" in reply[1]]
    assert len(truncated) == 2 and not truncated[0][3]


def _burst(server: DnsPeer, sources: int, total: int, window: int) -> int:
    """`total` queries from `sources` sockets on distinct loopback addresses, each with
    up to `window` outstanding; every reply checked (ID, question in the case asked,
    the name's address). Returns how many were answered correctly."""
    selector = selectors.DefaultSelector()
    rng = random.Random(13)
    pending: dict[socket.socket, dict[int, tuple[str, int]]] = {}
    left = {}
    for index in range(sources):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.1.{index + 1}", 0))
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        pending[sock], left[sock] = {}, total // sources + (index < total % sources)
    ids = iter(range(1, 1 << 16))
    correct = 0

    def send(sock: socket.socket) -> None:
        while left[sock] and len(pending[sock]) < window:
            number = rng.randrange(NAMES)
            name = "".join(c.upper() if rng.random() < 0.5 else c for c in f"n{number}.batch.test")
            query = dns.message.make_query(name, "A", id=next(ids))
            sock.sendto(query.to_wire(), (server.host, server.port))
            pending[sock][query.id] = (name, number)
            left[sock] -= 1

    try:
        for sock in pending:
            send(sock)
        deadline = time.monotonic() + 30
        while any(pending.values()) and time.monotonic() < deadline:
            for key, _ in selector.select(1):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                while True:
                    try:
                        data = ready.recv(512)
                    except BlockingIOError:
                        break
                    reply = dns.message.from_wire(data)
                    name, number = pending[ready].pop(reply.id)
                    assert reply.question[0].name.to_text() == name + "."
                    assert [str(r) for rrset in reply.answer for r in rrset] == [_address(number)]
                    correct += 1
                send(ready)
    finally:
        for sock in pending:
            sock.close()
        selector.close()
    return correct


def test_a_burst_from_64_sources_is_answered_exactly(tmp_path: Path, upstream: DnsPeer) -> None:
    """10,000 queries, names in random letter case, 64 source addresses with 8 queries
    each outstanding: every one answered with its own ID, its question as asked and its
    name's address. Checked to fail with replies sent to the address of the batch's
    first datagram instead of each one's own (KeyError: an ID another socket sent)."""
    with dnsoverride_serve(tmp_path, _zones(tmp_path), [upstream.address]) as server:
        assert _burst(server, 64, 10_000, 8) == 10_000
        (started,) = events(server, "started")
        assert started["udp"] == "batched"


async def _serving(tmp_path: Path) -> tuple[asyncio.DatagramTransport, tuple[str, int]]:
    """A resolver with the test zones behind a UDP listener on a loopback port."""
    resolver = in_process_resolver(_zones(tmp_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return await udpbatch.serve_udp(UdpListener(resolver, set()), sock), sock.getsockname()


async def _listening(tmp_path: Path) -> tuple[udpbatch.BatchedUdpTransport, tuple[str, int]]:
    transport, address = await _serving(tmp_path)
    assert isinstance(transport, udpbatch.BatchedUdpTransport)
    return transport, address


def _failing(real: Callable[..., int], codes: list[int], calls: list[int]) -> Callable[..., int]:
    """`sendmmsg` failing with `codes` in turn (as libc does: -1 and errno), then real.
    On loopback the kernel never fills a UDP send buffer (it hands the datagram over at
    once), so EAGAIN and per-datagram errors are made at the libc boundary."""

    def sendmmsg(*args: Any) -> int:
        calls.append(args[2])
        if codes:
            ctypes.set_errno(codes.pop(0))
            return -1
        return real(*args)

    return sendmmsg


async def _ask(address: tuple[str, int], count: int) -> tuple[dict[int, bytes], set[int]]:
    """Send `count` queries at once from one socket; the replies that came within 3 s."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        ids = set()
        for index in range(count):
            query = dns.message.make_query(f"n{index % NAMES}.batch.test", "A", id=index + 1)
            sock.sendto(query.to_wire(), address)
            ids.add(query.id)
        replies: dict[int, bytes] = {}
        try:
            async with asyncio.timeout(3):
                while len(replies) < count:
                    data = await loop.sock_recv(sock, 512)
                    replies[struct.unpack_from("!H", data)[0]] = data
        except TimeoutError:
            pass
    return replies, ids


@_on_uvloop
async def test_replies_the_socket_cannot_take_wait_and_go_out(tmp_path: Path) -> None:
    """EAGAIN from sendmmsg: the replies wait in the queue and go out when the socket is
    writable, none lost. Checked to fail with the replies dropped on EAGAIN."""
    transport, address = await _listening(tmp_path)
    await _ask(address, NAMES)  # each name once: the fast path answers them from now on
    calls: list[int] = []
    transport._sendmmsg = _failing(transport._sendmmsg, [errno.EAGAIN] * 3, calls)
    try:
        replies, ids = await _ask(address, 200)
        assert set(replies) == ids
        for query_id, data in replies.items():
            reply = dns.message.from_wire(data)
            assert [str(r) for rrset in reply.answer for r in rrset] == [
                _address((query_id - 1) % NAMES)
            ]
        assert transport.get_write_buffer_size() == 0
        # Once the queue has drained, replies go in batches again.
        replies, ids = await _ask(address, 50)
        assert set(replies) == ids and len(calls) >= 2
    finally:
        transport.close()


@_on_uvloop
async def test_a_send_error_costs_one_reply_and_is_logged(tmp_path: Path) -> None:
    """A datagram the kernel refuses (ENOBUFS, EMSGSIZE, EINVAL: -1 for the
    batch's first) costs that reply alone, logged as `udp_error`; the rest of the batch
    still goes. Checked to fail with the batch abandoned at the error."""
    transport, address = await _listening(tmp_path)
    await _ask(address, NAMES)
    calls: list[int] = []
    transport._sendmmsg = _failing(transport._sendmmsg, [errno.ENOBUFS], calls)
    try:
        with structlog.testing.capture_logs() as logs:
            replies, ids = await _ask(address, 20)
        assert len(replies) == 19 and set(replies) < ids
        assert [entry["event"] for entry in logs] == ["udp_error"]
        assert len(calls) >= 2  # the rest of the batch after the failed datagram
    finally:
        transport.close()


@_on_uvloop
async def test_a_full_queue_drops_replies_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the socket taking no reply and the queue bounded at 5, the sixth reply on is
    dropped and counted in `dnsoverride_dns_udp_replies_dropped_total`, not queued
    without bound; once the socket takes replies again the 5 queued go out, in order.
    Checked to fail with the bound removed, and before the drops were counted anywhere
    but a transport attribute (no metric: a failure invisible at the default log level)."""
    monkeypatch.setattr(udpbatch, "QUEUE_LIMIT", 5)
    resolver = in_process_resolver(_zones(tmp_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    transport = await udpbatch.serve_udp(UdpListener(resolver, set()), sock)
    assert isinstance(transport, udpbatch.BatchedUdpTransport)
    real_sendto = transport._sock.sendto
    blocked = True

    def sendto(data: bytes, addr: Any) -> int:
        if blocked:
            raise BlockingIOError(errno.EAGAIN, "would block")
        return real_sendto(data, addr)

    collector = DnsCollector(
        resolver.stats, resolver.answers, resolver.responses, resolver.ratelimit
    )

    def dropped() -> float:  # as /metrics shows it
        name = "dnsoverride_dns_udp_replies_dropped"
        (family,) = [metric for metric in collector.collect() if metric.name == name]
        return float(family.samples[0].value)

    monkeypatch.setattr(transport, "_sock", _SendWrapper(transport._sock, sendto))
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        try:
            for index in range(20):
                transport.sendto(struct.pack("!H", index) + bytes(10), client.getsockname())
            assert transport.get_write_buffer_size() == 5 and dropped() == 15
            blocked = False  # writable again: the writer sends what waits, in order
            async with asyncio.timeout(3):
                got = [(await loop.sock_recv(client, 512))[:2] for _ in range(5)]
            assert got == [struct.pack("!H", index) for index in range(5)]
            assert transport.get_write_buffer_size() == 0 and dropped() == 15
        finally:
            transport.close()


class _SendWrapper:
    """A socket whose `sendto` is replaced, everything else the real one."""

    def __init__(self, sock: socket.socket, sendto: Callable[[bytes, Any], int]) -> None:
        self._sock = sock
        self.sendto = sendto

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def test_a_client_that_never_reads_costs_others_nothing(tmp_path: Path, upstream: DnsPeer) -> None:
    """20,000 queries from a socket with a tiny receive buffer that is never read (its
    replies are dropped by the kernel at its end, the server's sends still succeed);
    then another client's queries are all answered, and the server logs no error."""
    with dnsoverride_serve(tmp_path, _zones(tmp_path), [upstream.address]) as server:
        query = dns.message.make_query("n5.batch.test", "A").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
            mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            mute.setblocking(False)
            # 10,000 a second: the server keeps up, so its receive buffer never
            # overflows (the kernel would drop the other client's queries then too).
            for index in range(20_000):
                packet = struct.pack("!H", index & 0xFFFF) + query[2:]
                with contextlib.suppress(BlockingIOError):
                    mute.sendto(packet, (server.host, server.port))
                if index % 100 == 99:
                    time.sleep(0.01)
            assert _burst(server, 4, 400, 4) == 400
        errors = [line for line in server.log_text().splitlines() if '"level": "error"' in line]
        assert not errors and "Traceback" not in server.log_text()


@_on_uvloop
async def test_without_batching_the_uvloop_transport_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where recvmmsg/sendmmsg are not available (`_LIBC` None: not glibc, not Linux, or
    DNSOVERRIDE_UDP_BATCH=0), `serve_udp` falls back to uvloop's datagram transport and
    answers the same."""
    monkeypatch.setattr(udpbatch, "_LIBC", None)
    assert not udpbatch.available()
    transport, address = await _serving(tmp_path)
    try:
        assert not isinstance(transport, udpbatch.BatchedUdpTransport)
        replies, ids = await _ask(address, 50)
        assert set(replies) == ids
    finally:
        transport.close()


def _spoofed(source: str, port: int, to: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 UDP datagram from `source`:`port` (the kernel fills the checksums)."""
    udp = struct.pack("!HHHH", port, to[1], 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source), socket.inet_aton(to[0]),
    )  # fmt: skip
    return header + udp


def _raw_socket() -> socket.socket:
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except PermissionError:
        pytest.skip("raw sockets need CAP_NET_RAW")


@_on_uvloop
async def test_replies_the_kernel_refuses_cost_only_themselves(tmp_path: Path) -> None:
    """Queries with sources no reply can go to (spoofed on loopback through a raw socket:
    port 0, refused with EINVAL; the broadcast address, EACCES) in the same batches as a
    real client's: the kernel refuses those replies inside `sendmmsg`, each is logged as
    `udp_error`, and every reply to the real client still goes. The injected errors of
    `test_a_send_error_costs_one_reply_and_is_logged`, from the real kernel; answered
    alike by uvloop's transport (checked with DNSOVERRIDE_UDP_BATCH=0 by hand)."""
    transport, address = await _listening(tmp_path)
    await _ask(address, 1)  # n0 in the answer cache: every query below takes the fast path
    sizes: list[int] = []
    real = transport._sendmmsg

    def sendmmsg(*args: Any) -> int:
        sizes.append(args[2])
        return int(real(*args))

    transport._sendmmsg = sendmmsg
    query = dns.message.make_query("n0.batch.test", "A").to_wire()
    with _raw_socket() as raw, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        client.setblocking(False)
        try:
            with structlog.testing.capture_logs() as logs:
                for index in range(30):
                    if index % 3 == 0:
                        raw.sendto(_spoofed("127.0.0.1", 0, address, query), (address[0], 0))
                    elif index % 3 == 1:
                        bad = _spoofed("255.255.255.255", 5353, address, query)
                        raw.sendto(bad, (address[0], 0))
                    client.sendto(struct.pack("!H", index) + query[2:], address)
                got: set[int] = set()
                async with asyncio.timeout(3):
                    while len(got) < 30:
                        reply = await asyncio.get_running_loop().sock_recv(client, 512)
                        got.add(struct.unpack_from("!H", reply)[0])
            errors = [str(entry["error"]) for entry in logs if entry["event"] == "udp_error"]
            assert sorted({error.split("]")[0] for error in errors}) == ["[Errno 13", "[Errno 22"]
            assert len(errors) == 20 and got == set(range(30))
            assert max(sizes) > 1  # refused and good replies went in one sendmmsg
        finally:
            transport.close()


@_on_uvloop
async def test_clients_gone_before_their_replies_cost_nothing(tmp_path: Path) -> None:
    """50 clients that close their socket right after asking: each reply meets a closed
    port (ICMP port-unreachable on loopback), which Linux does not report to an
    unconnected socket: no `udp_error`, and the next client is answered (its queries
    are read after theirs, so their replies went first)."""
    transport, address = await _listening(tmp_path)
    query = dns.message.make_query("n0.batch.test", "A").to_wire()
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(50):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                    gone.sendto(query, address)
            replies, ids = await _ask(address, 5)
        assert set(replies) == ids
        assert not [entry for entry in logs if entry["event"] == "udp_error"]
    finally:
        transport.close()


def test_a_raw_ipv6_address_reads_as_the_socket_module_gives_it() -> None:
    """A sockaddr_in6 as the kernel writes it (port and flowinfo in network order, the
    scope ID in host order) reads as `socket` would give it. On this little-endian
    machine the old code (scope ID always read little-endian) passes too: it was wrong
    only on big-endian 64-bit glibc (s390x, ppc64)."""
    raw = struct.pack(
        "=H2sI16sI",
        socket.AF_INET6,
        struct.pack("!H", 5353),
        socket.htonl(0x12345),
        socket.inet_pton(socket.AF_INET6, "fe80::1"),
        7,
    )
    assert len(raw) == 28
    assert udpbatch._address(socket.AF_INET6, raw) == ("fe80::1", ("fe80::1", 5353, 0x12345, 7))


@_on_uvloop
async def test_a_forked_child_does_not_share_the_buffers(tmp_path: Path) -> None:
    """The datagram buffers are private to the process: a child forked after the
    transport exists (the daemon's workers come from a fork server today, but a fork
    is one library call away) writes into its own copy, not into the datagrams its
    parent is reading and answering. Checked to fail with the default shared mapping."""
    transport, _ = await _listening(tmp_path)
    try:
        before = transport._data[:8]
        child = os.fork()
        if child == 0:  # the child: scribble over the buffer, leave at once
            transport._data[:8] = b"\xff" * 8
            os._exit(0)
        assert (await asyncio.to_thread(os.waitpid, child, 0))[1] == 0
        assert transport._data[:8] == before
    finally:
        transport.close()


IP_RECVERR = 11  # Linux's value; the socket module names it from Python 3.12 on


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "uvloop"])
@_on_uvloop
async def test_a_socket_with_ip_recverr_keeps_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batched: bool
) -> None:
    """A UDP socket with IP_RECVERR on (an inherited socket may come so) queues an ICMP
    error for each reply to a client gone; the queue keeps the socket in error for
    epoll, and once that error comes alone (no datagram waiting) libuv stops watching
    the socket: the listener went deaf, silently (every later query unanswered before
    the fix, no log line). `serve_udp` turns the option off. uvloop's own transport,
    the fallback, died of it too: a segmentation fault (this test's process) before."""
    if not batched:
        monkeypatch.setattr(udpbatch, "_LIBC", None)
    resolver = in_process_resolver(_zones(tmp_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    address = sock.getsockname()
    transport = await udpbatch.serve_udp(UdpListener(resolver, set()), sock)
    query = dns.message.make_query("n0.batch.test", "A").to_wire()
    try:
        await _ask(address, 1)
        for _ in range(3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
                gone.sendto(query, address)
            # Answered after the gone client's: by then its reply met the closed port.
            replies, ids = await _ask(address, 1)
            assert set(replies) == ids
            for _ in range(3):  # loop iterations with nothing to read: the error alone
                await asyncio.sleep(0)
        replies, ids = await _ask(address, 20)
        assert set(replies) == ids
    finally:
        transport.close()
