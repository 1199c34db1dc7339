"""Queries a client can make fail: an answer (FORMERR, REFUSED) and a throttled log line,
never a traceback per packet, and the server keeps answering everyone else.

Reproduces issue 10 item 6: a query name over 255 octets made the slow path log ~2 KB
of traceback per packet (dnslib parses such a name but cannot pack it back), also for
clients outside `allow` (their REFUSED reply echoes the question); at 2,000 packets/s
that was 25.6 MB of log in 10 s and a quarter of the probe queries lost. The test
fails on the code before the fix (tracebacks in the log, no FORMERR).
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import dns.rcode
import pytest

from tests.support.dns_load import Probes, flood
from tests.support.metrics import scrape
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

LONG_NAME = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00"  # 321 octets
FLOOD_RATE = 10_000  # packets per second
FLOOD_SECONDS = 4.0
LOG_INTERVAL = 60.0  # `failure_log_interval`: one line per kind for the whole test


def _packet(query_id: int, *, opcode: int = 0, name: bytes = LONG_NAME) -> bytes:
    flags = 0x0100 | (opcode << 11)
    return struct.pack("!HHHHHH", query_id, flags, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"


def _ask(server: DnsPeer, packet: bytes, source: str) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(2)
        sock.sendto(packet, (server.host, server.port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


@pytest.mark.timeout(90)
def test_long_names_and_refused_clients_cost_an_answer_not_a_traceback(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text("records:\n  registry-1.docker.io: {A: 10.0.0.5}\n")
    metrics = free_port()
    config = f"allow: [127.0.0.1/32]\nfailure_log_interval: {LOG_INTERVAL}\n"
    with (
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", "--local-ttl=300") as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{metrics}", config=config
        ) as server,
    ):
        # One of each: a FORMERR with the ID echoed, from an allowed and a refused client,
        # for an ordinary query and one that takes the parsed path (opcode 1).
        for source in ("127.0.0.1", "127.0.0.2"):
            for opcode in (0, 1):
                reply = _ask(server, _packet(0xABCD, opcode=opcode), source)
                assert reply is not None, (source, opcode)
                assert reply[:2] == b"\xab\xcd" and reply[2] & 0x80
                assert reply[3] & 0x0F == dns.rcode.FORMERR, (source, opcode, reply[:4])
        server.query("www.fwd.test")  # cached: the probes measure the server, not dnsmasq
        bad = [_packet(index, opcode=index % 2) for index in range(64)]
        with Probes(server, ["registry-1.docker.io", "www.fwd.test"]) as probes:
            sent = flood(server, bad, rate=FLOOD_RATE / 2, seconds=FLOOD_SECONDS)
            sent += flood(
                server, bad, rate=FLOOD_RATE / 2, seconds=FLOOD_SECONDS, source="127.0.0.2"
            )
        malformed = scrape(metrics).get(
            ("dnsoverride_dns_query_errors_total", (("kind", "malformed"),)), 0.0
        )
        log_text = server.log_text()
    assert "Traceback" not in log_text
    assert probes.success_within(0.05) >= 0.95, probes.summary()
    events = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    lines = [event for event in events if event["event"] == "query_malformed"]
    assert len(lines) == 1, lines  # one per interval, however many packets
    assert "255" in lines[0]["error"]
    assert len(log_text) < 20_000
    # Counted, every one that reached the server (the kernel may drop a few under load).
    assert malformed >= 0.8 * (sent + 4), (malformed, sent)
