"""UDP and TCP listeners: bytes in, bytes out, nothing else.

UDP is an `asyncio.DatagramProtocol`: a cache hit is answered inside
`datagram_received` without creating a task; so is a cold forwarding miss begun (its
reply sent from the forwarder's callback, `Resolver.miss`); any other query becomes a
task. On Linux its transport reads and sends in batches (udpbatch.py), asking `fast`
itself and handing the rest to `not_fast`. TCP reads length-prefixed messages (several
per connection, answered concurrently and out of order, RFC 7766) until the client goes
quiet, and closes a client that does not read its answers; cache hits are answered
from the same answer cache as UDP. Neither knows anything about DNS beyond the framing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
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
        self.fast = resolver.fast  # bound once: the hot path is a handful of lookups
        self._miss = resolver.miss
        self._tasks = tasks
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDPTransport implements DatagramTransport without subclassing it.
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._send = self._transport.sendto
        self._loop = asyncio.get_running_loop()  # once: a getpid() per call on Python 3.11

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            reply = self.fast(data, addr[0])
        except Exception:  # a bug on the fast path: `resolve` answers, logs and counts it
            reply = None
        if reply is not None:
            if reply:  # b"": dropped by the rate limit
                self._send(reply, addr)
            return
        self.not_fast(data, addr)

    def not_fast(self, data: bytes, addr: Any) -> None:
        """Answer a query `fast` did not: a forwarding miss begun, or a task."""
        try:
            taken = self._miss(data, addr, self._reply)
        except Exception:  # a bug: `resolve` answers, logs and counts it
            taken = False
        if not taken:
            self._tasks.add(self._loop.create_task(self._slow(data, addr)))

    def _reply(self, reply: bytes, addr: Any) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.sendto(reply, addr)

    async def _slow(self, data: bytes, addr: Any) -> None:
        try:
            reply = await self._resolver.resolve(data, addr[0], tcp=False)
            if reply is not None:
                self._reply(reply, addr)
        finally:
            # Itself, rather than a done callback: one loop callback less per query.
            self._tasks.discard(asyncio.current_task(self._loop))

    def reply_dropped(self) -> None:
        """A reply the batched transport's full send queue could not take (udpbatch.py)."""
        self._resolver.stats.udp_dropped += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client gone); nothing to do but note it.
        log.debug("udp_error", error=str(exc))


# Replies queued in our buffer beyond which the reading loop waits for the client to read
# (asyncio's default high-water mark); the hard bound is `tcp.max_queued`.
WRITE_HIGH_WATER = 16384
# The kernel's send buffer for a DNS connection: enough for a largest reply in flight;
# without it, autotuning lets one client that never reads pin megabytes of kernel memory.
SEND_BUFFER = 65536
# StreamReader buffer limit: reading pauses at twice this (a DNS message is <= 64 KiB,
# and readexactly() reads on past the limit).
READ_LIMIT = 8192


class TcpListener:
    """The `asyncio.start_server` callback for DNS over TCP (RFC 7766): one `_Connection`
    per client, at most `limits.max_connections` at once (a new one beyond that is closed
    at once); after a burst of connections the freed heap is given back to the system
    (common/heaptrim.py).

    Queries pipelined on one connection are answered concurrently, each as soon as it is
    ready (out of order): an answer-cache hit at once, a forwarded one when the upstream
    replies. At most `limits.pipeline` queries of one connection are in flight (reading
    stops until one finishes), and a connection with nothing in flight and no complete
    query for `limits.idle_timeout` seconds is closed (RFC 7766 6.2.3: seconds, not
    minutes).

    A client that sends but does not read its answers: once `WRITE_HIGH_WATER` bytes of
    replies wait for it, its queries are no longer read; if they still wait
    `limits.idle_timeout` seconds later, or more than `limits.max_queued` bytes pile up
    (answers in flight finishing), the connection is aborted and its buffers freed.
    """

    def __init__(self, resolver: Resolver, limits: TcpConfig) -> None:
        self._resolver = resolver
        self._limits = limits
        self._open = 0
        self._trimmer = HeapTrimmer()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._limits.max_connections:
            self._resolver.stats.tcp_refused += 1
            writer.close()
            return
        self._open += 1
        self._trimmer.opened(self._open)
        await _Connection(self, reader, writer).serve()

    def reading_ended(self) -> None:
        """A connection stopped reading queries (its last answers may still be going out)."""
        self._open -= 1
        self._trimmer.closed(self._open)


class _Connection:
    """One client's TCP connection: the reading loop and the answers in flight."""

    def __init__(
        self, listener: TcpListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._listener = listener
        self._resolver = listener._resolver
        limits = listener._limits
        self._idle_timeout = limits.idle_timeout
        self._max_queued = limits.max_queued
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        peer = writer.get_extra_info("peername")
        self._host = peer[0] if peer else ""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._slots = asyncio.Semaphore(limits.pipeline)
        self._pending: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.Timeout | None = None

    async def serve(self) -> None:
        fast = self._resolver.fast
        host = self._host
        try:
            while True:
                data = await self._query()
                reply = fast(data, host, True)
                if reply is not None:
                    self._send(reply)
                else:
                    await self._slots.acquire()
                    task = self._loop.create_task(self._answer(data))
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
                if not await self._drained():
                    break
                # Queries already buffered are read without suspending: yield after each,
                # so many busy connections take turns with each other and with UDP.
                await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._listener.reading_ended()
            await self._finish()

    async def _query(self) -> bytes:
        """The next length-prefixed query. The idle clock only runs while nothing is in
        flight: a client waiting for a slow forwarded answer is not idle."""
        timeout = self._idle_timeout
        try:
            async with asyncio.timeout(None if self._pending else timeout) as idle:
                self._idle = idle
                prefix = await self._reader.readexactly(2)
                idle.reschedule(self._loop.time() + timeout)
                return await self._reader.readexactly(struct.unpack("!H", prefix)[0])
        finally:
            self._idle = None

    async def _finish(self) -> None:
        """The client may have half-closed after its last query: it still gets the
        answers in flight (each bounded by the forwarding budget), then the close."""
        try:
            if self._pending and not self._transport.is_closing():
                await asyncio.wait(self._pending)
                await self._drained()
        except ConnectionError:
            pass
        finally:
            for task in self._pending:
                task.cancel()
            self._writer.close()

    def _send(self, reply: bytes) -> None:
        if self._transport.is_closing():
            return
        # One write per answer: concurrent answers never interleave.
        self._writer.write(struct.pack("!H", len(reply)) + reply)
        if self._transport.get_write_buffer_size() > self._max_queued:
            self._stalled()

    def _stalled(self) -> None:
        if not self._transport.is_closing():
            self._resolver.stats.tcp_stalled += 1
            log.debug("tcp_client_not_reading", client=self._host)
            self._transport.abort()  # drops what is queued, now

    async def _drained(self) -> bool:
        """Whether the client read its answers within the idle timeout."""
        if self._transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
            return not self._transport.is_closing()
        try:
            async with asyncio.timeout(self._idle_timeout):
                await self._writer.drain()
        except TimeoutError:
            self._stalled()
            return False
        return not self._transport.is_closing()

    async def _answer(self, data: bytes) -> None:
        try:
            reply = await self._resolver.resolve(data, self._host, tcp=True)
            if reply is not None:
                self._send(reply)
        finally:
            self._slots.release()
            idle = self._idle
            if len(self._pending) == 1 and idle is not None and not idle.expired():
                idle.reschedule(self._loop.time() + self._idle_timeout)  # the last in flight
