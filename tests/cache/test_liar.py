"""The cache against a lying upstream (tests/support/registry_liar.py): real-size manifests in many
small writes, HTML 200s, wrong Content-Length, stalls, token servers answering HTML or
nothing, 429 with Retry-After. Nothing unverified is stored or served as complete.

Tests marked "fails before the fix" reproduce a reported bug (issue 9) and were run
against the code before it (main at d97161d), where they fail.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.registry_fixtures import StartCache
from tests.support.registry_liar import (
    LyingRegistry,
    digest_of,
    real_size_index,
    real_size_manifest,
)
from tests.support.registry_peers import OCI_INDEX, OCI_MANIFEST, CacheProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
SIZES = (5 << 10, 12 << 10, 42 << 10, 60 << 10)


@pytest.fixture
async def liar() -> AsyncIterator[LyingRegistry]:
    async with LyingRegistry() as server:
        yield server


def stored(cache: CacheProcess, kind: str = "manifests") -> dict[str, bytes]:
    root = cache.storage / kind / "sha256"
    return {f"sha256:{p.name}": p.read_bytes() for p in root.glob("*/*")} if root.exists() else {}


def assert_store_verified(cache: CacheProcess) -> None:
    """Every stored file hashes to its name, and no temp file is left."""
    for kind in ("manifests", "blobs"):
        for digest, data in stored(cache, kind).items():
            assert digest_of(data) == digest, f"{kind} {digest} is corrupt ({len(data)} bytes)"
    assert cache.temp_files() == []


async def _pull_whole(
    http: aiohttp.ClientSession, cache: CacheProcess, blobs: dict[str, bytes]
) -> None:
    """GET ci/app:v1 and its blobs: a stale manifest is only served when all of it is stored."""
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 200
    for blob, data in blobs.items():
        async with http.get(f"{cache.url}/v2/ci/app/blobs/{blob}") as response:
            # Read to the end: the last byte is sent once the blob is stored.
            assert (response.status, await response.read()) == (200, data)


async def _error(response: aiohttp.ClientResponse) -> tuple[str, str]:
    error = json.loads(await response.read())["errors"][0]
    return str(error["code"]), str(error["message"])


async def _refused_twice(http: aiohttp.ClientSession, url: str) -> list[tuple[str, str]]:
    """(code, message) of two GETs in turn, both 502: nothing was kept from the first."""
    errors = []
    for _ in range(2):
        async with http.get(url) as response:
            assert response.status == 502
            errors.append(await _error(response))
    return errors


@pytest.mark.parametrize("digest_header", [True, False])
async def test_real_size_manifests_in_many_small_writes(
    liar: LyingRegistry,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
    digest_header: bool,
) -> None:
    """Fails before the fix: one `read(4 MiB + 1)` returned whatever had arrived; with a
    digest header that was a spurious 502, without one a truncated manifest was stored."""
    liar.chunk = 1460  # one TCP segment's worth per write
    liar.digest_header = digest_header
    expected = {}
    for size in SIZES:
        body, _ = real_size_manifest(size)
        expected[f"size{size}"] = (body, liar.add_manifest(f"ci/m{size}", "v1", body, OCI_MANIFEST))
    children = [real_size_manifest(5 << 10, layers=20)[0] for _ in range(12)]
    for number, child in enumerate(children):
        liar.add_manifest("ci/multi", f"p{number}", child, OCI_MANIFEST)
    index = real_size_index(children, size=20 << 10)
    expected["index"] = (index, liar.add_manifest("ci/multi", "v1", index, OCI_INDEX))
    cache = start_cache(liar.url)
    accept = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    for key, (body, digest) in expected.items():
        name = "ci/multi" if key == "index" else f"ci/m{key[4:]}"
        for reference in ("v1", digest):
            url = f"{cache.url}/v2/{name}/manifests/{reference}"
            async with http.get(url, headers=accept) as response:
                assert response.status == 200, await response.text()
                assert await response.read() == body
                assert response.headers["Docker-Content-Digest"] == digest
    # The index's platforms, by digest, as a client would ask next.
    for child in children:
        async with http.get(f"{cache.url}/v2/ci/multi/manifests/{digest_of(child)}") as response:
            assert response.status == 200
            assert await response.read() == child
    assert set(stored(cache)) == {d for _, d in expected.values()} | set(map(digest_of, children))
    assert_store_verified(cache)


async def test_html_200_is_refused_and_never_stored(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: a by-tag answer without digest header was stored unchecked,
    so a captive portal's login page was cached, tagged and served as the manifest."""
    body, _ = real_size_manifest(8 << 10)
    digest = liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.digest_header = False
    liar.html = {"v1"}
    cache = start_cache(liar.url)
    url = f"{cache.url}/v2/ci/app/manifests/v1"
    for code, message in await _refused_twice(http, url):
        assert code == "MANIFEST_INVALID"
        assert "not JSON (text/html" in message
    # Not stored, not tagged: the second client asked the upstream again.
    assert stored(cache) == {}
    assert len(liar.upstream_requests()) == 2
    assert not list((cache.storage / "tags").rglob("v1"))
    liar.html = set()
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == body
    assert set(stored(cache)) == {digest}
    assert_store_verified(cache)


@pytest.mark.parametrize("digest_header", [True, False])
@pytest.mark.parametrize("delta", [100, -100])
async def test_wrong_content_length_stores_nothing(
    liar: LyingRegistry,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
    digest_header: bool,
    delta: int,
) -> None:
    """+100: the body is short and the connection closes; -100: the body is cut to a
    Content-Length that is too small. Either way nothing is stored or served."""
    body, blobs = real_size_manifest(12 << 10)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.blobs.update(blobs)
    liar.digest_header = digest_header
    liar.length_delta = delta
    cache = start_cache(liar.url)
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 502
        code, message = await _error(response)
        assert code in ("MANIFEST_INVALID", "DIGEST_INVALID", "UNAVAILABLE"), message
    blob = next(iter(blobs))
    async with http.get(f"{cache.url}/v2/ci/app/blobs/{blob}") as response:
        try:
            data: bytes | None = await response.read()
        except aiohttp.ClientPayloadError:
            data = None
        assert response.status != 200 or data is None  # never served as complete
    assert stored(cache) == {}
    assert stored(cache, "blobs") == {}
    assert_store_verified(cache)


async def test_stalled_upstream_times_out_and_serves_stale_when_it_can(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    body, blobs = real_size_manifest(6 << 10, layers=2)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.add_manifest("ci/app", "v2", real_size_manifest(6 << 10)[0], OCI_MANIFEST)
    liar.blobs.update(blobs)
    config = {
        "upstreams": [{"url": liar.url}],
        "tag_ttl": 0,
        "timeouts": {"connect": 0.5, "idle": 0.5},
    }
    cache = start_cache(config=config)
    await _pull_whole(http, cache, blobs)
    liar.stall = 5
    started = time.monotonic()
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v2") as response:
        assert response.status == 503
        assert (await _error(response))[0] == "UNAVAILABLE"
    assert time.monotonic() - started < 2.5
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 200  # stale: the revalidation stalled
        assert await response.read() == body
    assert cache.wait_log('"cache": "stale"')
    assert len(stored(cache)) == 1
    assert_store_verified(cache)


async def test_token_server_answering_html_is_a_502_with_the_reason(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: a plain-text 500 and a traceback."""
    liar.add_manifest("ci/app", "v1", real_size_manifest(6 << 10)[0], OCI_MANIFEST)
    liar.token = "html"
    cache = start_cache(liar.url)
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 502
        code, message = await _error(response)
    assert code == "UNAVAILABLE"
    assert "text/html" in message and "without a token" in message
    lines = cache.wait_log("/v2/ci/app/manifests/v1")
    assert len(lines) == 1 and "without a token" in lines[0]
    assert stored(cache) == {}


async def test_hanging_token_server_costs_each_waiter_one_timeout(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: waiters queued on a lock and each waited its own timeout in
    turn (1, 2, 3, 4 x the timeout)."""
    liar.token = "hang"
    config = {"upstreams": [{"url": liar.url}], "timeouts": {"connect": 0.5, "idle": 1}}
    cache = start_cache(config=config)

    async def timed(tag: str) -> tuple[int, float]:
        started = time.monotonic()
        async with http.get(f"{cache.url}/v2/ci/app/manifests/{tag}") as response:
            return response.status, time.monotonic() - started

    results = await asyncio.gather(*(timed(f"t{n}") for n in range(4)))
    assert [status for status, _ in results] == [503] * 4
    # One token request for all four, bounded by connect + idle = 1.5 s.
    assert max(elapsed for _, elapsed in results) < 2.5
    assert len([path for _, path in liar.requests if path.startswith("/token")]) == 1
    assert "did not answer within" in cache.logs()


async def test_429_retry_after_is_passed_on_and_not_asked_again(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: Retry-After was dropped and every client retry was another
    upstream request."""
    body, blobs = real_size_manifest(6 << 10, layers=0)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.blobs.update(blobs)
    cache = start_cache(config={"upstreams": [{"url": liar.url}], "tag_ttl": 0})
    await _pull_whole(http, cache, blobs)
    liar.fail = (429, {"Retry-After": "30"})
    before = len(liar.requests)
    retries = 10
    for _ in range(retries):
        async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
            assert response.status == 200, await response.text()  # stale
            assert await response.read() == body
        async with http.get(f"{cache.url}/v2/ci/app/manifests/v2") as response:
            assert response.status == 429
            assert 1 <= int(response.headers["Retry-After"]) <= 30
            assert (await _error(response))[0] == "TOOMANYREQUESTS"
    upstream_requests = len(liar.requests) - before
    # 20 client requests in the Retry-After period: one upstream request.
    assert upstream_requests == 1, liar.requests[before:]
    print(f"429: {2 * retries} client requests -> {upstream_requests} upstream request(s)")


async def test_uploads_is_a_repository_name_outside_the_push_api(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: any path segment `uploads` was taken as the push API (405)."""
    body, _ = real_size_manifest(5 << 10)
    liar.add_manifest("team/uploads", "v1", body, OCI_MANIFEST)
    cache = start_cache(liar.url)
    async with http.get(f"{cache.url}/v2/team/uploads/manifests/v1") as response:
        assert response.status == 200
        assert await response.read() == body
    for method, path in (
        ("POST", "/v2/team/uploads/blobs/uploads/"),
        ("GET", "/v2/team/app/blobs/uploads/0f3c"),
        ("PUT", "/v2/team/uploads/manifests/v1"),
    ):
        async with http.request(method, cache.url + path) as response:
            assert response.status == 405
            assert (await _error(response))[0] == "UNSUPPORTED"


async def test_index_by_digest_is_that_digest_or_an_error(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: an index asked for by digest with an Accept that excludes
    indexes was answered with its linux/amd64 manifest, another digest."""
    children = [real_size_manifest(5 << 10)[0] for _ in range(12)]
    for number, child in enumerate(children):
        liar.add_manifest("ci/multi", f"p{number}", child, OCI_MANIFEST)
    index = real_size_index(children)
    digest = liar.add_manifest("ci/multi", "v1", index, OCI_INDEX)
    cache = start_cache(liar.url)
    narrow = {"Accept": OCI_MANIFEST}
    async with http.get(f"{cache.url}/v2/ci/multi/manifests/{digest}", headers=narrow) as response:
        assert response.status == 404
        code, message = await _error(response)
        assert code == "MANIFEST_UNKNOWN" and "Accept" in message
    async with http.get(f"{cache.url}/v2/ci/multi/manifests/{digest}") as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
    # By tag, a client that cannot take an index still gets the linux/amd64 manifest.
    async with http.get(f"{cache.url}/v2/ci/multi/manifests/v1", headers=narrow) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest_of(children[0])


async def test_head_on_a_cold_tag_costs_one_upstream_head(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: a HEAD on a tag not cached made the cache GET the manifest."""
    body, _ = real_size_manifest(20 << 10)
    digest = liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    cache = start_cache(liar.url)
    async with http.head(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == digest
        assert int(response.headers["Content-Length"]) == len(body)
        assert response.headers["Content-Type"] == OCI_MANIFEST
    assert liar.upstream_requests() == [("HEAD", "/v2/ci/app/manifests/v1")]
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert await response.read() == body
    assert hashlib.sha256(body).hexdigest() == digest.split(":")[1]


async def test_a_portal_page_on_revalidation_serves_the_verified_stale_manifest(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    body, blobs = real_size_manifest(9 << 10, layers=1)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.blobs.update(blobs)
    cache = start_cache(config={"upstreams": [{"url": liar.url}], "tag_ttl": 0})
    await _pull_whole(http, cache, blobs)
    liar.html = {"v1"}  # HEAD still answers; the GET after it gets the portal
    liar.digest_header = False
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 200
        assert await response.read() == body
    stale = cache.wait_log('"manifest_stale"')
    assert stale and "not JSON (text/html" in stale[0]
    assert set(stored(cache)) == {digest_of(body)}


async def test_a_body_that_stalls_midway_is_a_503_not_a_crash(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: the idle timeout hit while a by-digest manifest or a tag list
    was being read was not an upstream failure but an unexpected exception: a 500 and a
    traceback."""
    body, _ = real_size_manifest(8 << 10)
    digest = liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.tags["ci/app"] = [f"v{number}" for number in range(500)]
    liar.stall, liar.stall_after = 5, 1000
    config = {"upstreams": [{"url": liar.url}], "timeouts": {"connect": 0.5, "idle": 0.5}}
    cache = start_cache(config=config)
    for path in (f"/v2/ci/app/manifests/{digest}", "/v2/ci/app/tags/list"):
        async with http.get(cache.url + path) as response:
            assert response.status == 503
            code, message = await _error(response)
            assert code == "UNAVAILABLE" and "Timeout" in message, message
        lines = cache.wait_log(f'"path": "{path}"')
        assert len(lines) == 1 and '"error_code": "UNAVAILABLE"' in lines[0]
    assert stored(cache) == {}
    assert "Traceback" not in cache.logs()


BOGUS_STRUCTURES: dict[str, dict[str, Any]] = {
    "layers not a list": {"config": {"digest": digest_of(b"c"), "size": 1}, "layers": 5},
    "layers null": {"config": {"digest": digest_of(b"c"), "size": 1}, "layers": None},
    "digest not a digest": {
        "config": {"digest": "nonsense", "size": 1},
        "layers": [{"digest": "zz", "size": 1}],
    },
    "size not a number": {
        "config": {"digest": digest_of(b"c"), "size": "1"},
        "layers": [{"digest": digest_of(b"l"), "size": [1]}],
    },
}


@pytest.mark.parametrize("bogus", sorted(BOGUS_STRUCTURES))
async def test_a_manifest_shaped_body_with_a_bogus_structure_is_refused(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession, bogus: str
) -> None:
    """No digest vouches for it, so its structure is all there is to check. Fails before
    the fix: `layers` not a list crashed the check (500, traceback); descriptors whose
    digest is no digest passed it, were stored, tagged and served."""
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, **BOGUS_STRUCTURES[bogus]}
    liar.add_manifest("ci/app", "v1", json.dumps(document).encode(), OCI_MANIFEST)
    liar.digest_header = False
    cache = start_cache(liar.url)
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 502
        code, message = await _error(response)
    assert code == "MANIFEST_INVALID" and "descriptors" in message, message
    assert stored(cache) == {}
    assert "Traceback" not in cache.logs()


@pytest.mark.parametrize(
    "index",
    [
        b"not JSON at all",
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": ["x", 5]}).encode(),
        json.dumps(
            {"schemaVersion": 2, "manifests": [{"digest": "sha256:zz", "platform": [1]}]}
        ).encode(),
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": "sha256:zz",
                        "platform": {"os": "linux", "architecture": "amd64"},
                    }
                ],
            }
        ).encode(),
    ],
    ids=["not-json", "entries-not-objects", "platform-not-object", "digest-not-a-digest"],
)
async def test_a_bogus_index_vouched_for_by_its_digest_is_served_as_is(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession, index: bytes
) -> None:
    """The upstream's digest header vouches for the bytes, so they are stored; a client
    that cannot take an index gets them as they are (no platform to pick). Fails before the
    fix: picking the linux/amd64 entry crashed on the bogus entries (500, traceback)."""
    digest = liar.add_manifest("ci/multi", "v1", index, OCI_INDEX)
    cache = start_cache(liar.url)
    url = f"{cache.url}/v2/ci/multi/manifests/v1"
    async with http.get(url, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200, await response.text()
        assert await response.read() == index
        assert response.headers["Docker-Content-Digest"] == digest
    assert "Traceback" not in cache.logs()


@pytest.mark.parametrize("token", ["t0k\r\nX-Injected: 1", "t0k\n"])
async def test_a_token_that_cannot_be_a_header_is_a_502_and_not_kept(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession, token: str
) -> None:
    """Fails before the fix: the token was cached as it came, and every request of the
    repository for the token's lifetime crashed building its Authorization header (aiohttp
    refuses control characters in headers): a 500 and a traceback each."""
    body, _ = real_size_manifest(6 << 10)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    liar.token = "ok"
    liar.token_body = json.dumps({"token": token, "expires_in": 300}).encode()
    cache = start_cache(liar.url)
    url = f"{cache.url}/v2/ci/app/manifests/v1"
    for code, message in await _refused_twice(http, url):
        assert code == "UNAVAILABLE" and "token" in message, message
    liar.token_body = None  # the token server comes to its senses: nothing bad was kept
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == body
    assert "Traceback" not in cache.logs()


async def test_a_retry_after_of_unicode_digits_is_no_crash(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: `"²".isdigit()` is true but `float("²")` raises, so a 429 with
    `Retry-After: ²` was a 500 and a traceback instead of a 429."""
    liar.fail = (429, {"Retry-After": "²"})
    cache = start_cache(liar.url)
    async with http.get(f"{cache.url}/v2/ci/app/manifests/v1") as response:
        assert response.status == 429
        assert "Retry-After" not in response.headers  # no usable value to pass on
    assert "Traceback" not in cache.logs()
