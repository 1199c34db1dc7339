"""UDP and TCP listeners: bytes in, bytes out, nothing else.

UDP is a plain `asyncio.DatagramProtocol`: a cache hit is answered inside
`datagram_received` without creating a task; a miss becomes a task. TCP reads
length-prefixed messages (several per connection, RFC 7766) until the client goes
quiet. Neither knows anything about DNS beyond the framing.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import structlog

from dnsoverride.dns.resolver import Resolver

log = structlog.get_logger(__name__)

TCP_IDLE_TIMEOUT = 10.0


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

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self._fast(data, addr[0])
        if reply is not None:
            self._send(reply, addr)
            return
        task = asyncio.get_running_loop().create_task(self._slow(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _slow(self, data: bytes, addr: Any) -> None:
        reply = await self._resolver.resolve(data, addr[0], tcp=False)
        if reply is not None and self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (client gone); nothing to do but note it.
        log.debug("udp_error", error=str(exc))


TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def tcp_handler(resolver: Resolver) -> TcpHandler:
    """The `asyncio.start_server` callback for DNS over TCP."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else ""
        try:
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                (length,) = struct.unpack("!H", prefix)
                data = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_TIMEOUT)
                reply = await resolver.resolve(data, host, tcp=True)
                if reply is None:
                    continue
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return handle
