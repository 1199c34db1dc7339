"""The cache's upstream client on a clock the test turns: a registry token is reused until
10 s before its `expires_in` and fetched again from then on, and a 429's Retry-After
holds a repository off for exactly its seconds. In-process, against a real aiohttp
registry and token server on loopback; `test_auth.py` has the end-to-end run of token
expiry on the real clock."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from dnsoverride.cache.registry.config import UpstreamConfig
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import Upstream, UpstreamUnavailableError
from dnsoverride.cache.session import Timeouts

LIFETIME = 60  # the token server's `expires_in`


class _Registry:
    """`/v2/<name>/tags/list` for a Bearer token from `/token`; 429 for `busy/*`."""

    def __init__(self) -> None:
        self.issued = 0
        self.valid: set[str] = set()
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        self.issued += 1
        value = f"tok-{self.issued}"
        self.valid.add(value)
        return web.json_response({"token": value, "expires_in": LIFETIME})

    async def tags(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in self.valid:
            challenge = f'Bearer realm="{self.url}/token",service="test"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        if name.startswith("busy/"):
            return web.Response(status=429, headers={"Retry-After": "30"})
        return web.json_response({"name": name, "tags": ["v1"]})


@pytest.fixture
async def registry() -> AsyncIterator[_Registry]:
    served = _Registry()
    app = web.Application()
    app.router.add_get("/token", served.token)
    app.router.add_get("/v2/{name:.+}/tags/list", served.tags)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    served.url = f"http://{host}:{port}"
    yield served
    await runner.cleanup()


class _Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
async def upstream(registry: _Registry, clock: _Clock) -> AsyncIterator[Upstream]:
    client = Upstream(UpstreamConfig("test", registry.url), Timeouts(), Stats(), clock=clock)
    yield client
    await client.close()


async def test_a_token_is_reused_until_10_s_before_it_expires(
    registry: _Registry, upstream: Upstream, clock: _Clock
) -> None:
    async def status() -> int:
        response = await upstream.request("GET", "team/private", "tags/list")
        response.release()
        return response.status

    assert await status() == 200
    assert registry.issued == 1
    clock.now += LIFETIME - 10 - 0.1  # still good: reused
    assert await status() == 200
    assert registry.issued == 1
    clock.now += 0.1  # 10 s before it expires: a new one
    assert await status() == 200
    assert registry.issued == 2
    assert await status() == 200
    assert registry.issued == 2


async def test_retry_after_holds_the_repository_off_for_its_seconds(
    upstream: Upstream, clock: _Clock
) -> None:
    with pytest.raises(UpstreamUnavailableError) as first:
        await upstream.request("GET", "busy/app", "tags/list")
    assert first.value.status == 429
    clock.now += 29.9
    with pytest.raises(UpstreamUnavailableError, match="not asked again for 0 s"):
        await upstream.request("GET", "busy/app", "tags/list")
    clock.now += 0.1  # over: asked again (and 429 again)
    with pytest.raises(UpstreamUnavailableError, match="HTTP 429") as again:
        await upstream.request("GET", "busy/app", "tags/list")
    assert "not asked again" not in str(again.value)
