"""Access control: which client addresses may query at all (everyone else gets REFUSED).

Not an open resolver by default: the allowed networks come from `ServeConfig.allow`,
whose default covers loopback and the private ranges only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from dnsoverride.common.grammar import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(host: str) -> IPAddress:
    """The client's IP; an IPv4-mapped IPv6 address (dual-stack socket) as the IPv4 one."""
    address = ipaddress.ip_address(host.split("%", maxsplit=1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class Acl:
    """The allowed client networks."""

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self._networks = tuple(networks)

    def allows(self, address: IPAddress) -> bool:
        """Whether `address` is inside one of the allowed networks."""
        return any(address in network for network in self._networks)
