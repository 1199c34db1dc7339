"""How the cache reaches its upstreams: timeouts, the resolver and the aiohttp client
session, built in one place so that transport concerns (resolvers, TLS trust) are set once
for the registry's upstreams and the package repositories alike.

With `resolvers:` configured the cache resolves upstream names through those DNS servers
only (common/resolve.py), never through the system resolver: in transparent mode the
system resolver answers the overridden names with the cache's own address.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import aiohttp

from dnsoverride.cache.serving import DEFAULT_SEND_TIMEOUT
from dnsoverride.common.configfile import Section
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.resolve import UpstreamResolver

DAY = 86400.0


@dataclass(frozen=True)
class Timeouts:
    """Timeouts in seconds. Upstream: `connect` and `idle`, short so a dead upstream fails
    fast to stale. Clients: `send`, how long a client may take no bytes of a response
    before it is disconnected (serving.py), which releases what it pinned."""

    connect: float = 5.0
    idle: float = 30.0
    send: float = DEFAULT_SEND_TIMEOUT

    @classmethod
    def read(cls, section: Section) -> Self:
        section.duration("connect", 0.1, 300)
        section.duration("idle", 0.1, DAY)
        section.duration("send", 1, DAY)
        return cls(**section.values)


TIMEOUT_KEYS = ("connect", "idle", "send")


def upstream_resolver(resolvers: Sequence[Endpoint]) -> UpstreamResolver | None:
    """The resolver for `resolvers:` (None: the system resolver)."""
    return UpstreamResolver(servers=resolvers) if resolvers else None


def make_session(
    timeouts: Timeouts, resolver: UpstreamResolver | None = None
) -> aiohttp.ClientSession:
    """An upstream HTTP client session: connect and idle (between reads) timeouts, no
    total (a multi-GiB body takes what it takes), bodies passed through byte for byte
    (no transparent decompression: content is verified against its digest as sent).

    `resolver` replaces the system resolver (config `resolvers:`), so that the cache does
    not resolve its upstream through the overrides that point at itself.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            sock_read=timeouts.idle,
        ),
        connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60, resolver=resolver),
        auto_decompress=False,
    )
