"""Prometheus exposition of the registry cache's counters, read at scrape time.

The request path only bumps plain integers in `Stats` and `StoreStats`; this collector
turns them into metric families when /metrics is scraped, in the daemon's own
`Collectors` (never prometheus-client's global registry; prometheus-client is imported on
the first scrape, common/metrics.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.store import Store
from dnsoverride.common.metrics import Collectors

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

PREFIX = "dnsoverride_registry"


class RegistryCollector:
    def __init__(self, stats: Stats, store: Store) -> None:
        self.stats = stats
        self.store = store

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, store = self.stats, self.store.stats
        requests = CounterMetricFamily(
            f"{PREFIX}_requests",
            "Requests answered, by endpoint and HTTP status.",
            labels=["endpoint", "status"],
        )
        for (endpoint, status), count in sorted(stats.requests.items()):
            requests.add_metric([endpoint, str(status)], count)
        yield requests
        for name, counts, text in (
            ("cache_hits", stats.hits, "Requests answered from the store, by kind."),
            ("cache_misses", stats.misses, "Requests that needed the upstream, by kind."),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=["kind"])
            for kind in ("blob", "manifest"):
                family.add_metric([kind], counts[kind])
            yield family
        for name, counts, text in (
            ("upstream_bytes", stats.upstream_bytes, "Body bytes received from each upstream."),
            ("upstream_errors", stats.upstream_errors, "Failed upstream requests."),
            (
                "upstream_backoff_refusals",
                stats.backoff_refusals,
                "Requests refused at once during an upstream's Retry-After.",
            ),
            (
                "visibility_checks",
                stats.visibility_checks,
                "Anonymous upstream requests telling public from private repositories.",
            ),
        ):
            family = CounterMetricFamily(f"{PREFIX}_{name}", text, labels=["upstream"])
            for upstream, count in sorted(counts.items()):
                family.add_metric([upstream], count)
            yield family
        ratelimit = GaugeMetricFamily(
            f"{PREFIX}_upstream_ratelimit_remaining",
            "Last ratelimit-remaining an upstream reported.",
            labels=["upstream"],
        )
        for upstream, value in sorted(stats.ratelimit_remaining.items()):
            ratelimit.add_metric([upstream], value)
        yield ratelimit
        for name, value, text in (
            ("served_bytes", stats.bytes_served, "Blob bytes sent to clients."),
            ("coalesced", stats.coalesced, "Requests that joined an upstream fetch in flight."),
            ("stale_serves", stats.stale_serves, "Manifests served stale (upstream failing)."),
            ("verify_failures", stats.verify_failures, "Upstream content failing its digest."),
            ("evictions", store.evictions, "Store entries evicted to stay under budget."),
            ("evicted_bytes", store.evicted_bytes, "Bytes evicted to stay under budget."),
            ("store_write_failures", store.write_failures, "Store writes that failed."),
            ("store_corrupt_removed", store.corrupt_removed, "Stored files found damaged."),
        ):
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)
        yield GaugeMetricFamily(f"{PREFIX}_store_bytes", "Bytes in the store.", value=store.size)
        yield GaugeMetricFamily(
            f"{PREFIX}_store_entries", "Blobs and manifests in the store.", value=store.entries
        )
        if self.store.budget is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_store_budget_bytes",
                "The store's size cap.",
                value=self.store.budget.max_size,
            )


def build_registry(stats: Stats, store: Store) -> Collectors:
    registry = Collectors()
    registry.register(RegistryCollector(stats, store))
    return registry
