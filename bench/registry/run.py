"""Benchmark: `dnsoverride registry` against the distribution registry's proxy mode.

Both caches sit in front of the same upstream (a distribution registry on loopback
holding one generated image) and are measured in the same run:

1. upstream bytes for 8 concurrent cold pulls of the image, as a ratio to its size,
   counted by a byte-counting HTTP proxy (its own process) in front of the upstream;
2. warm blob throughput (MB/s) of concurrent GETs of the largest layer;
3. manifest-by-tag requests/s on a warm cache.

That load is an aiohttp client in this process, bounded by time. Then, server-limited:

4. warm hits of a small (4 KiB) and a large (48 MiB) blob with a client that discards
   bodies in the kernel (nocopy.py), against nginx (`sendfile on`, one worker) serving
   the files in the cache's store: throughput, requests/s and the server's CPU per
   request, over several rounds with the order alternated; the ratios are medians of
   per-round ratios. A response that is not 200 with its full length fails the bench
   (exit 1).

Usage:

    python bench/registry/run.py [--layer-mb 32] [--layers 3] [--seconds 5] [--clients 8]
        [--rounds 3] [--nocopy-clients 4] [--only-server-limited]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.registry.nocopy import Measured, measure
from tests.support.ports import free_port
from tests.support.registry_peers import (
    OCI_MANIFEST,
    CacheProcess,
    DistributionRegistry,
    TestProxy,
    build_image,
    push,
    wait_for_port,
)

ACCEPT = f"application/vnd.docker.distribution.manifest.v2+json, {OCI_MANIFEST}"
NAME, TAG = "bench/app", "v1"


# -- a counting proxy in its own process (so it does not share the load client's CPU) ------
def _proxy_main(target: str, port: int, conn: Connection) -> None:
    async def main() -> None:
        proxy = TestProxy(target)
        proxy.port = port
        await proxy.start()
        loop = asyncio.get_running_loop()
        while (await loop.run_in_executor(None, conn.recv)) == "stats":
            conn.send(dict(proxy.bytes))
        await proxy.stop()

    asyncio.run(main())


@contextlib.contextmanager
def counting_proxy(target: str) -> Iterator[tuple[str, Connection]]:
    port = free_port()
    # spawn, not fork: a forked child would inherit this process's running event loop.
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_proxy_main, args=(target, port, child), daemon=True)
    process.start()
    try:
        wait_for_port("127.0.0.1", port)
        yield f"http://127.0.0.1:{port}", parent
    finally:
        parent.send("stop")
        process.join(10)


def upstream_bytes(conn: Connection) -> int:
    conn.send("stats")
    counts: dict[str, int] = conn.recv()
    return sum(counts.values())


# -- load ------------------------------------------------------------------------------------
async def pull_image(session: aiohttp.ClientSession, base: str) -> int:
    """Pull manifest by tag and every blob; verify digests; return blob bytes."""
    async with session.get(f"{base}/v2/{NAME}/manifests/{TAG}", headers={"Accept": ACCEPT}) as r:
        r.raise_for_status()
        manifest = json.loads(await r.read())
    digests = [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]

    async def blob(digest: str) -> int:
        hasher = hashlib.sha256()
        async with session.get(f"{base}/v2/{NAME}/blobs/{digest}") as response:
            response.raise_for_status()
            async for chunk in response.content.iter_chunked(1 << 20):
                hasher.update(chunk)
        assert "sha256:" + hasher.hexdigest() == digest, f"bad blob {digest}"
        return response.content_length or 0

    return sum(await asyncio.gather(*(blob(d) for d in digests)))


async def cold_pulls(base: str, clients: int) -> float:
    started = time.perf_counter()
    sessions = [aiohttp.ClientSession() for _ in range(clients)]
    try:
        await asyncio.gather(*(pull_image(s, base) for s in sessions))
    finally:
        for session in sessions:
            await session.close()
    return time.perf_counter() - started


async def sustained(
    clients: int, seconds: float, one: Callable[[aiohttp.ClientSession], Awaitable[int]]
) -> float:
    """Run `one` in `clients` parallel loops for `seconds`; the units it returned, per second."""
    total = 0
    deadline = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while time.perf_counter() < deadline:
            total += await one(session)

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return total / (time.perf_counter() - started)


async def blob_throughput(base: str, digest: str, size: int, clients: int, seconds: float) -> float:
    """MB/s of whole-blob GETs, each checked for status 200 and all `size` bytes."""

    async def get_blob(session: aiohttp.ClientSession) -> int:
        received = 0
        async with session.get(f"{base}/v2/{NAME}/blobs/{digest}") as response:
            assert response.status == 200, f"blob GET answered {response.status}"
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
        assert received == size, f"blob GET gave {received} of {size} bytes"
        return received

    return await sustained(clients, seconds, get_blob) / 1e6


async def manifest_rate(base: str, clients: int, seconds: float) -> float:
    """Requests/s of manifest GETs by tag."""
    url = f"{base}/v2/{NAME}/manifests/{TAG}"

    async def get_manifest(session: aiohttp.ClientSession) -> int:
        async with session.get(url, headers={"Accept": ACCEPT}) as response:
            await response.read()
            assert response.status == 200, response.status
        return 1

    return await sustained(clients, seconds, get_manifest)


@dataclass
class Result:
    name: str
    upstream_bytes: int = 0
    cold_seconds: float = 0.0
    blob_mbps: float = 0.0
    manifest_rps: float = 0.0


def report(result: Result, image_bytes: int) -> None:
    print(
        f"  {result.name:<22} upstream {result.upstream_bytes / 1e6:8.1f} MB "
        f"({result.upstream_bytes / image_bytes:.2f}x image)  cold {result.cold_seconds:5.1f} s  "
        f"warm blob {result.blob_mbps:7.0f} MB/s  manifest-by-tag {result.manifest_rps:7.0f} req/s",
        flush=True,
    )


async def cold_phase(root: Path, upstream: DistributionRegistry, clients: int) -> list[Result]:
    """8 concurrent cold pulls through each cache; upstream bytes counted per cache."""
    results = []
    with (
        counting_proxy(upstream.url) as (theirs_up, theirs_conn),
        counting_proxy(upstream.url) as (ours_up, ours_conn),
    ):
        contenders: list[tuple[str, DistributionRegistry | CacheProcess, Connection]] = [
            (
                "distribution proxy",
                DistributionRegistry(root / "distribution", {"proxy": {"remoteurl": theirs_up}}),
                theirs_conn,
            ),
            ("dnsoverride registry", CacheProcess(root / "store", ours_up), ours_conn),
        ]
        for name, server, conn in contenders:
            server.start()
            try:
                result = Result(name)
                before = upstream_bytes(conn)
                result.cold_seconds = await cold_pulls(server.url, clients)
                result.upstream_bytes = upstream_bytes(conn) - before
                results.append(result)
            finally:
                server.stop()
    return results


async def warm_phase(
    root: Path,
    upstream: DistributionRegistry,
    results: list[Result],
    blob: tuple[str, int],
    seconds: float,
) -> None:
    """Warm blob and manifest-by-tag rates; both caches restarted on their warm stores and
    pointed straight at the upstream, so the counting proxy slows neither."""
    servers: list[DistributionRegistry | CacheProcess] = [
        DistributionRegistry(root / "distribution", {"proxy": {"remoteurl": upstream.url}}),
        CacheProcess(root / "store", upstream.url),
    ]
    digest, size = blob
    for result, server in zip(results, servers, strict=True):
        server.start()
        try:
            result.blob_mbps = await blob_throughput(server.url, digest, size, 4, seconds)
            result.manifest_rps = await manifest_rate(server.url, 16, seconds)
        finally:
            server.stop()


# -- server-limited: no-copy clients, the cache against nginx sendfile -------------------
NGINX_CONF = """\
user root;  # the blob files are under the benchmark's own (root) temp dir
worker_processes 1;  # one process, as the cache is
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;  # the cache logs every request too
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


@contextlib.contextmanager
def nginx(directory: Path, root: Path) -> Iterator[tuple[int, int]]:
    """nginx serving the files under `root`: (its master's pid, port)."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=directory, port=port, root=root))
    process = subprocess.Popen(
        ["nginx", "-p", str(directory), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port("127.0.0.1", port, proc=process)
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(10)


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


async def server_limited(
    root: Path, upstream: DistributionRegistry, args: argparse.Namespace
) -> bool:
    """Rounds of no-copy load on the cache and on nginx, order alternated; prints every
    measurement and the medians of the per-round ratios. False when a response failed."""
    name = "bench/blobs"
    image = build_image(
        root / "blobs-layout",
        TAG,
        layer_sizes=(args.small_kb << 10, args.large_mb << 20),
        platforms=("linux/amd64",),
    )
    await push(image, f"{upstream.address}/{name}:{TAG}", docker_v2=True)
    layers = sorted(
        (size, digest) for digest, size in image.blobs.items() if size > 1024
    )  # the config blob is a few hundred bytes: not one of the two
    blobs = {"small": layers[0], "large": layers[-1]}
    cache = CacheProcess(root / "store-nocopy", upstream.url, "--log-level", "info")
    cache.start()
    try:
        async with aiohttp.ClientSession() as session:
            await pull_image_named(session, cache.url, name)
    finally:
        cache.stop()
    ok = True
    ratios: dict[str, list[float]] = {"small": [], "large": []}
    cpu: dict[tuple[str, str], list[float]] = {}
    cache = CacheProcess(root / "store-nocopy", upstream.url, "--log-level", "info")
    # nginx serves the very files the cache stored (its store's layout, blobs/sha256/ab/abcd…).
    with nginx(root / "nginx", root / "store-nocopy") as (nginx_pid, nginx_port):
        cache.start()
        assert cache.proc is not None
        try:
            for round_ in range(args.rounds):
                for kind, (size, digest) in blobs.items():
                    targets = [
                        ("cache", cache.proc.pid, cache.port, f"/v2/{name}/blobs/{digest}"),
                        (
                            "nginx",
                            nginx_pid,
                            nginx_port,
                            f"/blobs/sha256/{digest[7:9]}/{digest[7:]}",
                        ),
                    ]
                    if round_ % 2:
                        targets.reverse()
                    figures: dict[str, Measured] = {}
                    for server, pid, port, path in targets:
                        got = measure(pid, port, path, size, args.nocopy_clients, args.seconds)
                        figures[server] = got
                        cpu.setdefault((kind, server), []).append(got.cpu_per_request_us)
                        print(
                            f"  round {round_ + 1} {kind:5} ({size} B) {server:5}: "
                            f"{got.mbps:8.0f} MB/s {got.rps:8.0f} req/s "
                            f"{got.cpu_per_request_us:7.0f} us CPU/request "
                            f"failures {got.load.failures} (load {load_average()})",
                            flush=True,
                        )
                        if got.load.failures or not got.load.requests:
                            print(f"  FAILED: {got.load.first_failure or 'no request completed'}")
                            ok = False
                    if figures["nginx"].load.requests:
                        ratios[kind].append(figures["cache"].mbps / figures["nginx"].mbps)
        finally:
            cache.stop()
    print("server-limited ratios (dnsoverride cache / nginx sendfile), medians of rounds:")
    for kind, values in ratios.items():
        if not values:
            continue
        print(
            f"  {kind} blob throughput: {statistics.median(values):.2f}x "
            f"(rounds {', '.join(f'{v:.2f}' for v in values)}; target >= 0.9x); CPU per "
            f"request: cache {statistics.median(cpu[(kind, 'cache')]):.0f} us, "
            f"nginx {statistics.median(cpu[(kind, 'nginx')]):.0f} us"
        )
    return ok


async def pull_image_named(session: aiohttp.ClientSession, base: str, name: str) -> None:
    """Pull `name`:TAG through `base` once (manifest and every blob), so it is stored."""
    async with session.get(f"{base}/v2/{name}/manifests/{TAG}", headers={"Accept": ACCEPT}) as r:
        r.raise_for_status()
        manifest = json.loads(await r.read())
    for digest in [manifest["config"]["digest"]] + [x["digest"] for x in manifest["layers"]]:
        async with session.get(f"{base}/v2/{name}/blobs/{digest}") as response:
            response.raise_for_status()
            await response.read()


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        root = Path(tmp)
        if args.only_server_limited:
            upstream = DistributionRegistry(root / "upstream").start()
            try:
                return 0 if await server_limited(root, upstream, args) else 1
            finally:
                upstream.stop()
        image = build_image(
            root / "layout",
            TAG,
            layer_sizes=tuple([args.layer_mb << 20] * args.layers),
            platforms=("linux/amd64",),
        )
        image_bytes = image.blob_bytes
        digest = max(image.blobs, key=lambda d: image.blobs[d])
        upstream = DistributionRegistry(root / "upstream").start()
        try:
            # Docker schema 2, like the Docker Hub images distribution's proxy is used for.
            await push(image, f"{upstream.address}/{NAME}:{TAG}", docker_v2=True)
            print(
                f"image: {args.layers} layers, {image_bytes / 1e6:.1f} MB; {args.clients} clients"
            )
            results = await cold_phase(root, upstream, args.clients)
            await warm_phase(root, upstream, results, (digest, image.blobs[digest]), args.seconds)
            ok = await server_limited(root, upstream, args)
        finally:
            upstream.stop()
    for result in results:
        report(result, image_bytes)
    theirs, ours = results
    print("ratios (dnsoverride / distribution proxy):")
    print(
        f"  upstream bytes for {args.clients} cold pulls: "
        f"{ours.upstream_bytes / image_bytes:.2f}x vs {theirs.upstream_bytes / image_bytes:.2f}x "
        f"image size (target 1.0x)"
    )
    print(f"  warm blob throughput: {ours.blob_mbps / theirs.blob_mbps:.2f}x (target >= 1.0x)")
    print(
        f"  manifest-by-tag req/s: {ours.manifest_rps / theirs.manifest_rps:.1f}x (target >= 10x)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-mb", type=int, default=32)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="server-limited rounds")
    parser.add_argument("--nocopy-clients", type=int, default=4)
    parser.add_argument("--small-kb", type=int, default=4)
    parser.add_argument("--large-mb", type=int, default=48)
    parser.add_argument("--only-server-limited", action="store_true")
    sys.exit(asyncio.run(main(parser.parse_args())))
