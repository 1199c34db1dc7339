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

That first import is 40 ms of CPU, 50-190 ms of a loaded box: done on the event loop's
thread it held every query to `serve` (and a worker's, asked for its metrics) that long.
`load_exposition` imports it on a thread of its own, awaited before the first
exposition: the loop runs between that thread's GIL switches.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
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


# What a scrape imports: the package (exposition) and the metric families of collectors.
_MODULES = ("prometheus_client", "prometheus_client.core")
_imported = threading.Event()  # set once a thread finished importing them


async def load_exposition() -> None:
    """Import prometheus-client on a thread that ends with it, unless already done; awaited
    before a process's first `exposition` so that the import does not stall its loop.
    Concurrent first scrapes each start one: the import lock runs the import once."""
    if _imported.is_set():
        return
    loop = asyncio.get_running_loop()
    imported: asyncio.Future[None] = loop.create_future()
    threading.Thread(
        target=_import, args=(loop, imported), name="metrics-import", daemon=True
    ).start()
    await imported


def _import(loop: asyncio.AbstractEventLoop, imported: asyncio.Future[None]) -> None:
    error: BaseException | None = None
    try:
        for name in _MODULES:
            importlib.import_module(name)
        _imported.set()
    except BaseException as caught:  # handed to the awaiting scrape, whatever it is
        error = caught
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
        loop.call_soon_threadsafe(_settle, imported, error)


def _settle(imported: asyncio.Future[None], error: BaseException | None) -> None:
    if imported.done():  # the scrape was cancelled (its client went away)
        return
    if error is None:
        imported.set_result(None)
    else:
        imported.set_exception(error)


def exposition(collector: Collector) -> bytes:
    """The Prometheus text exposition of what `collector` (one, or `Collectors`) collects
    now; imports prometheus-client on the first call."""
    from prometheus_client import generate_latest

    return generate_latest(collector)


def content_type() -> str:
    """The Content-Type of `exposition`'s text (the installed prometheus-client's)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return str(CONTENT_TYPE_LATEST)
