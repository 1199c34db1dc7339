"""UDP and TCP listeners: bytes in, bytes out, nothing else.

UDP is a plain `asyncio.DatagramProtocol`: a cache hit is answered inside
`datagram_received` without creating a task; a miss becomes a task. TCP reads
length-prefixed messages (several per connection, answered concurrently and out of
order, RFC 7766) until the client goes quiet, and closes a client that does not read
its answers; cache hits are answered from the same answer cache as UDP. Neither knows
anything about DNS beyond the framing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog

from dnsoverride.common.heaptrim import HeapTrimmer
from dnsoverride.dns.config import TcpConfig
from dnsoverride.dns.resolver import Resolver

log = structlog.get_logger(__name__)


class UdpListener(asyncio.DatagramProtocol):
    """Answers datagrams; tracks in-flight slow-path tasks so shutdown can wait for them."""

    def __init__(self, resolver: Resolver, tasks: set[asyncio.Task[None]]) -> None:
        self._resolver = resolver
        self._fast = resolver.fast  # bound once: the hot path is a handful of lookups
        self._tasks = tasks
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport implements DatagramTransport without subclassing it.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._send = self._transport.sendto
        self._loop = asyncio.get_running_loop()  # once: a getpid() per call on Python 3.11

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            reply = self._fast(data, addr[0])
        except Exception:  # a bug on the fast path: `resolve` answers, logs and counts it
            reply = None
        if reply is not None:
            if reply:  # b"": dropped by the rate limit
                self._send(reply, addr)
            return
        self._tasks.add(self._loop.create_task(self._slow(data, addr)))

    async def _slow(self, data: bytes, addr: Any) -> None:
        try:
            reply = await self._resolver.resolve(data, addr[0], tcp=False)
            transport = self._transport
            if reply is not None and transport is not None and not transport.is_closing():
                transport.sendto(reply, addr)
        finally:
            # Itself, rather than a done callback: one loop callback less per query.
            self._tasks.discard(asyncio.current_task(self._loop))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client gone); nothing to do but note it.
        log.debug("udp_error", error=str(exc))


TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Replies queued in our buffer beyond which the reading loop waits for the client to read
# (asyncio's default high-water mark); the hard bound is `tcp.max_queued`.
WRITE_HIGH_WATER = 16384
# The kernel's send buffer for a DNS connection: enough for a largest reply in flight;
# without it, autotuning lets one client that never reads pin megabytes of kernel memory.
SEND_BUFFER = 65536
# StreamReader buffer limit: reading pauses at twice this (a DNS message is <= 64 KiB,
# and readexactly() reads on past the limit).
READ_LIMIT = 8192


def tcp_handler(resolver: Resolver, limits: TcpConfig) -> TcpHandler:
    """The `asyncio.start_server` callback for DNS over TCP (RFC 7766).

    Queries pipelined on one connection are answered concurrently, each as soon as it is
    ready (out of order): an answer-cache hit at once, a forwarded one when the upstream
    replies. At most `limits.pipeline` queries of one connection are in flight (reading
    stops until one finishes), at most `limits.max_connections` connections are open (a
    new one beyond that is closed at once), and a connection with nothing in flight and
    no complete query for `limits.idle_timeout` seconds is closed (RFC 7766 6.2.3:
    seconds, not minutes).

    A client that sends but does not read its answers: once `WRITE_HIGH_WATER` bytes of
    replies wait for it, its queries are no longer read; if they still wait
    `limits.idle_timeout` seconds later, or more than `limits.max_queued` bytes pile up
    (answers in flight finishing), the connection is aborted and its buffers freed
    (and given back to the system after a burst of them, see common/heaptrim.py).
    """
    fast = resolver.fast
    idle_timeout = limits.idle_timeout
    max_queued = limits.max_queued
    open_connections = [0]
    trimmer = HeapTrimmer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if open_connections[0] >= limits.max_connections:
            resolver.stats.tcp_refused += 1
            writer.close()
            return
        open_connections[0] += 1
        trimmer.opened(open_connections[0])
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else ""
        transport = writer.transport
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        slots = asyncio.Semaphore(limits.pipeline)
        pending: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        idle: asyncio.Timeout | None = None

        def send(reply: bytes) -> None:
            if transport.is_closing():
                return
            # One write per answer: concurrent answers never interleave.
            writer.write(struct.pack("!H", len(reply)) + reply)
            if transport.get_write_buffer_size() > max_queued:
                stalled()

        def stalled() -> None:
            if not transport.is_closing():
                resolver.stats.tcp_stalled += 1
                log.debug("tcp_client_not_reading", client=host)
                transport.abort()  # drops what is queued, now

        async def drained() -> bool:
            """Whether the client read its answers within the idle timeout."""
            if transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
                return not transport.is_closing()
            try:
                async with asyncio.timeout(idle_timeout):
                    await writer.drain()
            except TimeoutError:
                stalled()
                return False
            return not transport.is_closing()

        async def answer(data: bytes) -> None:
            try:
                reply = await resolver.resolve(data, host, tcp=True)
                if reply is not None:
                    send(reply)
            finally:
                slots.release()
                if len(pending) == 1 and idle is not None and not idle.expired():
                    idle.reschedule(loop.time() + idle_timeout)  # the last one in flight

        try:
            while True:
                # The idle clock only runs while nothing is in flight: a client waiting
                # for a slow forwarded answer is not idle.
                try:
                    async with asyncio.timeout(None if pending else idle_timeout) as idle:
                        prefix = await reader.readexactly(2)
                        idle.reschedule(loop.time() + idle_timeout)
                        data = await reader.readexactly(struct.unpack("!H", prefix)[0])
                finally:
                    idle = None
                reply = fast(data, host, True)
                if reply is not None:
                    send(reply)
                else:
                    await slots.acquire()
                    task = loop.create_task(answer(data))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if not await drained():
                    break
                # Queries already buffered are read without suspending: yield after each,
                # so many busy connections take turns with each other and with UDP.
                await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            open_connections[0] -= 1
            trimmer.closed(open_connections[0])
            try:
                if pending and not transport.is_closing():
                    # The client may have half-closed after its last query: it still
                    # gets the answers (each bounded by the forwarding budget).
                    await asyncio.wait(pending)
                    await drained()
            except ConnectionError:
                pass
            finally:
                for task in pending:
                    task.cancel()
                writer.close()

    return handle
