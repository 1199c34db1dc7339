"""A load client that costs the server's peer almost nothing: whole-body GETs over
keep-alive connections whose bodies are discarded in the kernel (`recv` with `MSG_TRUNC`
on a TCP socket drops the bytes without copying them to user space), so the server is
what limits the rate, not the client.

Each connection is a process of its own (blocking socket, no event loop). Every response
is checked: the status must be 200 and exactly Content-Length body bytes must arrive
(a connection closed early, or no byte for `stall` seconds, counts as a failure); the
bench fails on any failure instead of counting it as served. The server's CPU time is
read from /proc (user + system of the process and of its children: nginx's workers), so
CPU per request is the server's own.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

_HEAD_LIMIT = 64 << 10
# Bodies are discarded with MSG_TRUNC: this anonymous mapping is only the kernel's nominal
# target and is never written, so its pages are never touched (never resident).
_DISCARD = 64 << 20
# No byte for this long is a failure: a server that sends a short body on a connection it
# keeps open would otherwise hang the bench instead of failing it.
STALL = 10.0


@dataclass
class Load:
    requests: int = 0
    body_bytes: int = 0
    failures: int = 0
    first_failure: str = ""
    seconds: float = 0.0

    def add(self, other: Load) -> None:
        self.requests += other.requests
        self.body_bytes += other.body_bytes
        self.failures += other.failures
        self.first_failure = self.first_failure or other.first_failure
        self.seconds = max(self.seconds, other.seconds)


class ResponseError(Exception):
    pass


def _one(
    sock: socket.socket, request: bytes, expected: int, head: bytearray, discard: mmap.mmap
) -> int:
    """Send one GET and discard its body; the body's length. ResponseError when the
    status is not 200 or the body is not `expected` bytes."""
    sock.sendall(request)
    view = memoryview(head)
    filled = 0
    while (end := head.find(b"\r\n\r\n", 0, filled)) < 0:
        if filled == len(head):
            raise ResponseError("response head larger than 64 KiB")
        got = sock.recv_into(view[filled:])
        if got == 0:
            raise ResponseError("connection closed before the response head")
        filled += got
    lines = bytes(head[:end]).decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    # A status line not at the start: bytes past the previous body's Content-Length.
    if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
        raise ResponseError(f"status line {lines[0]!r}")
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length != expected:
        raise ResponseError(f"Content-Length {length}, expected {expected}")
    remaining = length - (filled - end - 4)
    if remaining < 0:
        raise ResponseError("more bytes than Content-Length")
    while remaining:
        got = sock.recv_into(discard, min(remaining, _DISCARD), socket.MSG_TRUNC)
        if got == 0:
            raise ResponseError(f"connection closed {remaining} bytes short")
        remaining -= got
    return length


def _client(
    port: int,
    path: str,
    expected: int,
    start_at: float,
    seconds: float,
    stall: float,
    conn: Connection,
) -> None:
    load = Load()
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    head = bytearray(_HEAD_LIMIT)
    discard = mmap.mmap(-1, _DISCARD)
    sock = socket.create_connection(("127.0.0.1", port), timeout=stall)
    time.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    deadline = started + seconds
    try:
        while time.perf_counter() < deadline:
            load.body_bytes += _one(sock, request, expected, head, discard)
            load.requests += 1
    except (ResponseError, OSError) as error:
        load.failures += 1
        load.first_failure = f"{path}: {error}"
    finally:
        sock.close()
    load.seconds = time.perf_counter() - started
    conn.send(load)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and of its (live) child processes."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(child) for child in children.read_text().split()]
    for one in pids:
        fields = Path(f"/proc/{one}/stat").read_text().rpartition(")")[2].split()
        # fields[11], [12]: utime, stime (the 14th and 15th of stat(5), after pid and comm)
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


@dataclass
class Measured:
    load: Load
    cpu: float  # server CPU seconds during the load

    @property
    def mbps(self) -> float:
        return self.load.body_bytes / self.load.seconds / 1e6

    @property
    def rps(self) -> float:
        return self.load.requests / self.load.seconds

    @property
    def cpu_per_request_us(self) -> float:
        return self.cpu / max(self.load.requests, 1) * 1e6


def measure(
    server_pid: int,
    port: int,
    path: str,
    expected: int,
    clients: int,
    seconds: float,
    stall: float = STALL,
) -> Measured:
    """`clients` connections GETting `path` (`expected` bytes) for `seconds`."""
    context = multiprocessing.get_context("fork")
    start_at = time.time() + 0.3  # every client connected before the clock starts
    pipes, processes = [], []
    for _ in range(clients):
        parent, child = context.Pipe(duplex=False)
        process = context.Process(
            target=_client, args=(port, path, expected, start_at, seconds, stall, child)
        )
        process.start()
        pipes.append(parent)
        processes.append(process)
    time.sleep(max(0.0, start_at - time.time()))
    before = cpu_seconds(server_pid)
    total = Load()
    for pipe in pipes:
        total.add(pipe.recv())
    cpu = cpu_seconds(server_pid) - before
    for process in processes:
        process.join()
    return Measured(total, cpu)
