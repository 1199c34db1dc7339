"""Load for DNS tests: a paced UDP packet flood and probe queries measured beside it.

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
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType

import dns.message
import dns.query
import dns.rcode

from tests.peers import DnsPeer


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


def rss_kib(pid: int) -> int:
    """Resident set size of process `pid` in KiB (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    """Open file descriptors of process `pid`."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def chunks(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    """`items` in lists of `size`."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
