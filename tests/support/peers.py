"""Real DNS peers for tests: dnsmasq and unbound upstreams, and `dnsoverride serve` itself.

Each runs as a real process on a free loopback port and is stopped when its context
manager exits, whatever happened inside. Use them from fixtures:

    with dnsmasq(tmp_path, "--address=/forwarded.test/192.0.2.1") as upstream:
        with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
            server.query("forwarded.test")

`LyingUpstream` is the one peer that is not a real server: a loopback socket answering
with whatever bytes a test writes, for replies no real server sends.

Only 127.0.0.0/8 and ::1 are ever used.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from tests.support.ports import free_port

STARTUP_TIMEOUT = 15.0


@dataclass
class DnsPeer:
    """A running DNS server process on host:port."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        """`host:port` (bracketed for IPv6), as --upstream/--listen take it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def query(
        self,
        name: str,
        rdtype: str = "A",
        *,
        source: str | None = None,
        tcp: bool = False,
        timeout: float = 3.0,
        **make_query: object,
    ) -> dns.message.Message:
        """Ask this server with dnspython (from `source` when given, e.g. 127.0.0.2)."""
        message = dns.message.make_query(name, rdtype, **make_query)  # type: ignore[arg-type]
        if tcp:
            return dns.query.tcp(message, self.host, timeout, self.port, source=source)
        return dns.query.udp(message, self.host, timeout, self.port, source=source)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process and wait for it; kill it if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


def events(peer: DnsPeer, name: str) -> list[dict[str, Any]]:
    """The structlog events called `name` that `peer` has logged so far (JSON lines)."""
    found = []
    for line in peer.log_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def memory_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (`VmRSS`) and at its peak (`VmHWM`), in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def http_status(url: str) -> int:
    """The status a GET of `url` answers with (e.g. a daemon's /readyz), error codes too."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def wait_until_answers(peer: DnsPeer, timeout: float = STARTUP_TIMEOUT) -> None:
    """Poll until `peer` answers a query (any rcode) over UDP and TCP, or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.process.poll() is not None:
            raise AssertionError(
                f"{peer.name} exited ({peer.process.returncode}):\n{peer.log_text()}"
            )
        try:
            peer.query("ready.invalid", timeout=0.2)
            peer.query("ready.invalid", tcp=True, timeout=0.5)
        except (dns.exception.Timeout, OSError, EOFError, dns.query.BadResponse):
            # BadResponse: the late reply to an earlier attempt that timed out, landing on
            # a new client socket that the kernel gave the same ephemeral port.
            time.sleep(0.05)
            continue
        return
    raise AssertionError(f"{peer.name} did not answer within {timeout}s:\n{peer.log_text()}")


@contextlib.contextmanager
def running(
    name: str,
    command: Sequence[str],
    host: str,
    port: int,
    log: Path,
    *,
    startup_timeout: float = STARTUP_TIMEOUT,
    **popen: object,
) -> Iterator[DnsPeer]:
    """Start `command`, wait until host:port answers DNS, stop it on exit."""
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            **popen,  # type: ignore[call-overload]
        )
    peer = DnsPeer(name, host, port, process, log)
    try:
        wait_until_answers(peer, startup_timeout)
        yield peer
    finally:
        peer.stop()


@contextlib.contextmanager
def dnsmasq(
    directory: Path, *options: str, host: str = "127.0.0.1", port: int | None = None
) -> Iterator[DnsPeer]:
    """dnsmasq answering only from its options (no resolv.conf, no hosts, no forwarding).

    Useful options: `--address=/forwarded.test/192.0.2.1` (A for the name and below),
    `--address=/nx.test/` (NXDOMAIN), `--host-record=name,ip[,ip6]`, `--local-ttl=N`
    (dnsmasq's own answers have TTL 0 unless set). `port`: a given one (to restart an
    upstream where a server expects it) instead of a free one.
    """
    port = port or free_port(host)
    command = [
        "dnsmasq",
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--pid-file=",
        "--bind-interfaces",
        f"--listen-address={host}",
        f"--port={port}",
        *options,
    ]
    with running("dnsmasq", command, host, port, directory / f"dnsmasq-{port}.log") as peer:
        yield peer


@contextlib.contextmanager
def unbound(
    directory: Path,
    local_data: Iterable[str] = (),
    *,
    local_zones: Iterable[str] = (),
    forward_to: DnsPeer | None = None,
    host: str = "127.0.0.1",
    extra: str = "",
) -> Iterator[DnsPeer]:
    """unbound on a loopback port with `local-data`/`local-zone` lines, optionally
    forwarding everything else to `forward_to` (as a caching forwarder)."""
    port = free_port(host)
    config = directory / f"unbound-{port}.conf"
    lines = [
        "server:",
        f"  interface: {host}@{port}",
        "  do-daemonize: no",
        "  use-syslog: no",
        '  logfile: ""',
        '  chroot: ""',
        '  username: ""',
        f'  directory: "{directory}"',
        '  pidfile: ""',
        "  access-control: 127.0.0.0/8 allow",
        "  access-control: ::1 allow",
        "  do-not-query-localhost: no",
        '  module-config: "iterator"',
        "  verbosity: 0",
        *(f"  local-zone: {zone}" for zone in local_zones),
        *(f'  local-data: "{record}"' for record in local_data),
        textwrap.indent(extra, "  "),
    ]
    if forward_to is not None:
        lines += [
            "forward-zone:",
            '  name: "."',
            f"  forward-addr: {forward_to.host}@{forward_to.port}",
        ]
    config.write_text("\n".join(lines) + "\n")
    command = ["unbound", "-d", "-c", str(config)]
    with running("unbound", command, host, port, directory / f"unbound-{port}.log") as peer:
        yield peer


@contextlib.contextmanager
def dnsoverride_serve(
    directory: Path,
    zones: Path,
    upstreams: Iterable[str],
    *args: str,
    config: str | None = None,
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
    wrapper: Sequence[str] = (),
    workers: int | None = 1,
    python_flags: Sequence[str] = (),
) -> Iterator[DnsPeer]:
    """`python -m dnsoverride serve` on a free port of `host`, JSON logs in its log file;
    run through `wrapper` when given (e.g. `setpriv ...` to drop capabilities), `python`
    with `python_flags` (e.g. `-X dev`).

    `--workers 1` unless `workers` says otherwise: most tests look at one process (its
    counts, its caches, its memory); None leaves the count to `config` or the default
    (`auto`: 2 processes on a 2-CPU machine)."""
    # --workers would silently override the file's `workers:` (the command line wins).
    sets_workers = re.search(r"^\s*workers:", config or "", re.MULTILINE)
    assert workers is None or not sets_workers, "workers= or config's workers:, not both"
    port = free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    command = [
        *wrapper,
        sys.executable,
        *python_flags,
        "-m",
        "dnsoverride",
        "serve",
        "--zones",
        str(zones),
        "--listen",
        listen,
        "--log-format",
        "json",
        *(f"--upstream={upstream}" for upstream in upstreams),
        *(() if workers is None else ("--workers", str(workers))),
        *args,
    ]
    if config is not None:
        path = directory / f"dnsoverride-{port}.yaml"
        path.write_text(textwrap.dedent(config))
        command += ["--config", str(path)]
    environment = {**os.environ, **(env or {})}
    with contextlib.ExitStack() as stack:
        notify = None
        if "NOTIFY_SOCKET" not in (env or {}):
            # Ready is READY=1, as systemd sees it: sent once the admin listener is up too.
            # Answering DNS is not enough: a test that went on to /healthz at that moment
            # found nothing listening yet.
            notify = stack.enter_context(_notify_socket())
            environment["NOTIFY_SOCKET"] = notify.getsockname()
        peer = stack.enter_context(
            running(
                "dnsoverride",
                command,
                host,
                port,
                directory / f"dnsoverride-{port}.log",
                startup_timeout=startup_timeout,
                env=environment,
            )
        )
        if notify is not None:
            _wait_for_ready(peer, notify, startup_timeout)
        yield peer


@contextlib.contextmanager
def _notify_socket() -> Iterator[socket.socket]:
    """A datagram socket for sd_notify messages, in a directory of its own (a short path:
    AF_UNIX paths are limited to 107 bytes)."""
    with (
        tempfile.TemporaryDirectory(prefix="dno-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(os.path.join(directory, "notify"))
        yield sock


def _wait_for_ready(peer: DnsPeer, notify: socket.socket, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(min(left, 0.5))
        try:
            message = notify.recv(4096)
        except TimeoutError:
            if peer.process.poll() is not None:
                break
            continue
        if b"READY=1" in message.split(b"\n"):
            return
    raise AssertionError(f"{peer.name} never sent READY=1:\n{peer.log_text()}")


Responder = Callable[[bytes, bool], bytes | None]


class LyingUpstream:
    """A DNS upstream on a free loopback port, UDP and TCP, answering each query with the
    bytes `respond(query, tcp)` returns (None: no answer). `asked` lists the question
    names as they arrived (dnspython text, over either transport)."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.asked: list[str] = []
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._udp.bind(("127.0.0.1", self.port))
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._tcp.bind(("127.0.0.1", self.port))
        self._tcp.listen(16)
        threading.Thread(target=self._serve_udp, daemon=True).start()
        threading.Thread(target=self._serve_tcp, daemon=True).start()

    def _answer(self, data: bytes, tcp: bool) -> bytes | None:
        self.asked.append(dns.message.from_wire(data).question[0].name.to_text())
        return self.respond(data, tcp)

    def _serve_udp(self) -> None:
        while True:
            try:
                data, peer = self._udp.recvfrom(65535)
            except OSError:
                return
            reply = self._answer(data, False)
            if reply is not None:
                self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                connection, _ = self._tcp.accept()
            except OSError:
                return
            with connection:
                (length,) = struct.unpack("!H", connection.recv(2, socket.MSG_WAITALL))
                reply = self._answer(connection.recv(length, socket.MSG_WAITALL), True)
                if reply is not None:
                    connection.sendall(struct.pack("!H", len(reply)) + reply)

    def close(self) -> None:
        self._udp.close()
        self._tcp.close()


@contextlib.contextmanager
def lying_upstream(respond: Responder) -> Iterator[LyingUpstream]:
    """A `LyingUpstream`, closed on exit."""
    upstream = LyingUpstream(respond)
    try:
        yield upstream
    finally:
        upstream.close()
