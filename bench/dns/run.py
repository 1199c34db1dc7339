#!/usr/bin/env python3
"""DNS benchmark: dnsoverride beside unbound and dnsmasq, in one run.

All of them serve the same overrides and forward everything else to the same upstream (a
dnsmasq on loopback answering `*.fwd.bench`). Everything listens on 127.0.0.1.

Throughput (dnsperf: 8 sockets, 200 queries outstanding), each workload run for
--seconds against each server, --rounds times, the servers' order reversed every other
round (A/B alternation); printed are the medians of the QPS, of the per-round ratio to
unbound (1 thread), of dnsoverride's per-round ratio to unbound with as many threads as
it has workers, and of the server's CPU time per query answered (user + system of its
processes, workers included, over the queries dnsperf saw answered: less sensitive than
QPS to what else runs on the machine), with the load average before and after (the
machine is shared).
dnsoverride runs twice, with `workers: 1` and `2`, and unbound with `num-threads: 1` and `2`:

  overridden              100 names from the zone / local-data / host-records
  overridden EDNS         the same with EDNS (`dnsperf -e`)
  overridden EDNS+cookie  the same with the COOKIE a stub sends after its first reply:
                          a client cookie and the server cookie that server returned
                          (Debian 12's unbound 1.17 and dnsmasq answer no cookies: they
                          get the client cookie alone, and skip the work of one)
  forwarded (cached)      100 names under fwd.bench, warmed first so they are cached
  forwarded (cold)        every query a name never asked before: each is forwarded

Abuse, against dnsoverride and unbound configured alike (dnsmasq has neither feature):

  rrl    a burst of --burst identical queries (A, then ANY) from one source for an
         overridden name with 20 addresses and 4 KB of TXT (A: a ~360-octet answer to a
         ~40-octet query), both limited to 100 replies/s per client (dnsoverride
         `ratelimit: {rate: 100, exempt: []}`, unbound `ip-ratelimit: 100`): replies in
         full, TC replies, none, and the bytes sent back over the bytes received (the
         amplification factor)
  tcp    300 TCP clients that send queries and never read: seconds until the server
         closed them all (or the --tcp-seconds cap), RSS before, at the peak, 3 s after

    python3 bench/dns/run.py [--seconds 10] [--rounds 3]
        [--only overridden,edns,cookie,cached,cold,rrl,tcp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dns.edns  # after the sys.path line
import dns.message
import dns.query

from tests.support.dns_load import burst, cpu_seconds, non_readers, press, rss_kib
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, unbound

NAMES = 100
COLD_NAMES = 400_000  # more than any server answers in one run
RRL_RATE = 100
# unbound's caches large enough for every workload.
UNBOUND_CACHES = "msg-cache-size: 64m\nrrset-cache-size: 64m\n"
RRL_ADDRESSES = 20
TCP_CLIENTS = 300


def overridden(index: int) -> tuple[str, str]:
    return f"ovr{index}.ci.bench", f"10.0.{index // 250}.{index % 250 + 1}"


def dnsperf(
    server: DnsPeer, queries: Path, seconds: float, flags: Sequence[str] = ()
) -> tuple[float, float]:
    """Queries per second dnsperf measured and the server's CPU time per query answered
    (its processes' user + system, in us); notes on stderr if many queries were lost."""
    # 8 client sockets, up to 200 queries outstanding, 2 s timeout.
    command = ["dnsperf", "-s", server.host, "-p", str(server.port), "-d", str(queries)]
    command += ["-l", str(seconds), "-c", "8", "-q", "200", "-t", "2", *flags]
    cpu = cpu_seconds(server.process.pid)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    cpu = cpu_seconds(server.process.pid) - cpu
    qps = re.search(r"Queries per second:\s+([\d.]+)", result.stdout)
    sent = re.search(r"Queries sent:\s+(\d+)", result.stdout)
    lost = re.search(r"Queries lost:\s+(\d+)", result.stdout)
    completed = re.search(r"Queries completed:\s+(\d+)", result.stdout)
    if qps is None or completed is None:
        raise RuntimeError(f"dnsperf output not understood:\n{result.stdout}{result.stderr}")
    # A few queries still in flight when the run ends count as lost; more means overload.
    if sent and lost and int(lost.group(1)) > int(sent.group(1)) // 1000:
        print(f"  note: {server.name} lost {lost.group(1)} of {sent.group(1)}", file=sys.stderr)
    return float(qps.group(1)), cpu / max(1, int(completed.group(1))) * 1e6


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
        local_data = [f"{name}. 300 IN A {ip}" for name, ip in map(overridden, range(NAMES))]
        peers = {
            **{
                label: stack.enter_context(
                    dnsoverride_serve(work, zones, [upstream.address], workers=workers)
                )
                for label, workers in (("dnsoverride", 1), ("dnsoverride 2 workers", 2))
            },
            **{
                label: stack.enter_context(
                    unbound(
                        work,
                        local_data,
                        local_zones=['"ci.bench." transparent'],
                        forward_to=upstream,
                        extra=f"{UNBOUND_CACHES}num-threads: {threads}\n",
                    )
                )
                for label, threads in (("unbound", 1), ("unbound 2 threads", 2))
            },
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


CLIENT_COOKIE = "0102030405060708"
# dnsoverride against unbound at equal process/thread counts.
EQUAL_THREADS = {"dnsoverride": "unbound", "dnsoverride 2 workers": "unbound 2 threads"}


def cookie_flags(peer: DnsPeer) -> list[str]:
    """dnsperf flags sending the COOKIE a stub would after its first reply: our client
    cookie and the server cookie `peer` returned for it (the client cookie alone when
    the server sends none, as dnsmasq)."""
    option = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes.fromhex(CLIENT_COOKIE))
    query = dns.message.make_query(overridden(0)[0], "A", use_edns=0, options=[option])
    reply = dns.query.udp(query, peer.host, 3, peer.port)
    found = [o for o in reply.options if o.otype == dns.edns.OptionType.COOKIE]
    cookie = found[0].to_wire().hex() if found else CLIENT_COOKIE
    return ["-E", f"10:{cookie}"]


def throughput(work: Path, seconds: float, rounds: int, workloads: list[str]) -> None:
    """Each workload against each server, `rounds` times, the servers' order alternating
    from round to round; per round the ratio to unbound (1 thread); medians printed."""
    files = {"overridden": work / "overridden.txt", "forwarded (cached)": work / "cached.txt"}
    files["overridden"].write_text("".join(f"{overridden(i)[0]} A\n" for i in range(NAMES)))
    files["forwarded (cached)"].write_text("".join(f"name{i}.fwd.bench A\n" for i in range(NAMES)))
    qps: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}  # us per query
    equal: dict[str, dict[str, list[float]]] = {}  # ratio to unbound with as many threads
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with servers(work) as peers:
        cookies = {name: cookie_flags(peer) for name, peer in peers.items()}
        for peer in peers.values():
            dnsperf(peer, files["forwarded (cached)"], 1)  # warm the caches
        for round_ in range(rounds):
            order = list(peers.items())
            if round_ % 2:
                order.reverse()
            for load in workloads:
                measured: dict[str, float] = {}
                for name, peer in order:
                    flags: list[str] = []
                    path = files.get(load.removesuffix(" EDNS").removesuffix(" EDNS+cookie"))
                    if load.endswith(" EDNS"):
                        flags = ["-e"]
                    elif load.endswith(" EDNS+cookie"):
                        flags = cookies[name]
                    if load == "forwarded (cold)":
                        # Names no server has seen: each cold run gets its own.
                        path = work / f"cold-{name}-{round_}.txt"
                        prefix = f"r{round_}.{name.replace(' ', '-')}.fwd.bench"
                        path.write_text("".join(f"c{i}.{prefix} A\n" for i in range(COLD_NAMES)))
                    assert path is not None
                    measured[name], used = dnsperf(peer, path, seconds, flags)
                    cpu.setdefault(load, {}).setdefault(name, []).append(used)
                    if load == "forwarded (cold)":
                        path.unlink()
                for name, value in measured.items():
                    qps.setdefault(load, {}).setdefault(name, []).append(value)
                    ratio = value / measured["unbound"]
                    ratios.setdefault(load, {}).setdefault(name, []).append(ratio)
                for ours, theirs in EQUAL_THREADS.items():
                    ratio = measured[ours] / measured[theirs]
                    equal.setdefault(load, {}).setdefault(ours, []).append(ratio)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"medians of {rounds} rounds (servers alternating), ratio per round to unbound 1 thread")
    print(f"{'workload':<26}{'server':<24}{'QPS':>10}{'vs unbound':>12}{'CPU/q':>8}   per round")
    for load in workloads:
        for name in qps[load]:
            each = " ".join(f"{r:.2f}" for r in ratios[load][name])
            print(
                f"{load:<26}{name:<24}{statistics.median(qps[load][name]):>10.0f}"
                f"{statistics.median(ratios[load][name]):>11.2f}x"
                f"{statistics.median(cpu[load][name]):>6.1f}us   {each}"
            )
    print("at equal threads: median of the per-round ratios (per round)")
    for load in workloads:
        for ours, theirs in EQUAL_THREADS.items():
            each = " ".join(f"{r:.2f}" for r in equal[load][ours])
            median = statistics.median(equal[load][ours])
            print(f"{load:<26}{ours + ' / ' + theirs:<46}{median:>6.2f}x   {each}")


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
        # `dnsoverride_serve` returns once READY=1 came: every worker serves by then (its
        # `started` line is not logged at --log-level warning).
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
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and workload")
    parser.add_argument("--burst", type=int, default=5000, help="queries in the RRL burst")
    parser.add_argument("--tcp-seconds", type=float, default=40.0, help="cap of the TCP run")
    parser.add_argument(
        "--only",
        default="overridden,edns,cookie,cached,cold,rrl,tcp",
        help="comma-separated parts to run: overridden,edns,cookie,cached,cold,rrl,tcp",
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    loads = {
        "overridden": "overridden",
        "edns": "overridden EDNS",
        "cookie": "overridden EDNS+cookie",
        "cached": "forwarded (cached)",
        "cold": "forwarded (cold)",
    }
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
