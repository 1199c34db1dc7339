"""`dnsoverride registry`: wire config, store, upstreams and routes, and serve.

Runs on the default asyncio loop on purpose: aiohttp's FileResponse uses
`loop.sendfile` there, which uvloop lacks (3x slower blob hits; see DESIGN.md).
The store is opened (temp files removed, content indexed) before the listener binds;
the upstream is not contacted at start-up, so the cache serves what it has even
when the upstream is unreachable (its name is resolved once, to refuse a forwarding
loop back to our own listeners).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from dnsoverride.common import systemd
from dnsoverride.common.admin import start_admin
from dnsoverride.common.errors import UserError
from dnsoverride.common.log import LogOptions, configure
from dnsoverride.common.resolve import UpstreamResolver, refuse_loop
from dnsoverride.registry import config as registry_config
from dnsoverride.registry.access import Access
from dnsoverride.registry.accesslog import AccessLogger, server_logger
from dnsoverride.registry.app import Routes, build_app
from dnsoverride.registry.blobs import Blobs
from dnsoverride.registry.config import RegistryConfig, RegistryFlags
from dnsoverride.registry.links import Links
from dnsoverride.registry.manifests import Manifests
from dnsoverride.registry.metrics import build_registry
from dnsoverride.registry.stats import Stats
from dnsoverride.registry.store import Store
from dnsoverride.registry.tls import CertificateSet
from dnsoverride.registry.upstream import Upstream, make_session

log = structlog.get_logger(__name__)


@dataclass
class Cache:
    """Every long-lived component of a running cache, for the daemon and for tests."""

    config: RegistryConfig
    store: Store
    links: Links
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
    links = Links(config.storage)
    try:
        store.open()
        links.open()
    except OSError as error:
        raise UserError(f"cannot use storage {config.storage}: {error.strerror}") from error
    resolver = UpstreamResolver(servers=config.resolvers) if config.resolvers else None
    upstreams = {
        u.name: Upstream(u, config.timeouts, stats, make_session(config.timeouts, resolver))
        for u in config.upstreams
    }
    manifests = Manifests(store, links, stats, config.tag_ttl)
    blobs = Blobs(store, links, stats)
    access = Access(config.clients, upstreams, store, links, stats)
    routes = Routes(upstreams, config.default_upstream, manifests, blobs, access)
    app = build_app(routes, stats)
    return Cache(config, store, links, stats, upstreams, manifests, blobs, app)


def listeners(
    config: RegistryConfig, certificates: CertificateSet | None
) -> list[tuple[str, int, ssl.SSLContext | None]]:
    """(host, port, TLS context or None for plain HTTP) of every listener."""
    tls = certificates.server_context() if certificates else None
    if config.tls_listen is None:
        return [(config.host, config.port, tls)]
    return [(config.host, config.port, None), (*config.tls_listen, tls)]


async def refuse_upstream_loop(config: RegistryConfig) -> None:
    """Refuse to start when an upstream's name leads back to one of our own listeners."""
    upstreams = []
    for upstream in config.upstreams:
        url = urlsplit(upstream.url)
        upstreams.append((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)))
    own = [(host, port) for host, port, _ in listeners(config, None)]
    await refuse_loop(upstreams, own, UpstreamResolver(servers=config.resolvers))


def reload_certificates(certificates: CertificateSet | None) -> None:
    """SIGHUP: re-read the TLS pairs, framed by RELOADING=1 / READY=1 for `systemctl reload`."""
    systemd.notify_reloading()
    if certificates is None:
        log.info("reload_ignored", reason="no TLS certificates configured")
        result = "nothing to reload"
    else:
        result = "certificates reloaded" if certificates.reload() else "certificate reload failed"
    systemd.notify("READY=1", f"STATUS={result}")


async def _flush_access(store: Store, interval: float = 60.0) -> None:
    """Persist the LRU order now and then, so a crash loses at most `interval` of it."""
    while True:
        await asyncio.sleep(interval)
        store.flush_access()


async def serve(config: RegistryConfig) -> int:
    certificates = CertificateSet(config.tls_pairs) if config.tls_pairs else None
    await refuse_upstream_loop(config)
    cache = build_cache(config)
    # Handlers go in before the listeners bind: a signal sent as soon as the port answers
    # must not meet the default action (SIGHUP would kill the process).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP (`systemctl reload`) re-reads the certificates: new handshakes get them, open
    # connections are untouched. Without TLS it must still not kill the process.
    loop.add_signal_handler(signal.SIGHUP, reload_certificates, certificates)
    # The access log: one structlog event per request (accesslog.py), on by default.
    runner = web.AppRunner(
        cache.app,
        access_log=logging.getLogger("dnsoverride.registry.access"),
        access_log_class=AccessLogger,
        logger=server_logger(),
        handle_signals=False,
    )
    await runner.setup()
    for host, port, tls in listeners(config, certificates):
        try:
            await web.TCPSite(runner, host, port, ssl_context=tls).start()
        except OSError as error:
            await runner.cleanup()
            await cache.close()
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    log.info(
        "registry_listening",
        host=config.host,
        port=config.port,
        tls=certificates is not None,
        tls_listen=config.tls_listen,
        upstreams=[u.name for u in config.upstreams],
        default_upstream=config.default_upstream,
        storage=str(config.storage),
    )
    admin = None
    if config.metrics is not None:
        admin = await start_admin(
            *config.metrics,
            build_registry(cache.stats, cache.store),
            cache.store.writable,
            cache.store.not_ready,
        )
    pinger = systemd.start_watchdog()
    flusher = asyncio.create_task(_flush_access(cache.store))
    systemd.notify(
        "READY=1",
        f"STATUS=serving {cache.store.stats.entries} stored items from {config.storage}",
    )
    await stop.wait()
    log.info("registry_stopping")
    systemd.notify("STOPPING=1")
    flusher.cancel()
    if pinger is not None:
        pinger.cancel()
    if admin is not None:
        await admin.close()
    await runner.cleanup()
    await cache.close()
    return 0


def run(path: Path | None, flags: RegistryFlags, logging: LogOptions) -> int:
    """Serve with the config file at `path` (optional) and `flags` over it until
    SIGTERM/SIGINT; returns the exit status."""
    configure(logging)
    config = registry_config.load(path, flags)
    return asyncio.run(serve(config))
