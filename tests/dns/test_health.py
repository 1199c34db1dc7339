"""dnsoverride.health: `health:` parsing, the fall/rise state machine, and real probes.

The probes run against real TLS and TCP servers on loopback, with certificates made by the
test; the monitor test stops and restarts those servers and waits for the flips.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from dnsoverride.dns.health import HealthMonitor, Prober, TargetState
from dnsoverride.dns.zones.health import (
    DEFAULT_EXPECT,
    GatedOverride,
    HealthCheck,
    HealthSpecError,
    parse_health,
)
from tests.support.transparent_certs import CertAuthority, make_ca

NAME = "registry.health.test"


class TlsServer:
    """A real HTTPS server on loopback that records the SNI and Host it was sent."""

    def __init__(self, cert: Path, key: Path, status: int = 401) -> None:
        self.status = status
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.sni_callback = self._record_sni
        self._runner: web.AppRunner | None = None

    def _record_sni(
        self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        self.sni.append(name)

    async def _v2(self, request: web.Request) -> web.Response:
        self.hosts.append(request.host)
        return web.Response(status=self.status, text="{}")

    async def start(self, host: str, port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/v2/", self._v2)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=self.context).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return make_ca(tmp_path)


@pytest.fixture
async def server(tmp_path: Path, ca: CertAuthority) -> AsyncIterator[TlsServer]:
    cert, key = ca.issue(tmp_path, "server", NAME)
    tls = TlsServer(cert, key)
    yield tls
    await tls.stop()


def https_check(port: int, ca: CertAuthority, **overrides: object) -> HealthCheck:
    fields: dict[str, object] = {
        "kind": "https",
        "port": port,
        "path": "/v2/",
        "expect": frozenset({200, 401}),
        "ca_file": ca.cert_file,
        "interval": 0.05,
        "timeout": 2.0,
        "fall": 2,
        "rise": 2,
    }
    fields.update(overrides)
    return HealthCheck(**fields)  # type: ignore[arg-type]


# --- parsing -----------------------------------------------------------------------------


def test_parse_https_url_with_defaults(tmp_path: Path, ca: CertAuthority) -> None:
    check = parse_health(
        NAME,
        {
            "https": f"https://{NAME.upper()}:8443/v2/",
            "expect": [200, 401],
            "ca": ca.cert_file.name,
        },
        tmp_path,
    )
    assert check == HealthCheck(
        kind="https",
        port=8443,
        path="/v2/",
        expect=frozenset({200, 401}),
        ca_file=tmp_path / ca.cert_file.name,
    )


def test_parse_tcp_and_durations(tmp_path: Path) -> None:
    check = parse_health(
        NAME,
        {"tcp": 443, "interval": "1.5s", "timeout": "500ms", "fall": 1, "rise": 4},
        tmp_path,
    )
    assert (check.kind, check.port, check.interval, check.timeout) == ("tcp", 443, 1.5, 0.5)
    assert (check.fall, check.rise, check.expect) == (1, 4, DEFAULT_EXPECT)


def test_parse_path_only_https_defaults_to_443(tmp_path: Path) -> None:
    check = parse_health(NAME, {"https": "/v2/?probe=1"}, tmp_path)
    assert (check.port, check.path) == (443, "/v2/?probe=1")


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        (NAME, "tcp 443", "must be a mapping"),
        (NAME, {"tcp": 443, "https": "/v2/"}, "exactly one of"),
        (NAME, {}, "exactly one of"),
        (NAME, {"tcp": 443, "intervall": 5}, "unknown health key(s) intervall"),
        (NAME, {"tcp": 70000}, "port number"),
        (NAME, {"tcp": 443, "expect": 200}, "expect only applies to https"),
        (NAME, {"https": "https://other.test/v2/"}, "is not the overridden name"),
        (NAME, {"https": "http://" + NAME + "/"}, "https:// URL"),
        (NAME, {"https": "/v2/", "expect": [200, 999]}, "HTTP status"),
        (NAME, {"tcp": 443, "interval": "soon"}, "duration like"),
        (NAME, {"tcp": 443, "interval": 0}, "greater than zero"),
        (NAME, {"tcp": 443, "fall": 0}, "at least 1"),
        (NAME, {"tcp": 443, "rise": True}, "at least 1"),
        (NAME, {"tcp": 443, "interval": 1, "timeout": 2}, "not be longer than its interval"),
        (NAME, {"https": "/v2/", "ca": "missing.crt"}, "not a readable PEM CA"),
        ("*.apps.test", {"tcp": 443}, "wildcard"),
    ],
)
def test_parse_rejects_with_reason(tmp_path: Path, name: str, raw: object, reason: str) -> None:
    with pytest.raises(HealthSpecError, match=None) as caught:
        parse_health(name, raw, tmp_path)
    assert reason in str(caught.value)


# --- state machine -------------------------------------------------------------------------


def test_target_flips_after_fall_failures_and_rise_successes() -> None:
    state = TargetState()
    state = state.advance(False, fall=3, rise=2)
    state = state.advance(False, fall=3, rise=2)
    assert state.up
    state = state.advance(True, fall=3, rise=2)  # a success resets the failure streak
    for _ in range(2):
        state = state.advance(False, fall=3, rise=2)
    assert state.up
    state = state.advance(False, fall=3, rise=2)
    assert not state.up
    state = state.advance(True, fall=3, rise=2)
    assert not state.up
    state = state.advance(True, fall=3, rise=2)
    assert state == TargetState(up=True, streak=0)


# --- probes against real servers ---------------------------------------------------------


async def test_https_probe_pins_address_and_sends_name(
    server: TlsServer, ca: CertAuthority
) -> None:
    port = await server.start("127.0.0.1")
    prober = Prober(NAME, https_check(port, ca))
    try:
        assert await prober.probe("127.0.0.1") is None
    finally:
        await prober.close()
    assert server.sni == [NAME]
    assert server.hosts == [f"{NAME}:{port}"]


async def test_https_probe_rejects_unexpected_status(server: TlsServer, ca: CertAuthority) -> None:
    server.status = 503
    port = await server.start("127.0.0.1")
    prober = Prober(NAME, https_check(port, ca))
    try:
        assert await prober.probe("127.0.0.1") == "HTTP status 503"
    finally:
        await prober.close()


async def test_https_probe_verifies_certificate_against_ca(
    tmp_path: Path, server: TlsServer
) -> None:
    port = await server.start("127.0.0.1")
    stranger = make_ca(tmp_path / "stranger")
    prober = Prober(NAME, https_check(port, stranger))
    try:
        failure = await prober.probe("127.0.0.1")
    finally:
        await prober.close()
    assert failure is not None
    assert "certificate verify failed" in failure
    assert server.hosts == []  # no request was sent over the unverified connection


async def test_https_probe_rereads_the_ca_file_when_it_changes(
    tmp_path: Path, server: TlsServer, ca: CertAuthority
) -> None:
    port = await server.start("127.0.0.1")
    stranger = make_ca(tmp_path / "stranger")
    ca_file = tmp_path / "trusted-ca.pem"
    ca_file.write_bytes(stranger.cert_file.read_bytes())
    prober = Prober(NAME, https_check(port, ca, ca_file=ca_file))
    try:
        assert "certificate verify failed" in (await prober.probe("127.0.0.1") or "")
        # Replaced by a rename (a new inode), as configuration management does it.
        staged = tmp_path / "trusted-ca.pem.new"
        staged.write_bytes(ca.cert_file.read_bytes())
        staged.replace(ca_file)
        assert await prober.probe("127.0.0.1") is None
        # A broken file keeps the last good CA, and says so once.
        with structlog.testing.capture_logs() as logs:
            ca_file.write_text("not a certificate\n")
            assert await prober.probe("127.0.0.1") is None
            assert await prober.probe("127.0.0.1") is None
        assert [entry["event"] for entry in logs] == ["health_ca_unusable"]
        # Rewritten in place (same inode). The kernel stamps mtimes from a coarse clock,
        # so a rewrite within the same tick is made visible by moving the mtime on.
        inode = ca_file.stat().st_ino
        ca_file.write_bytes(stranger.cert_file.read_bytes())
        stamp = ca_file.stat().st_mtime_ns + 1_000_000_000
        os.utime(ca_file, ns=(stamp, stamp))
        assert ca_file.stat().st_ino == inode
        assert "certificate verify failed" in (await prober.probe("127.0.0.1") or "")
    finally:
        await prober.close()


async def test_https_probe_verifies_certificate_name(tmp_path: Path, ca: CertAuthority) -> None:
    cert, key = ca.issue(tmp_path, "wrong", "some-other-name.test")
    wrong = TlsServer(cert, key)
    port = await wrong.start("127.0.0.1")
    prober = Prober(NAME, https_check(port, ca))
    try:
        failure = await prober.probe("127.0.0.1")
    finally:
        await prober.close()
        await wrong.stop()
    assert failure is not None
    assert "certificate verify failed" in failure


async def test_probes_fail_on_closed_port(ca: CertAuthority) -> None:
    with_socket = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = with_socket.sockets[0].getsockname()[1]
    tcp = Prober(NAME, HealthCheck(kind="tcp", port=port, timeout=1.0))
    assert await tcp.probe("127.0.0.1") is None
    with_socket.close()
    await with_socket.wait_closed()
    tcp_failure = await tcp.probe("127.0.0.1")
    https = Prober(NAME, https_check(port, ca))
    https_failure = await https.probe("127.0.0.1")
    await https.close()
    assert tcp_failure is not None
    assert "refused" in tcp_failure.lower()
    assert https_failure is not None


async def test_tcp_probe_times_out_on_silent_address() -> None:
    # A listener that never accepts, with its backlog filled: further SYNs are dropped and
    # the probe's connect hangs, without sending anything off the host.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        prober = Prober(NAME, HealthCheck(kind="tcp", port=port, timeout=0.3))
        failure = await prober.probe("127.0.0.1")
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert failure == "no answer within 0.3s"


# --- the monitor ---------------------------------------------------------------------------


async def poll_until(predicate: Callable[[], bool]) -> None:
    """Poll with a deadline for a state change that has no event of its own."""
    async with asyncio.timeout(10):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def next_change(changes: asyncio.Queue[frozenset[str]]) -> frozenset[str]:
    async with asyncio.timeout(10):
        return await changes.get()


async def test_monitor_withdraws_only_when_every_target_fails(
    tmp_path: Path, ca: CertAuthority
) -> None:
    cert, key = ca.issue(tmp_path, "pair", NAME)
    first, second = TlsServer(cert, key), TlsServer(cert, key)
    port = await first.start("127.0.0.2")
    await second.start("127.0.0.3", port)
    changes: asyncio.Queue[frozenset[str]] = asyncio.Queue()
    monitor = HealthMonitor(changes.put_nowait)
    override = GatedOverride(NAME, https_check(port, ca), ("127.0.0.2", "127.0.0.3"))
    registry = CollectorRegistry()
    registry.register(monitor.collector())
    try:
        with structlog.testing.capture_logs() as logs:
            monitor.update([override])
            await first.stop()
            await poll_until(lambda: not monitor.states()[NAME]["127.0.0.2"].up)
            assert monitor.withdrawn == frozenset()
            assert changes.empty()

            await second.stop()
            assert await next_change(changes) == {NAME}
            assert monitor.withdrawn == {NAME}
            scrape = generate_latest(registry).decode()
            assert f'dnsoverride_override_withdrawn{{name="{NAME}"}} 1.0' in scrape
            assert (
                f'dnsoverride_health_target_up{{address="127.0.0.3",name="{NAME}"}} 0.0' in scrape
            )

            # Reloading the same zone data keeps the state; the name stays withdrawn.
            monitor.update([override])
            assert monitor.withdrawn == {NAME}

            await second.start("127.0.0.3", port)
            assert await next_change(changes) == frozenset()
        events = [entry["event"] for entry in logs]
        assert events.count("health_target_down") == 2
        assert events.count("override_withdrawn") == 1
        assert events.count("override_restored") == 1
        down = next(entry for entry in logs if entry["event"] == "health_target_down")
        assert down["name"] == NAME
        assert down["failures"] == 2
        assert down["reason"]
        scrape = generate_latest(registry).decode()
        assert f'dnsoverride_override_withdrawn{{name="{NAME}"}} 0.0' in scrape
        assert f'dnsoverride_health_flips_total{{address="127.0.0.3",name="{NAME}"}} 2.0' in scrape
    finally:
        await monitor.close()
        await first.stop()
        await second.stop()


async def test_monitor_drops_names_no_longer_gated(ca: CertAuthority) -> None:
    changes: asyncio.Queue[frozenset[str]] = asyncio.Queue()
    monitor = HealthMonitor(changes.put_nowait)
    # Nothing listens on this port: the name goes down after `fall` probes.
    dead = HealthCheck(kind="tcp", port=9, interval=0.05, timeout=1.0, fall=1, rise=1)
    try:
        monitor.update([GatedOverride(NAME, dead, ("127.0.0.1",))])
        assert await next_change(changes) == {NAME}
        monitor.update([])
        assert await next_change(changes) == frozenset()
        assert monitor.states() == {}
    finally:
        await monitor.close()
