"""The registry's /metrics after known traffic, /readyz, and sd_notify READY/STOPPING."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.support.metrics import parse_samples
from tests.support.ports import free_port
from tests.support.registry_fixtures import Publish
from tests.support.registry_peers import CacheProcess, DistributionRegistry, pull

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_metrics_count_known_traffic_and_notify_readiness(
    tmp_path: Path, upstream: DistributionRegistry, publish: Publish
) -> None:
    image = await publish("ci/app:v1", platforms=("linux/amd64",))
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(10)
    metrics_port = free_port()
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    try:
        cache = CacheProcess(
            tmp_path / "store", upstream.url, "--metrics", f"127.0.0.1:{metrics_port}"
        ).start()
    finally:
        del os.environ["NOTIFY_SOCKET"]
    try:
        assert notify.recv(4096).startswith(b"READY=1")
        code, out = await pull(f"{cache.address}/ci/app:v1", tmp_path / "out")
        assert code == 0, out
        code, out = await pull(f"{cache.address}/ci/app:v1", tmp_path / "again")
        assert code == 0, out
        async with aiohttp.ClientSession() as http:
            admin = f"http://127.0.0.1:{metrics_port}"
            async with http.get(f"{admin}/readyz") as response:
                assert response.status == 200
            async with http.get(f"{admin}/metrics") as response:
                samples = parse_samples(await response.text())
        upstream_name = upstream.address
        blobs = len(image.blobs)
        prefix = "dnsoverride_registry"
        assert samples[(f"{prefix}_cache_misses_total", (("kind", "blob"),))] == blobs
        assert samples[(f"{prefix}_cache_hits_total", (("kind", "blob"),))] == blobs
        manifest_bytes = sum(image.manifests.values())
        assert (
            samples[(f"{prefix}_upstream_bytes_total", (("upstream", upstream_name),))]
            == image.blob_bytes + manifest_bytes
        )
        assert samples[(f"{prefix}_served_bytes_total", ())] == 2 * image.blob_bytes
        assert samples[(f"{prefix}_requests_total", (("endpoint", "blob"), ("status", "200")))] == (
            2 * blobs
        )
        assert samples[(f"{prefix}_store_bytes", ())] == image.blob_bytes + manifest_bytes
    finally:
        assert cache.stop(signal.SIGTERM) == 0
        assert b"STOPPING=1" in notify.recv(4096)
        notify.close()
