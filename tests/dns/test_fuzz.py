"""Fuzzing the running server: 10^6 mutated UDP packets and 10^4 mutated TCP frames, with
probe queries in between.

The server must not crash, must not log a traceback, must keep its RSS bounded, and
must answer >= 95 % of the probes correctly within 100 ms while the fuzz runs. The
mutator is seeded: the seed is printed (and in every failure message); rerun with
`DNS_FUZZ_SEED=<seed>` to reproduce. Marked `fuzz` (about two minutes on 2 cores):
`pytest -m "not fuzz"` skips it in a quick loop; CI runs it.

The fuzz comes from 127.0.0.2 and the probes from 127.0.0.1, with response rate limiting
per address (`ipv4_prefix: 32`, nothing exempt): the fuzz is rate limited as a flood
would be, the probes are not.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rdatatype
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dns_load import Probes, rss_kib
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

UDP_PACKETS = 1_000_000
TCP_FRAMES = 10_000
RATE = 12_000  # UDP packets per second
PROBE_SHARE = 0.95
PROBE_WITHIN = 0.1  # seconds
RSS_GROWTH_KIB = 150_000


def _corpus() -> list[bytes]:
    """Valid and nearly valid messages the mutations start from."""
    names = ["registry-1.docker.io", "Www.Fwd.Test", "a.b.c.d.e.f.fwd.test", ".", "x.nx.test"]
    types = ["A", "AAAA", "TXT", "ANY", "HTTPS", "AXFR", "SOA", "MX", "TYPE65280", "NS"]
    corpus = []
    for name in names:
        for rdtype in types:
            for edns in (-1, 0, 1):
                query = dns.message.make_query(
                    name, dns.rdatatype.from_text(rdtype), use_edns=edns, want_dnssec=edns == 0
                )
                corpus.append(query.to_wire())
        cookie = dns.message.make_query(
            name, "A", use_edns=0, options=[dns.edns.CookieOption(os.urandom(8), b"")]
        )
        corpus.append(cookie.to_wire())
        padded = dns.message.make_query(
            name,
            "A",
            use_edns=0,
            options=[dns.edns.GenericOption(dns.edns.OptionType.PADDING, bytes(40))],
        )
        corpus.append(padded.to_wire())
        response = dns.message.make_response(dns.message.make_query(name, "A"))
        corpus.append(response.to_wire())
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    corpus.append(header + b"\xc0\x0c\x00\x01\x00\x01")  # a pointer to itself
    corpus.append(header + b"\x3f" + b"a" * 63 + b"\x00\x00\x01\x00\x01")
    corpus.append(struct.pack("!HHHHHH", 8, 0x2800, 1, 0, 0, 0) + b"\x00\x00\x06\x00\x01")  # UPDATE
    return corpus


class Mutator:
    """Seeded mutations of corpus messages: byte flips, interesting values, counts and
    label lengths rewritten, truncation, extension, splices, compression pointers."""

    INTERESTING = (0x00, 0x01, 0x3F, 0x40, 0x7F, 0x80, 0xBF, 0xC0, 0xC1, 0xFF)

    def __init__(self, seed: int, corpus: list[bytes]) -> None:
        self.random = random.Random(seed)
        self.corpus = corpus
        self._mutations: list[Callable[[bytearray], None]] = [
            self._flip,
            self._interesting,
            self._count,
            self._truncate,
            self._extend,
            self._splice,
            self._pointer,
            self._flags,
        ]

    def packets(self) -> Iterator[bytes]:
        """Endless mutated messages."""
        choice = self.random.choice
        while True:
            packet = bytearray(choice(self.corpus))
            for _ in range(self.random.randint(1, 4)):
                if packet:
                    choice(self._mutations)(packet)
            yield bytes(packet)

    def _at(self, packet: bytearray) -> int:
        return self.random.randrange(len(packet))

    def _flip(self, packet: bytearray) -> None:
        packet[self._at(packet)] ^= 1 << self.random.randrange(8)

    def _interesting(self, packet: bytearray) -> None:
        packet[self._at(packet)] = self.random.choice(self.INTERESTING)

    def _count(self, packet: bytearray) -> None:
        if len(packet) >= 12:
            offset = self.random.choice((4, 6, 8, 10))
            packet[offset : offset + 2] = struct.pack(
                "!H", self.random.choice((0, 1, 2, 255, 65535))
            )

    def _truncate(self, packet: bytearray) -> None:
        del packet[self._at(packet) :]

    def _extend(self, packet: bytearray) -> None:
        packet += self.random.randbytes(self.random.randint(1, 64))

    def _splice(self, packet: bytearray) -> None:
        other = self.random.choice(self.corpus)
        packet[self._at(packet) :] = other[self.random.randrange(len(other)) :]

    def _pointer(self, packet: bytearray) -> None:
        at = self._at(packet)
        packet[at : at + 2] = bytes((0xC0 | self.random.randrange(64), self.random.randrange(256)))

    def _flags(self, packet: bytearray) -> None:
        if len(packet) >= 4:
            packet[2] = self.random.randrange(256)
            packet[3] = self.random.randrange(256)


def _fuzz_udp(server: DnsPeer, packets: Iterator[bytes], count: int, rate: float) -> float:
    """Send `count` packets at `rate` per second from 127.0.0.2; seconds it took."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.2", 0))
        sock.setblocking(False)
        address = (server.host, server.port)
        started = time.monotonic()
        sent = 0
        while sent < count:
            due = min(count, int((time.monotonic() - started) * rate) + 100)
            while sent < due:
                try:
                    sock.sendto(next(packets), address)
                except BlockingIOError:
                    break
                except OSError:  # ICMP errors for earlier packets: not ours to mind
                    pass
                sent += 1
            while True:  # replies are read and dropped
                try:
                    sock.recv(65535)
                except (BlockingIOError, ConnectionRefusedError):
                    break
            time.sleep(0.002)
        return time.monotonic() - started


def _fuzz_tcp(server: DnsPeer, packets: Iterator[bytes], frames: int, seed: int) -> None:
    """`frames` length-prefixed mutated messages over many short connections, some with
    a lying length prefix, some closed mid-frame; answers are read when they come."""
    chooser = random.Random(seed + 1)
    sent = 0
    while sent < frames:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            burst = []
            for _ in range(chooser.randint(1, 50)):
                packet = next(packets)
                length = len(packet)
                if chooser.random() < 0.05:
                    length = chooser.randrange(65536)  # lies about its length
                burst.append(struct.pack("!H", length) + packet)
            sent += len(burst)
            data = b"".join(burst)
            if chooser.random() < 0.1:
                data = data[: chooser.randrange(len(data))]  # closed mid-frame
            try:
                sock.sendall(data)
                sock.settimeout(0.05)
                while sock.recv(65535):
                    pass
            except (TimeoutError, ConnectionError):
                pass


def _counters(port: int) -> dict[str, float]:
    """The error and rate-limit counters, summed per metric and label value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    wanted = ("query_errors", "ratelimited", "queries_total", "upstream_failures")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if any(word in sample.name for word in wanted) and sample.name.endswith("_total"):
                label = sample.labels.get("kind") or sample.labels.get("action")
                label = label or sample.labels.get("rcode") or sample.labels.get("reason", "")
                key = f"{sample.name.removeprefix('dnsoverride_dns_')}{{{label}}}"
                found[key] = found.get(key, 0) + sample.value
    return found


@pytest.mark.fuzz
@pytest.mark.timeout(600)
def test_fuzz_udp_and_tcp_with_probes(tmp_path: Path) -> None:
    seed = int(os.environ.get("DNS_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    print(f"DNS_FUZZ_SEED={seed}")
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(
        "records:\n"
        "  registry-1.docker.io: {A: [10.0.0.5, 10.0.0.6], AAAA: fd00::5, TXT: hello}\n"
        "  '*.apps.test': {CNAME: www.fwd.test.}\n"
        "  alias.test: {CNAME: registry-1.docker.io.}\n"
    )
    metrics = free_port()
    config = "ratelimit: {rate: 1000, ipv4_prefix: 32, exempt: []}\ntcp: {idle_timeout: 1.0}\n"
    with (
        dnsmasq(
            tmp_path, "--address=/fwd.test/192.0.2.1", "--address=/nx.test/", "--local-ttl=300"
        ) as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{metrics}", config=config
        ) as server,
    ):
        pid = server.process.pid
        server.query("www.fwd.test")
        baseline = rss_kib(pid)
        peak = [baseline]
        stop = threading.Event()

        def watch_rss() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], rss_kib(pid))

        watcher = threading.Thread(target=watch_rss, daemon=True)
        watcher.start()
        packets = Mutator(seed, _corpus()).packets()
        with Probes(server, ["registry-1.docker.io", "www.fwd.test", "x.apps.test"]) as probes:
            seconds = _fuzz_udp(server, packets, UDP_PACKETS, RATE)
            _fuzz_tcp(server, packets, TCP_FRAMES, seed)
        stop.set()
        watcher.join()
        alive = server.process.poll() is None
        final = server.query("registry-1.docker.io", tcp=True)
        log_text = server.log_text()
        counters = _counters(metrics)
    events = Counter(
        json.loads(line)["event"] for line in log_text.splitlines() if line.startswith("{")
    )
    context = (
        f"seed {seed}: {probes.summary()}, RSS {baseline} -> {peak[0]} KiB, {seconds:.0f} s "
        f"of UDP; log events {dict(events)}; {counters}"
    )
    print(context)
    assert alive, context
    assert "Traceback" not in log_text, context
    assert len(final.answer[0]) == 2, context
    assert probes.success_within(PROBE_WITHIN) >= PROBE_SHARE, context
    assert peak[0] - baseline < RSS_GROWTH_KIB, context
    assert len(log_text) < 2_000_000, context  # throttled, not a line per packet
