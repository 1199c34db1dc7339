"""Health-gated overrides in `dnsoverride serve`, over real sockets.

The override's target is a TCP listener the test opens and closes; the upstream is a real
dnsmasq that knows the real address. While the target is down the name must be forwarded
(also from the raw answer cache), when it is back the override must return, a zone reload
must carry the health state along, and the state must show in /metrics and the logs.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.rdatatype
import pytest

from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve
from tests.support.ports import free_port
from tests.support.waits import poll

NAME = "gated.test"
ALIAS = "alias.test"  # a CNAME to the gated name follows it out of local data
TARGET = "127.0.0.1"
REAL = "192.0.2.44"
INTERVAL, FALL, RISE = 0.2, 2, 2
WINDOW = FALL * (INTERVAL * 2) + 2.0  # FALL rounds of at most timeout + interval, plus slack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def zone(port: int, health: bool = True) -> str:
    entry = {"A": TARGET, "ttl": 1}
    if health:
        entry["health"] = {
            "tcp": port,
            "interval": INTERVAL,
            "timeout": INTERVAL,
            "fall": FALL,
            "rise": RISE,
        }
    records = {NAME: entry, ALIAS: {"CNAME": NAME + "."}, "plain.test": {"A": "10.9.9.9"}}
    return json.dumps({"records": records})


class Target:
    """A TCP listener on TARGET:port that can be closed and opened again."""

    def __init__(self) -> None:
        self.port = free_port(TARGET)
        self.sock: socket.socket | None = None

    def open(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((TARGET, self.port))
        self.sock.listen(64)  # the kernel completes handshakes; the probe needs no accept

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@pytest.fixture
def target() -> Iterator[Target]:
    listener = Target()
    listener.open()
    try:
        yield listener
    finally:
        listener.close()


def answers(server: DnsPeer, name: str = NAME) -> list[str]:
    reply = server.query(name, timeout=1.0)
    return sorted(
        item.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for item in rrset
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def test_failed_target_withdraws_the_override_until_it_recovers(
    tmp_path: Path, target: Target
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(zone(target.port))
    metrics = free_port()
    with (
        dnsmasq(tmp_path, "--local=/test/", f"--host-record={NAME},{REAL}") as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{metrics}"
        ) as server,
    ):
        assert answers(server) == [TARGET]
        assert answers(server) == [TARGET]  # now from the raw answer cache
        assert answers(server, ALIAS) == [TARGET]

        target.close()
        took = poll(lambda: answers(server) == [REAL], WINDOW)
        assert took <= WINDOW
        assert answers(server) == [REAL]  # the cached local answer is gone for good
        assert answers(server, ALIAS) == [REAL]
        assert [r.address for r in server.query("plain.test").answer[0]] == ["10.9.9.9"]
        page = scrape(metrics)
        assert f'dnsoverride_override_withdrawn{{name="{NAME}"}} 1.0' in page
        assert f'dnsoverride_health_target_up{{address="{TARGET}",name="{NAME}"}} 0.0' in page

        target.open()
        poll(lambda: answers(server) == [TARGET], RISE * INTERVAL * 2 + 2.0)
        assert f'dnsoverride_override_withdrawn{{name="{NAME}"}} 0.0' in scrape(metrics)

        # Withdrawn again, then the zone drops the health check: the override is back at
        # once, because the monitor follows every zone swap.
        target.close()
        poll(lambda: answers(server) == [REAL], WINDOW)
        (zones / "ci.yaml").write_text(zone(target.port, health=False))
        poll(lambda: answers(server) == [TARGET], 5.0)
        assert "dnsoverride_override_withdrawn{name=" not in scrape(metrics)

    events = [json.loads(line) for line in server.log_text().splitlines() if line.startswith("{")]
    withdrawn = [e for e in events if e["event"] == "override_withdrawn"]
    assert len(withdrawn) == 2
    assert withdrawn[0]["name"] == NAME
    assert withdrawn[0]["targets"] == [TARGET]
    down = next(e for e in events if e["event"] == "health_target_down")
    assert (down["name"], down["address"], down["failures"]) == (NAME, TARGET, FALL)
    assert "refused" in down["reason"].lower()
    assert [e["event"] for e in events].count("override_restored") == 1
