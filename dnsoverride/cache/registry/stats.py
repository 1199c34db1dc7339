"""Plain counters of the registry cache, read by whoever exports metrics.

Hot paths bump integers here; a Prometheus collector (or a test) reads them at
scrape time, so serving a request never touches a labelled metric object.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    # (endpoint, status) -> requests answered; endpoint is base/manifest/blob/tags/other.
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    # "blob"/"manifest" -> answered from the store / needed upstream.
    hits: Counter[str] = field(default_factory=Counter)
    misses: Counter[str] = field(default_factory=Counter)
    # Requests that joined a download already in flight instead of starting one.
    coalesced: int = 0
    bytes_served: int = 0
    # upstream name -> body bytes received from it.
    upstream_bytes: Counter[str] = field(default_factory=Counter)
    upstream_errors: Counter[str] = field(default_factory=Counter)
    # upstream name -> requests failed at once inside an upstream's Retry-After period.
    backoff_refusals: Counter[str] = field(default_factory=Counter)
    # upstream name -> anonymous requests made to tell public from private repositories.
    visibility_checks: Counter[str] = field(default_factory=Counter)
    # upstream name -> last `ratelimit-remaining` value it reported.
    ratelimit_remaining: dict[str, int] = field(default_factory=dict)
    stale_serves: int = 0
    verify_failures: int = 0
