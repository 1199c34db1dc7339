"""systemd's side of the daemons' protocols, for the tests that play it: a notify socket
that records every message with its sender's PID and a dead upstream (fixtures of a
pytest plugin, `systemd_notify` and `dead_upstream`, registered in conftest.py), an
environment without the protocol variables, and the `serve` command line and query those
tests run under `systemd-socket-activate`."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.support.ports import silent_port

OVERRIDE = "registry-1.docker.io"
ADDRESS = "10.0.0.5"
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Message:
    fields: dict[str, str]
    pid: int


class NotifySocket:
    """Stands in for systemd's notify socket; records every message and who sent it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # systemd reads SCM_CREDENTIALS to enforce NotifyAccess=main; so do we.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float = 20.0) -> Message:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])[0]
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
        return Message(fields, pid)

    def next_with(self, key: str, timeout: float = 20.0) -> Message:
        """The next message carrying `key`, skipping watchdog pings and the like."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.1, deadline - time.monotonic()))
            if key in message.fields:
                return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd_notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify")
    try:
        yield listener
    finally:
        listener.close()


@pytest.fixture
def dead_upstream() -> Iterator[str]:
    """A loopback port the test holds and never reads: these tests only ask for
    overridden names, and nothing may go to the machine's real resolver. Not a port found
    free and released: that was later handed out as the test client's own source port,
    and the daemon's upstream probe, arriving there, failed the client's query."""
    with silent_port() as address:
        yield address


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any systemd protocol variable it may have."""
    prefixes = ("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def serve_command(zones: Path, dead_upstream: str, *extra: str) -> list[str]:
    """`dnsoverride serve` with JSON logs, forwarding only to `dead_upstream`."""
    return [
        sys.executable, "-m", "dnsoverride", "serve", "--zones", str(zones),
        "--upstream", dead_upstream, "--log-format", "json", *extra,
    ]  # fmt: skip


def ask(port: int, tcp: bool = False, timeout: float = 2.0, host: str = "127.0.0.1") -> str:
    """The address `OVERRIDE`'s A query gets from the server on `port`."""
    query = dns.message.make_query(OVERRIDE, dns.rdatatype.A)
    send = dns.query.tcp if tcp else dns.query.udp
    response = send(query, host, port=port, timeout=timeout)
    (rrset,) = response.answer
    return str(rrset[0])


def ask_until_answered(port: int, deadline: float) -> str:
    """`ask`, retried until `deadline` (monotonic) while nobody answers yet."""
    while True:
        try:
            return ask(port, timeout=1.0)
        except (dns.exception.Timeout, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise


def listening_sockets(pid: int) -> set[tuple[str, str]]:
    """(protocol, local address) of the listening/unconnected sockets `pid` holds."""
    output = subprocess.run(
        ["ss", "-H", "-l", "-n", "-p", "-t", "-u"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    found = set()
    for line in output.splitlines():
        if f"pid={pid}," in line:
            columns = line.split()
            found.add((columns[0], columns[4]))
    return found
