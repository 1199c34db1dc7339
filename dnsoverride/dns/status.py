"""What the running DNS server reports on its admin listener, for `dnsoverride status`
(`/status`) and `dnsoverride explain --live` (`/explain`).

`/status` is one JSON document: the zone set being served (files, names, content hash,
generation), the last reload (when, result, problems), the views, the health-gated
overrides and which are withdrawn, each upstream's verdict, the two caches' size and hit
ratio, and queries per second. Everything is read from what the daemon keeps anyway;
nothing is counted for it on the query path.

With `workers: N` the supervisor answers both for the whole service: the state (zones,
reload, views, health, upstream verdicts) is its own, which every worker follows, and
the counts (`Counts`: queries, cache entries, hits and misses, upstream failures) are
summed over every process, each worker asked for its own (`counts`). `workers` lists
the processes and the routing each serves. `/explain` is the supervisor's answer (the
workers serve the same routing and withdrawals).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from dnsoverride.common.reloader import ReloadStats
from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.config import ServeConfig
from dnsoverride.dns.explain import explain
from dnsoverride.dns.health import HealthMonitor
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.views import Routing
from dnsoverride.dns.workerpool import WorkerPool
from dnsoverride.dns.zones.live import LiveZones

# Queries per second are measured over about this long (between status requests).
QPS_WINDOW = 60.0

# What one process has counted, nested by name; summed over the processes.
Counts: TypeAlias = dict[str, "int | Counts"]
Caches: TypeAlias = Mapping[str, AnswerCache | ResponseCache]


def counts(stats: DnsStats, caches: Caches) -> Counts:
    """What this process has counted so far (a worker's answer to "counts")."""
    failures: Counts = {}
    for (upstream, reason), count in list(stats.failures.items()):
        by_reason = failures.setdefault(upstream, {})
        assert isinstance(by_reason, dict)
        by_reason[reason] = count
    return {
        "queries": sum(cell[0] for cell in list(stats.queries.values())),
        "caches": {
            name: {"entries": len(cache), "hits": cache.hits, "misses": cache.misses}
            for name, cache in caches.items()
        },
        "upstream_failures": failures,
    }


def add_counts(parts: Iterable[Counts]) -> Counts:
    """The sum of several processes' `Counts`, name by name."""
    total: Counts = {}
    for part in parts:
        _add_into(total, part)
    return total


def _add_into(total: Counts, part: Counts) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            inner = total.setdefault(key, {})
            assert isinstance(inner, dict)
            _add_into(inner, value)
        else:
            before = total.get(key, 0)
            assert isinstance(before, int)
            total[key] = before + value


@dataclass
class DnsState:
    """The parts of a running DNS server that its status is read from."""

    config: ServeConfig
    listeners: list[str]
    zones: LiveZones
    routing: Callable[[], Routing]  # the routing being served (the reloader's current)
    reloads: ReloadStats
    health: HealthMonitor | None
    stats: DnsStats
    caches: Caches
    pool: WorkerPool | None = None  # the workers of `workers: N`, None for one process
    started: float = field(default_factory=time.time)
    # (monotonic time, queries answered): taken at each status request, for the QPS.
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def __post_init__(self) -> None:
        self._samples.append((time.monotonic(), 0))

    async def status(self, _: Mapping[str, str]) -> dict[str, object]:
        """The `/status` document, for the whole service."""
        own = counts(self.stats, self.caches)
        parts = [own]
        if self.pool is not None:
            parts += (await self.pool.ask_each("counts")).values()
        total = add_counts(parts)
        routing = self.routing()
        zone_set, generation = self.zones.snapshot()
        withdrawn = self.zones.withdrawn
        health = self.health.states() if self.health is not None else {}
        return {
            "daemon": "dns",
            "pid": os.getpid(),
            "started_unix": self.started,
            "listeners": self.listeners,
            "workers": self._workers(routing.content_hash),
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
                for name, targets in sorted(health.items())
            ],
            "upstreams": [
                {
                    "address": upstream,
                    "up": up,
                    "demoted_seconds": self._demoted_seconds(upstream),
                    "failures": _at(total, "upstream_failures", upstream),
                }
                for upstream, up in self.stats.upstream_up.items()
            ],
            "caches": {name: _cache_status(_at(total, "caches", name)) for name in self.caches},
            "queries": self._queries(_number(total, "queries")),
        }

    def _workers(self, routing_hash: str) -> dict[str, object]:
        supervisor = {"worker": 0, "pid": os.getpid(), "serving": True, "routing": routing_hash}
        auto = self.config.workers_auto  # why `workers: auto` chose the count; None: set
        if self.pool is None:
            return {
                "configured": 1,
                "auto": auto,
                "serving": 1,
                "restarts": 0,
                "processes": [supervisor],
            }
        return {
            "configured": self.config.workers,
            "auto": auto,
            "serving": 1 + self.pool.serving(),
            "restarts": self.pool.restarts,
            "processes": [supervisor, *self.pool.describe()],
        }

    def _demoted_seconds(self, upstream: str) -> float | None:
        """How much longer `upstream` is tried after the others (None: it is not)."""
        until = self.stats.upstream_demoted_until.get(upstream)
        left = None if until is None else until - asyncio.get_running_loop().time()
        return round(left, 1) if left is not None and left > 0 else None

    async def explain(self, query: Mapping[str, str]) -> dict[str, object]:
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
            health=self.health.states() if self.health is not None else {},
        )

    def _queries(self, total: int) -> dict[str, object]:
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


def _at(total: Counts, *keys: str) -> Counts:
    """The nested counts under `keys` (empty where nothing was counted)."""
    for key in keys:
        inner = total.get(key, {})
        assert isinstance(inner, dict)
        total = inner
    return total


def _number(total: Counts, key: str) -> int:
    value = total.get(key, 0)
    assert isinstance(value, int)
    return value


def _cache_status(cache: Counts) -> dict[str, object]:
    hits, misses = _number(cache, "hits"), _number(cache, "misses")
    return {
        "entries": _number(cache, "entries"),
        "hits": hits,
        "misses": misses,
        "hit_ratio": hits / (hits + misses) if hits + misses else None,
    }
