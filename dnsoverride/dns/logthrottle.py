"""Log events that clients or a dead upstream can cause at line rate, throttled: at most
one event per key per interval, carrying the number suppressed since the previous one.

A dead upstream under load, or a client sending a malformed query a thousand times a
second, must cost the journal one line every few seconds, not one per packet. Every
occurrence is still counted (by the caller, in a metric).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)
DEFAULT_INTERVAL = 10.0  # seconds; the default of the config's `failure_log_interval`


class ThrottledLog:
    """`event` at warning level, at most once per key per `interval` seconds."""

    def __init__(
        self, event: str, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._event = event
        self._interval = interval
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def emit(self, key: str, **fields: object) -> bool:
        """Log the event with `fields` (plus `suppressed`), or count it as suppressed;
        True when it was logged. Keys are few (upstreams, error kinds): never a client."""
        now = self._clock()
        if now < self._quiet_until.get(key, -math.inf):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._quiet_until[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        log.warning(self._event, suppressed=suppressed, **fields)
        return True
