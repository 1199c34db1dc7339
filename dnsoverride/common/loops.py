"""Whether an upstream address is one of our own listeners: the forwarding-loop test that
both daemons run at start-up (`serve` on its upstream resolvers, `registry` on the
addresses its upstream registries resolve to).
"""

from __future__ import annotations

import ipaddress
import socket

# What a listener bound to every address is configured as (the registry's `:5000` is "").
_WILDCARDS = ("", "0.0.0.0", "::")


def is_local_address(address: str) -> bool:
    """Whether this host owns `address`: binding to a foreign address fails."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


def listener_owns(listener: tuple[str, int], address: str, port: int) -> bool:
    """Whether a listener on `listener` (host, port) receives what is sent to `address`:`port`
    (host and address are IP literals; a wildcard host listens on every local address)."""
    host, listen_port = listener
    if listen_port != port:
        return False
    if host in _WILDCARDS:
        return address == host or is_local_address(address)
    return ipaddress.ip_address(host) == ipaddress.ip_address(address)
