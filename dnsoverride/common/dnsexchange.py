"""One DNS message exchanged with a server over UDP or TCP, as bytes: what the registry's
upstream resolver (common/resolve.py) and the DNS forwarder's TCP retry share. Imports no
HTTP client (the DNS server loads it only when a configuration needs one).
"""

from __future__ import annotations

import asyncio
import struct


class _UdpExchange(asyncio.DatagramProtocol):
    """One query over UDP: resolves with the first datagram that is a reply to it."""

    def __init__(self, server: tuple[str, int], query_id: int) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._server = server
        self._query_id = query_id

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        # Spoofing defence: only the server we asked, only our ID.
        if (
            addr[:2] == self._server
            and len(data) >= 2
            and struct.unpack("!H", data[:2])[0] == self._query_id
            and not self.reply.done()
        ):
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.reply.done():
            self.reply.set_exception(exc)


async def exchange_udp(server: tuple[str, int], packet: bytes, query_id: int) -> bytes:
    """One DNS message over UDP and the first reply from `server` with `query_id`."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(server, query_id), remote_addr=server
    )
    try:
        transport.sendto(packet)
        return await protocol.reply
    finally:
        transport.close()


async def exchange_tcp(server: tuple[str, int], packet: bytes) -> bytes:
    """One DNS message over TCP (two-byte length prefix, RFC 7766) and the reply's bytes;
    the forwarder's TCP retry uses it too."""
    reader, writer = await asyncio.open_connection(*server)
    try:
        writer.write(struct.pack("!H", len(packet)) + packet)
        await writer.drain()
        (length,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(length)
    finally:
        writer.close()
