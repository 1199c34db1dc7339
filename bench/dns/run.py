#!/usr/bin/env python3
"""DNS benchmark: dnsperf against dnsoverride, unbound and dnsmasq in one run.

All three serve the same overrides and forward everything else to the same upstream (a
dnsmasq on loopback answering `*.fwd.bench`). Two workloads, each run for --seconds
against each server, --rounds times with the servers interleaved; the best round
counts (the machine is shared, so the best round is the least disturbed one):

  (a) overridden names       100 names from the zone / local-data / host-records
  (b) forwarded, from cache  100 names under fwd.bench, warmed first so they are cached

Prints queries per second and the ratio to unbound. Everything listens on 127.0.0.1.

    python3 bench/dns/run.py [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.peers import DnsPeer, dnsmasq, dnsoverride_serve, unbound  # after the sys.path line

NAMES = 100


def overridden(index: int) -> tuple[str, str]:
    return f"ovr{index}.ci.bench", f"10.0.{index // 250}.{index % 250 + 1}"


def dnsperf(server: DnsPeer, queries: Path, seconds: float) -> float:
    """Queries per second dnsperf measured; notes on stderr if many queries were lost."""
    # 8 client sockets, up to 200 queries outstanding, 2 s timeout.
    command = ["dnsperf", "-s", server.host, "-p", str(server.port), "-d", str(queries)]
    command += ["-l", str(seconds), "-c", "8", "-q", "200", "-t", "2"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
    )
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="dnsperf run length")
    parser.add_argument("--rounds", type=int, default=2, help="runs per server and workload")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dns-") as tmp:
        work = Path(tmp)
        workloads = {
            "overridden": work / "overridden.txt",
            "forwarded (cached)": work / "forwarded.txt",
        }
        workloads["overridden"].write_text("".join(f"{overridden(i)[0]} A\n" for i in range(NAMES)))
        workloads["forwarded (cached)"].write_text(
            "".join(f"name{i}.fwd.bench A\n" for i in range(NAMES))
        )
        results: dict[str, dict[str, float]] = {}
        with servers(work) as peers:
            for peer in peers.values():
                dnsperf(peer, workloads["forwarded (cached)"], 1)  # warm the caches
            for _ in range(args.rounds):
                for name, peer in peers.items():
                    best = results.setdefault(name, {})
                    for load, path in workloads.items():
                        best[load] = max(best.get(load, 0.0), dnsperf(peer, path, args.seconds))
    print(f"{'workload':<22}{'server':<14}{'QPS':>10}{'vs unbound':>12}")
    for load in workloads:
        for name in results:
            qps = results[name][load]
            ratio = qps / results["unbound"][load]
            print(f"{load:<22}{name:<14}{qps:>10.0f}{ratio:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
