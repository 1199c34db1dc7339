"""What the running cache reports on its admin listener (`/status`), for
`dnsoverride status`: use of the one store against its budget, hit ratio by kind (registry
blobs and manifests, package files and repodata), the downloads in flight with how many
requests wait on each, each registry upstream's errors, last reported rate limit and the
repositories inside a Retry-After, and the registry's last error responses. Read from
what the cache keeps anyway; nothing is counted for it on the request path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dnsoverride.cache.fetch import Download, Fetcher
from dnsoverride.cache.packages.service import PackagesService
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import Upstream
from dnsoverride.cache.store import Kind, Store

REGISTRY_KINDS = ("blob", "manifest")
PACKAGE_KINDS: tuple[Kind, ...] = ("packages", "repodata")


@dataclass
class CacheState:
    """The parts of a running cache that its status is read from."""

    listeners: list[str]
    store: Store
    stats: Stats
    fetcher: Fetcher  # the registry's blobs
    upstreams: Mapping[str, Upstream]
    packages: PackagesService
    started: float = field(default_factory=time.time)

    async def status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document."""
        store, stats = self.store, self.stats
        budget = store.budget
        lookups = self.packages.repositories.lookups
        counts = {kind: (stats.hits[kind], stats.misses[kind]) for kind in REGISTRY_KINDS}
        counts |= {
            kind: (lookups[(kind, "hit")], lookups[(kind, "miss")]) for kind in PACKAGE_KINDS
        }
        return {
            "daemon": "cache",
            "pid": os.getpid(),
            "started_unix": self.started,
            "listeners": self.listeners,
            "store": {
                "root": str(store.root),
                "bytes": store.stats.size,
                "entries": store.stats.entries,
                "budget_bytes": budget.max_size if budget else None,
                "high_watermark_bytes": budget.high if budget else None,
                "low_watermark_bytes": budget.low if budget else None,
                "evictions": store.stats.evictions,
                "write_failures": store.stats.write_failures,
                "not_ready": store.not_ready(),
            },
            "hits": {
                kind: {
                    "hits": hits,
                    "misses": misses,
                    "hit_ratio": hits / (hits + misses) if hits + misses else None,
                }
                for kind, (hits, misses) in counts.items()
            },
            "coalesced": stats.coalesced,
            "downloads": [
                *(_download(d, "registry") for d in self.fetcher.downloads()),
                *(_download(d, "packages") for d in self.packages.fetcher.downloads()),
            ],
            "upstreams": [
                {
                    "name": name,
                    "url": upstream.config.url,
                    "errors": stats.upstream_errors[name],
                    "bytes": stats.upstream_bytes[name],
                    "ratelimit_remaining": stats.ratelimit_remaining.get(name),
                    "backoff": upstream.backoffs(),
                }
                for name, upstream in self.upstreams.items()
            ],
            "recent_errors": list(stats.recent_errors),
        }


def _download(download: Download, side: str) -> dict[str, object]:
    """One download in flight; `repository` is the registry's (upstream, repository) tag."""
    owner = download.owner if isinstance(download.owner, tuple) else (download.source, None)
    return {
        "side": side,
        "kind": download.kind,
        "digest": str(download.digest),
        "upstream": owner[0],
        "repository": owner[1],
        "bytes": download.written,
        "size": download.size,
        "waiters": download.waiters,
    }
