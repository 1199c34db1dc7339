"""A dnsmasq on a random loopback port, answering only from its own records.

Shared by the transparent-mode tests that need a DNS server the test controls (the
registry's `resolvers:`, the resolver module). Every name dnsmasq does not know is REFUSED.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import dns.exception
import dns.message
import dns.query


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def dnsmasq(options: Sequence[str], probe_name: str) -> Iterator[tuple[str, int]]:
    """Run dnsmasq with `options` (e.g. `--host-record=a.test,127.0.0.9`) until the block ends;
    yields its (address, port) once it answers `probe_name`."""
    port = free_udp_port()
    process = subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--port={port}",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            assert process.poll() is None, "dnsmasq exited"
            try:
                dns.query.udp(dns.message.make_query(probe_name, "A"), "127.0.0.1", 0.1, port)
                break
            except dns.exception.Timeout:
                continue
        else:
            raise AssertionError("dnsmasq did not answer")
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(timeout=10)
