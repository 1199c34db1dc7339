"""What the running DNS server reports on its admin listener, for `dnsoverride status`
(`/status`) and `dnsoverride explain --live` (`/explain`).

`/status` is one JSON document: the zone set being served (files, names, content hash,
generation), the last reload (when, result, problems), the views, the health-gated
overrides and which are withdrawn, each upstream's verdict, the two caches' size and hit
ratio, and queries per second. Everything is read from what the daemon keeps anyway;
nothing is counted for it on the query path.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from dnsoverride.common.reloader import ReloadStats
from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.config import ServeConfig
from dnsoverride.dns.explain import explain
from dnsoverride.dns.health import HealthMonitor
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.live import LiveZones

# Queries per second are measured over about this long (between status requests).
QPS_WINDOW = 60.0


@dataclass
class DnsState:
    """The parts of a running DNS server that its status is read from."""

    config: ServeConfig
    listeners: list[str]
    zones: LiveZones
    routing: Callable[[], Routing]  # the routing being served (the reloader's current)
    reloads: ReloadStats
    health: HealthMonitor
    stats: DnsStats
    caches: Mapping[str, AnswerCache | ResponseCache]
    started: float = field(default_factory=time.time)
    # (monotonic time, queries answered): taken at each status request, for the QPS.
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        self._samples.append((time.monotonic(), 0))

    def status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document."""
        routing = self.routing()
        zone_set, generation = self.zones.snapshot()
        withdrawn = self.zones.withdrawn
        return {
            "daemon": "dns",
            "pid": os.getpid(),
            "started_unix": self.started,
            "listeners": self.listeners,
            "zones": {
                "directory": zone_set.directory,
                "files": [{"name": z.name, "names": len(z.stored)} for z in zone_set.files],
                "names": zone_set.name_count(),
                "content_hash": routing.content_hash,
                "generation": generation,
            },
            "reload": self.reloads.summary(),
            "views": [
                {
                    "name": view.name,
                    "clients": [str(network) for network in view.clients],
                    "zones": "all" if view.zones is None else sorted(view.zones),
                    "default": view is routing.views.default,
                }
                for view in routing.views.views
            ],
            "health": [
                {
                    "name": name,
                    "withdrawn": name in withdrawn,
                    "targets": {address: state.up for address, state in targets.items()},
                }
                for name, targets in sorted(self.health.states().items())
            ],
            "upstreams": [
                {"address": upstream, "up": up, "failures": self._failures(upstream)}
                for upstream, up in self.stats.upstream_up.items()
            ],
            "caches": {
                name: {
                    "entries": len(cache),
                    "hits": cache.hits,
                    "misses": cache.misses,
                    "hit_ratio": cache.hits / (cache.hits + cache.misses)
                    if cache.hits + cache.misses
                    else None,
                }
                for name, cache in self.caches.items()
            },
            "queries": self._queries(),
        }

    def explain(self, query: Mapping[str, str]) -> dict[str, object]:
        """The `/explain?name=N&type=T&from=IP` document: `dns.explain` on the running
        routing, with the health verdicts of now."""
        name = query.get("name")
        if not name:
            raise ValueError("name= is required")
        return explain(
            self.routing(),
            [str(upstream) for upstream in self.config.upstreams],
            name,
            query.get("type", "A"),
            query.get("from") or None,
            withdrawn=self.zones.withdrawn,
            health=self.health.states(),
        )

    def _failures(self, upstream: str) -> dict[str, int]:
        return {
            reason: count
            for (name, reason), count in self.stats.failures.items()
            if name == upstream
        }

    def _queries(self) -> dict[str, object]:
        total = sum(cell[0] for cell in list(self.stats.queries.values()))
        now = time.monotonic()
        # Since the oldest sample within the window, or else since the last request.
        since, before = self._samples[-1]
        for taken, count in self._samples:
            if now - taken <= QPS_WINDOW:
                since, before = taken, count
                break
        self._samples.append((now, total))
        seconds = now - since
        return {
            "total": total,
            "qps": round((total - before) / seconds, 2) if seconds > 0 else None,
            "over_seconds": round(seconds, 1),
        }
