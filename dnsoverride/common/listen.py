"""Listening sockets the daemons bind themselves, for an IP address, and hand to the event
loop (`sock=`) rather than asking it for host and port.

asyncio's create_server(host, port) looks the host up with getaddrinfo even when it is an
IP address. On uvloop that lookup runs on libuv's thread pool, which starts 4 threads that
then idle for the daemon's life, and it imports the idna codec to encode the host: 0.5 MB
of an idle `serve` (issue 13). A socket bound here needs neither. A host name (an admin
listener on `localhost`) is still looked up by the loop, which binds each of its
addresses.
"""

from __future__ import annotations

import ipaddress
import socket


def is_ip_address(host: str) -> bool:
    """Whether `host` is an IP address (IPv6 with or without a `%zone`), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bound_socket(
    host: str, port: int, kind: socket.SocketKind, *, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking socket of `kind` (SOCK_DGRAM or SOCK_STREAM) bound to the IP address
    `host` and `port`, not yet listening; OSError (the socket closed) when it cannot be.

    Set as asyncio's create_server sets its own: IPv6-only for an IPv6 address (so that
    `[::]` and `0.0.0.0` can be bound side by side), SO_REUSEADDR for TCP (a restart binds
    over the last run's connections in TIME_WAIT); SO_REUSEPORT when `reuse_port` (several
    processes serve one port, the kernel spreads the clients).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
