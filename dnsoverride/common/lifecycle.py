"""One service lifecycle for both daemons: from signal handlers to the last socket closed.

A daemon is a `Service` (start, reload, stop); `run_service` does the rest, the same way
for `serve` and `registry`:

1. SIGTERM/SIGINT and SIGHUP handlers go in first: a signal sent as soon as a port
   answers must not meet the default action (SIGHUP would kill the process);
2. `start` binds its listeners, or takes the sockets systemd passed (socket activation,
   `systemd.inherited_sockets`), and starts serving;
3. the admin listener (/metrics, /healthz, /readyz, its JSON endpoints and actions) and
   the control socket, when the service has them;
4. READY=1 with a one-line STATUS, then WATCHDOG=1 pings when systemd asks for them;
5. SIGHUP: RELOADING=1, `reload`, READY=1 with the new STATUS whatever the outcome
   (systemd's reload job waits for it; the daemon serves on either way), one at a time;
6. SIGTERM/SIGINT: STOPPING=1, then in `finally`, also after a failed start: the
   watchdog and reloads stop, `stop` drains and closes what `start` opened, the admin
   listener closes last (metrics stay scrapeable while the service drains).
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from dnsoverride.common import systemd
from dnsoverride.common.admin import Action, AdminServer, JsonEndpoint, start_admin
from dnsoverride.common.grammar import Endpoint

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class Admin:
    """The admin listener of a service: where (a TCP endpoint and/or a unix control
    socket), what it exposes, and its readiness."""

    endpoint: Endpoint | None
    registry: Collector  # what /metrics exposes (common/metrics.py)
    ready: Callable[[], bool]
    why_not_ready: Callable[[], str | None] | None = None
    # Awaited before each /metrics scrape (a supervisor gathers its workers' metrics).
    before_scrape: Callable[[], Awaitable[None]] | None = None
    endpoints: Mapping[str, JsonEndpoint] = field(default_factory=dict)
    actions: Mapping[str, Action] = field(default_factory=dict)
    local_reads: Mapping[str, JsonEndpoint] = field(default_factory=dict)
    control_socket: Path | None = None
    # /metrics on a listener others reach, when it must differ (names withheld).
    public_registry: Collector | None = None


@dataclass(frozen=True)
class Started:
    """What a started service reports: READY's STATUS text, and its admin listener."""

    status: str
    admin: Admin | None = None


class Service(Protocol):
    """A daemon as `run_service` runs it."""

    async def start(self, inherited: list[socket.socket]) -> Started:
        """Bind the listeners, or serve `inherited` (sockets from systemd) when there are
        any, and start serving. UserError when it cannot (port in use, bad certificate)."""
        ...

    async def reload(self) -> str:
        """SIGHUP: re-read what the service re-reads; the STATUS text after it."""
        ...

    async def stop(self) -> None:
        """Drain (bounded) and close everything `start` opened, however far it got."""
        ...


async def run_service(service: Service) -> int:
    """Run `service` until SIGTERM/SIGINT (see the module docstring); the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started = asyncio.Event()
    reloads = _Reloads(service, started)
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    admin: AdminServer | None = None
    watchdog: asyncio.Task[None] | None = None
    try:
        outcome = await service.start(systemd.inherited_sockets())
        if outcome.admin is not None:
            spec = outcome.admin
            admin = await start_admin(
                spec.endpoint.host if spec.endpoint else None,
                spec.endpoint.port if spec.endpoint else 0,
                spec.registry,
                spec.ready,
                spec.why_not_ready,
                before_scrape=spec.before_scrape,
                endpoints=spec.endpoints,
                actions=spec.actions,
                local_reads=spec.local_reads,
                public_registry=spec.public_registry,
                unix=spec.control_socket,
            )
        started.set()
        systemd.notify("READY=1", f"STATUS={outcome.status}")
        watchdog = systemd.start_watchdog()
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.info("stopping")
    finally:
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if watchdog is not None:
            watchdog.cancel()
        await reloads.cancel()
        try:
            await service.stop()
        finally:
            if admin is not None:
                await admin.close()
    log.info("stopped")
    return 0


class _Reloads:
    """SIGHUPs, handled one at a time once the service has started."""

    def __init__(self, service: Service, started: asyncio.Event) -> None:
        self._service = service
        self._started = started
        self._turn = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        await self._started.wait()
        async with self._turn:
            systemd.notify_reloading()
            status = "reload failed"
            try:
                status = await self._service.reload()
            except Exception:
                # A reload's own failures are the service's to report; a bug here must
                # not leave systemd's reload job waiting for READY=1.
                log.exception("reload_crashed")
            finally:
                systemd.notify("READY=1", f"STATUS={status}")

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
