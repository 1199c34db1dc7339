"""Real DNS peers for tests: dnsmasq and unbound upstreams, and `dnsoverride serve` itself.

Each runs as a real process on a free loopback port and is stopped when its context
manager exits, whatever happened inside. Use them from fixtures:

    with dnsmasq(tmp_path, "--address=/forwarded.test/192.0.2.1") as upstream:
        with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
            server.query("forwarded.test")

Only 127.0.0.0/8 and ::1 are ever used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

STARTUP_TIMEOUT = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on `host` (DNS listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


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
) -> Iterator[DnsPeer]:
    """`python -m dnsoverride serve` on a free port of `host`, JSON logs in its log file;
    run through `wrapper` when given (e.g. `setpriv ...` to drop capabilities)."""
    port = free_port(host)
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    command = [
        *wrapper,
        sys.executable,
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
        *args,
    ]
    if config is not None:
        path = directory / f"dnsoverride-{port}.yaml"
        path.write_text(textwrap.dedent(config))
        command += ["--config", str(path)]
    environment = {**os.environ, **(env or {})}
    with running(
        "dnsoverride",
        command,
        host,
        port,
        directory / f"dnsoverride-{port}.log",
        startup_timeout=startup_timeout,
        env=environment,
    ) as peer:
        yield peer
