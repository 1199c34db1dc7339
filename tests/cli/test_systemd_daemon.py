"""The daemons speaking the systemd protocols, observed the way systemd sees them:
notify messages on a real AF_UNIX datagram socket (with the sender's credentials), and
sockets passed in by `systemd-socket-activate`."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support.ports import free_port
from tests.support.systemd import (
    ADDRESS,
    OVERRIDE,
    NotifySocket,
    ask,
    ask_until_answered,
    clean_env,
    listening_sockets,
    serve_command,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def zones(tmp_path: Path) -> Path:
    directory = tmp_path / "zones"
    directory.mkdir()
    (directory / "ci.yaml").write_text(f"records:\n  {OVERRIDE}:\n    A: {ADDRESS}\n")
    return directory


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.timeout(60)
def test_serve_notifies_ready_reloading_and_stopping(
    tmp_path: Path, zones: Path, systemd_notify: NotifySocket, dead_upstream: str
) -> None:
    port = free_port()
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            serve_command(zones, dead_upstream, "--listen", f"127.0.0.1:{port}"),
            env=clean_env(NOTIFY_SOCKET=str(systemd_notify.path)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = systemd_notify.next()
        # READY=1 is the first thing systemd hears, from the main process itself
        # (NotifyAccess=main), and it comes with a one-line status.
        assert ready.fields.get("READY") == "1", ready
        assert ready.pid == process.pid
        assert ready.fields.get("STATUS")
        # READY means ready: the very first query, with no retry, is answered.
        assert ask(port, timeout=1.0) == ADDRESS
        assert ask(port, tcp=True, timeout=1.0) == ADDRESS

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        process.send_signal(signal.SIGHUP)
        reloading = systemd_notify.next_with("RELOADING")
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading.fields["RELOADING"] == "1"
        assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
        assert reloading.pid == process.pid
        reloaded = systemd_notify.next_with("READY")
        assert reloaded.fields["READY"] == "1"
        assert ask(port) == ADDRESS

        process.send_signal(signal.SIGTERM)
        stopping = systemd_notify.next_with("STOPPING")
        assert stopping.fields["STOPPING"] == "1"
        assert process.wait(timeout=15) == 0
    finally:
        _stop(process)


@pytest.mark.timeout(60)
def test_serve_pings_the_watchdog(
    tmp_path: Path, zones: Path, systemd_notify: NotifySocket, dead_upstream: str
) -> None:
    port = free_port()
    env = clean_env(NOTIFY_SOCKET=str(systemd_notify.path), WATCHDOG_USEC="400000")
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            serve_command(zones, dead_upstream, "--listen", f"127.0.0.1:{port}"),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        systemd_notify.next_with("READY")
        start = time.monotonic()
        pings = [systemd_notify.next_with("WATCHDOG", timeout=2.0) for _ in range(3)]
        elapsed = time.monotonic() - start
        assert all(p.fields["WATCHDOG"] == "1" and p.pid == process.pid for p in pings)
        # Every 0.2 s (half of WATCHDOG_USEC): three pings in well under the 0.4 s timeout each.
        assert elapsed < 1.5
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        finally:
            _stop(process)


@pytest.mark.timeout(60)
def test_registry_notifies_pings_and_survives_reload(
    tmp_path: Path, systemd_notify: NotifySocket, dead_upstream: str
) -> None:
    port = free_port()
    command = [
        sys.executable, "-m", "dnsoverride", "registry", "--storage", str(tmp_path / "store"),
        "--listen", f"127.0.0.1:{port}", "--upstream", f"http://{dead_upstream}",
        "--log-format", "json",
    ]  # fmt: skip
    env = clean_env(NOTIFY_SOCKET=str(systemd_notify.path), WATCHDOG_USEC="400000")
    with (tmp_path / "registry.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = systemd_notify.next_with("READY")
        assert ready.pid == process.pid
        assert ready.fields.get("STATUS")
        # READY means the API answers now, without a retry.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as answer:
            assert answer.status == 200
        pings = [systemd_notify.next_with("WATCHDOG", timeout=2.0) for _ in range(2)]
        assert all(p.pid == process.pid for p in pings)
        # `systemctl reload` (ExecReload=kill -HUP) must never kill it, TLS or not, and
        # systemd hears RELOADING=1 then READY=1 so the reload job completes.
        process.send_signal(signal.SIGHUP)
        assert systemd_notify.next_with("RELOADING").fields["RELOADING"] == "1"
        reloaded = systemd_notify.next_with("READY")
        assert reloaded.fields["STATUS"] == "nothing to reload"
        systemd_notify.next_with("WATCHDOG", timeout=2.0)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert systemd_notify.next_with("STOPPING").fields["STOPPING"] == "1"
        assert process.wait(timeout=15) == 0
    finally:
        _stop(process)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("listen", "clients"),
    [
        ("127.0.0.1:{port}", ("127.0.0.1",)),
        # Exactly as dnsoverride.socket binds: `ListenDatagram=53` is [::]:53, dual-stack,
        # so IPv4 clients arrive as ::ffff:a.b.c.d and must still pass the ACL.
        ("{port}", ("127.0.0.1", "::1")),
    ],
    ids=["ipv4", "dual-stack"],
)
def test_serve_on_sockets_from_systemd_socket_activate(
    tmp_path: Path,
    zones: Path,
    systemd_notify: NotifySocket,
    dead_upstream: str,
    listen: str,
    clients: tuple[str, ...],
) -> None:
    port = free_port()
    address = listen.format(port=port)
    # As dnsoverride.socket does it: UDP on fd 3, TCP on fd 4, same port. The nested
    # activator passes the outer one's datagram socket through. No --listen: the daemon
    # must not bind anything itself (its default listen address stays free). The
    # activator passes on only PATH, TERM, USER, HOME and what -E names.
    command = [
        "systemd-socket-activate", "--datagram", "-l", address, "--",
        "systemd-socket-activate", "-l", address, "-E", f"NOTIFY_SOCKET={systemd_notify.path}",
        "--", *serve_command(zones, dead_upstream),
    ]  # fmt: skip
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            command,
            env=clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # The activator starts the daemon on the first datagram; that query waits in the
        # socket's queue and is answered once the daemon serves the inherited socket.
        # Retried because a datagram sent before the activator has bound the port is lost.
        assert ask_until_answered(port, deadline=time.monotonic() + 30) == ADDRESS
        ready = systemd_notify.next_with("READY")
        assert ready.pid == process.pid  # the activators exec, so systemd's pid is ours
        for client in clients:
            assert ask(port, host=client) == ADDRESS
            assert ask(port, host=client, tcp=True) == ADDRESS
        listening = listening_sockets(process.pid)
        assert {proto for proto, local in listening if local.endswith(f":{port}")} == {
            "udp",
            "tcp",
        }
        # It bound nothing of its own (the default listen address is 127.0.0.1:5353).
        assert not any(local.endswith(":5353") for _, local in listening), listening
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        _stop(process)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
@pytest.mark.timeout(60)
def test_registry_on_a_socket_from_systemd_socket_activate(
    tmp_path: Path, systemd_notify: NotifySocket, dead_upstream: str
) -> None:
    """The registry serves a TCP socket passed by socket activation, through the same
    lifecycle as serve (before, it ignored LISTEN_FDS and bound its own `listen`)."""
    port = free_port()
    own = free_port()  # its `--listen`: must stay unbound under socket activation
    command = [
        "systemd-socket-activate", "-l", f"127.0.0.1:{port}",
        "-E", f"NOTIFY_SOCKET={systemd_notify.path}", "--",
        sys.executable, "-m", "dnsoverride", "registry", "--storage", str(tmp_path / "store"),
        "--listen", f"127.0.0.1:{own}", "--upstream", f"http://{dead_upstream}",
        "--log-format", "json",
    ]  # fmt: skip
    with (tmp_path / "registry.log").open("wb") as log:
        process = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        # The activator starts the registry on the first connection, which waits in the
        # socket's backlog and is answered once the registry serves the inherited socket.
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=20) as answer:
                    assert answer.status == 200
                break
            except (ConnectionRefusedError, urllib.error.URLError):
                assert time.monotonic() < deadline, "never answered"
                time.sleep(0.1)
        assert systemd_notify.next_with("READY").pid == process.pid
        listening = listening_sockets(process.pid)
        assert any(local.endswith(f":{port}") for proto, local in listening if proto == "tcp")
        assert not any(local.endswith(f":{own}") for _, local in listening), listening
        process.send_signal(signal.SIGTERM)
        assert systemd_notify.next_with("STOPPING").fields["STOPPING"] == "1"
        assert process.wait(timeout=15) == 0
    finally:
        _stop(process)
