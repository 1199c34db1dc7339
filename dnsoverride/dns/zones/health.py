"""The `health:` key of an overridden name, parsed once into a frozen `HealthCheck`.

Only the spec: what to probe (TCP port, or HTTPS path with the statuses that pass and an
optional CA file), how often, and after how many results a target flips. The prober
that runs it is `dnsoverride.dns.health`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from dnsoverride.common.grammar import DURATION_FORMS, GrammarError, parse_duration
from dnsoverride.common.yamlsource import brief

DEFAULT_INTERVAL = 5.0
DEFAULT_TIMEOUT = 2.0
DEFAULT_FALL = 3
DEFAULT_RISE = 2
# A registry's /v2/ answers 200 or 401 depending on auth; anything that is not an error
# status shows the service is answering.
DEFAULT_EXPECT = frozenset(range(200, 400))

_KEYS = {"https", "tcp", "expect", "ca", "interval", "timeout", "fall", "rise"}


class HealthSpecError(ValueError):
    """A `health:` value that cannot be used; the message is the reason (no file or line)."""


@dataclass(frozen=True)
class HealthCheck:
    """A parsed `health:` key. `port` is the port probed on every address of the override."""

    kind: Literal["tcp", "https"]
    port: int
    path: str = "/"
    expect: frozenset[int] = DEFAULT_EXPECT
    ca_file: Path | None = None
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    fall: int = DEFAULT_FALL
    rise: int = DEFAULT_RISE

    def canonical(self) -> str:
        """A stable text form, for zone content hashes and diffs."""
        target = f"tcp {self.port}" if self.kind == "tcp" else f"https :{self.port}{self.path}"
        expect = ",".join(str(status) for status in sorted(self.expect))
        return (
            f"{target} expect={expect} ca={self.ca_file or '-'} interval={self.interval:g} "
            f"timeout={self.timeout:g} fall={self.fall} rise={self.rise}"
        )


@dataclass(frozen=True)
class GatedOverride:
    """One overridden name whose answer depends on its health check."""

    name: str
    check: HealthCheck
    addresses: tuple[str, ...]


def _duration(key: str, value: object) -> float:
    try:
        seconds = parse_duration(value)
    except GrammarError:
        raise HealthSpecError(
            f"health {key} must be a duration like {DURATION_FORMS}, not {brief(value)}"
        ) from None
    if seconds <= 0:
        raise HealthSpecError(f"health {key} must be greater than zero")
    return seconds


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HealthSpecError(f"health {key} must be a whole number of checks, at least 1")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise HealthSpecError(f"health tcp must be a port number (1-65535), not {brief(value)}")
    return value


def _statuses(value: object) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    if not items or any(
        isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599
        for item in items
    ):
        raise HealthSpecError(
            f"health expect must be an HTTP status or a list of them, not {brief(value)}"
        )
    return frozenset(items)


def _https_target(name: str, value: object) -> tuple[int, str]:
    """Port and path of an `https:` URL; its host, if any, must be the overridden name."""
    if not isinstance(value, str) or not value:
        raise HealthSpecError("health https must be a URL or a path, e.g. /v2/")
    if value.startswith("/"):
        return 443, value
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise HealthSpecError(f"health https must be an https:// URL or a path, not {brief(value)}")
    if parts.hostname.rstrip(".").lower() != name.rstrip(".").lower():
        raise HealthSpecError(
            f"health https URL host {brief(parts.hostname)} is not the overridden name "
            f"{brief(name)}: "
            "the check sends the overridden name as SNI and Host to the override's addresses"
        )
    try:
        port = parts.port or 443
    except ValueError as error:
        raise HealthSpecError(f"health https URL has a bad port: {error}") from None
    path = parts.path or "/"
    return port, f"{path}?{parts.query}" if parts.query else path


def _ca_file(value: object, base_dir: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise HealthSpecError("health ca must be the path of a PEM CA certificate file")
    path = base_dir / value
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as error:
        raise HealthSpecError(
            f"health ca {brief(str(path))} is not a readable PEM CA: {error}"
        ) from None
    return path


def parse_health(name: str, raw: object, base_dir: Path) -> HealthCheck:
    """Parse the `health:` value of record set `name`; `ca` paths are relative to `base_dir`.

    Raises HealthSpecError with a reason; the zone loader adds the file and line.
    """
    if name.startswith("*"):
        raise HealthSpecError("a wildcard cannot be health-checked: there is no name to send")
    if not isinstance(raw, dict):
        raise HealthSpecError('health must be a mapping, e.g. {tcp: 443} or {https: "/v2/"}')
    unknown = sorted(str(key) for key in raw if key not in _KEYS)
    if unknown:
        raise HealthSpecError(
            f"unknown health key(s) {', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})"
        )
    if ("https" in raw) == ("tcp" in raw):
        raise HealthSpecError("health needs exactly one of https: URL or tcp: PORT")
    if "tcp" in raw:
        for key in ("expect", "ca"):
            if key in raw:
                raise HealthSpecError(f"health {key} only applies to https checks")
        kind: Literal["tcp", "https"] = "tcp"
        port, path = _port(raw["tcp"]), "/"
    else:
        kind = "https"
        port, path = _https_target(name, raw["https"])
    check = HealthCheck(
        kind=kind,
        port=port,
        path=path,
        expect=_statuses(raw["expect"]) if "expect" in raw else DEFAULT_EXPECT,
        ca_file=_ca_file(raw["ca"], base_dir) if "ca" in raw else None,
        interval=_duration("interval", raw.get("interval", DEFAULT_INTERVAL)),
        timeout=_duration("timeout", raw.get("timeout", DEFAULT_TIMEOUT)),
        fall=_count("fall", raw.get("fall", DEFAULT_FALL)),
        rise=_count("rise", raw.get("rise", DEFAULT_RISE)),
    )
    if check.timeout > check.interval:
        raise HealthSpecError("health timeout must not be longer than its interval")
    return check
