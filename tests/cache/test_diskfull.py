"""The store on a full disk: a small tmpfs (mounted here as root, unmounted after).

Fails before the fix (issue 9): `put_bytes` ignored `os.write`'s count, so with one page
left a 12 KiB manifest was stored as 4,096 bytes under the full manifest's digest and
served so after a restart; the tag path answered a plain-text 500 with a traceback and
left a temp file; /readyz stayed 200.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.mounts import tmpfs
from tests.support.ports import free_port
from tests.support.registry_fixtures import StartCache
from tests.support.registry_liar import LyingRegistry, digest_of, real_size_manifest
from tests.support.registry_peers import OCI_MANIFEST, CacheProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
PAGE = 4096


def fill(root: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system's free space with a filler file."""
    info = os.statvfs(root)
    filler = root / "filler"
    with filler.open("wb") as stream:
        stream.write(b"\0" * (info.f_bavail * info.f_frsize - leave))
    return filler


def corrupt_entries(storage: Path) -> list[str]:
    """Every stored file re-hashed: the names of those whose content is not their digest."""
    bad = []
    for kind in ("manifests", "blobs"):
        for path in (storage / kind / "sha256").glob("*/*"):
            if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
                bad.append(f"{kind}/{path.name} ({path.stat().st_size} bytes)")
    return bad


@pytest.fixture
async def liar() -> AsyncIterator[LyingRegistry]:
    async with LyingRegistry() as server:
        yield server


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes | None]:
    async with http.get(url) as response:
        try:
            return response.status, await response.read()
        except aiohttp.ClientPayloadError:
            return response.status, None


async def test_disk_full_stores_nothing_corrupt_reports_unready_and_recovers(
    tmp_path: Path, liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    manifest, blobs = real_size_manifest(12 << 10, layers=3)
    assert len(manifest) > 3 * PAGE
    digest = liar.add_manifest("ci/app", "v1", manifest, OCI_MANIFEST)
    big = os.urandom(64 << 10)
    blobs[digest_of(big)] = big
    liar.blobs.update(blobs)
    metrics = free_port()
    with tmpfs(tmp_path / "disk", "2m") as disk:
        config = {"upstreams": [{"url": liar.url}], "metrics": f"127.0.0.1:{metrics}"}
        cache = start_cache(config=config, storage=disk / "store")
        readyz = f"http://127.0.0.1:{metrics}/readyz"
        async with http.get(readyz) as response:
            assert response.status == 200
        filler = fill(disk, leave=PAGE)

        # The manifest is verified, so this client gets it; it is not kept.
        status, body = await _get(http, f"{cache.url}/v2/ci/app/manifests/v1")
        assert (status, body) == (200, manifest)
        assert cache.wait_log('"store_write_failed"')
        async with http.get(readyz) as response:
            assert response.status == 503
            reason = await response.text()
        assert "lack of space" in reason and "bytes free" in reason
        # A blob cannot be stored: never served as complete.
        status, body = await _get(http, f"{cache.url}/v2/ci/app/blobs/{digest_of(big)}")
        assert status == 503 or body is None
        assert cache.temp_files() == []
        assert corrupt_entries(cache.storage) == []
        lines = cache.wait_log('"request"', "/v2/ci/app/blobs/")
        assert lines and "No space left on device" in lines[-1]
        assert "Traceback" not in cache.logs()

        # Restart on the full disk: nothing corrupt was left to serve.
        assert cache.stop() == 0
        cache.start()
        assert corrupt_entries(cache.storage) == []
        assert cache.temp_files() == []

        # Space comes back: ready again, and everything is stored, verified.
        filler.unlink()
        async with http.get(readyz) as response:
            assert response.status == 200
        status, body = await _get(http, f"{cache.url}/v2/ci/app/manifests/v1")
        assert (status, body) == (200, manifest)
        for blob, data in blobs.items():
            assert await _get(http, f"{cache.url}/v2/ci/app/blobs/{blob}") == (200, data)
        stored = {p.name for p in (cache.storage / "manifests" / "sha256").glob("*/*")}
        assert stored == {digest.split(":")[1]}
        assert corrupt_entries(cache.storage) == []
        events = [json.loads(line)["event"] for line in cache.logs().splitlines()]
        assert "store_write_failed" in events
        assert cache.stop() == 0


async def test_max_size_below_a_blob_is_warned_once(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: a budget smaller than one blob silently made the cache a
    pass-through (each new blob evicted everything else)."""
    _, blobs = real_size_manifest(5 << 10, layers=0)
    for _ in range(3):
        data = os.urandom(300_000)
        blobs[digest_of(data)] = data
    liar.blobs.update(blobs)
    cache: CacheProcess = start_cache(liar.url, "--max-size", "200000B")
    for blob, data in blobs.items():
        assert await _get(http, f"{cache.url}/v2/ci/app/blobs/{blob}") == (200, data)
    warnings = cache.wait_log('"store_budget_too_small"')
    assert len(warnings) == 1
    assert '"item_size": 300000' in warnings[0] and '"max_size": 200000' in warnings[0]
