"""Loopback ports for the peers a test starts, chosen so that nothing else is given them.

A port found free and released (bind to port 0, close) comes from the kernel's ephemeral
range, the same range every client socket's source port comes from: dnspython's queries,
the daemon's own upstream queries, every connect(), and every other test suite on the
machine doing the same. Released, it was soon handed to one of them: the "dead upstream"
of a socket-activation test became the test client's own source port (the daemon's probe
then arrived at the client, which raised UnexpectedSource), and a stopped peer's port
could be some other suite's new peer, answering for it.

So `free_port` chooses from below the ephemeral range (`ip_local_port_range`), where the
kernel never hands out a port by itself, at random, never the same one twice in a
process, and checks it can be bound for both UDP and TCP (DNS uses both) at that moment.
A port that must stay dead while a test runs is `silent_port`: bound by the test for its
whole life, so nobody can be given it, and never read (UDP waits out its timeout; TCP,
bound but not listening, refuses).
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import Iterator
from pathlib import Path

_LOWEST = 10000  # above the registered services people run on a CI host
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(family: socket.AddressFamily, host: str, port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(family, kind) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host`, outside the ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    top = _ephemeral_start()
    for _ in range(200):
        port = random.randrange(_LOWEST, top)
        if port in _given or not _bindable(family, host, port):
            continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {_LOWEST}-{top - 1} on {host}")


@contextlib.contextmanager
def silent_port(host: str = "127.0.0.1") -> Iterator[str]:
    """`host:port` of a port this test holds and never reads: a dead upstream nobody else
    can be given while the test runs."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as udp, socket.socket(family) as tcp:
        for _ in range(50):
            port = free_port(host)
            try:
                udp.bind((host, port))
                tcp.bind((host, port))
            except OSError:
                continue
            break
        else:
            raise RuntimeError("no port to hold")
        yield f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
