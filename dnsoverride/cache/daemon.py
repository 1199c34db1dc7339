"""`dnsoverride cache` (alias `dnsoverride registry`): wire config, store, upstream
session, the registry and the package side, and the Host routes together as a
`CacheService`, which the service lifecycle (common/lifecycle.py) runs.

Runs on the default asyncio loop on purpose: hits are sent with `loop.sendfile` there
(serving.py), which uvloop lacks (3x slower blob hits; docs/architecture.md,
"Event loops").
The store is opened (temp files removed, content indexed) before the listener binds;
no upstream is contacted at start-up, so the cache serves what it has even when the
upstreams are unreachable (the registry upstreams' names are resolved once, to refuse a
forwarding loop back to our own listeners).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.accesslog import AccessLogger, server_logger
from dnsoverride.cache.app import Order, Route, Router, build_app
from dnsoverride.cache.config import CacheConfig, CacheFlags
from dnsoverride.cache.contents import CacheContents
from dnsoverride.cache.fetch import Fetcher
from dnsoverride.cache.packages.service import PackagesService
from dnsoverride.cache.registry.access import Access
from dnsoverride.cache.registry.app import PATHS, RegistryHandler, Routes
from dnsoverride.cache.registry.blobs import Blobs, RegistryMeter
from dnsoverride.cache.registry.contents import RegistryContents
from dnsoverride.cache.registry.links import Links
from dnsoverride.cache.registry.manifests import Manifests
from dnsoverride.cache.registry.metrics import build_registry
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import Upstream
from dnsoverride.cache.registry.warm import WarmCollector, Warmer
from dnsoverride.cache.session import make_session, upstream_resolver
from dnsoverride.cache.status import CacheState
from dnsoverride.cache.store import Store
from dnsoverride.cache.tls import CertificateSet
from dnsoverride.common.errors import UserError, listen_error
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.lifecycle import Admin, Started, run_service
from dnsoverride.common.log import LogOptions, configure
from dnsoverride.common.resolve import UpstreamResolver, refuse_loop

log = structlog.get_logger(__name__)


@dataclass
class Cache:
    """Every long-lived component of a running cache, for the daemon and for tests."""

    config: CacheConfig
    store: Store
    links: Links
    stats: Stats
    upstreams: dict[str, Upstream]
    manifests: Manifests
    fetcher: Fetcher
    packages: PackagesService
    session: aiohttp.ClientSession
    app: web.Application
    warmer: Warmer
    contents: CacheContents

    async def close(self) -> None:
        await self.warmer.close()
        await self.fetcher.close()
        await self.packages.close()
        for upstream in self.upstreams.values():
            await upstream.close()
        await self.session.close()
        self.store.flush_access()


def build_cache(config: CacheConfig) -> Cache:
    """Open the store and build the app; must run inside the event loop."""
    stats = Stats()
    store = Store(config.storage, config.budget)
    links = Links(config.storage)
    try:
        store.open()
        links.open()
    except OSError as error:
        raise UserError(f"cannot use storage {config.storage}: {error.strerror}") from error
    resolver = upstream_resolver(config.resolvers)
    registry = config.registry
    upstreams = {
        u.name: Upstream(u, config.timeouts, stats, make_session(config.timeouts, resolver))
        for u in registry.upstreams
    }
    manifests = Manifests(store, links, stats, registry.tag_ttl)
    fetcher = Fetcher(store, RegistryMeter(stats), config.timeouts.send)
    blobs = Blobs(store, links, stats, fetcher)
    access = Access(registry.clients, upstreams, store, links, stats)
    routes = Routes(upstreams, registry.default_upstream, manifests, blobs, access)
    session = make_session(config.timeouts, resolver)
    packages = PackagesService(config.packages, store, session, config.timeouts.send)
    router = Router(
        [
            Route("registry", Order.REGISTRY, RegistryHandler(routes, stats), prefixes=PATHS),
            *packages.routes(),
        ]
    )
    app = build_app(router)
    warmer = Warmer(registry, upstreams, manifests, blobs, config.warm)
    contents = CacheContents(
        store, RegistryContents(store, manifests, fetcher), packages.repositories, warmer
    )
    return Cache(
        config,
        store,
        links,
        stats,
        upstreams,
        manifests,
        fetcher,
        packages,
        session,
        app,
        warmer,
        contents,
    )


def listeners(
    config: CacheConfig, certificates: CertificateSet | None
) -> list[tuple[str, int, ssl.SSLContext | None]]:
    """(host, port, TLS context or None for plain HTTP) of every listener."""
    tls = certificates.server_context() if certificates else None
    if config.tls_listen is None:
        return [(config.host, config.port, tls)]
    return [(config.host, config.port, None), (*config.tls_listen, tls)]


async def refuse_upstream_loop(config: CacheConfig) -> None:
    """Refuse to start when a registry upstream's name leads back to one of our own
    listeners."""
    upstreams = []
    for upstream in config.registry.upstreams:
        url = urlsplit(upstream.url)
        upstreams.append((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)))
    own = [(host, port) for host, port, _ in listeners(config, None)]
    await refuse_loop(upstreams, own, UpstreamResolver(servers=config.resolvers))


async def _flush_access(store: Store, interval: float = 60.0) -> None:
    """Persist the LRU order now and then, so a crash loses at most `interval` of it."""
    while True:
        await asyncio.sleep(interval)
        store.flush_access()


class CacheService:
    """The cache as the service lifecycle runs it (common/lifecycle.py)."""

    def __init__(
        self, config: CacheConfig, reread: Callable[[], CacheConfig] | None = None
    ) -> None:
        self._config = config
        self._reread = reread  # the config again from its file and flags, for a reload
        self._certificates: CertificateSet | None = None
        self._cache: Cache | None = None
        self._runner: web.AppRunner | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def start(self, inherited: list[socket.socket]) -> Started:
        config = self._config
        if config.tls_pairs:
            self._certificates = CertificateSet(config.tls_pairs)
        await refuse_upstream_loop(config)
        self._cache = cache = build_cache(config)
        # The access log: one structlog event per request (accesslog.py), on by default.
        self._runner = runner = web.AppRunner(
            cache.app,
            access_log=logging.getLogger("dnsoverride.cache.access"),
            access_log_class=AccessLogger,
            logger=server_logger(),
            handle_signals=False,
        )
        await runner.setup()
        sites = _sites(runner, config, self._certificates, inherited)
        for where, site in sites:
            try:
                await site.start()
            except OSError as error:
                port = where.rpartition(":")[2]  # "HOST:PORT", or "fd N" under systemd
                raise listen_error(where, int(port) if port.isdigit() else 0, error) from error
        log.info(
            "cache_listening",
            host=config.host,
            port=config.port,
            tls=self._certificates is not None,
            tls_listen=config.tls_listen,
            systemd_sockets=len(inherited),
            upstreams=[u.name for u in config.registry.upstreams],
            default_upstream=config.registry.default_upstream,
            storage=str(config.storage),
        )
        self._flusher = asyncio.create_task(_flush_access(cache.store))
        cache.warmer.start_schedule()
        admin = None
        if config.metrics is not None or config.control_socket is not None:
            registry = build_registry(cache.stats, cache.store)
            public = build_registry(cache.stats, cache.store)  # names withheld
            for collector in cache.packages.collectors():
                registry.register(collector)
                public.register(collector)
            registry.register(WarmCollector(cache.warmer))
            public.register(WarmCollector(cache.warmer, names=False))
            state = CacheState(
                [where for where, _ in sites],
                cache.store,
                cache.stats,
                cache.fetcher,
                cache.upstreams,
                cache.packages,
                cache.warmer,
            )
            admin = Admin(
                config.metrics,
                registry,
                cache.store.writable,
                cache.store.not_ready,
                endpoints={"/status": state.public_status},
                actions=cache.contents.actions(),
                local_reads={**cache.contents.local_reads(), "/status": state.status},
                control_socket=config.control_socket,
                public_registry=public,
            )
        status = f"serving {cache.store.stats.entries} stored items from {config.storage}"
        return Started(status, admin)

    async def reload(self) -> str:
        """Re-read the TLS pairs (new handshakes get them, open connections are untouched)
        and the config file: its `warm:` list is followed at once; any other change needs
        a restart and is logged as such. A config with problems changes nothing."""
        done = []
        if self._certificates is not None:
            reloaded = self._certificates.reload()
            done.append("certificates reloaded" if reloaded else "certificate reload failed")
        if self._reread is not None and self._cache is not None:
            done.append(await self._reload_config(self._cache, self._reread))
        if not done:
            log.info("reload_ignored", reason="no config file and no TLS certificates")
            return "nothing to reload"
        return "; ".join(done)

    async def _reload_config(self, cache: Cache, reread: Callable[[], CacheConfig]) -> str:
        try:
            new = await asyncio.to_thread(reread)
        except UserError as error:  # the file's problems with their lines, or a file gone
            log.error("config_reload_failed", reason=str(error))
            return "config reload failed"
        old = self._config
        unapplied = [
            f.name
            for f in fields(CacheConfig)
            if f.name != "warm" and getattr(old, f.name) != getattr(new, f.name)
        ]
        # The list's images name upstreams as the new `registry:` does, but the running
        # cache has the old upstreams and default: its new list waits for the restart too.
        follow = new.warm != old.warm and new.registry == old.registry
        if new.warm != old.warm and not follow:
            unapplied.append("warm")
        restart = f"; {', '.join(unapplied)}: restart needed" if unapplied else ""
        if unapplied:
            log.warning("config_reload_needs_restart", settings=unapplied)
        if not follow:
            return f"warm list unchanged{restart}"
        self._config = replace(old, warm=new.warm)
        added, removed = cache.warmer.replace_schedule(new.warm)
        log.info(
            "warm_list_reloaded", added=added, removed=removed, images=len(cache.warmer.schedule)
        )
        return f"warm list reloaded ({len(cache.warmer.schedule)} images){restart}"

    async def stop(self) -> None:
        log.info("cache_stopping")
        if self._flusher is not None:
            self._flusher.cancel()
        if self._runner is not None:
            await self._runner.cleanup()  # lets responses in progress finish
        if self._cache is not None:
            await self._cache.close()


def _sites(
    runner: web.AppRunner,
    config: CacheConfig,
    certificates: CertificateSet | None,
    inherited: list[socket.socket],
) -> list[tuple[str, web.BaseSite]]:
    """(where, site) per listener; with sockets from systemd, one per socket instead,
    HTTPS on the one whose port is `tls: listen`'s (or on all of them without it)."""
    if not inherited:
        return [
            (str(Endpoint(host, port)), web.TCPSite(runner, host, port, ssl_context=tls))
            for host, port, tls in listeners(config, certificates)
        ]
    tls_port = config.tls_listen.port if config.tls_listen is not None else None
    tls = certificates.server_context() if certificates else None
    sites: list[tuple[str, web.BaseSite]] = []
    for sock in inherited:
        if sock.type != socket.SOCK_STREAM:
            raise UserError(f"socket activation: the cache serves TCP; fd {sock.fileno()} is not")
        port = sock.getsockname()[1]
        secure = tls if tls_port is None or port == tls_port else None
        sites.append((f"fd {sock.fileno()}", web.SockSite(runner, sock, ssl_context=secure)))
    return sites


def run(path: Path | None, flags: CacheFlags, logging: LogOptions) -> int:
    """Serve with the config file at `path` (optional) and `flags` over it until
    SIGTERM/SIGINT; returns the exit status."""
    configure(logging)
    config = cache_config.load(path, flags)
    reread = None if path is None else functools.partial(cache_config.load, path, flags)
    return asyncio.run(run_service(CacheService(config, reread)))
