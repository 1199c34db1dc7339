"""A daemon's metrics as `/metrics` exposes them: the collectors it registered, and their
Prometheus text exposition.

Both daemons count in their own plain integers and dicts (dns/stats.py, cache/stats.py,
...); a collector (prometheus-client's `Collector` protocol: a `collect()` method) reads
them and builds prometheus-client's metric families only when asked, on a scrape.
prometheus-client itself is imported then, on the first scrape (or a supervisor's first
merge of its workers' metrics), not at start: importing any part of it runs the
package's `__init__`, whose exposition module loads urllib.request, http.server and
wsgiref: 3.3 MB of RSS (issue 13) for every daemon, scraped or not. So neither this
module nor a collector imports it at module level; annotations name its types through
TYPE_CHECKING imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector


class Collectors:
    """The collectors a daemon registered, collected in registration order (what
    prometheus-client's CollectorRegistry holds, without importing it at start)."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        """Add `collector` to what is collected on every scrape."""
        self._collectors.append(collector)

    def collect(self) -> Iterator[Metric]:
        """Every registered collector's metric families."""
        for collector in list(self._collectors):
            yield from collector.collect()


def exposition(collector: Collector) -> bytes:
    """The Prometheus text exposition of what `collector` (one, or `Collectors`) collects
    now; imports prometheus-client on the first call."""
    from prometheus_client import generate_latest

    return generate_latest(collector)


def content_type() -> str:
    """The Content-Type of `exposition`'s text (the installed prometheus-client's)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)
