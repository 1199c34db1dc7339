"""The one grammar of the values both daemons read, in config files and flags alike:
endpoints (`HOST:PORT`), durations and sizes (README, "Values: endpoints, durations, sizes").

Each parser takes what YAML or argparse gave (a string, or a YAML number) and returns a
typed value, or raises `GrammarError` saying what is wrong and what would be right; the
caller adds where the value was (`file:line: key:`, or the flag), see `configfile`.

- **Endpoints**: `IPv4:PORT`, `[IPv6]:PORT`, an IPv6 zone as `%scope` (`[fe80::1%eth0]:53`),
  `:PORT` for every IPv4 address where a listener is meant, host names only where a name
  makes sense (an HTTP listener binds what the name resolves to; a DNS resolver must be
  an address: a name would need a resolver to find the resolver). Where a default port
  exists (a resolver's 53) it may be left out, and a bare IPv6 address needs no brackets.
- **Durations**: a number of seconds (`5`, `0.5`) or a number with a unit: `500ms`, `5s`,
  `1m`, `1h`.
- **Networks**: CIDR (`10.0.0.0/8`, `fd00::/8`); a bare address is its /32 or /128.
- **Sizes**: a number with a unit: `K`, `M`, `G`, `T` and `KiB` ... `TiB` are powers of
  1024, `KB` ... `TB` powers of 1000 (as disks are sold), `B` bytes. A budget needs its
  unit: `20` is refused rather than read as 20 bytes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

from dnsoverride.common.yamlsource import brief

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class GrammarError(ValueError):
    """A value that does not follow the grammar; the message is the reason, no location."""


class Endpoint(NamedTuple):
    """A host (an IP literal, `fe80::1%eth0` with its zone, or a host name) and a port.

    A tuple, so it unpacks and compares as `(host, port)`."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class EndpointRule:
    """What one key or flag accepts: a default port (None: the port is required), whether
    a host name will do (else `address_only` says why it will not), and whether an empty
    host (`:PORT`) means every IPv4 address (a listener)."""

    default_port: int | None = None
    names: bool = False
    address_only: str = "it must be an IP address"
    wildcard: bool = False


# What the daemons listen on and what they ask; every endpoint key and flag is one of these.
DNS_LISTENER = EndpointRule(
    address_only="a DNS listener binds one IP address (0.0.0.0 or [::] for every address)",
    wildcard=True,
)
HTTP_LISTENER = EndpointRule(names=True, wildcard=True)
RESOLVER = EndpointRule(
    default_port=53,
    address_only=(
        "a DNS resolver is given by IP address (looking its name up would need a resolver "
        "already, possibly this one)"
    ),
)

_HOST_NAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
EVERY_IPV4 = "0.0.0.0"


def parse_endpoint(text: object, rule: EndpointRule) -> Endpoint:
    """`text` as an Endpoint under `rule`; GrammarError with the reason otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)  # YAML's `listen: 5353`
    if not isinstance(text, str):
        raise GrammarError(f"expected HOST:PORT as a string, not {brief(text)}")
    text = text.strip()
    if text.isdigit():
        raise GrammarError(
            f"{brief(text)} is a port without a host: write HOST:PORT, "
            f"e.g. 127.0.0.1:{text} (one address) or 0.0.0.0:{text} (every IPv4 address)"
        )
    host, port = _split(text)
    if port is None:
        if rule.default_port is None:
            raise GrammarError(f"{brief(text)} needs a port (HOST:PORT)")
        number = rule.default_port
    else:
        number = _port(port, text, allow_zero=rule.wildcard)
    if not host:
        if not rule.wildcard:
            raise GrammarError(f"{brief(text)} has no host (HOST:PORT)")
        return Endpoint(EVERY_IPV4, number)
    return Endpoint(_host(host, text, rule), number)


def _split(text: str) -> tuple[str, str | None]:
    """(host, port text or None) of `[V6]:PORT`, `[V6]`, `HOST:PORT`, `HOST` or bare `V6`."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise GrammarError(f"{brief(text)} is not [IPv6]:PORT")
        if ":" not in host:
            raise GrammarError(f"{brief(text)}: brackets are for IPv6 addresses only")
        return host, rest[1:] if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, port
    return text, None  # a bare IPv6 address (no port) or a host without a port


def _port(port: str, text: str, *, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if not port.isdigit() or not low <= int(port) <= 65535:
        raise GrammarError(f"bad port in {brief(text)}: expected a number from {low} to 65535")
    return int(port)


def _host(host: str, text: str, rule: EndpointRule) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        raise GrammarError(f"{brief(host)} is not an IPv6 address")
    if not _HOST_NAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise GrammarError(f"{brief(host)} is neither an IP address nor a host name")
    if not rule.names:
        raise GrammarError(f"{brief(text)} names a host: {rule.address_only}")
    return host.rstrip(".").lower()


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.IGNORECASE)
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
DURATION_FORMS = "5 or 5s, 500ms, 1m, 1h, 7d"


def parse_duration(value: object) -> float:
    """Seconds of a duration: a number (seconds), or a number with ms, s, m, h or d."""
    if isinstance(value, bool):
        raise GrammarError(f"expected a duration ({DURATION_FORMS}), not {brief(value)}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise GrammarError(f"expected a duration ({DURATION_FORMS}), not {brief(value)}")
    unit = match.group(2).lower() if match.group(2) else None
    return float(match.group(1)) * _SECONDS[unit]


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(i?B)?|(B))?\s*", re.IGNORECASE)
_POWERS = {"K": 1, "M": 2, "G": 3, "T": 4}
SIZE_FORMS = "20G or 20GiB (2^30 bytes each), 20GB (10^9), 512M, 64K"


def parse_size(value: object, *, unit_required: bool = True) -> int:
    """Bytes of a size. `K/M/G/T` and `KiB/MiB/GiB/TiB` count in 1024s, `KB/MB/GB/TB` in
    1000s, `B` is bytes. A bare number is bytes where `unit_required` is False, and an
    error where it is True (a budget of `20` bytes is a mistake, not a wish)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise GrammarError(f"expected a size ({SIZE_FORMS}), not {brief(value)}")
    match = _SIZE.fullmatch(str(value))
    if match is None:
        raise GrammarError(f"expected a size ({SIZE_FORMS}), not {brief(value)}")
    number = float(match.group(1))
    prefix, suffix, plain_bytes = match.group(2), match.group(3), match.group(4)
    if prefix is None:
        if plain_bytes is None and unit_required:
            raise GrammarError(
                f"{brief(value)} has no unit: write {match.group(1)}G (GiB), "
                f"{match.group(1)}GB (10^9 bytes), {match.group(1)}M, ... "
                f"(a bare number would be {match.group(1)} bytes)"
            )
        return int(number)
    decimal = suffix is not None and suffix.lower() == "b"
    base = 1000 if decimal else 1024
    return int(number * base ** _POWERS[prefix.upper()])


def parse_network(value: object) -> IPNetwork:
    """A CIDR network (`10.0.0.0/8`; a bare address is its /32 or /128)."""
    if not isinstance(value, str):
        raise GrammarError(f"expected a CIDR network such as 10.0.0.0/8, not {brief(value)}")
    try:
        return ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise GrammarError(f"not an IP network: {brief(value)}") from None
