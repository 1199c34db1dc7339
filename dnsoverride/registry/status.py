"""What the running registry cache reports on its admin listener (`/status`), for
`dnsoverride status`: store use against its budget, hit ratio by kind, the downloads in
flight with how many requests wait on each, each upstream's errors, last reported rate
limit and the repositories inside a Retry-After, and the last error responses. Read from
what the cache keeps anyway; nothing is counted for it on the request path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dnsoverride.registry.blobs import Blobs
from dnsoverride.registry.stats import Stats
from dnsoverride.registry.store import Store
from dnsoverride.registry.upstream import Upstream

KINDS = ("blob", "manifest")


@dataclass
class CacheState:
    """The parts of a running cache that its status is read from."""

    listeners: list[str]
    store: Store
    stats: Stats
    blobs: Blobs
    upstreams: Mapping[str, Upstream]
    started: float = field(default_factory=time.time)

    async def status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document."""
        store, stats = self.store, self.stats
        budget = store.budget
        return {
            "daemon": "registry",
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
                    "hits": stats.hits[kind],
                    "misses": stats.misses[kind],
                    "hit_ratio": stats.hits[kind] / (stats.hits[kind] + stats.misses[kind])
                    if stats.hits[kind] + stats.misses[kind]
                    else None,
                }
                for kind in KINDS
            },
            "coalesced": stats.coalesced,
            "downloads": [
                {
                    "digest": str(download.digest),
                    "upstream": download.owner[0],
                    "repository": download.owner[1],
                    "bytes": download.written,
                    "size": download.size,
                    "waiters": download.waiters,
                }
                for download in self.blobs.downloads()
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
