"""`dnsoverride serve`: wire config, zones, listeners, metrics and systemd together, run
until SIGTERM/SIGINT, shut down cleanly.

Runs on uvloop: the DNS fast path is dominated by event-loop overhead per datagram,
where uvloop answers several times more queries than the default loop (DESIGN.md).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from pathlib import Path

import structlog
import uvloop
from prometheus_client.registry import CollectorRegistry

from dnsoverride.common import systemd
from dnsoverride.common.admin import AdminServer, start_admin
from dnsoverride.common.errors import UserError
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.log import LogOptions
from dnsoverride.common.log import configure as configure_logging
from dnsoverride.dns.config import ServeConfig, ServeFlags, load_config
from dnsoverride.dns.forwarder import Forwarder
from dnsoverride.dns.health import HealthMonitor
from dnsoverride.dns.listener import READ_LIMIT, UdpListener, tcp_handler
from dnsoverride.dns.reload import ServeStart, serve_reloader, serve_start
from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.stats import DnsCollector, DnsStats
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.live import LiveZones

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
    # The coroutine holds the first routing, not this frame: after a reload replaces it,
    # nothing keeps the old zone set alive.
    # A ZoneSetError (a UserError) lists every problem of the zones.
    serve = _serve(config, start.load(), path, start)
    # The zone set lives until the next reload (refcounting frees it then): out of the
    # collector's sight, a large one is not millions of objects for every full collection
    # to walk. The same after each swap (`install`).
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve)


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


async def _bind(config: ServeConfig, resolver: Resolver, tasks: set[asyncio.Task[None]]) -> _Bound:
    # TCP listeners get a backlog as large as the connection cap: clients retrying over
    # TCP after TC replies arrive together, and an overflowing accept queue resets them.
    loop = asyncio.get_running_loop()
    bound = _Bound()
    handler = tcp_handler(resolver, config.tcp)

    def udp_protocol() -> UdpListener:
        return UdpListener(resolver, tasks)

    inherited = systemd.inherited_sockets()
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
        return bound
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
            raise UserError(f"cannot listen on {endpoint}: {error.strerror or error}") from None
        bound.names.append(str(Endpoint(endpoint.host, port)))
    return bound


async def _serve(
    config: ServeConfig, routing: Routing, path: Path | None, start: ServeStart
) -> int:
    loop = asyncio.get_running_loop()
    zone_set = routing.zone_set
    zones = LiveZones(zone_set)
    stats = DnsStats()
    forwarder = Forwarder(
        config.upstreams,
        config.timeout,
        config.attempt_timeout,
        config.edns_udp_size,
        stats,
        probe=config.probe,
        failure_log_interval=config.failure_log_interval,
        forward=config.forward,
    )
    resolver = Resolver(config, zones, forwarder, stats)
    resolver.route(routing)  # the views the first load was validated with
    registry = CollectorRegistry()
    registry.register(DnsCollector(stats, resolver.answers, resolver.responses, resolver.ratelimit))
    # Health-gated overrides: checker tasks that follow every zone swap and withdraw names.
    health = HealthMonitor(zones.withdraw)
    registry.register(health.collector())
    health.update(zone_set.health_gated())
    zones.on_swap(lambda new: health.update(new.health_gated()))
    tasks: set[asyncio.Task[None]] = set()
    bound = await _bind(config, resolver, tasks)
    probing = forwarder.start_probing()  # upstream health for readiness and ordering
    admin: AdminServer | None = None

    def install(new: Routing) -> None:
        # One synchronous step on the loop thread: no query runs between the two, and the
        # swap's generation bump retires every answer cached under the old routing.
        resolver.route(new)
        zones.swap(new.zone_set)
        gc.freeze()  # the new zone set, as at start (see `run`)

    reloader = serve_reloader(
        install, routing, config=config, path=path, start=start, registry=registry
    )
    try:
        await reloader.start()
        if config.metrics is not None:
            admin = await start_admin(
                config.metrics.host, config.metrics.port, registry, forwarder.answering
            )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "sighup")
        log.info(
            "started",
            listeners=bound.names,
            zones=str(config.zones),
            zone_files=len(zone_set.files),
            names=zone_set.name_count(),
            upstreams=[str(u) for u in config.upstreams],
            views=[view.name for view in config.views],
        )
        systemd.notify(
            "READY=1",
            f"STATUS=serving {zone_set.name_count()} names on {', '.join(bound.names)}",
        )
        # This frame lives as long as the daemon: it must not keep the first zone set
        # alive after a reload replaced it (1,000,000 names: ~0.25 GB).
        del routing, zone_set
        watchdog = systemd.start_watchdog()
        await stop.wait()
        systemd.notify("STOPPING=1")
        log.info("stopping")
        if watchdog is not None:
            watchdog.cancel()
    finally:
        probing.cancel()
        await health.close()
        await reloader.stop()
        await _close(bound, tasks, admin)
    log.info("stopped")
    return 0


async def _close(bound: _Bound, tasks: set[asyncio.Task[None]], admin: AdminServer | None) -> None:
    for server in bound.tcp:
        server.close()
    if tasks:
        # In-flight forwarded queries finish (bounded) so their clients get an answer.
        await asyncio.wait(set(tasks), timeout=SHUTDOWN_GRACE)
    for transport in bound.udp:
        transport.close()
    if admin is not None:
        await admin.close()
