"""An in-process `Resolver` over a zones directory, for tests that drive the query
pipeline (or a UDP listener) without starting a daemon. Call it on a running loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dnsoverride.dns.config import ServeFlags, load_config
from dnsoverride.dns.forwarder import Forwarder
from dnsoverride.dns.reload import serve_start
from dnsoverride.dns.resolver import Resolver
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.zones.live import LiveZones


def in_process_resolver(
    zones: Path,
    upstream: str = "127.0.0.1:9",
    config_file: Path | None = None,
    clock: Callable[[], float] | None = None,
) -> Resolver:
    """A resolver serving `zones`, forwarding to `upstream` (nothing answers the default:
    for tests of local answers), configured by `config_file` when given, on `clock`'s
    monotonic time when given (see `Resolver`)."""
    flags = ServeFlags(listen=("127.0.0.1:0",), upstream=(upstream,), zones=str(zones))
    config = load_config(config_file, flags)
    routing = serve_start(config, config_file, flags).load()
    stats = DnsStats()
    forwarder = Forwarder.for_config(config, stats)
    resolver = Resolver(config, LiveZones(routing.zone_set), forwarder, stats, clock=clock)
    resolver.route(routing)
    return resolver
