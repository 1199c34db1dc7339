"""dnsoverride.systemd against a real AF_UNIX datagram socket and systemd-socket-activate."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dnsoverride.common import systemd
from tests.support.ports import free_port


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, with $NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def _fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_notify_sends_all_fields_in_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.notify("READY=1", "STATUS=serving 12 names") is True
    assert _fields(notify_socket) == ["READY=1", "STATUS=serving 12 names"]


def test_notify_keeps_one_assignment_per_line(notify_socket: socket.socket) -> None:
    assert systemd.notify("STATUS=reload failed:\nzones/a.yaml:3: bad A", "READY=1")
    assert _fields(notify_socket) == ["STATUS=reload failed: zones/a.yaml:3: bad A", "READY=1"]


def test_notify_to_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"dnsoverride-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1") is True
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_to_missing_socket_reports_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


def test_notify_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.notify_reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = _fields(notify_socket)
    assert fields[0] == "RELOADING=1"
    key, _, value = fields[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid == "self":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    elif pid == "other":
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() == expected


async def test_watchdog_pinger_pings_at_half_the_timeout(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notify_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(systemd.watchdog_pinger())
    try:
        start = loop.time()
        for _ in range(3):
            message = await asyncio.wait_for(loop.sock_recv(notify_socket, 4096), 5)
            assert message == b"WATCHDOG=1"
        elapsed = loop.time() - start
    finally:
        task.cancel()
    # Three pings span two intervals: neither spamming nor late.
    assert 0.15 <= elapsed < 2.0


async def test_watchdog_pinger_returns_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.watchdog_pinger(), 1)
    assert systemd.start_watchdog() is None


async def test_start_watchdog_runs_the_pinger(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notify_socket.setblocking(False)
    task = systemd.start_watchdog()
    assert task is not None
    try:
        message = await asyncio.wait_for(
            asyncio.get_running_loop().sock_recv(notify_socket, 4096), 5
        )
    finally:
        task.cancel()
    assert message == b"WATCHDOG=1"


def test_inherited_sockets_empty_when_not_activated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert systemd.inherited_sockets() == []


def test_inherited_sockets_ignores_another_process_fds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    assert systemd.inherited_sockets() == []
    # Unset either way, as sd_listen_fds(unset_environment=1) does.
    assert "LISTEN_FDS" not in os.environ
    assert "LISTEN_PID" not in os.environ


@pytest.mark.e2e
def test_inherited_sockets_rejects_a_descriptor_that_is_no_socket() -> None:
    # In a child: fd 3 is /dev/null there, and wrapping fds must not touch pytest's own.
    child = textwrap.dedent(
        """
        import os
        from dnsoverride.common.errors import UserError
        from dnsoverride.common.systemd import inherited_sockets

        os.dup2(os.open(os.devnull, os.O_RDONLY), 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
        try:
            inherited_sockets()
        except UserError as error:
            print(error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True, timeout=30
    )
    assert "LISTEN_FDS=1, but fd 3 is not a socket" in result.stdout


# The child reports what inherited_sockets() returned over the sockets themselves:
# it answers the first datagram on the UDP socket and the first connection on the TCP one.
_CHILD = textwrap.dedent(
    """
    import json, os, socket
    from dnsoverride.common.systemd import inherited_sockets

    sockets = inherited_sockets()
    report = json.dumps({
        "sockets": [[s.family.name, s.type.name, s.getsockname()[1]] for s in sockets],
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }).encode()
    for s in sockets:
        if s.type == socket.SOCK_DGRAM:
            _, peer = s.recvfrom(512)
            s.sendto(report, peer)
        else:
            conn, _ = s.accept()
            conn.sendall(report)
            conn.close()
    """
)


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd")
@pytest.mark.timeout(30)
@pytest.mark.e2e
def test_inherited_sockets_under_systemd_socket_activate(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    # systemd-socket-activate passes through descriptors it inherited, so nesting a
    # datagram activator around a stream one hands the child UDP on fd 3, TCP on fd 4,
    # which is what dnsoverride.socket does.
    command = [
        "systemd-socket-activate", "--datagram", "-l", address, "--",
        "systemd-socket-activate", "-l", address, "--",
        sys.executable, "-c", _CHILD,
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        udp_report = _udp_exchange(port)
        tcp_report = _tcp_exchange(port)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
    assert udp_report == tcp_report
    report = json.loads(udp_report)
    assert report["sockets"] == [
        ["AF_INET", "SOCK_DGRAM", port],
        ["AF_INET", "SOCK_STREAM", port],
    ]
    assert report["env_left"] == []


def _udp_exchange(port: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            udp.sendto(b"hello", ("127.0.0.1", port))
            try:
                return udp.recv(4096)
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise AssertionError("no reply on the activated UDP socket")


def _tcp_exchange(port: int) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as tcp:
                chunks = []
                while chunk := tcp.recv(4096):
                    chunks.append(chunk)
                return b"".join(chunks)
        except ConnectionRefusedError:
            time.sleep(0.05)
    raise AssertionError("no reply on the activated TCP socket")
