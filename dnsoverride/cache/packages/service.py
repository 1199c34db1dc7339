"""The package side of the cache as the daemon wires it: the responders and the repository
cache built from the `packages:` section over the shared store and upstream session, and
the routes (cache/app.py) they answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp

from dnsoverride.cache.app import Order, Route
from dnsoverride.cache.fetch import Fetcher
from dnsoverride.cache.packages.config import PackagesConfig
from dnsoverride.cache.packages.metalink import Metalink
from dnsoverride.cache.packages.mirrorlist import Mirrorlist
from dnsoverride.cache.packages.repos import PackagesMeter, RepositoryCache, upstream_health
from dnsoverride.cache.serving import DEFAULT_SEND_TIMEOUT
from dnsoverride.cache.store import Store

if TYPE_CHECKING:
    from prometheus_client.registry import Collector


class PackagesService:
    """Everything that answers package clients, for the daemon and for tests."""

    def __init__(
        self,
        config: PackagesConfig,
        store: Store,
        session: aiohttp.ClientSession,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ):
        self.config = config
        self.store = store
        self.session = session
        # Its own fetcher (single flight per package/repodata digest) over the shared
        # store and budget; the registry's counts its blobs.
        health = upstream_health(config.repositories)  # revalidations and downloads alike
        self.meter = PackagesMeter(health)
        self.fetcher = Fetcher(store, self.meter, send_timeout)
        self.repositories = RepositoryCache(
            config.repositories, store, self.fetcher, session, health=health
        )
        self.mirrorlist = Mirrorlist(config.mirrorlist)
        self.metalink = Metalink(config.metalink, self.repositories)

    def routes(self) -> list[Route]:
        """The routes (cache/app.py) of the package side, each at its `Order`."""
        return [
            Route(
                "mirrorlist",
                Order.MIRRORLIST,
                self.mirrorlist.handle,
                frozenset(self.config.mirrorlist.hosts),
            ),
            Route(
                "metalink",
                Order.METALINK,
                self.metalink.handle,
                frozenset(self.config.metalink.hosts),
            ),
            *self.repositories.routes(),
        ]

    def collectors(self) -> list[Collector]:
        """Metric collectors of the package side, for the admin listener's /metrics."""
        return []

    async def close(self) -> None:
        """Stop what runs in the background (downloads in flight are cut short)."""
        await self.repositories.close()
        await self.fetcher.close()
