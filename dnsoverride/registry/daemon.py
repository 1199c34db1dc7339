"""`dnsoverride registry`: wire config, store, upstreams and routes, and serve.

Runs on the default asyncio loop on purpose: aiohttp's FileResponse uses
`loop.sendfile` there, which uvloop lacks (3x slower blob hits; see DESIGN.md).
The store is opened (temp files removed, content indexed) before the listener binds;
the upstream is not contacted at start-up, so the cache serves what it has even
when the upstream is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
from dataclasses import dataclass

import structlog
from aiohttp import web

from dnsoverride.errors import UserError
from dnsoverride.log import configure
from dnsoverride.registry import config as registry_config
from dnsoverride.registry.app import Routes, build_app
from dnsoverride.registry.blobs import Blobs
from dnsoverride.registry.config import RegistryConfig
from dnsoverride.registry.manifests import Manifests
from dnsoverride.registry.stats import Stats
from dnsoverride.registry.store import Store
from dnsoverride.registry.upstream import Upstream

log = structlog.get_logger(__name__)


@dataclass
class Cache:
    """Every long-lived component of a running cache, for the daemon and for tests."""

    config: RegistryConfig
    store: Store
    stats: Stats
    upstreams: dict[str, Upstream]
    manifests: Manifests
    blobs: Blobs
    app: web.Application

    async def close(self) -> None:
        await self.blobs.close()
        for upstream in self.upstreams.values():
            await upstream.close()
        self.store.flush_access()


def build_cache(config: RegistryConfig) -> Cache:
    """Open the store and build the app; must run inside the event loop."""
    stats = Stats()
    store = Store(config.storage, config.budget)
    try:
        store.open()
    except OSError as error:
        raise UserError(f"cannot use storage {config.storage}: {error.strerror}") from error
    upstreams = {u.name: Upstream(u, config.timeouts, stats) for u in config.upstreams}
    manifests = Manifests(store, stats, config.tag_ttl)
    blobs = Blobs(store, stats)
    routes = Routes(upstreams, config.default_upstream, manifests, blobs, stats)
    return Cache(config, store, stats, upstreams, manifests, blobs, build_app(routes, stats))


def tls_context(config: RegistryConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"cannot load TLS certificate/key: {error}") from error
    return context


async def serve(config: RegistryConfig) -> int:
    cache = build_cache(config)
    runner = web.AppRunner(cache.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=tls_context(config))
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        await cache.close()
        raise UserError(
            f"cannot listen on {config.host}:{config.port}: {error.strerror}"
        ) from error
    log.info(
        "registry_listening",
        host=config.host,
        port=config.port,
        tls=config.tls_cert is not None,
        upstreams=[u.name for u in config.upstreams],
        default_upstream=config.default_upstream,
        storage=str(config.storage),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("registry_stopping")
    await runner.cleanup()
    await cache.close()
    return 0


def run(args: argparse.Namespace) -> int:
    configure(args.log_format, args.log_level or "info")
    config = registry_config.load(args)
    return asyncio.run(serve(config))
