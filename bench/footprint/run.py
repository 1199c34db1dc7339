#!/usr/bin/env python3
"""Idle footprint: the resident memory (VmRSS) of both daemons beside their peers, one run.

DNS: `dnsoverride serve` with the example zones (zones/) and `workers: 1`, without and
with `metrics:` (before and after a first scrape, which imports prometheus-client),
beside unbound and dnsmasq on loopback with minimal configs. Cache: `dnsoverride cache`
with listen and storage (upstream on loopback, never asked), before and after a scrape
of its `metrics:`, beside the distribution registry (`docker-registry serve`, filesystem
storage). Every server is started --rounds times, measured --idle seconds after it
answers; the median is printed, in MB (1000 kB, as /proc prints kB) and MiB.

    python3 bench/footprint/run.py [--rounds 3] [--idle 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.peers import dnsmasq, dnsoverride_serve, unbound  # after the sys.path line
from tests.support.ports import free_port
from tests.support.registry_peers import CacheProcess, DistributionRegistry

EXAMPLE_ZONES = Path(__file__).resolve().parents[2] / "zones"
UNUSED_UPSTREAM = "127.0.0.1:9"  # nothing listens: never answers, never asked for idle


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


def scrape(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        reply.read()


# A server: a context manager that starts it and yields (pid, what to do before measuring
# a second time, or None).
Server = Callable[[Path], contextlib.AbstractContextManager[tuple[int, Callable[[], None] | None]]]


@contextlib.contextmanager
def serve(work: Path, metrics: bool) -> Iterator[tuple[int, Callable[[], None] | None]]:
    port = free_port()
    extra = ("--metrics", f"127.0.0.1:{port}") if metrics else ()
    with dnsoverride_serve(
        work, EXAMPLE_ZONES, [UNUSED_UPSTREAM], *extra, config="workers: 1\n"
    ) as server:
        yield server.process.pid, (lambda: scrape(port)) if metrics else None


@contextlib.contextmanager
def unbound_server(work: Path) -> Iterator[tuple[int, Callable[[], None] | None]]:
    with unbound(work) as server:
        yield server.process.pid, None


@contextlib.contextmanager
def dnsmasq_server(work: Path) -> Iterator[tuple[int, Callable[[], None] | None]]:
    with dnsmasq(work) as server:
        yield server.process.pid, None


@contextlib.contextmanager
def cache(work: Path) -> Iterator[tuple[int, Callable[[], None] | None]]:
    port = free_port()
    process = CacheProcess(
        work / "store", f"http://{UNUSED_UPSTREAM}", "--metrics", f"127.0.0.1:{port}"
    ).start()
    try:
        assert process.proc is not None
        with urllib.request.urlopen(f"{process.url}/v2/", timeout=5) as reply:
            reply.read()
        yield process.proc.pid, lambda: scrape(port)
    finally:
        process.stop()


@contextlib.contextmanager
def distribution(work: Path) -> Iterator[tuple[int, Callable[[], None] | None]]:
    with DistributionRegistry(work / "distribution") as registry:
        assert registry.proc is not None
        with urllib.request.urlopen(f"{registry.url}/v2/", timeout=5) as reply:
            reply.read()
        yield registry.proc.pid, None


SERVERS: dict[str, Server] = {
    "dnsoverride serve": lambda work: serve(work, metrics=False),
    "dnsoverride serve, metrics": lambda work: serve(work, metrics=True),
    "unbound": unbound_server,
    "dnsmasq": dnsmasq_server,
    "dnsoverride cache": cache,
    "distribution": distribution,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds before measuring")
    args = parser.parse_args()
    idle: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for name, server in SERVERS.items():
            with tempfile.TemporaryDirectory() as directory, server(Path(directory)) as started:
                pid, second = started
                time.sleep(args.idle)
                idle.setdefault(name, []).append(rss_kb(pid))
                if second is not None:
                    second()
                    time.sleep(1.0)
                    after.setdefault(name, []).append(rss_kb(pid))
    print(f"{'server':<30}{'idle MB':>9}{'MiB':>7}{'scraped MB':>12}{'MiB':>7}   idle kB per round")
    for name in SERVERS:
        kb = statistics.median(idle[name])
        line = f"{name:<30}{kb / 1000:>9.1f}{kb / 1024:>7.1f}"
        if name in after:
            scraped = statistics.median(after[name])
            line += f"{scraped / 1000:>12.1f}{scraped / 1024:>7.1f}"
        else:
            line += f"{'':>19}"
        print(f"{line}   {idle[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
