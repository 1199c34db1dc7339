"""Load for DNS tests and benchmarks: a paced UDP packet flood, probe queries measured
beside it, a burst of identical queries (what comes back, in bytes), and TCP clients
that send but never read.

    with Probes(server, ["registry-1.docker.io"]) as probes:
        flood(server, packets, rate=10_000, seconds=5)
    assert probes.success_within(0.05) >= 0.95

Probes run in their own thread, one query every `interval` seconds from their own
socket, and record each one's round trip (None when no reply came within `timeout`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

import dns.message
import dns.query
import dns.rcode

from tests.support.peers import DnsPeer


def flood(
    server: DnsPeer,
    packets: Iterable[bytes],
    *,
    rate: float,
    seconds: float,
    source: str = "127.0.0.1",
) -> int:
    """Send `packets` (cycled) at `rate` per second for `seconds`; returns how many were
    sent. Replies are read and discarded so the socket's buffer never fills."""
    sent = 0
    batch = max(1, int(rate / 200))  # paced in 5 ms steps
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.setblocking(False)
        started = time.monotonic()
        stream = itertools.cycle(packets)
        while (elapsed := time.monotonic() - started) < seconds:
            due = int(elapsed * rate) - sent
            for packet in itertools.islice(stream, max(0, min(due, batch * 4))):
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(packet, (server.host, server.port))
                sent += 1
            _discard(sock)
            if due < batch:
                time.sleep(0.001)
    return sent


def _discard(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65535)
        except (BlockingIOError, ConnectionRefusedError):
            return


class Probes:
    """Valid queries sent beside a load, with their round-trip times."""

    def __init__(
        self,
        server: DnsPeer,
        names: Iterable[str],
        *,
        interval: float = 0.02,
        timeout: float = 1.0,
    ) -> None:
        self._server = server
        self._names = itertools.cycle(list(names))
        self._interval = interval
        self._timeout = timeout
        self.times: list[float | None] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probes:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            name = next(self._names)
            query = dns.message.make_query(name, "A")
            started = time.monotonic()
            try:
                reply = dns.query.udp(query, self._server.host, self._timeout, self._server.port)
            except (dns.exception.Timeout, OSError, dns.query.BadResponse):
                self.times.append(None)
                continue
            self.times.append(time.monotonic() - started)
            if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
                self.wrong.append(f"{name}: {dns.rcode.to_text(reply.rcode())}")

    def success_within(self, seconds: float) -> float:
        """The share of probes answered (correctly) within `seconds`."""
        good = sum(1 for took in self.times if took is not None and took <= seconds)
        return (good - len(self.wrong)) / len(self.times) if self.times else 0.0

    def summary(self) -> str:
        """For assertion messages: count, answered, p50/p99 in ms, wrong answers."""
        answered = sorted(took for took in self.times if took is not None)

        def percentile(share: float) -> str:
            if not answered:
                return "-"
            return f"{answered[min(len(answered) - 1, int(share * len(answered)))] * 1000:.1f}"

        return (
            f"{len(self.times)} probes, {len(answered)} answered, p50 {percentile(0.5)} ms, "
            f"p99 {percentile(0.99)} ms, wrong {self.wrong[:3]}"
        )


@dataclass
class Burst:
    """What a burst of identical UDP queries got back."""

    sent: int
    seconds: float  # from the first query sent to the last reply received
    full: int  # answers with records
    truncated: int  # empty TC replies
    bytes_in: int  # query octets sent
    bytes_out: int  # reply octets received
    largest: int
    largest_truncated: int

    @property
    def factor(self) -> float:
        return self.bytes_out / self.bytes_in


def burst(
    server: DnsPeer, query: bytes, count: int, *, settle: float = 0.5, ports: int = 1
) -> Burst:
    """Send `query` `count` times as fast as the sockets take it (fresh IDs), from `ports`
    source ports in turn (one address: one client prefix), then read replies until none
    has come for `settle` seconds."""
    full = truncated = bytes_out = largest = largest_truncated = 0
    last = started = time.monotonic()
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(ports):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, (8 << 20) // ports)
            sock.setblocking(False)
            socks.append(sock)

        def read() -> None:
            nonlocal full, truncated, bytes_out, largest, largest_truncated, last
            for sock in socks:
                while True:
                    try:
                        reply = sock.recv(65535)
                    except BlockingIOError:
                        break
                    last = time.monotonic()
                    bytes_out += len(reply)
                    largest = max(largest, len(reply))
                    if reply[2] & 0x02:
                        truncated += 1
                        largest_truncated = max(largest_truncated, len(reply))
                    elif struct.unpack_from("!H", reply, 6)[0]:
                        full += 1

        for index in range(count):
            packet = struct.pack("!H", index) + query[2:]
            while True:
                try:
                    socks[index % ports].sendto(packet, (server.host, server.port))
                    break
                except BlockingIOError:
                    read()
            if index % 64 == 0:
                read()
        while time.monotonic() - last < settle:
            read()
            time.sleep(0.01)
    return Burst(
        count,
        last - started,
        full,
        truncated,
        count * len(query),
        bytes_out,
        largest,
        largest_truncated,
    )


def _framed_query(query_id: int, name: str, rdtype: str) -> bytes:
    wire = dns.message.make_query(name, rdtype, id=query_id).to_wire()
    return struct.pack("!H", len(wire)) + wire


def non_readers(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections to host:port with a 4 KiB receive buffer, for `press`."""
    clients = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
        sock.connect((host, port))
        sock.setblocking(False)
        clients.append(sock)
    return clients


def press(
    clients: list[socket.socket], seconds: float, name: str = "big.test", rdtype: str = "TXT"
) -> dict[socket.socket, float]:
    """Send `name rdtype` queries on every client as fast as each takes them, never
    reading, for up to `seconds`; returns when each one was closed by the server
    (seconds from start)."""
    selector = selectors.DefaultSelector()
    for sock in clients:
        selector.register(sock, selectors.EVENT_WRITE)
    closed: dict[socket.socket, float] = {}
    payload = b"".join(_framed_query(index, name, rdtype) for index in range(50))
    started = time.monotonic()
    while len(closed) < len(clients) and time.monotonic() - started < seconds:
        for key, _ in selector.select(timeout=0.1):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            try:
                sock.send(payload)
            except BlockingIOError:
                continue
            except OSError:  # reset or broken pipe: the server closed it
                closed[sock] = time.monotonic() - started
                selector.unregister(sock)
        # A connection whose send queue is full gets no write event: poll it for a reset.
        for sock in clients:
            if sock in closed:
                continue
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            state = _tcp_state(sock)
            if error or state in (7, 8):  # CLOSE, CLOSE_WAIT
                closed[sock] = time.monotonic() - started
                selector.unregister(sock)
    selector.close()
    return closed


def _tcp_state(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and every process below it (a server's
    workers), in seconds (Linux)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for process, used in times.items():
        ancestor = process
        while ancestor > 1 and ancestor != pid:
            ancestor = parents.get(ancestor, 0)
        if ancestor == pid:
            total += used
    return total


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
