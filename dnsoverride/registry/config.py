"""Registry cache configuration: YAML file + command-line flags -> frozen dataclasses.

Parsed once at start-up; everything downstream receives typed values. Embedded
defaults make `dnsoverride registry` work with no config file at all: listen on
127.0.0.1:5000, mirror Docker Hub, store under the user's cache directory.
"""

from __future__ import annotations

import argparse
import fnmatch
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from dnsoverride.common.errors import UserError

DEFAULT_LISTEN = "127.0.0.1:5000"
DEFAULT_UPSTREAM = "https://registry-1.docker.io"
# Docker Hub serves official images under `library/`; clients may leave the prefix out.
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "docker.io", "index.docker.io")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:\d{1,5})?$")


@dataclass(frozen=True)
class Timeouts:
    """Upstream client timeouts in seconds; short so a dead upstream fails fast to stale."""

    connect: float = 5.0
    idle: float = 30.0


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry and the host names (Host header or `?ns=`) that select it."""

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    username: str | None = None
    password: str | None = None
    # Prepend `library/` to single-component names (Docker Hub's official images).
    library_prefix: bool = False

    @property
    def hosts(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Budget:
    """Store size cap: evict least-recently-used content from `high` down to `low` bytes."""

    max_size: int
    high_watermark: float = 0.95
    low_watermark: float = 0.85

    @property
    def high(self) -> int:
        return int(self.max_size * self.high_watermark)

    @property
    def low(self) -> int:
        return int(self.max_size * self.low_watermark)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# htpasswd hashes we verify: bcrypt only (`htpasswd -B`); MD5/SHA1/crypt are refused.
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


@dataclass(frozen=True)
class Grant:
    """Clients (htpasswd users and/or source networks) and what they may read.

    Empty `upstreams` means every upstream, empty `repositories` every repository.
    """

    users: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()
    upstreams: frozenset[str] = frozenset()
    repositories: tuple[str, ...] = ()

    def covers(self, upstream: str, name: str) -> bool:
        if self.upstreams and upstream not in self.upstreams:
            return False
        return not self.repositories or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.repositories
        )


@dataclass(frozen=True)
class ClientsConfig:
    """Who may read private content (see access.py); by default nobody but the public."""

    users: tuple[tuple[str, bytes], ...] = ()  # (user, bcrypt hash) from the htpasswd file
    grants: tuple[Grant, ...] = ()
    require_auth: bool = False
    visibility_ttl: float = 300.0


@dataclass(frozen=True)
class RegistryConfig:
    host: str
    port: int
    storage: Path
    upstreams: tuple[UpstreamConfig, ...]
    default_upstream: str
    budget: Budget | None = None
    tag_ttl: float = 300.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    # HTTPS: certificate/key pairs chosen by SNI (registry/tls.py). With `tls_listen` HTTPS
    # is served there and `host:port` stays plain HTTP; without it `host:port` is HTTPS.
    tls_pairs: tuple[tuple[Path, Path], ...] = ()
    tls_listen: tuple[str, int] | None = None
    # DNS servers the upstream client asks instead of the system resolver (common/resolve.py).
    resolvers: tuple[tuple[str, int], ...] = ()
    metrics: tuple[str, int] | None = None
    clients: ClientsConfig = field(default_factory=ClientsConfig)

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


def default_storage() -> Path:
    """`$XDG_CACHE_HOME/dnsoverride/registry`, else `~/.cache/dnsoverride/registry`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnsoverride" / "registry"


def parse_size(text: str | int) -> int:
    """`20G`, `512M`, `1.5GiB`, `1000` -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise UserError(f"invalid size {text!r} (expected e.g. 20G, 512M, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UserError(f"invalid listen address {text!r} (expected HOST:PORT)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _upstream_from_url(url: str, name: str | None = None, **extra: Any) -> UpstreamConfig:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"invalid upstream URL {url!r} (expected http(s)://host[:port])")
    name = name or parts.netloc
    if not _HOSTNAME.match(name):
        raise UserError(f"invalid upstream name {name!r}")
    # Docker Hub by URL, or by name when the URL points at a stand-in (tests, relays).
    hub = parts.hostname in DOCKER_HUB_HOSTS or name in DOCKER_HUB_HOSTS
    aliases = tuple(extra.pop("aliases", None) or (("docker.io", "index.docker.io") if hub else ()))
    for alias in aliases:
        if not isinstance(alias, str) or not _HOSTNAME.match(alias):
            raise UserError(f"upstream {name}: invalid alias {alias!r}")
    return UpstreamConfig(
        name=name,
        url=url.rstrip("/"),
        aliases=aliases,
        username=extra.pop("username", None),
        password=extra.pop("password", None),
        library_prefix=bool(extra.pop("library_prefix", hub)),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping")
    return value


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as stream:
            return _mapping(yaml.safe_load(stream), path)
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise UserError(f"{path}: invalid YAML: {error}") from error


_KNOWN = {
    "listen",
    "storage",
    "max_size",
    "high_watermark",
    "low_watermark",
    "tag_ttl",
    "timeouts",
    "upstreams",
    "default_upstream",
    "tls",
    "resolvers",
    "metrics",
    "clients",
}
_CLIENTS_KEYS = {"htpasswd", "grants", "require_auth", "visibility_ttl"}
_GRANT_KEYS = {"users", "networks", "upstreams", "repositories"}
_TLS_KEYS = {"cert", "key", "certificates", "listen"}
_UPSTREAM_KEYS = {"name", "url", "aliases", "username", "password", "library_prefix"}


def _tls_pairs(
    args: argparse.Namespace, tls: dict[str, Any], where: str
) -> tuple[tuple[Path, Path], ...]:
    """The flag pair (else `tls: cert/key`) first, then every `tls: certificates` entry."""
    unknown = set(tls) - _TLS_KEYS
    if unknown:
        raise UserError(f"{where}: tls: unknown keys: {', '.join(sorted(unknown))}")
    cert = getattr(args, "tls_cert", None) or tls.get("cert")
    key = getattr(args, "tls_key", None) or tls.get("key")
    if bool(cert) != bool(key):
        raise UserError("--tls-cert and --tls-key go together")
    pairs = [(Path(cert), Path(key))] if cert and key else []
    for index, item in enumerate(tls.get("certificates") or ()):
        entry = _mapping(item, f"{where}: tls: certificates[{index}]")
        if set(entry) != {"cert", "key"}:
            raise UserError(f"{where}: tls: certificates[{index}] needs exactly cert and key")
        pairs.append((Path(str(entry["cert"])), Path(str(entry["key"]))))
    return tuple(pairs)


def _resolvers(value: Any, where: str) -> tuple[tuple[str, int], ...]:
    """`["10.0.0.53", "10.0.0.54:5353", "[fd00::53]:53"]` -> ((address, port), ...)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise UserError(f"{where}: resolvers must be a list of IP[:PORT]")
    servers = []
    for item in value:
        text = str(item)
        host, port = text, 53
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else -1
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = int(port_text) if port_text.isdigit() else -1
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            address = ""
        if not address or not 0 < port < 65536:
            raise UserError(f"{where}: resolvers: {text!r} is not IP or IP:PORT")
        servers.append((address, port))
    return tuple(servers)


def _htpasswd(path: str, where: str) -> tuple[tuple[str, bytes], ...]:
    """`user:$2y$...` lines of an htpasswd file (bcrypt only); UserError at file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{where}: clients: cannot read htpasswd {path}: {error}") from error
    users: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.strip().partition(":")
        if not sep or not user:
            raise UserError(f"{path}:{number}: expected user:hash")
        if not _BCRYPT.match(hashed):
            raise UserError(
                f"{path}:{number}: user {user!r}: only bcrypt hashes are supported "
                "(create them with `htpasswd -B`)"
            )
        if user in users:
            raise UserError(f"{path}:{number}: user {user!r} given twice")
        users[user] = hashed.encode()
    return tuple(users.items())


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise UserError(f"{where}: expected a list of strings")
    return tuple(value)


def _grant(raw: Any, where: str, users: set[str], upstreams: set[str]) -> Grant:
    entry = _mapping(raw, where)
    unknown = set(entry) - _GRANT_KEYS
    if unknown:
        raise UserError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
    names = _strings(entry.get("users"), f"{where}: users")
    for user in names:
        if user not in users:
            raise UserError(f"{where}: user {user!r} is not in the htpasswd file")
    networks = []
    for text in _strings(entry.get("networks"), f"{where}: networks"):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as error:
            raise UserError(f"{where}: networks: {error}") from error
    if not names and not networks:
        raise UserError(f"{where}: a grant needs users or networks")
    granted_upstreams = _strings(entry.get("upstreams"), f"{where}: upstreams")
    for name in granted_upstreams:
        if name not in upstreams:
            raise UserError(f"{where}: upstream {name!r} is not configured")
    patterns = _strings(entry.get("repositories"), f"{where}: repositories")
    return Grant(frozenset(names), tuple(networks), frozenset(granted_upstreams), patterns)


def _clients(raw: Any, where: str, upstreams: set[str]) -> ClientsConfig:
    section = _mapping(raw, f"{where}: clients")
    where = f"{where}: clients"
    unknown = set(section) - _CLIENTS_KEYS
    if unknown:
        raise UserError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
    users = _htpasswd(str(section["htpasswd"]), where) if section.get("htpasswd") else ()
    known = {user for user, _ in users}
    grants_raw = section.get("grants") or []
    if not isinstance(grants_raw, list):
        raise UserError(f"{where}: grants must be a list")
    grants = tuple(
        _grant(item, f"{where}: grants[{index}]", known, upstreams)
        for index, item in enumerate(grants_raw)
    )
    require_auth = section.get("require_auth", False)
    if not isinstance(require_auth, bool):
        raise UserError(f"{where}: require_auth must be true or false")
    if require_auth and not grants:
        raise UserError(f"{where}: require_auth needs grants (nobody could read anything)")
    try:
        ttl = float(section.get("visibility_ttl", 300.0))
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: visibility_ttl is seconds: {error}") from error
    if ttl < 0:
        raise UserError(f"{where}: visibility_ttl must not be negative")
    return ClientsConfig(users, grants, require_auth, ttl)


def load(args: argparse.Namespace) -> RegistryConfig:
    """Merge the config file (if any) with flags; flags win. Raises UserError when invalid."""
    raw = _read_file(args.config) if getattr(args, "config", None) else {}
    where = getattr(args, "config", None) or "config"
    unknown = set(raw) - _KNOWN
    if unknown:
        raise UserError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")

    host, port = parse_listen(getattr(args, "listen", None) or raw.get("listen") or DEFAULT_LISTEN)
    storage = Path(getattr(args, "storage", None) or raw.get("storage") or default_storage())

    upstreams: list[UpstreamConfig] = []
    for index, item in enumerate(raw.get("upstreams") or ()):
        entry = dict(_mapping(item, f"{where}: upstreams[{index}]"))
        bad = set(entry) - _UPSTREAM_KEYS
        if bad or "url" not in entry:
            raise UserError(f"{where}: upstreams[{index}]: needs url; unknown keys {sorted(bad)}")
        url = entry.pop("url")
        upstreams.append(_upstream_from_url(str(url), entry.pop("name", None), **entry))
    flag_url = getattr(args, "upstream", None)
    default_name = raw.get("default_upstream")
    if flag_url:
        flag_upstream = _upstream_from_url(flag_url)
        upstreams = [u for u in upstreams if u.name != flag_upstream.name] + [flag_upstream]
        default_name = flag_upstream.name
    if not upstreams:
        upstreams.append(_upstream_from_url(DEFAULT_UPSTREAM))
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: duplicate upstream names")
    default_name = default_name or names[0]
    if default_name not in names:
        raise UserError(f"{where}: default_upstream {default_name!r} is not an upstream")

    max_size = getattr(args, "max_size", None) or raw.get("max_size")
    budget = None
    if max_size:
        budget = Budget(
            parse_size(max_size),
            float(raw.get("high_watermark", 0.95)),
            float(raw.get("low_watermark", 0.85)),
        )
        if not 0 < budget.low_watermark < budget.high_watermark <= 1:
            raise UserError(f"{where}: need 0 < low_watermark < high_watermark <= 1")

    timeouts_raw = _mapping(raw.get("timeouts"), f"{where}: timeouts")
    tls = _mapping(raw.get("tls"), f"{where}: tls")
    tls_pairs = _tls_pairs(args, tls, where)
    tls_listen = parse_listen(str(tls["listen"])) if tls.get("listen") else None
    if tls_listen is not None and not tls_pairs:
        raise UserError(f"{where}: tls: listen needs a certificate (cert/key or certificates)")
    try:
        timeouts = Timeouts(
            float(timeouts_raw.get("connect", 5.0)), float(timeouts_raw.get("idle", 30.0))
        )
        tag_ttl = float(raw.get("tag_ttl", 300.0))
    except (TypeError, ValueError) as error:
        raise UserError(f"{where}: timeouts and tag_ttl are seconds: {error}") from error
    metrics = getattr(args, "metrics", None) or raw.get("metrics")
    return RegistryConfig(
        host=host,
        port=port,
        storage=storage,
        upstreams=tuple(upstreams),
        default_upstream=default_name,
        budget=budget,
        tag_ttl=tag_ttl,
        timeouts=timeouts,
        tls_pairs=tls_pairs,
        tls_listen=tls_listen,
        resolvers=_resolvers(raw.get("resolvers"), where),
        metrics=parse_listen(str(metrics)) if metrics else None,
        clients=_clients(raw.get("clients"), where, set(names)),
    )
