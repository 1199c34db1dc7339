"""`dnsoverride serve`: wire config, zones, listeners, metrics and health checks together
as a `DnsService`, which the service lifecycle (common/lifecycle.py) runs until
SIGTERM/SIGINT and shuts down cleanly. With `workers: N` the same service runs in N
processes: this one supervises (workerpool.py), `worker_main` is each worker's.

Runs on uvloop: the DNS fast path is dominated by event-loop overhead per datagram,
where uvloop answers several times more queries than the default loop
(docs/architecture.md, "Event loops").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
import uvloop

from dnsoverride.common.errors import UserError, listen_error
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.heaptrim import trim_heap
from dnsoverride.common.lifecycle import Admin, Started, run_service
from dnsoverride.common.listen import bound_socket
from dnsoverride.common.log import LogOptions, bind_process
from dnsoverride.common.log import configure as configure_logging
from dnsoverride.common.metrics import Collectors, exposition, load_exposition
from dnsoverride.common.reloader import Reloader
from dnsoverride.dns.config import ServeConfig, ServeFlags, fit_workers, load_config
from dnsoverride.dns.controllink import ControlLink
from dnsoverride.dns.forwarder import Forwarder
from dnsoverride.dns.health import HealthMonitor
from dnsoverride.dns.listener import READ_LIMIT, TcpListener, UdpListener
from dnsoverride.dns.reload import ServeStart, serve_reloader, serve_start
from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.stats import DnsCollector, DnsStats
from dnsoverride.dns.status import Caches, Counts, DnsState, counts
from dnsoverride.dns.udpbatch import available as udp_batched
from dnsoverride.dns.udpbatch import serve_udp
from dnsoverride.dns.views import Routing
from dnsoverride.dns.workerpool import (
    MergedMetrics,
    Message,
    WorkerPool,
    WorkerSpec,
)
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import empty_reason

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 2.0
COOKIE_SECRET_SIZE = 16


# The cyclic garbage collector's thresholds (allocations before a young collection, young
# collections before an older one). A forwarded query allocates dozens of short-lived
# objects and every cache entry outlives them, so at Python's default (700, 10, 10) full
# collections kept traversing the caches: 12 % of the CPU of cold forwarding in `perf`,
# 87 -> 72 us per query at these. Our objects rarely form cycles; those few (an
# exception's traceback) wait a little longer to be collected.
GC_THRESHOLDS = (20_000, 20, 100)


def run(path: Path | None, flags: ServeFlags, logging: LogOptions) -> int:
    """Serve with the config file at `path` (optional) and `flags` over it until
    SIGTERM/SIGINT; returns the exit status (0 after a clean shutdown)."""
    configure_logging(logging)
    gc.set_threshold(*GC_THRESHOLDS)
    loaded = load_config(path, flags)
    start = serve_start(loaded, path, flags)
    # A ZoneSetError (a UserError) lists every problem of the zones. The service holds
    # the first routing until it starts, not this frame: after a reload replaces it,
    # nothing keeps the old zone set alive.
    routing = start.load()
    # `workers: auto` counts the zones too (each process holds a copy), once, at start.
    config = fit_workers(loaded, routing.zone_set.name_count())
    if config.workers > 1:
        bind_process(worker=0)  # the supervisor: worker 0 of N
    invocation = Invocation(path, flags, logging, loaded)
    service = DnsService(config, routing, invocation, start)
    # The zone set lives until the next reload (refcounting frees it then): out of the
    # collector's sight, a large one is not millions of objects for every full collection
    # to walk. The same after each swap (`install`).
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_service(service))


class _Bound:
    """What the daemon listens on, to close at shutdown."""

    def __init__(self) -> None:
        self.udp: list[asyncio.DatagramTransport] = []
        self.tcp: list[asyncio.Server] = []
        self.names: list[str] = []
        self.endpoints: list[Endpoint] = []  # bound addresses, port 0 resolved


UDP_RECEIVE_BUFFER = 4 << 20


def _grow_receive_buffer(sock: socket.socket) -> None:
    # A burst of queries (CI jobs starting together) overflows the 208 KiB default and
    # the kernel drops datagrams before we see them; the kernel caps this at rmem_max.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)


def _udp_socket(endpoint: Endpoint, *, reuse_port: bool) -> socket.socket:
    sock = bound_socket(endpoint.host, endpoint.port, socket.SOCK_DGRAM, reuse_port=reuse_port)
    _grow_receive_buffer(sock)
    return sock


async def _bind(
    config: ServeConfig,
    resolver: Resolver,
    tasks: set[asyncio.Task[None]],
    inherited: list[socket.socket],
    bound: _Bound,
) -> None:
    """Serve the inherited sockets, or bind `config.listen` (with SO_REUSEPORT when there
    are several workers); into `bound`, so that what was bound before a failure is closed
    too."""
    reuse_port = config.workers > 1
    # TCP listeners get a backlog as large as the connection cap: clients retrying over
    # TCP after TC replies arrive together, and an overflowing accept queue resets them.
    handler = TcpListener(resolver, config.tcp)

    def udp_protocol() -> UdpListener:
        return UdpListener(resolver, tasks)

    if inherited:
        for sock in inherited:
            sockname = sock.getsockname()
            if sock.type == socket.SOCK_DGRAM:
                _grow_receive_buffer(sock)
                bound.udp.append(await serve_udp(udp_protocol(), sock))
                bound.names.append(f"udp {sockname[0]}:{sockname[1]} (systemd)")
            else:
                bound.tcp.append(
                    await asyncio.start_server(
                        handler, sock=sock, backlog=config.tcp.max_connections, limit=READ_LIMIT
                    )
                )
                bound.names.append(f"tcp {sockname[0]}:{sockname[1]} (systemd)")
        return
    for endpoint in config.listen:
        try:
            transport = await serve_udp(
                udp_protocol(), _udp_socket(endpoint, reuse_port=reuse_port)
            )
            bound.udp.append(transport)
            port = transport.get_extra_info("sockname")[1]
            # A TCP listener on the same port as UDP (port 0 means: the one UDP got), bound
            # here, not by the loop from the host (common/listen.py).
            tcp = bound_socket(endpoint.host, port, socket.SOCK_STREAM, reuse_port=reuse_port)
            bound.tcp.append(
                await asyncio.start_server(
                    handler, sock=tcp, backlog=config.tcp.max_connections, limit=READ_LIMIT
                )
            )
        except OSError as error:
            raise listen_error(str(endpoint), endpoint.port, error) from None
        bound.names.append(str(Endpoint(endpoint.host, port)))
        bound.endpoints.append(Endpoint(endpoint.host, port))


@dataclass(frozen=True)
class Invocation:
    """How `serve` was started: what a worker process is started with too."""

    path: Path | None
    flags: ServeFlags
    logging: LogOptions
    loaded: ServeConfig  # as `load_config` read it (what a reload's config is compared with)


class DnsService:
    """The DNS server as the service lifecycle runs it (common/lifecycle.py); with
    `workers: N`, the supervisor of N-1 worker processes (dns/workerpool.py), or, with
    `link`, one of those workers: it serves, and takes reloads, the health verdict and
    metrics requests from the supervisor instead of watching files, probing and
    listening for scrapes itself."""

    def __init__(
        self,
        config: ServeConfig,
        routing: Routing,
        invocation: Invocation,
        start: ServeStart,
        *,
        link: ControlLink | None = None,
        cookie_secret: bytes | None = None,
    ) -> None:
        self._config = config
        self._first: Routing | None = routing
        self._invocation = invocation
        self._start = start
        self._link = link
        self._tasks: set[asyncio.Task[None]] = set()  # slow-path UDP queries in flight
        self._zones: LiveZones | None = None
        self._health: HealthMonitor | None = None
        self._bound: _Bound | None = None
        self._resolver: Resolver | None = None
        self._probing: asyncio.Task[None] | None = None
        self._reloader: Reloader[Routing] | None = None
        self._pool: WorkerPool | None = None
        self._worker_acks: list[asyncio.Future[None]] = []
        self._install: Callable[[Routing], None] | None = None
        self._counts: Callable[[], Counts] | None = None
        self._registry = Collectors()
        self._routing_hash = routing.content_hash
        self._auto_refit = config.workers  # what `workers: auto` came to at the last look
        # One DNS cookie secret for all processes: a client's next query may reach another.
        self._cookie_secret = cookie_secret or os.urandom(COOKIE_SECRET_SIZE)

    async def start(self, inherited: list[socket.socket]) -> Started:
        config = self._config
        routing, self._first = self._first, None
        assert routing is not None, "started twice"
        zone_set = routing.zone_set
        self._zones = zones = LiveZones(zone_set)
        stats = DnsStats()
        forwarder = Forwarder.for_config(config, stats)
        self._resolver = resolver = Resolver(
            config, zones, forwarder, stats, cookie_secret=self._cookie_secret
        )
        resolver.route(routing)  # the views the first load was validated with
        registry = self._registry
        registry.register(
            DnsCollector(stats, resolver.answers, resolver.responses, resolver.ratelimit)
        )
        caches: Caches = {"answer": resolver.answers, "response": resolver.responses}
        self._counts = lambda: counts(stats, caches)
        if self._link is None:
            # Health-gated overrides: checker tasks that follow every zone swap and withdraw
            # names (in the supervisor only: workers get its verdict).
            self._health = health = HealthMonitor(self._withdraw)
            registry.register(health.collector())
            health.update(zone_set.health_gated())
            zones.on_swap(lambda new: health.update(new.health_gated()))
        self._bound = bound = _Bound()
        await _bind(config, resolver, self._tasks, inherited, bound)
        self._probing = forwarder.start_probing()  # upstream health for readiness and ordering

        def install(new: Routing) -> None:
            # One synchronous step on the loop thread: no query runs between the two, and
            # the swap's generation bump retires every answer cached under the old routing.
            resolver.route(new)
            zones.swap(new.zone_set)
            gc.freeze()  # the new zone set, as at start (see `run`)
            self._installed(new)

        self._install = install
        if self._link is not None:
            return Started("worker")
        self._reloader = serve_reloader(
            install,
            routing,
            config=config,
            path=self._invocation.path,
            start=self._start,
            registry=registry,
        )
        await self._reloader.start()
        before_scrape = None
        if config.workers > 1:
            await self._start_workers(inherited, bound)
            assert self._pool is not None
            merged = MergedMetrics(registry, self._pool)
            registry = Collectors()
            registry.register(merged)
            before_scrape = merged.refresh
        log.info(
            "started",
            listeners=bound.names,
            zones=str(config.zones),
            zone_files=len(zone_set.files),
            names=zone_set.name_count(),
            upstreams=[str(u) for u in config.upstreams],
            views=[view.name for view in config.views],
            workers=config.workers,
            workers_auto=config.workers_auto,
            udp="batched" if udp_batched() else "uvloop",
        )
        if not zone_set.files:
            log.warning(
                "zones_empty", directory=str(config.zones), reason=empty_reason(config.zones)
            )
        # Startup's garbage (config and zone parsing, imports) is freed by now: ~1 MB of
        # the idle footprint glibc would otherwise keep.
        trim_heap()
        status = f"serving {zone_set.name_count()} names on {', '.join(bound.names)}"
        admin = None
        if config.metrics is not None:
            reloader = self._reloader
            state = DnsState(
                config,
                bound.names,
                zones,
                lambda: reloader.current,
                self._start.stats,
                self._health,
                stats,
                caches,
                self._pool,
            )
            admin = Admin(
                config.metrics,
                registry,
                forwarder.answering,
                before_scrape=before_scrape,
                endpoints={"/status": state.status, "/explain": state.explain},
            )
        return Started(status, admin)

    def _installed(self, new: Routing) -> None:
        """After `new` was installed: the workers follow, `auto` looks again."""
        self._routing_hash = new.content_hash
        if self._pool is not None:
            self._worker_acks = self._pool.reload(new.content_hash)
        self._check_auto_workers(new.zone_set.name_count())

    def _check_auto_workers(self, names: int) -> None:
        """`workers: auto` is fitted to the zones once, at start: after a reload that
        would fit another count (the zones grew or shrank past a step), say so, once
        (the supervisor: a worker's count is not its own)."""
        if self._config.workers_auto is None or self._link is not None:
            return
        fitted = fit_workers(self._invocation.loaded, names)
        if fitted.workers != self._auto_refit:
            self._auto_refit = fitted.workers
            if fitted.workers != self._config.workers:
                log.warning(
                    "workers_auto_differs",
                    workers=self._config.workers,
                    at_restart=fitted.workers,
                    names=names,
                    why=fitted.workers_auto,
                )

    async def _start_workers(self, inherited: list[socket.socket], bound: _Bound) -> None:
        config = self._config
        invocation = self._invocation
        spec = WorkerSpec(
            replace(config, listen=tuple(bound.endpoints)),
            invocation.loaded,
            invocation.path,
            invocation.flags,
            invocation.logging,
            self._cookie_secret,
            tuple(sock.fileno() for sock in inherited),
        )
        zones = self._zones
        assert zones is not None
        self._pool = WorkerPool(
            spec,
            config.workers - 1,
            worker_main,
            lambda: self._start.load_seconds(zones.current.name_count()),
        )
        try:
            await self._pool.start(self._routing_hash)
        except RuntimeError as error:
            raise UserError(f"workers: {error}") from None

    def _withdraw(self, names: frozenset[str]) -> None:
        assert self._zones is not None
        self._zones.withdraw(names)
        if self._pool is not None:
            self._pool.withdraw(names)

    async def reload(self) -> str:
        """The zones and the config, as a save would reload them, but even if unchanged;
        with workers, once every worker has loaded them too (bounded)."""
        assert self._reloader is not None and self._zones is not None
        await self._reloader.reload_now()
        if self._pool is not None:
            await self._pool.reloaded(self._worker_acks)
        return f"serving {self._zones.current.name_count()} names"

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.stop()
        if self._probing is not None:
            self._probing.cancel()
        if self._health is not None:
            await self._health.close()
        if self._reloader is not None:
            await self._reloader.stop()
        if self._bound is not None:
            assert self._resolver is not None
            await _close(self._bound, self._tasks, self._resolver)

    async def serve_as_worker(self, inherited: list[socket.socket]) -> None:
        """A worker's life: serve, tell the supervisor, follow its messages until "stop"
        (or SIGTERM, or the supervisor gone), then drain and close."""
        assert self._link is not None
        link = self._link
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
        reloading = asyncio.Lock()
        await self.start(inherited)
        trim_heap()  # startup's garbage, as in the supervisor

        def spawn(work: Coroutine[Any, Any, None]) -> None:
            task = loop.create_task(work)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def receive() -> None:
            try:
                message: Message = link.recv()
            except (EOFError, OSError):
                # Nothing of the supervisor's holds the pipe open but the supervisor
                # itself: it is gone (killed), and with it the one who would stop us.
                log.warning("worker_supervisor_gone")
                loop.remove_reader(link.fileno())
                stopping.set()
                return
            if message.kind == "reload":
                spawn(self._reload_as_worker(link, reloading))
            elif message.kind == "withdrawn":
                assert self._zones is not None
                self._zones.withdraw(message.value)
            elif message.kind == "metrics":
                spawn(self._send_metrics(link))
            elif message.kind == "counts":
                assert self._counts is not None
                link.send(Message("counts", self._counts()))
            elif message.kind == "ping":
                link.send(Message("pong"))
            elif message.kind == "stop":
                stopping.set()

        loop.add_reader(link.fileno(), receive)
        with contextlib.suppress(OSError):  # the supervisor died as we started: EOF follows
            link.send(Message("ready", self._routing_hash))
        await stopping.wait()
        loop.remove_reader(link.fileno())
        await self.stop()

    async def _reload_as_worker(self, link: ControlLink, reloading: asyncio.Lock) -> None:
        """The supervisor's "reload": the same files again, answered with the new hash."""
        async with reloading:
            try:
                new = await asyncio.to_thread(self._start.loader)
            except Exception as error:  # the supervisor's load passed: files changed since
                log.warning("worker_reload_failed", error=str(error)[:500])
            else:
                assert self._install is not None
                self._install(new)
            link.send(Message("reloaded", self._routing_hash))

    async def _send_metrics(self, link: ControlLink) -> None:
        await load_exposition()  # the first request's import, off the loop's thread
        link.send(Message("metrics", exposition(self._registry).decode()))


def worker_main(spec: WorkerSpec, index: int, link: ControlLink) -> None:
    """A worker process of `workers: N` (started by WorkerPool as a fresh interpreter)."""
    # Ctrl-C and a terminal's hangup reach the whole process group: the supervisor stops
    # or reloads the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(spec.logging)
    bind_process(worker=index)
    gc.set_threshold(*GC_THRESHOLDS)
    # What needs a restart is the supervisor's to say, once: not once per process.
    start = serve_start(spec.loaded, spec.path, spec.flags, report=False)
    try:
        routing = start.load()
    except UserError as error:  # the files changed since the supervisor loaded them
        log.error("worker_start_failed", error=str(error)[:500])
        raise SystemExit(1) from None
    invocation = Invocation(spec.path, spec.flags, spec.logging, spec.loaded)
    service = DnsService(
        spec.config, routing, invocation, start, link=link, cookie_secret=spec.cookie_secret
    )
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        inherited = [socket.socket(fileno=fd) for fd in spec.inherited]
        runner.run(service.serve_as_worker(inherited))


async def _close(bound: _Bound, tasks: set[asyncio.Task[None]], resolver: Resolver) -> None:
    for server in bound.tcp:
        server.close()
    in_flight = {*tasks, *resolver.in_flight()}
    if in_flight:
        # In-flight forwarded queries finish (bounded) so their clients get an answer.
        await asyncio.wait(in_flight, timeout=SHUTDOWN_GRACE)
    for transport in bound.udp:
        transport.close()
