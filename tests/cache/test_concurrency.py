"""One upstream fetch per blob, however many clients pull at once; streaming while it lands."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest

from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import CacheProcess, TestProxy, pull, verify_dir

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


async def test_eight_concurrent_cold_pulls_fetch_each_blob_once(
    tmp_path: Path, publish: Publish, proxy: TestProxy, cache: CacheProcess
) -> None:
    image = await publish(
        "ci/big:v1", platforms=("linux/amd64",), layer_sizes=(900_000, 600_000, 300_000)
    )
    proxy.throttle = 4_000_000  # bytes/s: the pulls overlap the downloads for sure

    results = await asyncio.gather(
        *(pull(f"{cache.address}/ci/big:v1", tmp_path / f"out{i}") for i in range(8))
    )
    for i, (code, out) in enumerate(results):
        assert code == 0, out + cache.logs()
        assert verify_dir(tmp_path / f"out{i}") == set(image.blobs)

    # Measured on the upstream's side: every blob byte crossed exactly once (1.0x).
    assert proxy.bytes["blob"] == image.blob_bytes
    assert sorted(proxy.blob_requests()) == sorted(
        f"/v2/ci/big/blobs/{digest}" for digest in image.blobs
    )
    manifest_gets = [p for m, p, _ in proxy.requests if m == "GET" and "/manifests/" in p]
    assert len(manifest_gets) == 1  # eight tag requests shared one upstream GET


async def test_first_bytes_stream_before_the_blob_lands_and_disconnect_does_not_cancel(
    publish: Publish, proxy: TestProxy, cache: CacheProcess
) -> None:
    image = await publish("ci/slow:v1", platforms=("linux/amd64",), layer_sizes=(2_000_000,))
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    url = f"{cache.url}/v2/ci/slow/blobs/{digest}"
    proxy.throttle = 1_000_000

    async with aiohttp.ClientSession() as first:
        response = await first.get(url)
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == size
        head = await response.content.readexactly(100_000)
        # The client has bytes while the upstream is still sending the rest.
        assert proxy.bytes["blob"] < size
        response.close()  # this client gives up

    # A second client joins the same download and gets the whole verified blob.
    async with aiohttp.ClientSession() as second, second.get(url) as response:
        data = await response.read()
    assert data[:100_000] == head
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    # The last byte is only sent after the blob is stored.
    assert digest in cache.stored_blobs()
    assert proxy.bytes["blob"] == size
    assert len(proxy.blob_requests()) == 1


async def test_range_and_head_of_a_blob_still_downloading_answer_as_bytes_land(
    publish: Publish, proxy: TestProxy, cache: CacheProcess, http: aiohttp.ClientSession
) -> None:
    image = await publish("ci/ranged:v1", platforms=("linux/amd64",), layer_sizes=(2_000_000,))
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    url = f"{cache.url}/v2/ci/ranged/blobs/{digest}"
    proxy.throttle = 500_000  # bytes/s: about four seconds for the whole blob

    async def ranged(spec: str) -> tuple[int, str, bytes]:
        async with http.get(url, headers={"Range": spec}) as response:
            return response.status, response.headers.get("Content-Range", ""), await response.read()

    whole = await http.get(url)  # starts the one download
    first = await whole.content.readexactly(1)

    async with http.head(url) as response:  # answered from the download's upstream length
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == size
        assert response.headers["Docker-Content-Digest"] == digest
    assert proxy.blob_requests("HEAD") == []
    assert await ranged(f"bytes={size}-") == (416, f"bytes */{size}", b"")

    # Served once those bytes have landed, while the rest is still on its way.
    head_status, head_range, head_bytes = await ranged("bytes=0-99")
    middle = size // 2
    mid_status, mid_range, mid_bytes = await ranged(f"bytes={middle}-{middle + 9999}")
    assert proxy.bytes["blob"] < size
    assert digest not in cache.stored_blobs()
    assert (head_status, head_range, len(head_bytes)) == (206, f"bytes 0-99/{size}", 100)
    assert (mid_status, mid_range) == (206, f"bytes {middle}-{middle + 9999}/{size}")

    # A range with the last byte in it waits for the verified, stored blob.
    tail_status, tail_range, tail_bytes = await ranged("bytes=-10")
    assert (tail_status, tail_range) == (206, f"bytes {size - 10}-{size - 1}/{size}")
    assert digest in cache.stored_blobs()

    data = first + await whole.read()
    whole.release()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert (head_bytes, mid_bytes, tail_bytes) == (
        data[:100],
        data[middle : middle + 10000],
        data[-10:],
    )
    assert len(proxy.blob_requests()) == 1


async def test_tag_revalidation_uses_head_and_refetches_only_on_change(
    publish: Publish, proxy: TestProxy, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    first = await publish("ci/tagged:v1", platforms=("linux/amd64",), layer_sizes=(1000,))
    cache = start_cache(config={"upstreams": [{"url": proxy.url}], "tag_ttl": 0})
    url = f"{cache.url}/v2/ci/tagged/manifests/v1"

    def manifest_calls() -> list[str]:
        return [m for m, p, _ in proxy.requests if "/manifests/" in p]

    async with http.get(url) as response:
        assert response.headers["Docker-Content-Digest"] == first.top_digest
    assert manifest_calls() == ["GET"]
    async with http.get(url) as response:  # expired, unchanged: one HEAD, no GET
        assert response.headers["Docker-Content-Digest"] == first.top_digest
    assert manifest_calls() == ["GET", "HEAD"]
    second = await publish("ci/tagged:v1", platforms=("linux/amd64",), layer_sizes=(1000,))
    before = len(proxy.requests)
    async with http.get(url) as response:  # changed upstream: HEAD, then GET
        assert response.headers["Docker-Content-Digest"] == second.top_digest
    assert manifest_calls()[-2:] == ["HEAD", "GET"]
    assert len([p for _, p, _ in proxy.requests[before:] if "/manifests/" in p]) == 2
