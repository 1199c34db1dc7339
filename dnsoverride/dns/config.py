"""The DNS daemon's configuration: YAML file + command-line flags -> frozen `ServeConfig`.

Precedence: flags over the config file over the embedded defaults. Everything is parsed
and validated here, once, so the server only ever sees typed values. Problems are
reported together as `file:line: reason` in one `ConfigError` (a `UserError`).
"""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnsoverride.common import yamlsource
from dnsoverride.common.errors import ConfigError, Problem, UserError
from dnsoverride.common.loops import listener_owns
from dnsoverride.common.yamlsource import brief
from dnsoverride.dns.zones.names import name_problem, normalize_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_LISTEN = "127.0.0.1:5353"
DEFAULT_ZONES = "zones"
RESOLV_CONF = Path("/etc/resolv.conf")
# Loopback, RFC 1918, RFC 4193 (ULA), link-local: the private ranges, never the internet.
DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)
DEFAULT_VIEW = "default"
TOP_KEYS = (
    "listen",
    "zones",
    "upstreams",
    "allow",
    "views",
    "default_view",
    "cache",
    "timeout",
    "attempt_timeout",
    "edns_udp_size",
    "query_log",
    "metrics",
    "reload_interval",
    "probe",
    "failure_log_interval",
    "tcp",
    "ratelimit",
    "forward",
)
VIEW_KEYS = ("name", "clients", "zones")
CACHE_KEYS = ("size", "min_ttl", "max_ttl", "negative_max_ttl", "stale_ttl", "stale_reuse")
PROBE_KEYS = ("interval", "name")
TCP_KEYS = ("max_connections", "pipeline", "idle_timeout", "max_queued")
RATELIMIT_KEYS = ("rate", "slip", "ipv4_prefix", "ipv6_prefix", "exempt")
FORWARD_KEYS = ("case_randomization",)
# Loopback sources cannot be forged from outside the host: no one is reflected at them.
DEFAULT_RATELIMIT_EXEMPT = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class Endpoint:
    """A host (IP literal) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class View:
    """Clients in `clients` see the zone files in `zones` (None: every file)."""

    name: str
    clients: tuple[IPNetwork, ...]
    zones: frozenset[str] | None


@dataclass(frozen=True)
class CacheConfig:
    """Response cache bounds (entries) and TTL clamps (seconds)."""

    size: int = 10000
    min_ttl: int = 0
    max_ttl: int = 86400
    negative_max_ttl: int = 3600
    stale_ttl: int = 86400
    # Seconds the answer cache reuses a stale reply before the next query asks the
    # upstreams again (in the background while all are down), so a recovered upstream's
    # fresh answer replaces it within about this long (unbound: serve-expired-ttl-reset).
    stale_reuse: float = 2.0


@dataclass(frozen=True)
class ProbeConfig:
    """Active health probes of the upstreams: `<name> NS` every `interval` seconds to each
    upstream that is down or has answered nothing for that long (name "" is the root)."""

    interval: float = 2.0
    name: str = ""


@dataclass(frozen=True)
class TcpConfig:
    """DNS over TCP limits (RFC 7766): open connections, queries in flight per connection,
    seconds a connection may sit with nothing in flight before it is closed (also the
    longest a client may take to read its answers), and reply bytes queued for one
    connection beyond which it stops being read."""

    max_connections: int = 512
    pipeline: int = 100
    idle_timeout: float = 10.0
    max_queued: int = 262144


def _default_exempt() -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(network) for network in DEFAULT_RATELIMIT_EXEMPT)


@dataclass(frozen=True)
class RateLimitConfig:
    """Response rate limiting for UDP clients without a valid DNS cookie: `rate` replies
    per second per client prefix (/`ipv4_prefix`, /`ipv6_prefix`; 0 = off), bursts up to
    one second's worth; over it every `slip`th reply is an empty TC one, the others are
    dropped (slip 0: all dropped, 1: all TC). Clients in `exempt` are never limited."""

    rate: int = 1000
    slip: int = 2
    ipv4_prefix: int = 24
    ipv6_prefix: int = 56
    exempt: tuple[IPNetwork, ...] = field(default_factory=_default_exempt)


@dataclass(frozen=True)
class ForwardConfig:
    """How upstream queries are made: `case_randomization` sets the case of each letter
    of the name at random and accepts only a reply that echoes it (draft-vixie-dnsext-
    dns0x20, unbound's `use-caps-for-id`); off by default, as in unbound, because an
    upstream that does not echo the case is then never answered."""

    case_randomization: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """Everything `dnsoverride serve` needs, validated."""

    listen: tuple[Endpoint, ...]
    zones: Path
    upstreams: tuple[Endpoint, ...]
    allow: tuple[IPNetwork, ...]
    views: tuple[View, ...]
    default_view: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    timeout: float = 2.0
    attempt_timeout: float = 0.8
    edns_udp_size: int = 1232
    query_log: bool = False
    metrics: Endpoint | None = None
    reload_interval: float = 30.0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    failure_log_interval: float = 10.0  # seconds between two `upstream_failed` of one upstream
    tcp: TcpConfig = field(default_factory=TcpConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)

    def view_selectors(self) -> dict[str, frozenset[str] | None]:
        """View name -> zone file selectors, as `zones.load_zone_set(views=...)` wants."""
        return {view.name: view.zones for view in self.views}


def parse_endpoint(text: str, default_port: int | None) -> Endpoint:
    """`HOST:PORT`, `[V6]:PORT`, or (with a default port) `HOST` / `V6`; raises ValueError."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {brief(text)}")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    host = host.split("%")[0]  # a link-local scope; the address is what we compare
    if port is None:
        if default_port is None:
            raise ValueError(f"{brief(text)} needs a port (HOST:PORT)")
        return Endpoint(str(ipaddress.ip_address(host)), default_port)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {brief(text)}")
    return Endpoint(str(ipaddress.ip_address(host)), int(port))


def resolv_conf_upstreams(path: Path = RESOLV_CONF) -> tuple[Endpoint, ...]:
    """The `nameserver` lines of resolv.conf, port 53."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ()
    found = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                found.append(parse_endpoint(words[1], 53))
            except ValueError:
                continue
    return tuple(found)


class _Reader:
    """Reads one config document, collecting every problem with its line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def add(self, line: int, reason: str) -> None:
        self.problems.append(Problem(self.source, line, reason))

    def list_of(self, value: Any, line: int, key: str, parse: Callable[[Any], Any]) -> list[Any]:
        items = value if isinstance(value, list) else [value]
        lines = getattr(value, "item_lines", None) or [line] * len(items)
        parsed = []
        for item, item_line in zip(items, lines, strict=True):
            try:
                parsed.append(parse(item))
            except (ValueError, TypeError) as error:
                self.add(item_line, f"{key}: {error}")
        return parsed

    def number(
        self,
        mapping: yamlsource.LineMap,
        key: str,
        low: float,
        high: float,
        integer: bool,
        *,
        section: str = "",
    ) -> Any:
        value: Any = mapping[key]
        numeric = isinstance(value, int) or (not integer and isinstance(value, float))
        if isinstance(value, bool) or not numeric or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            where = f"{section}: {key}" if section else key
            self.add(mapping.key_lines[key], f"{where}: expected {kind} from {low} to {high}")
            return None
        return value


def _network(text: Any) -> IPNetwork:
    if not isinstance(text, str):
        raise TypeError(f"expected a CIDR string, got {brief(text)}")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {brief(text)}") from None


def _endpoint_parser(default_port: int | None) -> Callable[[Any], Endpoint]:
    def parse(text: Any) -> Endpoint:
        if not isinstance(text, str):
            raise TypeError(f"expected 'HOST:PORT', got {brief(text)}")
        try:
            return parse_endpoint(text, default_port)
        except ValueError as error:
            raise ValueError(f"bad address {brief(text)} ({error})") from None

    return parse


def _read_file(path: Path) -> tuple[dict[str, Any], list[Problem], dict[str, int]]:
    """The config file's settings as keyword values for ServeConfig, problems, and the line
    of each key."""
    reader = _Reader(str(path))
    try:
        document = yamlsource.load_file(path)
    except yamlsource.YamlError as error:
        return {}, [Problem(str(path), error.line, error.reason)], {}
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    if document is None:
        return {}, [], {}
    if not isinstance(document, yamlsource.LineMap):
        return {}, [Problem(str(path), 1, "the config must be a mapping of settings")], {}
    for key, line in document.duplicates:
        reader.add(line, f"duplicate key {brief(key)}")
    values: dict[str, Any] = {}
    lines = document.key_lines
    for key, value in document.items():
        line = lines[key]
        if key not in TOP_KEYS:
            reader.add(line, f"unknown key {brief(key)} (known: {', '.join(TOP_KEYS)})")
        elif key == "listen":
            values["listen"] = tuple(reader.list_of(value, line, key, _endpoint_parser(None)))
        elif key == "upstreams":
            values["upstreams"] = tuple(reader.list_of(value, line, key, _endpoint_parser(53)))
        elif key == "allow":
            values["allow"] = tuple(reader.list_of(value, line, key, _network))
        elif key == "zones":
            if not isinstance(value, str):
                reader.add(line, "zones: expected a directory path")
            else:
                values["zones"] = path.parent / value
        elif key == "views":
            values["views"] = _views(reader, value, line)
        elif key == "default_view":
            if not isinstance(value, str):
                reader.add(line, "default_view: expected a view name")
            else:
                values["default_view"] = value
        elif key == "cache":
            values["cache"] = _cache(reader, value, line)
        elif key in ("timeout", "attempt_timeout"):
            values[key] = reader.number(document, key, 0.05, 30, integer=False)
        elif key in ("reload_interval", "failure_log_interval"):
            values[key] = reader.number(document, key, 0, 86400, integer=False)
        elif key == "probe":
            values[key] = _probe(reader, value, line)
        elif key == "tcp":
            values[key] = _tcp(reader, value, line)
        elif key == "ratelimit":
            values[key] = _ratelimit(reader, value, line)
        elif key == "forward":
            values[key] = _forward(reader, value, line)
        elif key == "edns_udp_size":
            values[key] = reader.number(document, key, 512, 4096, integer=True)
        elif key == "query_log":
            if not isinstance(value, bool):
                reader.add(line, "query_log: expected true or false")
            else:
                values[key] = value
        elif key == "metrics":
            values[key] = next(iter(reader.list_of(value, line, key, _endpoint_parser(None))), None)
    return {k: v for k, v in values.items() if v is not None}, reader.problems, lines


def _views(reader: _Reader, value: Any, line: int) -> tuple[View, ...]:
    if not isinstance(value, yamlsource.LineList):
        reader.add(line, "views: expected a list of {name, clients, zones}")
        return ()
    views: list[View] = []
    for item, item_line in zip(value, value.item_lines, strict=True):
        if not isinstance(item, yamlsource.LineMap):
            reader.add(item_line, "views: each view is a mapping with name, clients, zones")
            continue
        for key in item:
            if key not in VIEW_KEYS:
                reader.add(
                    item.key_lines[key],
                    f"view: unknown key {brief(key)} (known: name, clients, zones)",
                )
        name = item.get("name")
        if not isinstance(name, str) or not name:
            reader.add(item_line, "view: 'name' is required")
            continue
        if name in (v.name for v in views):
            reader.add(item_line, f"view {brief(name)} is defined twice")
        clients = item.get("clients", [])
        clients_line = item.key_lines.get("clients", item_line)
        networks = reader.list_of(clients, clients_line, f"view {name} clients", _network)
        zones: frozenset[str] | None = None
        if "zones" in item:
            raw = item["zones"]
            if raw == "all":
                zones = None
            elif isinstance(raw, list) and all(isinstance(z, str) for z in raw):
                zones = frozenset(raw)
            else:
                reader.add(
                    item.key_lines["zones"],
                    f"view {name}: zones must be a list of zone file names, [] or 'all'",
                )
        views.append(View(name, tuple(networks), zones))
    return tuple(views)


def _cache(reader: _Reader, value: Any, line: int) -> CacheConfig | None:
    keys = _section_keys(reader, value, line, "cache", CACHE_KEYS)
    if keys is None:
        return None
    numbers: dict[str, Any] = {}
    for key in keys:
        if key == "stale_reuse":
            number = reader.number(value, key, 0, 3600, integer=False, section="cache")
        else:
            number = reader.number(
                value, key, 1 if key == "size" else 0, 2**31 - 1, integer=True, section="cache"
            )
        if number is not None:
            numbers[key] = number
    cache = CacheConfig(**numbers)
    if cache.min_ttl > cache.max_ttl:
        reader.add(line, "cache: min_ttl is larger than max_ttl")
    return cache


def _section_keys(
    reader: _Reader, value: Any, line: int, section: str, known: tuple[str, ...]
) -> list[str] | None:
    """The known keys of settings section `section` (the others reported); None, reported,
    when the section is not a mapping."""
    if not isinstance(value, yamlsource.LineMap):
        reader.add(line, f"{section}: expected a mapping with {', '.join(known)}")
        return None
    keys = []
    for key in value:
        if key in known:
            keys.append(key)
        else:
            reader.add(
                value.key_lines[key],
                f"{section}: unknown key {brief(key)} (known: {', '.join(known)})",
            )
    return keys


def _probe(reader: _Reader, value: Any, line: int) -> ProbeConfig | None:
    keys = _section_keys(reader, value, line, "probe", PROBE_KEYS)
    if keys is None:
        return None
    settings: dict[str, Any] = {}
    for key in keys:
        if key == "interval":
            settings[key] = reader.number(value, key, 0.1, 3600, integer=False, section="probe")
            continue
        name = value[key]
        problem = (
            name_problem(name, wildcard_ok=False)
            if isinstance(name, str)
            else "expected a domain name"
        )
        if isinstance(name, str) and normalize_name(name) == "":
            problem = None  # the root: every resolver answers `. NS`
        if problem is not None:
            reader.add(value.key_lines[key], f"probe: name: {problem}")
        else:
            settings[key] = normalize_name(name)
    return ProbeConfig(**{k: v for k, v in settings.items() if v is not None})


def _tcp(reader: _Reader, value: Any, line: int) -> TcpConfig | None:
    keys = _section_keys(reader, value, line, "tcp", TCP_KEYS)
    if keys is None:
        return None
    settings: dict[str, Any] = {}
    for key in keys:
        if key == "idle_timeout":
            settings[key] = reader.number(value, key, 0.1, 3600, integer=False, section="tcp")
        elif key == "max_queued":
            # At least one largest reply (65,535 bytes plus its length prefix).
            settings[key] = reader.number(value, key, 65537, 2**30, integer=True, section="tcp")
        else:
            settings[key] = reader.number(value, key, 1, 65535, integer=True, section="tcp")
    return TcpConfig(**{k: v for k, v in settings.items() if v is not None})


def _ratelimit(reader: _Reader, value: Any, line: int) -> RateLimitConfig | None:
    keys = _section_keys(reader, value, line, "ratelimit", RATELIMIT_KEYS)
    if keys is None:
        return None
    bounds = {"rate": (0, 10**7), "slip": (0, 10), "ipv4_prefix": (8, 32), "ipv6_prefix": (16, 128)}
    settings: dict[str, Any] = {}
    for key in keys:
        if key == "exempt":
            settings[key] = tuple(
                reader.list_of(value[key], value.key_lines[key], "ratelimit: exempt", _network)
            )
        else:
            low, high = bounds[key]
            settings[key] = reader.number(value, key, low, high, integer=True, section="ratelimit")
    return RateLimitConfig(**{k: v for k, v in settings.items() if v is not None})


def _forward(reader: _Reader, value: Any, line: int) -> ForwardConfig | None:
    keys = _section_keys(reader, value, line, "forward", FORWARD_KEYS)
    if keys is None:
        return None
    settings: dict[str, Any] = {}
    for key in keys:
        if isinstance(value[key], bool):
            settings[key] = value[key]
        else:
            reader.add(value.key_lines[key], f"forward: {key}: expected true or false")
    return ForwardConfig(**settings)


def _forwarding_loops(
    source: str, listen: tuple[Endpoint, ...], upstreams: tuple[Endpoint, ...]
) -> list[Problem]:
    problems = []
    for upstream in upstreams:
        for endpoint in listen:
            if listener_owns((endpoint.host, endpoint.port), upstream.host, upstream.port):
                problems.append(
                    Problem(
                        source,
                        None,
                        f"upstream {upstream} is our own listening address {endpoint}: queries "
                        "would loop back to this server (is /etc/resolv.conf pointing at it? set "
                        "'upstreams' or --upstream)",
                    )
                )
    return problems


def load_config(args: argparse.Namespace, resolv_conf: Path = RESOLV_CONF) -> ServeConfig:
    """Build the config from `args.config` (optional), the flags in `args` and the defaults."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    lines: dict[str, int] = {}
    config_path = getattr(args, "config", None)
    source = str(config_path or "command line")
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        values, problems, lines = _read_file(path)
    flag_problems: list[Problem] = []
    try:
        if getattr(args, "listen", None):
            values["listen"] = tuple(parse_endpoint(text, None) for text in args.listen)
        if getattr(args, "upstream", None):
            values["upstreams"] = tuple(parse_endpoint(text, 53) for text in args.upstream)
        if getattr(args, "metrics", None):
            values["metrics"] = parse_endpoint(args.metrics, None)
    except ValueError as error:
        flag_problems.append(Problem("command line", None, str(error)))
    if getattr(args, "zones", None):
        values["zones"] = Path(args.zones)
    if getattr(args, "query_log", False):
        values["query_log"] = True
    problems.extend(flag_problems)
    values.setdefault("listen", (parse_endpoint(DEFAULT_LISTEN, None),))
    values.setdefault("zones", Path(DEFAULT_ZONES))
    values.setdefault("allow", tuple(ipaddress.ip_network(n) for n in DEFAULT_ALLOW))
    values.setdefault("views", ())
    values.setdefault("default_view", DEFAULT_VIEW)
    if "upstreams" not in values:
        values["upstreams"] = resolv_conf_upstreams(resolv_conf)
        if not values["upstreams"]:
            problems.append(
                Problem(
                    str(resolv_conf),
                    None,
                    "no upstream resolvers: no usable 'nameserver' line; "
                    "set 'upstreams' in the config or pass --upstream",
                )
            )
    names = [view.name for view in values["views"]]
    if values["default_view"] not in names:
        if values["default_view"] != DEFAULT_VIEW:
            problems.append(
                Problem(
                    source,
                    lines.get("default_view"),
                    f"default_view {brief(values['default_view'])} is not one of the views",
                )
            )
        else:
            values["views"] = (*values["views"], View(DEFAULT_VIEW, (), None))
    if values.get("timeout", 2.0) < values.get("attempt_timeout", 0.8):
        values["attempt_timeout"] = values.get("timeout", 2.0)
    problems.extend(_forwarding_loops(source, values["listen"], values["upstreams"]))
    if problems:
        raise ConfigError(sorted(problems, key=lambda problem: (problem.file, problem.line or 0)))
    return ServeConfig(**values)
