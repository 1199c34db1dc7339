"""Upstream health: active probes keep /readyz honest with no client traffic, and a dead
first upstream stops costing every query its attempt timeout once it is marked down."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rrset
import pytest

from dnsoverride.common.grammar import RESOLVER, parse_endpoint
from dnsoverride.dns import forwarder, wire
from dnsoverride.dns.config import ProbeConfig
from dnsoverride.dns.forwarder import DEMOTE_AFTER
from dnsoverride.dns.relay import Question
from dnsoverride.dns.stats import DnsStats
from tests.support.metrics import scrape
from tests.support.peers import dnsmasq, dnsoverride_serve, http_status, lying_upstream
from tests.support.ports import free_port
from tests.support.waits import poll

pytestmark = pytest.mark.e2e

ATTEMPT_TIMEOUT = 0.8  # the default `attempt_timeout`
PROBE_INTERVAL = ProbeConfig().interval
# A probe is due at most PROBE_INTERVAL after the change and takes at most one attempt.
NOTICED_WITHIN = PROBE_INTERVAL + ATTEMPT_TIMEOUT + 1.5


def _upstream_up(metrics_port: int, upstream: str) -> float | None:
    return scrape(metrics_port).get(("dnsoverride_dns_upstream_up", (("upstream", upstream),)))


@pytest.mark.timeout(60)
def test_readyz_follows_the_only_upstream_without_client_traffic(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    metrics_port = free_port()
    readyz = f"http://127.0.0.1:{metrics_port}/readyz"
    with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1") as upstream:
        port = upstream.port
        with dnsoverride_serve(
            tmp_path, zones, [upstream.address], "--metrics", f"127.0.0.1:{metrics_port}"
        ) as server:
            poll(lambda: http_status(readyz) == 200, NOTICED_WITHIN, every=0.05)
            upstream.stop()
            # Not one client query from here on: only the probes can notice.
            poll(lambda: http_status(readyz) == 503, NOTICED_WITHIN, every=0.05)
            with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", port=port):
                poll(lambda: http_status(readyz) == 200, NOTICED_WITHIN, every=0.05)
                reply = server.query("www.fwd.test")
                assert [str(rdata) for rrset in reply.answer for rdata in rrset] == ["192.0.2.1"]


@pytest.mark.timeout(60)
def test_a_dead_first_upstream_is_skipped_once_probed(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    metrics_port = free_port()
    # A black hole: a bound socket that never answers, so every attempt costs a timeout.
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole,
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1") as alive,
    ):
        hole.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{hole.getsockname()[1]}"
        with dnsoverride_serve(
            tmp_path, zones, [dead, alive.address], "--metrics", f"127.0.0.1:{metrics_port}"
        ) as server:
            poll(lambda: _upstream_up(metrics_port, dead) == 0, NOTICED_WITHIN, every=0.05)
            assert _upstream_up(metrics_port, alive.address) == 1
            for index in range(10):
                started = time.monotonic()
                reply = server.query(f"n{index}.fwd.test", timeout=5)
                took = time.monotonic() - started
                assert [str(rdata) for rrset in reply.answer for rdata in rrset] == ["192.0.2.1"]
                assert took < ATTEMPT_TIMEOUT / 2, f"query {index} took {took:.2f} s"
            assert http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 200
        asked = _drain(hole)
    # The dead upstream saw probes (and the startup poll's name), never the names above.
    assert "." in asked
    assert not [name for name in asked if name.endswith("fwd.test.")]


def _drain(hole: socket.socket) -> list[str]:
    """The names asked of a black-hole upstream so far."""
    hole.setblocking(False)
    asked = []
    while True:
        try:
            asked.append(dns.message.from_wire(hole.recv(65535)).question[0].name.to_text())
        except BlockingIOError:
            return asked


@pytest.mark.timeout(60)
def test_all_upstreams_down_servfail_at_once_then_answers_after_recovery(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    config = "probe: {name: Health.Example.}\n"
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Below the ephemeral range (tests/support/ports.py): between the hole's close and
        # dnsmasq's start, a source port the kernel hands out (the daemon's upstream
        # queries, dnspython's) could have been this one, and dnsmasq could not bind it.
        port = free_port()
        hole.bind(("127.0.0.1", port))
        dead = f"127.0.0.1:{port}"
        with dnsoverride_serve(tmp_path, zones, [dead], config=config) as server:
            # The first probe runs at start and times out: the only upstream is down.
            poll(lambda: "upstream_down" in server.log_text(), NOTICED_WITHIN, every=0.05)
            for index in range(10):
                started = time.monotonic()
                reply = server.query(f"n{index}.fwd.test", timeout=5)
                took = time.monotonic() - started
                assert reply.rcode() == dns.rcode.SERVFAIL
                assert took < 0.2, f"query {index} took {took:.2f} s"
            # Still asked, in the background, and probed with the configured name.
            wanted = {f"n{index}.fwd.test." for index in range(10)} | {"health.example."}
            asked: set[str] = set()

            def all_asked() -> bool:
                asked.update(_drain(hole))
                return wanted <= asked

            poll(all_asked, NOTICED_WITHIN, every=0.05)
            assert "." not in asked
            hole.close()
            with dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1", port=port):
                recovered = time.monotonic()
                while (
                    reply := server.query("n0.fwd.test", timeout=5)
                ).rcode() != dns.rcode.NOERROR:
                    assert time.monotonic() - recovered < NOTICED_WITHIN, "still SERVFAIL"
                    time.sleep(0.1)
                assert [str(rdata) for rrset in reply.answer for rdata in rrset] == ["192.0.2.1"]
    finally:
        hole.close()


SLOW_RATE = 2.0  # slow-name queries per second, as in the issue
LEGITIMATE = 15
LEGITIMATE_EVERY = 1.0  # seconds: sparse, so slow names time out in between


@pytest.mark.timeout(90)
def test_a_slow_name_does_not_take_the_only_upstream_down(tmp_path: Path) -> None:
    """Reproduces issue 10 item 5: with one upstream (a real dnsmasq) that forwards one
    zone to a black hole, 2 queries/s for names in that zone timed out one by one, each
    marked the upstream down (nothing else answered meanwhile), and while it was down
    every uncached lookup got SERVFAIL at once: 15 of 15 legitimate lookups failed and
    the upstream flapped 16 times (unbound answered all 15). Now a question's timeout
    costs only that question: a probe confirms the upstream is alive. Fails on the code
    before the fix."""
    zones = tmp_path / "zones"
    zones.mkdir()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))
        black_hole = f"127.0.0.1#{hole.getsockname()[1]}"
        with (
            dnsmasq(
                tmp_path,
                f"--server=/slow.test/{black_hole}",
                "--address=/fwd.test/192.0.2.1",
            ) as upstream,
            dnsoverride_serve(tmp_path, zones, [upstream.address]) as server,
        ):
            stop = threading.Event()
            slow_rcodes: list[int] = []

            def slow_names() -> None:
                for index in itertools.count():
                    if stop.wait(1 / SLOW_RATE):
                        return
                    query = dns.message.make_query(f"n{index}.slow.test", "A")
                    try:
                        reply = dns.query.udp(query, server.host, 5, server.port)
                    except dns.exception.Timeout:
                        continue
                    slow_rcodes.append(reply.rcode())

            slow = threading.Thread(target=slow_names)
            slow.start()
            try:
                time.sleep(2)  # the slow names are timing out by now
                rcodes = []
                for index in range(LEGITIMATE):
                    reply = server.query(f"legit{index}.fwd.test", timeout=5)
                    rcodes.append(dns.rcode.to_text(reply.rcode()))
                    time.sleep(LEGITIMATE_EVERY)
            finally:
                stop.set()
                slow.join()
            log_text = server.log_text()
    assert rcodes == ["NOERROR"] * LEGITIMATE
    assert slow_rcodes and set(slow_rcodes) == {dns.rcode.SERVFAIL}  # only they fail
    assert "upstream_down" not in log_text


class _ProbesOnly:
    """An upstream's replies: the health probe (`. NS`) and anything outside `fwd.test`
    answered, no question in `fwd.test` ever answered: a resolver whose own uplink is
    gone still answers what it has cached. Once `recovered`, it answers those with
    A 192.0.2.99."""

    def __init__(self) -> None:
        self.dropped = 0
        self.recovered = False

    def __call__(self, data: bytes, _tcp: bool) -> bytes | None:
        query = dns.message.from_wire(data)
        name = query.question[0].name
        reply = dns.message.make_response(query)
        if not name.is_subdomain(dns.name.from_text("fwd.test")):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif self.recovered:
            reply.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.99"))
        else:
            self.dropped += 1
            return None
        return reply.to_wire()


@pytest.mark.timeout(60)
def test_an_upstream_that_answers_probes_but_drops_questions_is_tried_last(
    tmp_path: Path,
) -> None:
    """The first upstream answers the probe but lets every client question time out; the
    second answers them. The probe kept the first one up and first in line, so every
    uncached query paid its attempt timeout (0.8 s each, for as long as it lasted; unbound
    with both as forward-addr: ~1 ms). Now an upstream that let DEMOTE_AFTER questions in
    a row time out that another upstream answered is tried after the others. Fails on
    the code before the fix (all 12 took 0.8 s)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    dropping = _ProbesOnly()
    with (
        lying_upstream(dropping) as first,
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1") as good,
        dnsoverride_serve(tmp_path, zones, [first.address, good.address]) as server,
    ):
        seconds = []
        for index in range(12):
            started = time.monotonic()
            reply = server.query(f"n{index}.fwd.test", timeout=5)
            seconds.append(time.monotonic() - started)
            assert reply.rcode() == dns.rcode.NOERROR
    slow = [s for s in seconds if s >= ATTEMPT_TIMEOUT * 0.9]
    assert len(slow) == DEMOTE_AFTER, seconds
    assert max(seconds[DEMOTE_AFTER:]) < 0.3, seconds
    assert dropping.dropped == DEMOTE_AFTER


async def test_a_demoted_upstream_is_tried_first_again_after_the_demotion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The forwarder itself, with a short demotion: after it, the next question goes to the
    demoted upstream first again, and one answer puts it back in its place."""
    monkeypatch.setattr(forwarder, "DEMOTION", 1.0)
    dropping = _ProbesOnly()
    with (
        lying_upstream(dropping) as first,
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1") as good,
    ):
        upstreams = (
            parse_endpoint(first.address, RESOLVER),
            parse_endpoint(good.address, RESOLVER),
        )
        ask = forwarder.Forwarder(
            upstreams,
            2.0,
            ATTEMPT_TIMEOUT,
            1232,
            DnsStats(),
            probe=ProbeConfig(),
            failure_log_interval=10.0,
        )

        async def first_address(name: str) -> str:
            reply = await ask.resolve(Question(wire.encode_name(name), 1, 1, False, False))
            (rrset,) = dns.message.from_wire(reply.wire).answer
            return str(rrset[0])

        for index in range(DEMOTE_AFTER):
            assert await first_address(f"d{index}.fwd.test") == "192.0.2.1"
        assert dropping.dropped == DEMOTE_AFTER
        assert await first_address("after.fwd.test") == "192.0.2.1"
        assert dropping.dropped == DEMOTE_AFTER  # not asked: tried last
        dropping.recovered = True
        await asyncio.sleep(1.0)  # the demotion runs out
        assert await first_address("again.fwd.test") == "192.0.2.99"
        assert await first_address("back.fwd.test") == "192.0.2.99"
