"""dnsoverride.admin served over real TCP and read with a real HTTP client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from dnsoverride.common.admin import AdminServer, start_admin
from dnsoverride.common.errors import UserError
from tests.support.metrics import parse_samples


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def admin(
    registry: CollectorRegistry, readiness: Readiness
) -> AsyncIterator[tuple[AdminServer, aiohttp.ClientSession, str]]:
    server = await start_admin("127.0.0.1", 0, registry, readiness)
    try:
        async with aiohttp.ClientSession() as session:
            yield server, session, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_metrics_expose_the_daemon_registry(
    admin: tuple[AdminServer, aiohttp.ClientSession, str], registry: CollectorRegistry
) -> None:
    _, session, base = admin
    # Declared without the suffix; prometheus-client exposes it as *_total.
    queries = Counter("dnsoverride_test_queries", "queries", ["view"], registry=registry)
    queries.labels(view="ci").inc(3)
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    samples = parse_samples(text)
    assert samples[("dnsoverride_test_queries_total", (("view", "ci"),))] == 3.0
    # Only the daemon's own registry: no default process/python collectors leak in.
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)

    queries.labels(view="ci").inc()
    async with session.get(f"{base}/metrics") as response:
        assert 'dnsoverride_test_queries_total{view="ci"} 4.0' in await response.text()


async def test_healthz_answers_while_not_ready(
    admin: tuple[AdminServer, aiohttp.ClientSession, str],
) -> None:
    _, session, base = admin
    async with session.get(f"{base}/healthz") as response:
        assert response.status == 200
        assert (await response.text()).strip() == "ok"


async def test_readyz_follows_the_ready_callback(
    admin: tuple[AdminServer, aiohttp.ClientSession, str], readiness: Readiness
) -> None:
    _, session, base = admin
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 503
    readiness.ready = True
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 200
    readiness.ready = False
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 503


async def test_unknown_path_is_404(admin: tuple[AdminServer, aiohttp.ClientSession, str]) -> None:
    _, session, base = admin
    async with session.get(f"{base}/metricz") as response:
        assert response.status == 404


async def test_close_releases_the_port(registry: CollectorRegistry) -> None:
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    port = server.port
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz"),
        ):
            pass


async def test_port_in_use_is_a_user_error(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
            await start_admin("127.0.0.1", port, registry, lambda: True)
