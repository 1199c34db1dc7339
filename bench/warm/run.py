"""Benchmark: what `dnsoverride cache warm` buys a CI job, beside the distribution
registry in proxy mode (which has no warm) in the same run.

One upstream (the distribution registry) holds a multi-platform image (`--platforms`
platforms, three layers each of `--mb` MB together, 6 KiB manifests, a 20 KiB index:
Docker Hub's shapes). For `--rounds` fresh images, `skopeo copy --all` times:

1. through distribution's proxy mode, cold (its only mode: the first job pays);
2. through `dnsoverride cache`, cold;
3. through `dnsoverride cache` after `dnsoverride cache warm` (the job CI runs at its
   peak), and the warm itself (paid before the peak);

and the upstream requests the pull after the warm made (0: it hit only). Usage:

    python bench/warm/run.py [--rounds 3] [--platforms 10] [--mb 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.support.registry_peers import (
    CacheProcess,
    DistributionRegistry,
    TestProxy,
    build_image,
    pull,
    push,
)

ARCHES = ("amd64", "arm64", "ppc64le", "s390x", "386", "riscv64", "mips64le", "mips64", "loong64")


async def timed(work: Awaitable[tuple[int, str]]) -> float:
    start = time.monotonic()
    code, out = await work
    if code != 0:
        raise RuntimeError(out)
    return time.monotonic() - start


async def bench(root: Path, rounds: int, platforms: int, mb: float) -> dict[str, list[float]]:
    arches = [*ARCHES, *(f"extra{n}" for n in range(platforms))][:platforms]
    total = int(mb * 1_000_000)
    layers = (total * 3 // 4, total // 5, total - total * 3 // 4 - total // 5)
    results: dict[str, list[float]] = {
        "distribution proxy, cold": [],
        "dnsoverride, cold": [],
        "dnsoverride, after warm": [],
        "the warm itself": [],
        "upstream requests after warm": [],
    }
    with DistributionRegistry(root / "upstream") as upstream:
        async with TestProxy(upstream.url) as counting:
            for n in range(rounds):
                image = build_image(
                    root / f"layout{n}",
                    platforms=tuple(f"linux/{arch}" for arch in arches),
                    layer_sizes=layers,
                    manifest_size=6_000,
                    index_size=20_000,
                )
                reference = f"library/app{n}:1.0"
                await push(image, f"{upstream.address}/{reference}")
                proxy = {"proxy": {"remoteurl": upstream.url}}
                with DistributionRegistry(root / f"proxy{n}", extra=proxy) as peer:
                    source = f"{peer.address}/{reference}"
                    took = await timed(pull(source, root / f"a{n}", all_platforms=True))
                    results["distribution proxy, cold"].append(took)
                cold = CacheProcess(root / f"cold{n}", upstream.url).start()
                try:
                    source = f"{cold.address}/{reference}"
                    took = await timed(pull(source, root / f"b{n}", all_platforms=True))
                    results["dnsoverride, cold"].append(took)
                finally:
                    cold.stop()
                socket = root / f"c{n}.sock"
                flags = ("--control-socket", str(socket))
                warm = CacheProcess(root / f"warm{n}", counting.url, *flags).start()
                try:
                    start = time.monotonic()
                    # The counting proxy runs on this loop: the warm must not block it.
                    command = await asyncio.create_subprocess_exec(
                        *(sys.executable, "-m", "dnsoverride", "cache", "warm"),
                        *("--admin", str(socket), reference),
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                    )
                    out, _ = await command.communicate()
                    if command.returncode != 0:
                        raise RuntimeError(out.decode())
                    results["the warm itself"].append(time.monotonic() - start)
                    asked = len(counting.requests)
                    source = f"{warm.address}/{reference}"
                    took = await timed(pull(source, root / f"c{n}", all_platforms=True))
                    results["dnsoverride, after warm"].append(took)
                    results["upstream requests after warm"].append(len(counting.requests) - asked)
                finally:
                    warm.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--platforms", type=int, default=10)
    parser.add_argument("--mb", type=float, default=4.0, help="MB of layers per platform")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        results = asyncio.run(bench(root, args.rounds, args.platforms, args.mb))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peer = statistics.median(results["distribution proxy, cold"])
    print(f"skopeo copy --all, {args.platforms} platforms, {args.mb} MB of layers each")
    for name, values in results.items():
        median = statistics.median(values)
        if name.startswith("upstream"):
            print(f"  {name:32s} {max(values):.0f} (most in a round)")
            continue
        runs = ", ".join(f"{value:.2f}" for value in values)
        print(f"  {name:32s} median {median:.2f} s = {median / peer:.2f}x the peer  ({runs})")


if __name__ == "__main__":
    main()
