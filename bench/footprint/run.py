#!/usr/bin/env python3
"""Idle footprint: the memory of both daemons beside their peers, every process of each, one run.

DNS: `dnsoverride serve` with the example zones (zones/): with `workers: 1`, without and
with `metrics:` (before and after a first scrape, which imports prometheus-client), and
with the default `workers:` (whatever that is: several processes when it is more than
one), beside unbound and dnsmasq on loopback with minimal configs. Cache: `dnsoverride
cache` with listen and storage (upstream on loopback, never asked), before and after a
scrape of its `metrics:`, beside the distribution registry (`docker-registry serve`,
filesystem storage).

A server is the process started and every process below it (found by walking /proc's
parent links: a `serve` with workers has its worker processes, fresh interpreters it
started). Each process's VmRSS (/proc/PID/
status) and Pss (/proc/PID/smaps_rollup: its pages, those shared with other processes
divided among them) and USS (its private pages: what its exit would free) are read; the
server's figures are their sums. The RSS sum counts a page that forked processes share
once per process, so it overstates a server of several; the Pss sum counts it once, but
it also divides the pages shared with processes outside the server (libpython with
every other Python on the box), so it understates a server on a busy box; the USS sum
leaves every shared page out: the least stopping the server frees. For one process, RSS
is the figure to compare (what it costs alone); for several, Pss on a quiet box. Every
server is started --rounds times, measured --idle seconds after it answers; the median
of the sums is printed, in MB (10^6 bytes) and MiB (2^20), then the processes of the
median round. (/proc's "kB" are KiB, 1024 bytes: `kB / 1000` is not MB.)

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
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.peers import dnsmasq, dnsoverride_serve, unbound  # after the sys.path line
from tests.support.ports import free_port
from tests.support.registry_peers import CacheProcess, DistributionRegistry

EXAMPLE_ZONES = Path(__file__).resolve().parents[2] / "zones"
UNUSED_UPSTREAM = "127.0.0.1:9"  # nothing listens: never answers, never asked for idle


@dataclass(frozen=True)
class Process:
    """One process of a server, measured."""

    pid: int
    role: str
    rss_kib: int
    pss_kib: int
    private_kib: int


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/PID/stat (a process gone meanwhile is left out)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            fields = stat.read_text().rpartition(")")[2].split()
            parents[int(stat.parent.name)] = int(fields[1])
    return parents


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "main"
    with contextlib.suppress(OSError):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        if "dnsoverride.dns.workerpool" in command:  # a fresh interpreter (python -P -c)
            return "worker"
    return "child"


def _kb(path: str, key: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise ValueError(f"no {key} in {path}")


def measure(root: int) -> list[Process]:
    """`root` and every process below it, parents before their children."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    order, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        order.append(pid)
        queue += sorted(children.get(pid, []))
    measured = []
    for pid in order:
        try:
            rss = _kb(f"/proc/{pid}/status", "VmRSS:")
            rollup = f"/proc/{pid}/smaps_rollup"
            pss = _kb(rollup, "Pss:")
            private = _kb(rollup, "Private_Clean:") + _kb(rollup, "Private_Dirty:")
        except (OSError, ValueError):
            continue  # exited meanwhile (a short-lived helper), or a kernel thread
        measured.append(Process(pid, _role(pid, root), rss, pss, private))
    return measured


def scrape(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        reply.read()


# A server: a context manager that starts it and yields (pid, what to do before measuring
# a second time, or None).
Server = Callable[[Path], contextlib.AbstractContextManager[tuple[int, Callable[[], None] | None]]]


@contextlib.contextmanager
def serve(
    work: Path, *, metrics: bool, workers: str | None
) -> Iterator[tuple[int, Callable[[], None] | None]]:
    """`serve` with the example zones; `workers: N` when given, else the default."""
    port = free_port()
    extra = ("--metrics", f"127.0.0.1:{port}") if metrics else ()
    count = int(workers) if workers is not None else None
    with dnsoverride_serve(work, EXAMPLE_ZONES, [UNUSED_UPSTREAM], *extra, workers=count) as server:
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
    "dnsoverride serve": lambda work: serve(work, metrics=False, workers="1"),
    "dnsoverride serve, metrics": lambda work: serve(work, metrics=True, workers="1"),
    "dnsoverride serve, default workers": lambda work: serve(work, metrics=False, workers=None),
    "unbound": unbound_server,
    "dnsmasq": dnsmasq_server,
    "dnsoverride cache": cache,
    "distribution": distribution,
}


def _mb(kib: float) -> str:
    """`kib` (what /proc calls kB) in MB and MiB, as two columns."""
    return f"{kib * 1024 / 1e6:>8.1f}{kib / 1024:>7.1f}"


def _sums(processes: list[Process]) -> tuple[int, int, int]:
    return (
        sum(p.rss_kib for p in processes),
        sum(p.pss_kib for p in processes),
        sum(p.private_kib for p in processes),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds before measuring")
    args = parser.parse_args()
    idle: dict[str, list[list[Process]]] = {}
    after: dict[str, list[list[Process]]] = {}
    for _ in range(args.rounds):
        for name, server in SERVERS.items():
            with tempfile.TemporaryDirectory() as directory, server(Path(directory)) as started:
                pid, second = started
                time.sleep(args.idle)
                idle.setdefault(name, []).append(measure(pid))
                if second is not None:
                    second()
                    time.sleep(1.0)
                    after.setdefault(name, []).append(measure(pid))
    columns = "".join(f"{kind:>8}{'MiB':>7}" for kind in ("RSS MB", "Pss MB", "USS MB"))
    print(f"{'server':<36}{'procs':>6}{columns}")
    for name in SERVERS:
        for label, rounds in ((name, idle[name]), ("  after a scrape", after.get(name))):
            if rounds is None:
                continue
            line = f"{label:<36}{statistics.median(len(r) for r in rounds):>6.0f}"
            for column in range(3):
                line += _mb(statistics.median(_sums(r)[column] for r in rounds))
            print(line)
    print("\nthe processes of each server's median round (idle, by Pss): role RSS/Pss/USS MiB")
    for name in SERVERS:
        rounds = sorted(idle[name], key=lambda r: _sums(r)[1])
        median_round = rounds[len(rounds) // 2]
        parts = ", ".join(
            f"{p.role} {p.rss_kib / 1024:.1f}/{p.pss_kib / 1024:.1f}/{p.private_kib / 1024:.1f}"
            for p in median_round
        )
        print(f"  {name}: {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
