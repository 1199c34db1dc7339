"""`dnsoverride serve`: wire config, zones, listeners, metrics and health checks together
as a `DnsService`, which the service lifecycle (common/lifecycle.py) runs until
SIGTERM/SIGINT and shuts down cleanly.

Runs on uvloop: the DNS fast path is dominated by event-loop overhead per datagram,
where uvloop answers several times more queries than the default loop
(docs/architecture.md, "Event loops").
"""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path

import structlog
import uvloop
from prometheus_client.registry import CollectorRegistry

from dnsoverride.common.errors import listen_error
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.lifecycle import Admin, Started, run_service
from dnsoverride.common.log import LogOptions
from dnsoverride.common.log import configure as configure_logging
from dnsoverride.common.reloader import Reloader
from dnsoverride.dns.config import ServeConfig, ServeFlags, load_config
from dnsoverride.dns.forwarder import Forwarder
from dnsoverride.dns.health import HealthMonitor
from dnsoverride.dns.listener import READ_LIMIT, TcpListener, UdpListener
from dnsoverride.dns.reload import ServeStart, serve_reloader, serve_start
from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.stats import DnsCollector, DnsStats
from dnsoverride.dns.status import DnsState
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import empty_reason

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 2.0


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
    config = load_config(path, flags)
    start = serve_start(config, path, flags)
    # A ZoneSetError (a UserError) lists every problem of the zones. The service holds
    # the first routing until it starts, not this frame: after a reload replaces it,
    # nothing keeps the old zone set alive.
    service = DnsService(config, start.load(), path, start)
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


UDP_RECEIVE_BUFFER = 4 << 20


def _grow_receive_buffer(sock: socket.socket) -> None:
    # A burst of queries (CI jobs starting together) overflows the 208 KiB default and
    # the kernel drops datagrams before we see them; the kernel caps this at rmem_max.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)


def _udp_socket(endpoint: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _grow_receive_buffer(sock)
        sock.bind((endpoint.host, endpoint.port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _bind(
    config: ServeConfig,
    resolver: Resolver,
    tasks: set[asyncio.Task[None]],
    inherited: list[socket.socket],
    bound: _Bound,
) -> None:
    """Serve the inherited sockets, or bind `config.listen`; into `bound`, so that what
    was bound before a failure is closed too."""
    # TCP listeners get a backlog as large as the connection cap: clients retrying over
    # TCP after TC replies arrive together, and an overflowing accept queue resets them.
    loop = asyncio.get_running_loop()
    handler = TcpListener(resolver, config.tcp)

    def udp_protocol() -> UdpListener:
        return UdpListener(resolver, tasks)

    if inherited:
        for sock in inherited:
            sockname = sock.getsockname()
            if sock.type == socket.SOCK_DGRAM:
                _grow_receive_buffer(sock)
                transport, _ = await loop.create_datagram_endpoint(udp_protocol, sock=sock)
                bound.udp.append(transport)
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
            transport, _ = await loop.create_datagram_endpoint(
                udp_protocol, sock=_udp_socket(endpoint)
            )
            bound.udp.append(transport)
            port = transport.get_extra_info("sockname")[1]
            # A TCP listener on the same port as UDP (port 0 means: the one UDP got).
            bound.tcp.append(
                await asyncio.start_server(
                    handler,
                    endpoint.host,
                    port,
                    reuse_address=True,
                    backlog=config.tcp.max_connections,
                    limit=READ_LIMIT,
                )
            )
        except OSError as error:
            raise listen_error(str(endpoint), endpoint.port, error) from None
        bound.names.append(str(Endpoint(endpoint.host, port)))


class DnsService:
    """The DNS server as the service lifecycle runs it (common/lifecycle.py)."""

    def __init__(
        self, config: ServeConfig, routing: Routing, path: Path | None, start: ServeStart
    ) -> None:
        self._config = config
        self._first: Routing | None = routing
        self._path = path
        self._start = start
        self._tasks: set[asyncio.Task[None]] = set()  # slow-path UDP queries in flight
        self._zones: LiveZones | None = None
        self._health: HealthMonitor | None = None
        self._bound: _Bound | None = None
        self._probing: asyncio.Task[None] | None = None
        self._reloader: Reloader[Routing] | None = None

    async def start(self, inherited: list[socket.socket]) -> Started:
        config = self._config
        routing, self._first = self._first, None
        assert routing is not None, "started twice"
        zone_set = routing.zone_set
        self._zones = zones = LiveZones(zone_set)
        stats = DnsStats()
        forwarder = Forwarder.for_config(config, stats)
        resolver = Resolver(config, zones, forwarder, stats)
        resolver.route(routing)  # the views the first load was validated with
        registry = CollectorRegistry()
        registry.register(
            DnsCollector(stats, resolver.answers, resolver.responses, resolver.ratelimit)
        )
        # Health-gated overrides: checker tasks that follow every zone swap and withdraw names.
        self._health = health = HealthMonitor(zones.withdraw)
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

        self._reloader = serve_reloader(
            install, routing, config=config, path=self._path, start=self._start, registry=registry
        )
        await self._reloader.start()
        log.info(
            "started",
            listeners=bound.names,
            zones=str(config.zones),
            zone_files=len(zone_set.files),
            names=zone_set.name_count(),
            upstreams=[str(u) for u in config.upstreams],
            views=[view.name for view in config.views],
        )
        if not zone_set.files:
            log.warning(
                "zones_empty", directory=str(config.zones), reason=empty_reason(config.zones)
            )
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
                health,
                stats,
                {"answer": resolver.answers, "response": resolver.responses},
            )
            endpoints = {"/status": state.status, "/explain": state.explain}
            admin = Admin(config.metrics, registry, forwarder.answering, endpoints=endpoints)
        return Started(status, admin)

    async def reload(self) -> str:
        """The zones and the config, as a save would reload them, but even if unchanged."""
        assert self._reloader is not None and self._zones is not None
        await self._reloader.reload_now()
        return f"serving {self._zones.current.name_count()} names"

    async def stop(self) -> None:
        if self._probing is not None:
            self._probing.cancel()
        if self._health is not None:
            await self._health.close()
        if self._reloader is not None:
            await self._reloader.stop()
        if self._bound is not None:
            await _close(self._bound, self._tasks)


async def _close(bound: _Bound, tasks: set[asyncio.Task[None]]) -> None:
    for server in bound.tcp:
        server.close()
    if tasks:
        # In-flight forwarded queries finish (bounded) so their clients get an answer.
        await asyncio.wait(set(tasks), timeout=SHUTDOWN_GRACE)
    for transport in bound.udp:
        transport.close()
