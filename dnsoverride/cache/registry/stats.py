"""Plain counters of the registry cache, read by whoever exports metrics.

Hot paths bump integers here; a Prometheus collector (or a test) reads them at
scrape time, so serving a request never touches a labelled metric object.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

# Error responses kept for `dnsoverride status` (the log has them all).
RECENT_ERRORS = 20


@dataclass
class UpstreamHealth:
    """How an upstream's requests went lately, for its verdict in `dnsoverride status`:
    an answer (2xx, 404, 401/403: the upstream is there) or a failure (no connection, a
    timeout, 429, 5xx), with wall-clock times."""

    last_answer: float | None = None
    last_failure: float | None = None
    reason: str | None = None
    failing_since: float | None = None  # the first failure of those in a row, if failing
    failures: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def answered(self) -> None:
        self.last_answer = time.time()
        self.failing_since = None

    def failed(self, reason: str) -> None:
        now = time.time()
        self.last_failure, self.reason = now, reason
        self.failing_since = self.failing_since or now
        self.failures.append(now)


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
