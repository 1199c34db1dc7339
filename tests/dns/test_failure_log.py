"""A dead upstream cannot flood the journal: `upstream_failed` at most once per upstream
per interval, with the count of failures suppressed since the previous event."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import dns.rcode
import pytest
from structlog.testing import capture_logs

from dnsoverride.dns.logthrottle import ThrottledLog
from tests.support.peers import dnsoverride_serve

QUERIES = 40
FAILURE_LOG_INTERVAL = 4.0  # configured: `failure_log_interval`


def _failure_events(log_text: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    return [event for event in events if event["event"] == "upstream_failed"]


@pytest.mark.timeout(60)
@pytest.mark.e2e
def test_dead_upstream_logs_one_event_per_interval_with_suppressed_count(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    # A port nobody listens on: every attempt fails at once (ICMP port unreachable).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{reserved.getsockname()[1]}"
    config = f"failure_log_interval: {FAILURE_LOG_INTERVAL}\n"
    with dnsoverride_serve(tmp_path, zones, [dead], config=config) as server:
        started = time.monotonic()
        for index in range(QUERIES):
            assert server.query(f"n{index}.example").rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < FAILURE_LOG_INTERVAL - 1  # all in one interval
        first = _failure_events(server.log_text())
        assert len(first) == 1, first
        assert first[0]["upstream"] == dead and first[0]["suppressed"] == 0
        # The next interval's first failure (a client's or a probe's) carries the count.
        deadline = time.monotonic() + FAILURE_LOG_INTERVAL + 5
        while len(events := _failure_events(server.log_text())) < 2:
            assert time.monotonic() < deadline, "no second upstream_failed event"
            time.sleep(0.1)
    suppressed = events[1]["suppressed"]
    assert isinstance(suppressed, int) and suppressed >= QUERIES  # plus the probes between
    assert len(events) == 2


def test_failure_log_is_per_upstream_and_counts_what_it_suppressed() -> None:
    now = [100.0]
    log = ThrottledLog("upstream_failed", interval=10.0, clock=lambda: now[0])

    def failed(upstream: str, reason: str, **fields: object) -> bool:
        return log.emit(upstream, upstream=upstream, reason=reason, **fields)

    with capture_logs() as logged:
        assert failed("a:53", "timeout")
        assert not failed("a:53", "timeout")
        assert not failed("a:53", "error")
        assert failed("b:53", "timeout")  # another upstream has its own budget
        now[0] = 109.9
        assert not failed("a:53", "timeout")
        now[0] = 110.0
        assert failed("a:53", "refused", name="x.example")
        now[0] = 121.0
        assert failed("a:53", "timeout")
    assert [(e["upstream"], e["reason"], e["suppressed"]) for e in logged] == [
        ("a:53", "timeout", 0),
        ("b:53", "timeout", 0),
        ("a:53", "refused", 3),
        ("a:53", "timeout", 0),
    ]
    assert logged[2]["name"] == "x.example"
