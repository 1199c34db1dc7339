"""Shared fixtures of the registry-cache tests (a pytest plugin, registered in conftest.py).

- `upstream`: a distribution registry on loopback; `publish` builds an image and pushes it
  there.
- `proxy`: a `TestProxy` in front of `upstream` (counts and, on request, disturbs traffic).
- `start_cache`: starts `dnsoverride registry` processes; at teardown every one still
  running is stopped and must exit 0 with no traceback in its log.
- `cache`: one such process, fetching through `proxy`.
- `http`: a client session that passes bodies through undecoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.registry_peers import (
    CacheProcess,
    DistributionRegistry,
    Image,
    TestProxy,
    build_image,
    push,
)

StartCache = Callable[..., CacheProcess]
Publish = Callable[..., Awaitable[Image]]


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DistributionRegistry]:
    with DistributionRegistry(tmp_path / "upstream") as registry:
        yield registry


@pytest.fixture
def publish(tmp_path: Path, upstream: DistributionRegistry) -> Publish:
    """`await publish("team/app:v1", docker_v2=False, **build_image_kwargs)` -> the Image.

    `docker_v2` pushes Docker schema 2 media types (a manifest list for several platforms).
    """
    layouts = iter(range(1_000))

    async def publish(reference: str, docker_v2: bool = False, **build: Any) -> Image:
        image = build_image(tmp_path / f"layout{next(layouts)}", **build)
        await push(image, f"{upstream.address}/{reference}", docker_v2=docker_v2)
        return image

    return publish


@pytest.fixture
async def proxy(upstream: DistributionRegistry) -> AsyncIterator[TestProxy]:
    async with TestProxy(upstream.url) as running:
        yield running


def _stopped_cleanly(process: CacheProcess) -> None:
    if process.proc is not None:
        assert process.stop() == 0, process.logs()


@pytest.fixture
def start_cache(tmp_path: Path) -> Iterator[StartCache]:
    """`start_cache(upstream_url, *flags, config=None, storage=None)` -> a running
    CacheProcess (storing under tmp_path/store unless `storage` is given)."""
    with contextlib.ExitStack() as running:

        def start(
            upstream: str = "", *extra: str, config: Any = None, storage: Path | None = None
        ) -> CacheProcess:
            process = CacheProcess(storage or tmp_path / "store", upstream, *extra, config=config)
            # Registered first: a cache that fails to come up is still stopped.
            running.callback(_stopped_cleanly, process)
            return process.start()

        yield start


@pytest.fixture
def cache(start_cache: StartCache, proxy: TestProxy) -> CacheProcess:
    return start_cache(proxy.url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
