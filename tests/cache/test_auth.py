"""Upstream auth: the Bearer token flow against distribution with `auth: token`, and
redirects to a CDN host that must not receive the registry's Authorization."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.ports import free_port
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import (
    CacheProcess,
    DistributionRegistry,
    Image,
    TestProxy,
    TokenServer,
    build_image,
    pull,
    push,
    verify_dir,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
async def tokens(tmp_path: Path) -> AsyncIterator[TokenServer]:
    async with TokenServer(tmp_path / "tokens") as server:
        yield server


@pytest.fixture
def secured(tmp_path: Path, tokens: TokenServer) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path / "secured", tokens.registry_auth()) as registry:
        yield registry


@pytest.fixture
async def image(tmp_path: Path, secured: DistributionRegistry, tokens: TokenServer) -> Image:
    image = build_image(tmp_path / "layout", platforms=("linux/amd64",))
    await push(image, f"{secured.address}/team/private:v1", creds="ci:s3cret")
    return image


@pytest.fixture
def private_cache(
    start_cache: StartCache, secured: DistributionRegistry, image: Image
) -> Callable[[str], CacheProcess]:
    """A cache whose upstream is the token-secured registry holding `image`, with user `ci`
    and a password."""
    return lambda password: start_cache(
        config=_config(secured.url, username="ci", password=password)
    )


# The repositories here are private: these tests are about the cache's own upstream
# authentication, so the test client (on loopback) is granted everything.
LOOPBACK_GRANT = {"grants": [{"networks": ["127.0.0.0/8"]}]}


def _config(url: str, **credentials: str) -> dict[str, object]:
    return {
        "upstreams": [{"name": "private.example", "url": url, **credentials}],
        "clients": LOOPBACK_GRANT,
    }


async def test_token_flow_with_credentials_and_token_cache(
    tmp_path: Path,
    secured: DistributionRegistry,
    tokens: TokenServer,
    image: Image,
    private_cache: Callable[[str], CacheProcess],
    http: aiohttp.ClientSession,
) -> None:
    cache = private_cache("s3cret")
    async with http.get(f"{secured.url}/v2/") as response:
        assert response.status == 401  # the upstream really wants a token
    code, out = await pull(f"{cache.address}/team/private:v1", tmp_path / "out")
    assert code == 0, out + cache.logs()
    assert verify_dir(tmp_path / "out") == set(image.blobs)
    # One token for the pull scope, reused for the manifest and every blob.
    assert tokens.issued.count("repository:team/private:pull") == 1
    # tags/list is passed through with the same upstream authentication.
    async with http.get(f"{cache.url}/v2/team/private/tags/list") as response:
        assert response.status == 200
        assert (await response.json())["tags"] == ["v1"]
    assert tokens.issued.count("repository:team/private:pull") == 1


async def test_token_is_reused_until_it_expires(
    tokens: TokenServer,
    private_cache: Callable[[str], CacheProcess],
    http: aiohttp.ClientSession,
) -> None:
    """The real daemon on its real clock (the seconds are tested on an injected clock in
    test_upstream_clock.py): a token good for one second is reused within it, and a new
    one is fetched once it is over, not before."""
    tokens.expires_in = 11  # the cache renews 10 s early: good for one second here
    cache = private_cache("s3cret")
    url = f"{cache.url}/v2/team/private/tags/list"  # never cached: always asks upstream
    started = time.monotonic()
    for _ in range(2):
        async with http.get(url) as response:
            assert response.status == 200
    assert tokens.issued.count("repository:team/private:pull") == 1
    assert time.monotonic() - started < 1.0, "too slow to see the token reused"
    while tokens.issued.count("repository:team/private:pull") == 1:
        assert time.monotonic() - started < 10, "the token was never renewed"
        async with http.get(url) as response:
            assert response.status == 200
    assert time.monotonic() - started >= 1.0  # renewed when it expired, not before
    assert tokens.issued.count("repository:team/private:pull") == 2


async def test_wrong_credentials_give_unauthorized(
    tokens: TokenServer,
    private_cache: Callable[[str], CacheProcess],
    http: aiohttp.ClientSession,
) -> None:
    cache = private_cache("wrong")
    async with http.get(f"{cache.url}/v2/team/private/manifests/v1") as response:
        assert response.status == 401
        body = await response.json()
        assert body["errors"][0]["code"] == "UNAUTHORIZED"
    assert tokens.refused >= 1


async def test_redirect_to_cdn_drops_authorization(
    tmp_path: Path,
    secured: DistributionRegistry,
    tokens: TokenServer,
    image: Image,
    start_cache: StartCache,
) -> None:
    """Blob GETs are redirected (307) to a "CDN" on another loopback host."""
    with DistributionRegistry(tmp_path / "cdn-origin") as plain:
        await push(image, f"{plain.address}/team/private:v1")
        async with (
            TestProxy(plain.url, host="127.0.0.2") as cdn,
            TestProxy(secured.url) as front,
        ):
            front.redirect_blobs_to = cdn.url
            cache = start_cache(config=_config(front.url, username="ci", password="s3cret"))
            code, out = await pull(f"{cache.address}/team/private:v1", tmp_path / "out")
            assert code == 0, out + cache.logs()
            assert verify_dir(tmp_path / "out") == set(image.blobs)
            assert cache.stop() == 0
    assert sorted(cdn.blob_requests()) == sorted(f"/v2/team/private/blobs/{d}" for d in image.blobs)
    assert all("Authorization" not in headers for _, _, headers in cdn.requests)
    registry_auth = [h.get("Authorization", "") for _, p, h in front.requests if "/v2/team" in p]
    assert any(value.startswith("Bearer ") for value in registry_auth)


async def test_basic_auth_and_ratelimit_header_recorded(
    tmp_path: Path,
    upstream: DistributionRegistry,
    publish: Publish,
    start_cache: StartCache,
    http: aiohttp.ClientSession,
) -> None:
    image = await publish("team/basic:v1", platforms=("linux/amd64",), layer_sizes=(2000,))
    async with TestProxy(upstream.url) as guard:
        guard.basic_auth = "ci:pw"
        guard.extra_headers = {"ratelimit-remaining": "97;w=21600"}
        metrics_port = free_port()
        config = {
            "upstreams": [
                {"name": "basic.example", "url": guard.url, "username": "ci", "password": "pw"}
            ],
            "metrics": f"127.0.0.1:{metrics_port}",
            "clients": LOOPBACK_GRANT,
        }
        cache = start_cache(config=config)
        code, out = await pull(f"{cache.address}/team/basic:v1", tmp_path / "out")
        assert code == 0, out + cache.logs()
        assert verify_dir(tmp_path / "out") == set(image.blobs)
        async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            text = await response.text()
        gauge = "dnsoverride_registry_upstream_ratelimit_remaining"
        assert f'{gauge}{{upstream="basic.example"}} 97.0' in text
        assert cache.stop() == 0
    sent = {h.get("Authorization") for _, p, h in guard.requests if "/v2/team" in p}
    assert "Basic Y2k6cHc=" in sent
