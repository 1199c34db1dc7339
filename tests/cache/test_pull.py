"""Pulls through the cache from a real distribution registry, with skopeo; API surface."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
import yarl

from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import (
    OCI_INDEX,
    OCI_MANIFEST,
    CacheProcess,
    DistributionRegistry,
    Image,
    TestProxy,
    pull,
    verify_dir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture
async def image(publish: Publish) -> Image:
    return await publish("team/app:v1")


async def test_skopeo_pulls_every_platform_through_the_cache(
    tmp_path: Path, image: Image, cache: CacheProcess
) -> None:
    code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "out", all_platforms=True)
    assert code == 0, out + cache.logs()
    assert verify_dir(tmp_path / "out") == set(image.blobs)
    # Everything the client got is now stored, verified, under its digest.
    assert cache.stored_blobs() == set(image.blobs)
    for digest in image.manifests:
        hex_digest = digest.split(":")[1]
        stored = cache.storage / "manifests" / "sha256" / hex_digest[:2] / hex_digest
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == hex_digest
    assert cache.temp_files() == []

    # A second pull of one platform by digest is served from the store.
    amd64 = image.platforms["linux/amd64"]
    code, out = await pull(f"{cache.address}/team/app@{amd64}", tmp_path / "again")
    assert code == 0, out
    assert verify_dir(tmp_path / "again") <= set(image.blobs)


async def test_manifest_headers_and_accept(
    image: Image, cache: CacheProcess, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{cache.url}/v2/") as response:
        assert response.status == 200
        assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"

    accept = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    url = f"{cache.url}/v2/team/app/manifests/v1"
    async with http.get(url, headers=accept) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_INDEX
        assert response.headers["Docker-Content-Digest"] == image.top_digest
        assert response.headers["ETag"] == f'"{image.top_digest}"'
        assert int(response.headers["Content-Length"]) == len(body)
        assert "sha256:" + hashlib.sha256(body).hexdigest() == image.top_digest
    async with http.head(url, headers=accept) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.top_digest
        assert int(response.headers["Content-Length"]) == len(body)
    etag = f'"{image.top_digest}"'
    for method in ("GET", "HEAD"):
        conditional = {**accept, "If-None-Match": etag}
        async with http.request(method, url, headers=conditional) as response:
            assert response.status == 304
            assert response.headers["ETag"] == etag
            assert await response.read() == b""
    async with http.get(url, headers={**accept, "If-None-Match": '"sha256:0"'}) as response:
        assert response.status == 200
        assert await response.read() == body

    # A client that cannot take an index gets the linux/amd64 manifest.
    async with http.get(url, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == OCI_MANIFEST
        assert response.headers["Docker-Content-Digest"] == image.platforms["linux/amd64"]


async def test_accept_negotiation_for_docker_media_types(
    publish: Publish, cache: CacheProcess, http: aiohttp.ClientSession
) -> None:
    image = await publish("team/docker:v1", docker_v2=True)  # two platforms: a manifest list
    url = f"{cache.url}/v2/team/docker/manifests/v1"
    async with http.get(url, headers={"Accept": f"{DOCKER_LIST}, {DOCKER_MANIFEST}"}) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == DOCKER_LIST
        assert response.headers["Docker-Content-Digest"] == _digest(body)
    amd64 = next(
        entry
        for entry in json.loads(body)["manifests"]
        if entry["platform"]["architecture"] == "amd64"
    )
    assert amd64["mediaType"] == DOCKER_MANIFEST
    # A client that cannot take a manifest list gets the linux/amd64 manifest.
    async with http.get(url, headers={"Accept": DOCKER_MANIFEST}) as response:
        manifest = await response.read()
        assert response.status == 200
        assert response.headers["Content-Type"] == DOCKER_MANIFEST
        assert response.headers["Docker-Content-Digest"] == amd64["digest"] == _digest(manifest)
    layers = {layer["digest"] for layer in json.loads(manifest)["layers"]}
    assert layers <= set(image.blobs)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_blob_head_get_and_range(
    image: Image, cache: CacheProcess, http: aiohttp.ClientSession
) -> None:
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    url = f"{cache.url}/v2/team/app/blobs/{digest}"
    async with http.head(url) as response:  # a miss: answered from an upstream HEAD
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == size
        assert response.headers["Docker-Content-Digest"] == digest
    async with http.get(url) as response:  # a miss: fetched and streamed
        data = await response.read()
        assert response.status == 200
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    async with http.get(url, headers={"Range": "bytes=10-19"}) as response:  # a hit
        assert response.status == 206
        assert await response.read() == data[10:20]
        assert response.headers["Content-Range"] == f"bytes 10-19/{size}"
    async with http.head(url) as response:  # a hit
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == size


async def test_tags_list_passes_through_with_pagination(
    image: Image,
    publish: Publish,
    proxy: TestProxy,
    cache: CacheProcess,
    http: aiohttp.ClientSession,
) -> None:
    await publish("team/app:v2", platforms=("linux/amd64",), layer_sizes=(1000,))
    async with http.get(f"{cache.url}/v2/team/app/tags/list") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["v1", "v2"]
    # distribution 2.8 does not paginate; the proxy adds the Link a paginating one sends.
    link = '</v2/team/app/tags/list?last=v1&n=1>; rel="next"'
    proxy.extra_headers = {"Link": link}
    params = {"n": "1", "last": "v0", "other": "x"}
    async with http.get(f"{cache.url}/v2/team/app/tags/list", params=params) as response:
        assert response.status == 200
        assert response.headers["Link"] == link
    assert proxy.requests[-1][1] == "/v2/team/app/tags/list?n=1&last=v0"


async def _error(response: aiohttp.ClientResponse) -> str:
    body = json.loads(await response.read())
    return str(body["errors"][0]["code"])


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v2/Team/App/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/team/../etc/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/team/.hidden/manifests/v1", 400, "NAME_INVALID"),
        ("GET", "/v2/team/app/manifests/bad%21tag", 400, "TAG_INVALID"),
        ("GET", "/v2/team/app/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/app/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("GET", "/v2/team/app/manifests/nosuchtag", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/team/app/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/team/app/manifests/v1?ns=quay.example", 404, "NAME_UNKNOWN"),
        ("POST", "/v2/team/app/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PUT", "/v2/team/app/manifests/v1", 405, "UNSUPPORTED"),
        ("DELETE", "/v2/team/app/manifests/v1", 405, "UNSUPPORTED"),
        ("PATCH", "/v2/team/app/blobs/uploads/abc", 405, "UNSUPPORTED"),
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
    ],
)
async def test_bad_requests_get_oci_errors(
    image: Image,
    cache: CacheProcess,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    status: int,
    code: str,
) -> None:
    # encoded=True: send the path as written, `..` included.
    async with http.request(method, yarl.URL(cache.url + path, encoded=True)) as response:
        assert response.status == status
        assert response.headers["Content-Type"].startswith("application/json")
        assert await _error(response) == code
    assert not list(cache.storage.rglob("etc"))


async def test_library_prefix_and_ns_routing(
    upstream: DistributionRegistry,
    publish: Publish,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
) -> None:
    """`alpine` means `library/alpine` on a Docker Hub upstream; `?ns=` picks the upstream."""
    image = await publish("library/alpine:3", platforms=("linux/amd64",), layer_sizes=(5000,))
    config = {
        "upstreams": [
            {"name": "registry-1.docker.io", "url": upstream.url, "library_prefix": True},
            {"name": "ghcr.io", "url": "http://127.0.0.1:9"},
        ],
        "default_upstream": "ghcr.io",
    }
    cache = start_cache(config=config)
    url = f"{cache.url}/v2/alpine/manifests/3"
    async with http.get(url, params={"ns": "docker.io"}) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.top_digest
    # containerd sends ns with blob requests too.
    digest = next(iter(image.blobs))
    params = {"ns": "docker.io"}
    async with http.get(f"{cache.url}/v2/alpine/blobs/{digest}", params=params) as response:
        assert response.status == 200
        assert _digest(await response.read()) == digest
    # Host decides when there is no ns (transparent mode).
    headers = {"Host": "registry-1.docker.io"}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200
    # Otherwise the default upstream (here unreachable) is used.
    async with http.get(url) as response:
        assert response.status == 503
        assert await _error(response) == "UNAVAILABLE"
