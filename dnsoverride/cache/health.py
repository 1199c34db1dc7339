"""How an upstream's requests went lately (registry upstreams and package upstreams alike),
kept where the requests are made and read by `/status` (cache/status.py) for the
upstream's verdict."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


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
