"""Plain counters of the registry cache, read by whoever exports metrics.

Hot paths bump integers here; a Prometheus collector (or a test) reads them at
scrape time, so serving a request never touches a labelled metric object.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from dnsoverride.cache.health import UpstreamHealth

# Error responses kept for `dnsoverride status` (the log has them all).
RECENT_ERRORS = 20


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
    # upstream name -> how its requests went lately.
    health: dict[str, UpstreamHealth] = field(default_factory=dict)
    # upstream name -> last `ratelimit-remaining` value it reported.
    ratelimit_remaining: dict[str, int] = field(default_factory=dict)
    stale_serves: int = 0
    verify_failures: int = 0
    # The last RECENT_ERRORS error responses, newest last.
    recent_errors: deque[dict[str, object]] = field(
        default_factory=lambda: deque(maxlen=RECENT_ERRORS)
    )

    def upstream(self, name: str) -> UpstreamHealth:
        health = self.health.get(name)
        if health is None:
            health = self.health[name] = UpstreamHealth()
        return health

    def note_error(self, method: str, path: str, status: int, code: str, message: str) -> None:
        """An error answered to a client (or a stream cut short), for the status report."""
        self.recent_errors.append(
            {
                "unix": time.time(),
                "request": f"{method} {path}",
                "status": status,
                "code": code,
                "message": message,
            }
        )
