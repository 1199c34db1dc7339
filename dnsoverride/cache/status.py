"""What the running cache reports on its admin listener (`/status`), for
`dnsoverride status`: use of the one store against its budget, hit ratio by kind (registry
blobs and manifests, package files and repodata), the downloads in flight with how many
requests wait on each, each registry upstream's errors, last reported rate limit and the
repositories inside a Retry-After, and the registry's last error responses. Read from
what the cache keeps anyway; nothing is counted for it on the request path.

Each upstream (registry and package) gets a verdict from how its requests went:
`DOWN` while its last request failed (since when, the reason), `rate-limited` while a
Retry-After holds or its last answer was a 429, `recent failures` when requests failed
within RECENT seconds though the last one was answered, `up` when answered, `unused` when
never asked. The `warm:` list's last warms are there too.

Repository and image names (private ones too), digests and the reasons of failures (which
name them) are in the document on local listeners only: the control socket and a loopback
admin listener (`status`). An admin listener others reach (`public_status`: where
Prometheus scrapes) gets the same document with them withheld, as `cache ls` is refused
there.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field

from dnsoverride.cache.fetch import Download, Fetcher
from dnsoverride.cache.health import UpstreamHealth
from dnsoverride.cache.packages.service import PackagesService
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import Upstream
from dnsoverride.cache.registry.warm import Warmer
from dnsoverride.cache.registry.withheld import WITHHELD, withheld
from dnsoverride.cache.store import Kind, Store

REGISTRY_KINDS = ("blob", "manifest")
PACKAGE_KINDS: tuple[Kind, ...] = ("packages", "repodata")
RECENT = 300.0  # seconds in which failures make an answering upstream `recent failures`


@dataclass
class CacheState:
    """The parts of a running cache that its status is read from."""

    listeners: list[str]
    store: Store
    stats: Stats
    fetcher: Fetcher  # the registry's blobs
    upstreams: Mapping[str, Upstream]
    packages: PackagesService
    warmer: Warmer
    started: float = field(default_factory=time.time)

    async def status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document, on a local listener."""
        return self.document(names=True)

    async def public_status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document with names and reasons withheld, on other listeners."""
        return self.document(names=False)

    def document(self, *, names: bool) -> dict[str, object]:
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
                *(_download(d, "registry", names) for d in self.fetcher.downloads()),
                *(_download(d, "packages", names) for d in self.packages.fetcher.downloads()),
            ],
            "upstreams": [
                {
                    "name": name,
                    "url": _without_credentials(upstream.config.url),
                    **verdict(stats.health.get(name), bool(upstream.backoffs()), reasons=names),
                    "errors": stats.upstream_errors[name],
                    "bytes": stats.upstream_bytes[name],
                    "ratelimit_remaining": stats.ratelimit_remaining.get(name),
                    "backoff": _backoffs(upstream.backoffs(), names),
                }
                for name, upstream in self.upstreams.items()
            ],
            "package_upstreams": self._package_upstreams(names),
            "recent_errors": [_error(e, names) for e in stats.recent_errors],
            "warm": [_warm(w, n, names) for n, w in enumerate(self.warmer.status(), 1)],
            "names_withheld": not names,
        }

    def _package_upstreams(self, names: bool) -> list[dict[str, object]]:
        repositories = self.packages.repositories
        found: list[dict[str, object]] = []
        for upstream in repositories.config.upstreams:
            asked = [r for r in repositories.repositories.values() if r.upstream == upstream]
            found.append(
                {
                    "name": upstream.name,
                    "url": _without_credentials(upstream.url),
                    **verdict(repositories.health[upstream.name], backoff=False, reasons=names),
                    "repositories": len(asked),
                    "failing": [
                        r.where if names else WITHHELD for r in asked if r.failure is not None
                    ],
                    "bytes": self.packages.meter.upstream_bytes[upstream.name],
                }
            )
        return found


def verdict(
    health: UpstreamHealth | None, backoff: bool, *, reasons: bool = True
) -> dict[str, object]:
    """`state` and `detail` of an upstream (see the module docstring); `reasons`: the
    detail names the last failure's reason."""
    now = time.time()
    last = health.last_answer if health else None
    reason = health.reason if health is not None and reasons else WITHHELD
    if health is not None and health.failing_since is not None:
        since = now - health.failing_since
        detail = f"failing for {since:.0f} s: {reason}"
        limited = backoff or "HTTP 429 " in (health.reason or "")
        state = "rate-limited" if limited else "DOWN"
        return {"state": state, "detail": detail, "last_answer_unix": last}
    if backoff:
        return {"state": "rate-limited", "detail": "inside a Retry-After", "last_answer_unix": last}
    if health is None or last is None:
        return {"state": "unused", "detail": None, "last_answer_unix": None}
    recent = sum(1 for t in health.failures if now - t < RECENT)
    if recent:
        detail = f"{recent} failed in the last {RECENT:.0f} s, last: {reason}"
        return {"state": "recent failures", "detail": detail, "last_answer_unix": last}
    return {"state": "up", "detail": None, "last_answer_unix": last}


def _download(download: Download, side: str, names: bool) -> dict[str, object]:
    """One download in flight; `repository` is the registry's (upstream, repository) tag."""
    owner = download.owner if isinstance(download.owner, tuple) else (download.source, None)
    return {
        "side": side,
        "kind": download.kind,
        "digest": str(download.digest) if names else WITHHELD,
        "upstream": owner[0],
        "repository": owner[1] if names or owner[1] is None else WITHHELD,
        "bytes": download.written,
        "size": download.size,
        "waiters": download.waiters,
    }


def _without_credentials(url: str) -> str:
    """`url` without a `user:password@` (yum's baseurl form), on every listener: a status
    report gets pasted into tickets."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _backoffs(backoffs: dict[str, dict[str, object]], names: bool) -> dict[str, object]:
    """Repositories inside a Retry-After, by name; numbered when names are withheld."""
    if names:
        return dict(backoffs)
    return {
        withheld(number): {**backoff, "reason": WITHHELD}
        for number, backoff in enumerate(backoffs.values(), 1)
    }


def _error(error: dict[str, object], names: bool) -> dict[str, object]:
    """A recent error response; its request path and message name the repository."""
    if names:
        return error
    method = str(error["request"]).partition(" ")[0]
    return {**error, "request": f"{method} {WITHHELD}", "message": WITHHELD}


def _warm(warm: dict[str, object], number: int, names: bool) -> dict[str, object]:
    """The `number`th `warm:` entry's last warm; the image and its error name it."""
    if names:
        return warm
    error = warm["last_error"]
    return {**warm, "image": withheld(number), "last_error": WITHHELD if error else error}
