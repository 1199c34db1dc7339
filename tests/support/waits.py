"""Waiting for what a test cannot be told about: a condition polled with a deadline (a
process's state seen from outside has no event), and how long a reload may take."""

from __future__ import annotations

import time
from collections.abc import Callable

# What the README promises: a saved zone or config change is served within a second.
RELOAD_DEADLINE = 1.0


def poll(
    predicate: Callable[[], bool], within: float, what: str = "condition", every: float = 0.005
) -> float:
    """Seconds until `predicate()` held, asking every `every` seconds; fails after `within`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(every)
    return time.monotonic() - start
