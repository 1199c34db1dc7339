"""Name resolution that does not go through the system resolver, and the forwarding-loop check.

In transparent mode the cache host's own resolvers answer `registry-1.docker.io` with the
cache itself, so the registry's upstream client must be able to bypass them: fixed
addresses per name (`hosts`) and/or DNS servers asked directly (`servers`). Health checks use
the same fixed mapping to pin a check to one override target while the URL keeps the
overridden name (so SNI, Host and certificate verification use that name).

aiohttp's own AsyncResolver needs aiodns, which is not a dependency; queries here are built
and parsed with dnslib (imported on the first query: a cache without `resolvers:` never
needs it, 0.5 MB) and sent over UDP, retried over TCP when truncated.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping, Sequence

import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from dnsoverride.common.dnsexchange import exchange_tcp, exchange_udp
from dnsoverride.common.errors import UserError
from dnsoverride.common.loops import listener_owns

log = structlog.get_logger(__name__)

_LOOP_CHECK_SECONDS = 5.0
_QTYPES = {socket.AF_INET: 1, socket.AF_INET6: 28}  # A (RFC 1035), AAAA (RFC 3596)


class UpstreamResolver(AbstractResolver):
    """aiohttp resolver: fixed `hosts` first, then the DNS `servers`, else the system resolver.

    With `servers` configured the system resolver is never asked: a name they cannot resolve
    is an error, not a silent fallback into the override loop.
    """

    def __init__(
        self,
        hosts: Mapping[str, Sequence[str]] | None = None,
        servers: Sequence[tuple[str, int]] = (),
        timeout: float = 2.0,
    ) -> None:
        self._hosts = {
            name.rstrip(".").lower(): tuple(addresses) for name, addresses in (hosts or {}).items()
        }
        self._servers = tuple(servers)
        self._timeout = timeout
        self._system: ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if not self._servers and host.rstrip(".").lower() not in self._hosts:
            if self._system is None:
                self._system = ThreadedResolver()
            return await self._system.resolve(host, port, family)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in await self.addresses(host, family)
        ]

    async def addresses(
        self, host: str, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[str]:
        """The addresses of `host` (an IP literal is its own address); OSError if there are none."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        key = host.rstrip(".").lower()
        families = [family] if family in _QTYPES else [socket.AF_INET, socket.AF_INET6]
        if key in self._hosts:
            found = [
                address
                for address in self._hosts[key]
                if socket.AF_INET6 in families or ":" not in address
                if socket.AF_INET in families or ":" in address
            ]
        elif self._servers:
            found = []
            failure: OSError | None = None
            for qfamily in families:
                # A server that fails AAAA but answers A still gives a usable address.
                try:
                    found += await self._query(key, _QTYPES[qfamily])
                except OSError as error:
                    failure = error
            if not found and failure is not None:
                raise failure
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, family=family, type=socket.SOCK_STREAM
            )
            found = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not found:
            raise OSError(f"{host}: no address found")
        return found

    async def _query(self, name: str, qtype: int) -> list[str]:
        from dnslib import QTYPE, RCODE, DNSRecord

        failures: list[str] = []
        for server in self._servers:
            query_id = int.from_bytes(os.urandom(2))
            request = DNSRecord.question(name, QTYPE[qtype])
            request.header.id = query_id
            packet = request.pack()
            try:
                async with asyncio.timeout(self._timeout):
                    reply = DNSRecord.parse(await exchange_udp(server, packet, query_id))
                    if reply.header.tc:
                        reply = DNSRecord.parse(await exchange_tcp(server, packet))
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                failures.append(f"{server[0]}:{server[1]}: {error or type(error).__name__}")
                continue
            except Exception as error:  # dnslib raises assorted errors on garbage
                failures.append(f"{server[0]}:{server[1]}: unparsable reply ({error})")
                continue
            if reply.header.id != query_id or str(reply.q.qname).rstrip(".").lower() != name:
                failures.append(f"{server[0]}:{server[1]}: reply does not match the question")
                continue
            rcode = reply.header.rcode
            if rcode == RCODE.NXDOMAIN:
                return []
            if rcode != RCODE.NOERROR:
                failures.append(f"{server[0]}:{server[1]}: {RCODE[rcode]}")
                continue
            # The answer may hold a CNAME chain; every record of the asked type is the name's.
            return [str(rr.rdata) for rr in reply.rr if rr.rtype == qtype]
        log.warning("resolve_failed", name=name, qtype=QTYPE[qtype], failures=failures)
        raise OSError(f"{name}: no resolver answered ({'; '.join(failures)})")

    async def close(self) -> None:
        if self._system is not None:
            await self._system.close()


async def _bound_addresses(listeners: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """(address, port) of every socket the listeners bind: a listener given a host name
    (`localhost:5000`) binds each address the system resolver gives for it, as asyncio's
    create_server does. A name that does not resolve binds nothing (the bind reports it)."""
    loop = asyncio.get_running_loop()
    bound: list[tuple[str, int]] = []
    for host, port in listeners:
        if not host:
            bound.append((host, port))
            continue
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError:
            continue
        bound.extend((str(info[4][0]), port) for info in infos)
    return bound


async def refuse_loop(
    upstreams: Iterable[tuple[str, int]],
    listeners: Iterable[tuple[str, int]],
    resolver: UpstreamResolver,
) -> None:
    """Raise UserError when an upstream (host, port) resolves to one of our own listeners.

    That is the transparent-mode trap: the cache host asks the resolvers that point the
    upstream's name at the cache, and every miss would be fetched from itself. A name that
    does not resolve now is not an error (the upstream may be down at start-up).
    """
    listening = await _bound_addresses(listeners)
    for host, port in upstreams:
        try:
            # Bounded: a slow resolver must not hold up serving what is cached.
            async with asyncio.timeout(_LOOP_CHECK_SECONDS):
                addresses = await resolver.addresses(host)
        except (OSError, TimeoutError) as error:
            log.warning("upstream_unresolved", upstream=host, reason=str(error) or "timeout")
            continue
        for address in addresses:
            if any(listener_owns(listener, address, port) for listener in listening):
                raise UserError(
                    f"upstream {host}:{port} resolves to {address}, which is this registry's own "
                    "listening address (a forwarding loop: the resolvers this host asks point "
                    f"{host} at the cache). Give the registry `resolvers:` that return the real "
                    "address, or put the cache host in a view without overrides."
                )
