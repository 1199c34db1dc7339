#!/usr/bin/env python3
"""The DNS fast path's CPU per query, in process: plain, EDNS and cookie queries.

dnsperf's ratios need a quiet machine; CPU time spent in this process does not. Two
measurements per workload, each over the same 100 overridden names (answers cached first):

  fast    `Resolver.fast(query, host)` called in a loop: what the fast path itself costs
  batch   the batched UDP transport's read handler (`recvmmsg`, `fast` per datagram,
          `sendmmsg`) on a loopback socket, 32 queries per call: only that handler's
          thread CPU time is counted, not the client's sends and reads

Workloads, built with dnspython the way clients send them (each query a fresh ID):

  plain               no EDNS
  EDNS                an OPT record, UDP size 1232 (`dnsperf -e`, dig +nocookie)
  EDNS+client cookie  a client cookie alone (a stub's first query; dnsperf -E 10:...)
  EDNS+full cookie    the client cookie and the server cookie this server returned for it
                      (every later query of a stub resolver, dig's default)
  64 clients' cookies full cookies of 64 clients (127.0.0.2-65), each name asked by every
                      client in turn, as a CI farm's runners ask the same names: no two
                      queries in a row share a cookie (`fast` only: the batch client
                      sends from one address)

The workloads take turns in short rounds (other processes on a shared machine slow each
alike). Printed per workload: the least CPU per query of any round (microseconds: the
figure least disturbed by the rest of the machine) and the median over rounds of its
ratio to plain's in the same round. It imports the tree it sits in (PYTHONPATH does
not change that): to compare old and new code, run a copy of it in the old tree.

    python3 bench/dns/fastpath.py [--queries 20000] [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dns.edns  # after the sys.path line
import dns.message
import uvloop

from dnsoverride.dns import udpbatch
from dnsoverride.dns.listener import UdpListener
from dnsoverride.dns.resolver import Resolver
from tests.support.resolvers import in_process_resolver

NAMES = 100
IDS = 16  # distinct query IDs per name: a real client never repeats one
HOST = "127.0.0.1"
CLIENT_COOKIE = bytes.fromhex("0102030405060708")
WORKLOADS = ("plain", "EDNS", "EDNS+client cookie", "EDNS+full cookie")
CLIENTS = [f"127.0.0.{index}" for index in range(2, 66)]
MANY = "64 clients' cookies"


def _name(index: int) -> str:
    return f"ovr{index}.ci.bench"


def _zones(work: Path) -> Path:
    zones = work / "zones"
    zones.mkdir()
    records = "\n".join(
        f"  {_name(index)}: {{A: 10.0.{index // 250}.{index % 250 + 1}}}" for index in range(NAMES)
    )
    (zones / "bench.yaml").write_text(f"ttl: 300\nrecords:\n{records}\n")
    return zones


def _queries(cookie: bytes | None, edns: bool) -> list[bytes]:
    options: list[dns.edns.Option] = []
    if cookie is not None:
        options.append(dns.edns.GenericOption(dns.edns.OptionType.COOKIE, cookie))
    queries = []
    for query_id in range(IDS):
        for index in range(NAMES):
            query = dns.message.make_query(
                _name(index), "A", use_edns=0 if edns else False, payload=1232, options=options
            )
            query.id = 0x1000 + query_id * NAMES + index
            queries.append(query.to_wire())
    return queries


async def _server_cookie(
    resolver: Resolver, host: str = HOST, client: bytes = CLIENT_COOKIE
) -> bytes:
    """The COOKIE this server returns to `host` for a query with `client`'s cookie alone."""
    query = _queries(client, True)[0]
    reply = await resolver.resolve(query, host, False)
    assert reply is not None
    found = [o for o in dns.message.from_wire(bytes(reply)).options if o.otype == 10]
    return bytes(found[0].to_wire())


async def _workloads(resolver: Resolver) -> dict[str, list[bytes]]:
    full = await _server_cookie(resolver)
    workloads = {
        "plain": _queries(None, False),
        "EDNS": _queries(None, True),
        "EDNS+client cookie": _queries(CLIENT_COOKIE, True),
        "EDNS+full cookie": _queries(full, True),
    }
    for queries in workloads.values():  # into the answer cache; each must hit after
        for query in queries[:NAMES]:
            await resolver.resolve(query, HOST, False)
        assert all(resolver.fast(query, HOST) for query in queries), "not on the fast path"
    return workloads


async def _many_clients(resolver: Resolver) -> list[tuple[str, bytes]]:
    """`MANY`'s (client, query) pairs: each name asked by every client in turn."""
    per_client = []
    for index, host in enumerate(CLIENTS):
        full = await _server_cookie(resolver, host, bytes((index,)) * 8)
        per_client.append(_queries(full, True)[:NAMES])
    pairs = [
        (host, queries[name])
        for name in range(NAMES)
        for host, queries in zip(CLIENTS, per_client, strict=True)
    ]
    assert all(resolver.fast(query, host) for host, query in pairs), "not on the fast path"
    return pairs


def _fast_many(resolver: Resolver, pairs: list[tuple[str, bytes]], count: int) -> float:
    """CPU microseconds per `fast` call, each from its own client."""
    fast = resolver.fast
    rounds = max(1, count // len(pairs))
    started = time.thread_time()
    for _ in range(rounds):
        for host, query in pairs:
            fast(query, host)
    return (time.thread_time() - started) / (rounds * len(pairs)) * 1e6


def _fast(resolver: Resolver, queries: list[bytes], count: int) -> float:
    """CPU microseconds per `fast` call."""
    fast = resolver.fast
    rounds = max(1, count // len(queries))
    started = time.thread_time()
    for _ in range(rounds):
        for query in queries:
            fast(query, HOST)
    return (time.thread_time() - started) / (rounds * len(queries)) * 1e6


def _batch(
    readable: Callable[[], None], server: socket.socket, queries: list[bytes], count: int
) -> float:
    """CPU microseconds per query of the batched transport's read handler."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind((HOST, 0))
    client.connect(server.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    spent, answered, at = 0.0, 0, 0
    try:
        while answered < count:
            for _ in range(udpbatch.BATCH):
                client.send(queries[at])
                at = (at + 1) % len(queries)
            started = time.thread_time()
            readable()
            spent += time.thread_time() - started
            for _ in range(udpbatch.BATCH):
                client.recv(4096)
            answered += udpbatch.BATCH
    finally:
        client.close()
    return spent / answered * 1e6


async def _measure(count: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory() as work:
        resolver = in_process_resolver(_zones(Path(work)))
        workloads = await _workloads(resolver)
        many = await _many_clients(resolver)
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        server.bind((HOST, 0))
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        transport = await udpbatch.serve_udp(UdpListener(resolver, set()), server)
        assert isinstance(transport, udpbatch.BatchedUdpTransport), "no batched UDP here"
        loop = asyncio.get_running_loop()
        loop.remove_reader(server.fileno())  # driven by hand below, not by the loop
        readable = transport._readable  # the handler is what is measured
        fast: dict[str, list[float]] = {name: [] for name in (*workloads, MANY)}
        batch: dict[str, list[float]] = {name: [] for name in workloads}
        for _ in range(rounds):
            for name, queries in workloads.items():
                fast[name].append(_fast(resolver, queries, count))
                batch[name].append(_batch(readable, server, queries, count // 4))
            fast[MANY].append(_fast_many(resolver, many, count))
        transport.close()
    return {"fast": fast, "batch": batch}


def _summary(rounds: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Per workload: the least microseconds per query, the median ratio to plain."""
    plain = rounds["plain"]
    return {
        name: (min(spent), statistics.median(s / p for s, p in zip(spent, plain, strict=True)))
        for name, spent in rounds.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=20_000, help="per workload and round")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not udpbatch.available():
        print("batched UDP is not available here (glibc Linux only)", file=sys.stderr)
        return 1
    load = os.getloadavg()[0]
    measured = uvloop.run(_measure(args.queries, args.rounds))
    fast, batch = _summary(measured["fast"]), _summary(measured["batch"])
    print(f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}; {args.rounds} rounds")
    print("CPU us per query (least of any round), median ratio to plain")
    print(f"{'workload':<20} {'fast':>7} {'x plain':>8} {'batch':>7} {'x plain':>8}")
    for name in WORKLOADS:
        print(
            f"{name:<20} {fast[name][0]:7.2f} {fast[name][1]:7.2f}x "
            f"{batch[name][0]:7.2f} {batch[name][1]:7.2f}x"
        )
    print(f"{MANY:<20} {fast[MANY][0]:7.2f} {fast[MANY][1]:7.2f}x {'-':>7} {'-':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
