#!/usr/bin/env python3
"""DNS benchmark: dnsoverride beside unbound and dnsmasq, in one run.

All three serve the same overrides and forward everything else to the same upstream (a
dnsmasq on loopback answering `*.fwd.bench`). Everything listens on 127.0.0.1.

Throughput (dnsperf: 8 sockets, 200 queries outstanding), each workload run for
--seconds against each server, --rounds times with the servers interleaved; the best
round counts (the machine is shared, so the best round is the least disturbed one):

  overridden            100 names from the zone / local-data / host-records
  forwarded (cached)    100 names under fwd.bench, warmed first so they are cached
  forwarded (cold)      every query a name never asked before: each is forwarded

Abuse, against dnsoverride and unbound configured alike (dnsmasq has neither feature):

  rrl    a burst of --burst identical queries (A, then ANY) from one source for an
         overridden name with 20 addresses and 4 KB of TXT (A: a ~360-octet answer to a
         ~40-octet query), both limited to 100 replies/s per client (dnsoverride
         `ratelimit: {rate: 100, exempt: []}`, unbound `ip-ratelimit: 100`): replies in
         full, TC replies, none, and the bytes sent back over the bytes received (the
         amplification factor)
  tcp    300 TCP clients that send queries and never read: seconds until the server
         closed them all (or the --tcp-seconds cap), RSS before, at the peak, 3 s after

    python3 bench/dns/run.py [--seconds 10] [--rounds 2] [--only overridden,cached,cold,rrl,tcp]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dns.message  # after the sys.path line

from tests.support.dns_load import burst, non_readers, press, rss_kib
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, unbound

NAMES = 100
COLD_NAMES = 400_000  # more than any server answers in one run
RRL_RATE = 100
RRL_ADDRESSES = 20
TCP_CLIENTS = 300


def overridden(index: int) -> tuple[str, str]:
    return f"ovr{index}.ci.bench", f"10.0.{index // 250}.{index % 250 + 1}"


def dnsperf(server: DnsPeer, queries: Path, seconds: float) -> float:
    """Queries per second dnsperf measured; notes on stderr if many queries were lost."""
    # 8 client sockets, up to 200 queries outstanding, 2 s timeout.
    command = ["dnsperf", "-s", server.host, "-p", str(server.port), "-d", str(queries)]
    command += ["-l", str(seconds), "-c", "8", "-q", "200", "-t", "2"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    qps = re.search(r"Queries per second:\s+([\d.]+)", result.stdout)
    sent = re.search(r"Queries sent:\s+(\d+)", result.stdout)
    lost = re.search(r"Queries lost:\s+(\d+)", result.stdout)
    if qps is None:
        raise RuntimeError(f"dnsperf output not understood:\n{result.stdout}{result.stderr}")
    # A few queries still in flight when the run ends count as lost; more means overload.
    if sent and lost and int(lost.group(1)) > int(sent.group(1)) // 1000:
        print(f"  note: {server.name} lost {lost.group(1)} of {sent.group(1)}", file=sys.stderr)
    return float(qps.group(1))


@contextlib.contextmanager
def servers(work: Path) -> Iterator[dict[str, DnsPeer]]:
    zones = work / "zones"
    zones.mkdir()
    records = "\n".join(f"  {name}: {{A: {ip}}}" for name, ip in map(overridden, range(NAMES)))
    (zones / "bench.yaml").write_text(f"ttl: 300\nrecords:\n{records}\n")
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(
            dnsmasq(work, "--address=/fwd.bench/192.0.2.1", "--local-ttl=3600")
        )
        up = f"{upstream.host}#{upstream.port}"
        peers = {
            "dnsoverride": stack.enter_context(
                dnsoverride_serve(work, zones, [upstream.address], "--log-level", "warning")
            ),
            "unbound": stack.enter_context(
                unbound(
                    work,
                    [f"{name}. 300 IN A {ip}" for name, ip in map(overridden, range(NAMES))],
                    local_zones=['"ci.bench." transparent'],
                    forward_to=upstream,
                    extra="msg-cache-size: 64m\nrrset-cache-size: 64m\n",
                )
            ),
            "dnsmasq": stack.enter_context(
                dnsmasq(
                    work,
                    f"--server={up}",
                    "--cache-size=10000",
                    "--local-ttl=300",
                    *(f"--host-record={name},{ip}" for name, ip in map(overridden, range(NAMES))),
                )
            ),
        }
        yield peers


def throughput(work: Path, seconds: float, rounds: int, workloads: list[str]) -> None:
    files = {"overridden": work / "overridden.txt", "forwarded (cached)": work / "cached.txt"}
    files["overridden"].write_text("".join(f"{overridden(i)[0]} A\n" for i in range(NAMES)))
    files["forwarded (cached)"].write_text("".join(f"name{i}.fwd.bench A\n" for i in range(NAMES)))
    results: dict[str, dict[str, float]] = {}
    with servers(work) as peers:
        for peer in peers.values():
            dnsperf(peer, files["forwarded (cached)"], 1)  # warm the caches
        for round_ in range(rounds):
            for name, peer in peers.items():
                # Names no server has seen: each cold run gets its own.
                cold = work / f"cold-{name}-{round_}.txt"
                cold.write_text(
                    "".join(f"c{i}.r{round_}.{name}.fwd.bench A\n" for i in range(COLD_NAMES))
                )
                best = results.setdefault(name, {})
                for load in workloads:
                    path = cold if load == "forwarded (cold)" else files[load]
                    best[load] = max(best.get(load, 0.0), dnsperf(peer, path, seconds))
                cold.unlink()
    print(f"{'workload':<22}{'server':<14}{'QPS':>10}{'vs unbound':>12}")
    for load in workloads:
        for name in results:
            qps = results[name][load]
            ratio = qps / results["unbound"][load]
            print(f"{load:<22}{name:<14}{qps:>10.0f}{ratio:>11.2f}x")


@contextlib.contextmanager
def abuse_servers(work: Path) -> Iterator[dict[str, DnsPeer]]:
    """dnsoverride and unbound with the same big override, rate limited alike."""
    zones = work / "abuse-zones"
    zones.mkdir()
    addresses = [f"10.1.0.{index}" for index in range(1, RRL_ADDRESSES + 1)]
    strings = ", ".join(f'"{index:03d}' + "x" * 247 + '"' for index in range(16))
    (zones / "abuse.yaml").write_text(
        f"records:\n  big.bench: {{A: [{', '.join(addresses)}], TXT: [{strings}]}}\n"
    )
    txt = " ".join(f'"{index:03d}' + "x" * 247 + '"' for index in range(16))
    local = [f"big.bench. 300 IN A {address}" for address in addresses]
    # Quoted strings inside: unbound takes the line in single quotes.
    extra = f"ip-ratelimit: {RRL_RATE}\nlocal-data: 'big.bench. 300 IN TXT {txt}'\n"
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(dnsmasq(work, "--address=/fwd.bench/192.0.2.1"))
        config = f"ratelimit: {{rate: {RRL_RATE}, exempt: []}}\n"
        peers = {
            "dnsoverride": stack.enter_context(
                dnsoverride_serve(
                    work, zones, [upstream.address], "--log-level", "warning", config=config
                )
            ),
            "unbound": stack.enter_context(
                unbound(
                    work,
                    local,
                    local_zones=['"big.bench." static'],
                    forward_to=upstream,
                    extra=extra,
                )
            ),
        }
        yield peers


def rrl(work: Path, count: int) -> None:
    print(f"\nRRL: {count} identical queries from one source, both limited to {RRL_RATE}/s")
    print(f"{'query':<7}{'server':<14}{'full':>6}{'TC':>6}{'none':>6}{'largest':>9}{'factor':>9}")
    with abuse_servers(work) as peers:
        for rdtype in ("A", "ANY"):
            query = dns.message.make_query("big.bench", rdtype, use_edns=0).to_wire()
            for name, peer in peers.items():
                time.sleep(1.5)  # a full bucket for each
                result = burst(peer, query, count)
                none = count - result.full - result.truncated
                print(
                    f"{rdtype:<7}{name:<14}{result.full:>6}{result.truncated:>6}{none:>6}"
                    f"{result.largest:>9}{result.factor:>8.2f}x"
                )


def tcp(work: Path, cap: float) -> None:
    print(f"\nTCP: {TCP_CLIENTS} clients that never read (TXT answers of ~4 KB), cap {cap:.0f} s")
    print(f"{'server':<14}{'closed':>8}{'last (s)':>10}{'RSS before':>12}{'peak':>8}{'after':>8}")
    with abuse_servers(work) as peers:
        for name, peer in peers.items():
            pid = peer.process.pid
            before = rss_kib(pid)
            clients = non_readers(peer.host, peer.port, TCP_CLIENTS)
            closed = press(clients, cap, "big.bench", "TXT")
            peak = rss_kib(pid)
            for sock in clients:
                sock.close()
            time.sleep(3)
            after = rss_kib(pid)
            last = f"{max(closed.values()):.1f}" if closed else "-"
            print(
                f"{name:<14}{len(closed):>8}{last:>10}{before // 1024:>10}MB"
                f"{peak // 1024:>6}MB{after // 1024:>6}MB"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="dnsperf run length")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server and workload")
    parser.add_argument("--burst", type=int, default=5000, help="queries in the RRL burst")
    parser.add_argument("--tcp-seconds", type=float, default=40.0, help="cap of the TCP run")
    parser.add_argument(
        "--only",
        default="overridden,cached,cold,rrl,tcp",
        help="comma-separated parts to run: overridden,cached,cold,rrl,tcp",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    loads = {"overridden": "overridden", "cached": "forwarded (cached)", "cold": "forwarded (cold)"}
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        workloads = [load for part, load in loads.items() if part in parts]
        if workloads:
            throughput(work, args.seconds, args.rounds, workloads)
        if "rrl" in parts:
            (work / "rrl").mkdir()
            rrl(work / "rrl", args.burst)
        if "tcp" in parts:
            (work / "tcp").mkdir()
            tcp(work / "tcp", args.tcp_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
