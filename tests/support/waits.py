"""Waiting for what a test cannot be told about: a condition polled with a deadline (a
process's state seen from outside has no event), and how long a reload may take."""

from __future__ import annotations

import asyncio
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


async def poll_async(
    predicate: Callable[[], object], within: float, what: str = "condition", every: float = 0.02
) -> float:
    """`poll` for a test on the event loop: the loop runs (the server under test with it)
    while it waits."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(every)
    return time.monotonic() - start
