"""DNS metrics: plain integer counters on the hot path, turned into Prometheus metrics
only when scraped (a labelled `Counter.inc()` per query would cost more than the answer;
prometheus-client is imported on the first scrape, common/metrics.py).

Label sets are bounded whatever clients send: `qtype` is a type's name when dnslib knows
it and `other` for the rest of the 65,536; refused clients are counted with empty `view`
and `qtype`; upstreams, views and reasons come from the config and the code.

Exposed names:
  dnsoverride_dns_queries_total{view,qtype,rcode,source}   source: override, cache,
                                                           upstream, stale, synthesized, error
  dnsoverride_dns_upstream_latency_seconds{upstream}       histogram of answered queries
  dnsoverride_dns_upstream_failures_total{upstream,reason} reason: timeout, servfail,
                                                           refused, error, unwanted (a
                                                           socket's worth of forged replies,
                                                           thrice); upstream "*", reason
                                                           busy: too many questions in flight
  dnsoverride_dns_upstream_unwanted_replies_total{upstream}  datagrams on a query's socket
                                                           that do not answer it (forgeries)
  dnsoverride_dns_query_errors_total{kind}                 malformed (FORMERR) or internal
                                                           (SERVFAIL): logged throttled
  dnsoverride_dns_ratelimited_total{action}                UDP replies over the rate limit:
                                                           dropped or truncated (TC)
  dnsoverride_dns_tcp_connections_stalled_total            closed: did not read its answers
  dnsoverride_dns_cache_entries{cache}                     cache: answer, response
  dnsoverride_dns_cache_hits_total{cache} / _misses_total{cache}
  dnsoverride_dns_cache_hit_ratio{cache}
  dnsoverride_dns_upstream_up{upstream}                    1 answering, 0 marked down
  dnsoverride_dns_tcp_connections_refused_total            closed at once: too many open
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dnslib

from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.ratelimit import RateLimiter

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

QueryKey = tuple[str, str, str, str]
_QTYPE_NAMES: dict[int, str] = dict(dnslib.QTYPE.forward)
_RCODE_NAMES: dict[int, str] = dict(dnslib.RCODE.forward)


def qtype_label(qtype: int) -> str:
    """The `qtype` label: the type's name, or `other` for types dnslib does not name."""
    return _QTYPE_NAMES.get(qtype, "other")


def rcode_label(rcode: int) -> str:
    """The `rcode` label: the response code's name (`other` for unassigned ones)."""
    return _RCODE_NAMES.get(rcode, "other")


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class DnsStats:
    """The counters; `count` is called once per answered query."""

    def __init__(self) -> None:
        self.queries: dict[QueryKey, list[int]] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self.latency: dict[str, list[float]] = {}
        self.upstream_up: dict[str, bool] = {}  # the forwarder's health verdict
        # Upstreams tried after the others (they let questions time out that another
        # answered), until this loop time.
        self.upstream_demoted_until: dict[str, float] = {}
        self.tcp_refused = 0  # connections closed at once: the connection cap was reached
        self.tcp_stalled = 0  # connections closed because the client did not read
        self.udp_dropped = 0  # UDP replies dropped: the socket's send queue was full
        self.unwanted: dict[str, int] = {}  # by upstream
        self.query_errors = {"malformed": 0, "internal": 0}

    def cell(self, key: QueryKey) -> list[int]:
        """The one-element counter for labels (view, qtype, rcode, source).

        The answer cache keeps the cell of each entry, so a hit costs `cell[0] += 1`
        rather than hashing a tuple of four strings.
        """
        cell = self.queries.get(key)
        if cell is None:
            cell = self.queries[key] = [0]
        return cell

    def count(self, key: QueryKey) -> None:
        """One more query with labels (view, qtype, rcode, source)."""
        self.cell(key)[0] += 1

    def upstream_answered(self, upstream: str, seconds: float) -> None:
        """An upstream answered after `seconds`: one histogram observation."""
        buckets = self.latency.get(upstream)
        if buckets is None:
            # one count per bucket plus +Inf, then the sum in the last slot
            buckets = self.latency[upstream] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        buckets[-1] += seconds

    def unwanted_reply(self, upstream: str) -> None:
        """A datagram on a query's socket to `upstream` that does not answer the query."""
        self.unwanted[upstream] = self.unwanted.get(upstream, 0) + 1

    def upstream_failed(self, upstream: str, reason: str) -> None:
        """An upstream attempt failed for `reason`."""
        key = (upstream, reason)
        self.failures[key] = self.failures.get(key, 0) + 1


class DnsCollector:
    """Reads `DnsStats` and the caches at scrape time."""

    def __init__(
        self,
        stats: DnsStats,
        answers: AnswerCache,
        responses: ResponseCache,
        ratelimit: RateLimiter,
    ) -> None:
        self._stats = stats
        self._ratelimit = ratelimit
        self._caches: dict[str, AnswerCache | ResponseCache] = {
            "answer": answers,
            "response": responses,
        }

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by prometheus_client on scrape)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        queries = CounterMetricFamily(
            "dnsoverride_dns_queries",
            "DNS queries answered, by view, query type, response code and answer source",
            labels=("view", "qtype", "rcode", "source"),
        )
        for labels, cell in list(self._stats.queries.items()):
            queries.add_metric(labels, cell[0])
        yield queries
        latency = HistogramMetricFamily(
            "dnsoverride_dns_upstream_latency_seconds",
            "Time for an upstream resolver to answer a forwarded query",
            labels=("upstream",),
        )
        for upstream, counts in list(self._stats.latency.items()):
            cumulative = 0.0
            buckets = []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=False):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            latency.add_metric([upstream], buckets, sum_value=counts[-1])
        yield latency
        failures = CounterMetricFamily(
            "dnsoverride_dns_upstream_failures",
            "Upstream query attempts that failed, by upstream and reason",
            labels=("upstream", "reason"),
        )
        for (upstream, reason), value in list(self._stats.failures.items()):
            failures.add_metric([upstream, reason], value)
        yield failures
        up = GaugeMetricFamily(
            "dnsoverride_dns_upstream_up",
            "Whether the upstream is answering (1) or marked down by a timeout or probe (0)",
            labels=("upstream",),
        )
        for upstream, value in list(self._stats.upstream_up.items()):
            up.add_metric([upstream], int(value))
        yield up
        yield CounterMetricFamily(
            "dnsoverride_dns_tcp_connections_refused",
            "TCP connections closed on accept because too many were open",
            value=self._stats.tcp_refused,
        )
        yield CounterMetricFamily(
            "dnsoverride_dns_tcp_connections_stalled",
            "TCP connections closed because the client did not read its answers in time",
            value=self._stats.tcp_stalled,
        )
        yield CounterMetricFamily(
            "dnsoverride_dns_udp_replies_dropped",
            "UDP replies dropped: the socket could not take them and its send queue was full",
            value=self._stats.udp_dropped,
        )
        unwanted = CounterMetricFamily(
            "dnsoverride_dns_upstream_unwanted_replies",
            "Datagrams on an upstream query's socket that do not answer it (forged or stray)",
            labels=("upstream",),
        )
        for upstream, count in list(self._stats.unwanted.items()):
            unwanted.add_metric([upstream], count)
        yield unwanted
        errors = CounterMetricFamily(
            "dnsoverride_dns_query_errors",
            "Queries answered FORMERR as malformed, or SERVFAIL after an internal error",
            labels=("kind",),
        )
        for kind, count in self._stats.query_errors.items():
            errors.add_metric([kind], count)
        yield errors
        limited = CounterMetricFamily(
            "dnsoverride_dns_ratelimited",
            "UDP replies over the response rate limit, by what was sent instead",
            labels=("action",),
        )
        limited.add_metric(["dropped"], self._ratelimit.dropped)
        limited.add_metric(["truncated"], self._ratelimit.truncated)
        yield limited
        entries = GaugeMetricFamily(
            "dnsoverride_dns_cache_entries", "Entries in the DNS caches", labels=("cache",)
        )
        hits = CounterMetricFamily(
            "dnsoverride_dns_cache_hits", "DNS cache lookups that hit", labels=("cache",)
        )
        misses = CounterMetricFamily(
            "dnsoverride_dns_cache_misses", "DNS cache lookups that missed", labels=("cache",)
        )
        ratio = GaugeMetricFamily(
            "dnsoverride_dns_cache_hit_ratio",
            "Hits / lookups of the DNS caches since start",
            labels=("cache",),
        )
        for name, cache in self._caches.items():
            entries.add_metric([name], len(cache))
            hits.add_metric([name], cache.hits)
            misses.add_metric([name], cache.misses)
            total = cache.hits + cache.misses
            ratio.add_metric([name], cache.hits / total if total else 0.0)
        yield from (entries, hits, misses, ratio)
