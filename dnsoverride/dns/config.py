"""The DNS daemon's configuration: YAML file + command-line flags -> frozen `ServeConfig`.

Precedence: flags over the config file over the defaults, which live in the dataclasses
below and nowhere else. Each section's dataclass reads itself (`read`) through the one
config idiom (`dnsoverride.common.configfile`): every problem of the file at once, as
`file:line: key: reason`, unknown keys with a did-you-mean; flags are read with the same
grammar and their problems name the flag. Everything is parsed and validated here, once,
so the server only ever sees typed values.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Self

from dnsoverride.common.configfile import Document, Flags, Section, require_file
from dnsoverride.common.cpus import usable_cpus
from dnsoverride.common.errors import ConfigError, Problem
from dnsoverride.common.grammar import (
    DNS_LISTENER,
    HTTP_LISTENER,
    RESOLVER,
    Endpoint,
    GrammarError,
    IPNetwork,
    parse_endpoint,
)
from dnsoverride.common.loops import listener_owns
from dnsoverride.common.yamlsource import brief
from dnsoverride.dns.constants import MAX_TTL, PLAIN_UDP_SIZE
from dnsoverride.dns.logthrottle import DEFAULT_INTERVAL
from dnsoverride.dns.zones.names import name_problem, normalize_name

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
# Loopback sources cannot be forged from outside the host: no one is reflected at them.
DEFAULT_RATELIMIT_EXEMPT = ("127.0.0.0/8", "::1/128")
DAY = 86400.0


def keys_of(cls: type) -> tuple[str, ...]:
    """The keys of a config section: the fields of its dataclass, in order."""
    return tuple(item.name for item in fields(cls))


@dataclass(frozen=True)
class View:
    """Clients in `clients` see the zone files in `zones` (None: every file)."""

    name: str
    clients: tuple[IPNetwork, ...] = ()
    zones: frozenset[str] | None = None

    @classmethod
    def read(cls, section: Section) -> Self | None:
        if section.required_text("name", "a view name") is None:
            return None
        section.networks("clients")
        if "zones" in section:
            raw = section.raw("zones")
            if raw == "all":
                section.values["zones"] = None
            elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
                section.values["zones"] = frozenset(raw)
            else:
                section.problem("zones", "expected a list of zone file names, [] or 'all'")
        return cls(**section.values)


@dataclass(frozen=True)
class CacheConfig:
    """Cache bounds (entries, and bytes of replies: an answer may take 64 KiB, and who
    runs a domain chooses its answers' size) and TTL clamps (seconds)."""

    size: int = 10000
    max_bytes: int = 64 << 20
    min_ttl: int = 0
    max_ttl: int = 86400
    negative_max_ttl: int = 3600
    stale_ttl: int = 86400
    # Seconds the answer cache reuses a stale reply before the next query asks the
    # upstreams again (in the background while all are down), so a recovered upstream's
    # fresh answer replaces it within about this long (unbound: serve-expired-ttl-reset).
    stale_reuse: float = 2.0

    @classmethod
    def read(cls, section: Section) -> Self:
        section.integer("size", 1, MAX_TTL)
        # A budget, so its unit is required; at least one largest reply (65,535 bytes).
        section.size("max_bytes", 65535, 1 << 40)
        for key in ("min_ttl", "max_ttl", "negative_max_ttl", "stale_ttl"):
            section.duration(key, 0, MAX_TTL, whole=True)
        section.duration("stale_reuse", 0, 3600)
        cache = cls(**section.values)
        if cache.min_ttl > cache.max_ttl:
            section.add(section.line, "min_ttl is larger than max_ttl")
        return cache


@dataclass(frozen=True)
class ProbeConfig:
    """Active health probes of the upstreams: `<name> NS` every `interval` seconds to each
    upstream that is down or has answered nothing for that long (name "" is the root)."""

    interval: float = 2.0
    name: str = ""

    @classmethod
    def read(cls, section: Section) -> Self:
        section.duration("interval", 0.1, 3600)
        section.read("name", _probe_name)
        return cls(**section.values)


def _probe_name(value: Any) -> str:
    if not isinstance(value, str):
        raise GrammarError(f"expected a domain name, not {brief(value)}")
    if normalize_name(value) == "":
        return ""  # the root: every resolver answers `. NS`
    problem = name_problem(value, wildcard_ok=False)
    if problem is not None:
        raise GrammarError(problem)
    return normalize_name(value)


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

    @classmethod
    def read(cls, section: Section) -> Self:
        section.integer("max_connections", 1, 65535)
        section.integer("pipeline", 1, 65535)
        section.duration("idle_timeout", 0.1, 3600)
        # At least one largest reply (65,535 bytes plus its length prefix).
        section.size("max_queued", 65537, 2**30, unit_required=False)
        return cls(**section.values)


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

    @classmethod
    def read(cls, section: Section) -> Self:
        section.integer("rate", 0, 10**7)
        section.integer("slip", 0, 10)
        section.integer("ipv4_prefix", 8, 32)
        section.integer("ipv6_prefix", 16, 128)
        section.networks("exempt")
        return cls(**section.values)


@dataclass(frozen=True)
class ForwardConfig:
    """How upstream queries are made: `case_randomization` sets the case of each letter
    of the name at random and accepts only a reply that echoes it (draft-vixie-dnsext-
    dns0x20, unbound's `use-caps-for-id`); off by default, as in unbound, because an
    upstream that does not echo the case is then never answered."""

    case_randomization: bool = False

    @classmethod
    def read(cls, section: Section) -> Self:
        section.boolean("case_randomization")
        return cls(**section.values)


def _default_allow() -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(network) for network in DEFAULT_ALLOW)


@dataclass(frozen=True)
class ServeConfig:
    """Everything `dnsoverride serve` needs, validated. With no upstreams configured, the
    loader takes the `nameserver`s of /etc/resolv.conf; with no view named `default_view`,
    it adds one that sees every zone file."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 5353),)
    zones: Path = Path("zones")
    upstreams: tuple[Endpoint, ...] = ()
    allow: tuple[IPNetwork, ...] = field(default_factory=_default_allow)
    views: tuple[View, ...] = ()
    default_view: str = "default"
    cache: CacheConfig = field(default_factory=CacheConfig)
    timeout: float = 2.0
    attempt_timeout: float = 0.8
    edns_udp_size: int = 1232
    query_log: bool = False
    metrics: Endpoint | None = None
    reload_interval: float = 30.0
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # seconds between two `upstream_failed` of one upstream
    failure_log_interval: float = DEFAULT_INTERVAL
    tcp: TcpConfig = field(default_factory=TcpConfig)
    ratelimit: RateLimitConfig = field(default_factory=RateLimitConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    workers: int = 1  # processes answering queries (SO_REUSEPORT); 1: this one alone
    # Why `workers: auto` (the default in a config `load_config` reads) chose `workers`;
    # None when the config set a number.
    workers_auto: str | None = None

    def view_selectors(self) -> dict[str, frozenset[str] | None]:
        """View name -> zone file selectors, as `zones.load_zone_set(views=...)` wants."""
        return {view.name: view.zones for view in self.views}


# The keys a config file may set: not `workers_auto`, which `workers: auto` derives.
TOP_KEYS = tuple(key for key in keys_of(ServeConfig) if key != "workers_auto")
MAX_WORKERS = 64
# `workers: auto`: one per CPU this process can keep busy, at most this many (each copies
# the zones and has its own caches).
AUTO_WORKERS_CAP = 4
# ... and fewer for a large zone set: every process holds its own copy of the zones
# (~220-290 bytes of RSS per name), so the copies beyond the first hold at most this
# many names in all (~80 MB): 1,000,000 names are served by one process, not four.
AUTO_EXTRA_NAMES = 300_000


def auto_workers(cpus: int) -> tuple[int, str]:
    """What `workers: auto` means with `cpus` usable CPUs (affinity and cgroup CPU
    limit: `usable_cpus`), before the zones are known: the count and why."""
    if cpus > AUTO_WORKERS_CAP:
        return AUTO_WORKERS_CAP, f"{cpus} usable CPUs, at most {AUTO_WORKERS_CAP}"
    return cpus, f"{cpus} usable CPU{'s' if cpus > 1 else ''}"


def fit_workers(config: ServeConfig, names: int) -> ServeConfig:
    """`config` with `workers: auto` fitted to a zone set of `names` names (see
    `AUTO_EXTRA_NAMES`); a number the config set stays."""
    fitting = 1 + AUTO_EXTRA_NAMES // max(names, 1)
    if config.workers_auto is None or fitting >= config.workers:
        return config
    why = (
        f"{names:,} zone names, a copy in each process: the copies beyond the first hold "
        f"at most {AUTO_EXTRA_NAMES:,} names ({config.workers_auto})"
    )
    return replace(config, workers=fitting, workers_auto=why)


def _parse_workers(value: Any) -> int | str:
    """A number of processes, or "auto" (resolved by `load_config`)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise GrammarError(
            f"expected an integer from 1 to {MAX_WORKERS} or auto, not {brief(value)}"
        )
    return value


VIEW_KEYS = keys_of(View)
CACHE_KEYS = keys_of(CacheConfig)
PROBE_KEYS = keys_of(ProbeConfig)
TCP_KEYS = keys_of(TcpConfig)
RATELIMIT_KEYS = keys_of(RateLimitConfig)
FORWARD_KEYS = keys_of(ForwardConfig)
SECTIONS: dict[str, type[CacheConfig | ProbeConfig | TcpConfig | RateLimitConfig | ForwardConfig]]
SECTIONS = {
    "cache": CacheConfig,
    "probe": ProbeConfig,
    "tcp": TcpConfig,
    "ratelimit": RateLimitConfig,
    "forward": ForwardConfig,
}


@dataclass(frozen=True)
class ServeFlags:
    """What the command line of `serve` (and `check`) sets over the config file; empty or
    None: not given."""

    listen: tuple[str, ...] = ()
    upstream: tuple[str, ...] = ()
    metrics: str | None = None
    zones: str | None = None
    query_log: bool = False
    workers: str | None = None  # a number or "auto"


def _read_top(top: Section, path: Path) -> None:
    """Every key of the file into `top.values` (bad ones recorded as problems)."""
    top.endpoints("listen", DNS_LISTENER)
    top.endpoints("upstreams", RESOLVER)
    top.networks("allow")
    if top.text("zones", "a directory path") is not None:
        top.values["zones"] = path.parent / top.values["zones"]
    views: dict[str, View] = {}
    for section in top.sections("views", VIEW_KEYS):
        view = View.read(section)
        if view is not None and view.name in views:
            section.add(section.line, f"view {brief(view.name)} is defined twice")
        elif view is not None:
            views[view.name] = view
    if "views" in top:
        top.values["views"] = tuple(views.values())
    top.text("default_view", "a view name")
    for key in ("timeout", "attempt_timeout"):
        top.duration(key, 0.05, 30)
    for key in ("reload_interval", "failure_log_interval"):
        top.duration(key, 0, DAY)
    top.size("edns_udp_size", PLAIN_UDP_SIZE, 4096, unit_required=False)
    top.boolean("query_log")
    top.read("workers", _parse_workers)
    top.endpoint("metrics", HTTP_LISTENER)
    for key, section_class in SECTIONS.items():
        settings = top.section(key, keys_of(section_class))
        if settings is not None:
            top.values[key] = section_class.read(settings)


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
                found.append(parse_endpoint(words[1], RESOLVER))
            except GrammarError:
                continue
    return tuple(found)


@dataclass
class _Origins:
    """Where the settings that are checked together came from, for their problems."""

    where: dict[str, tuple[str, int | None]] = field(default_factory=dict)

    def note(self, key: str, source: str, line: int | None) -> None:
        self.where[key] = (source, line)

    def problem(self, key: str, reason: str) -> Problem:
        source, line = self.where.get(key, ("defaults", None))
        return Problem(source, line, reason)


def _read_flags(flags: ServeFlags, values: dict[str, Any], origins: _Origins) -> list[Problem]:
    """What the command line sets, into `values` over the file's; its problems."""
    command_line = Flags()
    for key, flag, given in (
        ("listen", "--listen", command_line.each("--listen", flags.listen, _listener)),
        ("upstreams", "--upstream", command_line.each("--upstream", flags.upstream, _resolver)),
    ):
        if given:
            values[key] = given
            origins.note(key, flag, None)
    metrics = command_line.read("--metrics", flags.metrics, _http_listener)
    if metrics is not None:
        values["metrics"] = metrics
    if flags.zones:
        values["zones"] = Path(flags.zones)
        origins.note("zones", f"--zones {flags.zones}", None)
    if flags.query_log:
        values["query_log"] = True
    workers = command_line.read("--workers", flags.workers, _workers_flag)
    if workers is not None:
        values["workers"] = workers
    return command_line.problems


def load_config(
    path: Path | None, flags: ServeFlags | None = None, resolv_conf: Path = RESOLV_CONF
) -> ServeConfig:
    """The config from the file at `path` (optional), `flags` over it, and the defaults;
    ConfigError with every problem, file and flags together."""
    flags = flags or ServeFlags()
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    origins = _Origins()
    if path is not None:
        require_file(path, f"config file {path}")
        document = Document(path)
        top = document.top(TOP_KEYS)
        if top is not None:
            _read_top(top, path)
            values = top.values
            for key in top.mapping:
                origins.note(key, str(path), top.line_of(key))
        problems = document.problems
    problems.extend(_read_flags(flags, values, origins))
    if values.get("workers", "auto") == "auto":
        values["workers"], values["workers_auto"] = auto_workers(usable_cpus())
    config = ServeConfig(**values)
    if "upstreams" not in origins.where:
        config = _with_resolv_conf(config, resolv_conf, origins, problems)
    config = _with_default_view(config, origins, problems)
    if config.timeout < config.attempt_timeout:
        config = replace(config, attempt_timeout=config.timeout)
    problems.extend(_forwarding_loops(config, origins))
    problems.extend(_zones_directory(config.zones, origins))
    if problems:
        raise ConfigError(sorted(problems, key=lambda problem: (problem.file, problem.line or 0)))
    return config


def _workers_flag(text: str) -> int | str:
    return _parse_workers(int(text) if text.isdigit() else text)


def _listener(text: str) -> Endpoint:
    return parse_endpoint(text, DNS_LISTENER)


def _resolver(text: str) -> Endpoint:
    return parse_endpoint(text, RESOLVER)


def _http_listener(text: str) -> Endpoint:
    return parse_endpoint(text, HTTP_LISTENER)


def _with_resolv_conf(
    config: ServeConfig, resolv_conf: Path, origins: _Origins, problems: list[Problem]
) -> ServeConfig:
    upstreams = resolv_conf_upstreams(resolv_conf)
    origins.note("upstreams", str(resolv_conf), None)
    if not upstreams:
        problems.append(
            Problem(
                str(resolv_conf),
                None,
                "no upstream resolvers: no usable 'nameserver' line; "
                "set 'upstreams' in the config or pass --upstream",
            )
        )
    return replace(config, upstreams=upstreams)


def _with_default_view(
    config: ServeConfig, origins: _Origins, problems: list[Problem]
) -> ServeConfig:
    """The config with its default view added when no view has that name; a problem when
    the default view was named and does not exist."""
    if config.default_view in (view.name for view in config.views):
        return config
    if config.default_view != ServeConfig.default_view:
        problems.append(
            origins.problem(
                "default_view",
                f"default_view {brief(config.default_view)} is not one of the views",
            )
        )
        return config
    return replace(config, views=(*config.views, View(config.default_view)))


def _zones_directory(zones: Path, origins: _Origins) -> list[Problem]:
    """The zones directory as named by the flag or key that gave it, when it cannot be
    read: a user sees `--zones nozones: ...`, `dnsoverride.yaml:4: zones: ...` or, for the
    default, which flag or key would name another one."""
    try:
        with os.scandir(zones):
            return []
    except FileNotFoundError:
        reason = "zones directory does not exist"
    except NotADirectoryError:
        reason = "is a file, not a zones directory"
    except OSError as error:
        reason = f"cannot read the zones directory: {error.strerror or error}"
    source, line = origins.where.get("zones", ("", None))
    if not source:
        return [Problem(f"./{zones}", None, f"{reason} (the default; set --zones or zones:)")]
    if source.startswith("--"):
        return [Problem(source, None, reason)]
    return [Problem(source, line, f"zones: {zones}: {reason}")]


def _forwarding_loops(config: ServeConfig, origins: _Origins) -> list[Problem]:
    problems = []
    for upstream in config.upstreams:
        for endpoint in config.listen:
            if listener_owns(endpoint, upstream.host, upstream.port):
                problems.append(
                    origins.problem(
                        "upstreams",
                        f"upstream {upstream} is our own listening address {endpoint}: queries "
                        "would loop back to this server (is /etc/resolv.conf pointing at it? set "
                        "'upstreams' or --upstream)",
                    )
                )
    return problems
