"""Registry cache configuration: YAML file + command-line flags -> frozen dataclasses.

Parsed once at start-up; everything downstream receives typed values. Read with the one
config idiom (`dnsoverride.common.configfile`, as `serve` reads its own): every problem
of the file at once as `file:line: key: reason`, unknown keys with a did-you-mean, flags
read with the same grammar (their problems name the flag). Each section's parser sits
beside its dataclass, and the defaults live in the dataclasses only: with no config file
at all, `dnsoverride registry` listens on 127.0.0.1:5000, mirrors Docker Hub and stores
under the user's cache directory.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from dnsoverride.common.configfile import Document, Flags, Section, require_file
from dnsoverride.common.errors import Problem
from dnsoverride.common.grammar import (
    HTTP_LISTENER,
    RESOLVER,
    Endpoint,
    GrammarError,
    IPNetwork,
    parse_endpoint,
    parse_size,
)
from dnsoverride.common.yamlsource import brief

DEFAULT_UPSTREAM = "https://registry-1.docker.io"
# Docker Hub serves official images under `library/`; clients may leave the prefix out.
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "docker.io", "index.docker.io")
DAY = 86400.0

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:\d{1,5})?$")
# htpasswd hashes we verify: bcrypt only (`htpasswd -B`); MD5/SHA1/crypt are refused.
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


@dataclass(frozen=True)
class Timeouts:
    """Upstream client timeouts in seconds; short so a dead upstream fails fast to stale."""

    connect: float = 5.0
    idle: float = 30.0

    @classmethod
    def read(cls, section: Section) -> Self:
        section.duration("connect", 0.1, 300)
        section.duration("idle", 0.1, DAY)
        return cls(**section.values)


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

    @classmethod
    def from_url(cls, url: str, name: str | None = None, **settings: Any) -> Self:
        """The upstream at `url`, named `name` (default: the URL's host[:port]); Docker Hub,
        by URL or by name, gets its aliases and `library/` prefix unless `settings` say
        otherwise. ValueError with the reason for a bad URL, name or alias."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GrammarError(f"invalid upstream URL {url!r} (expected http(s)://host[:port])")
        name = name or parts.netloc
        if not _HOSTNAME.match(name):
            raise GrammarError(f"invalid upstream name {name!r}")
        # Docker Hub by URL, or by name when the URL points at a stand-in (tests, relays).
        hub = parts.hostname in DOCKER_HUB_HOSTS or name in DOCKER_HUB_HOSTS
        aliases = settings.pop("aliases", None) or (DOCKER_HUB_HOSTS[1:] if hub else ())
        for alias in aliases:
            if not _HOSTNAME.match(alias):
                raise GrammarError(f"invalid alias {alias!r}")
        settings.setdefault("library_prefix", hub)
        return cls(name=name, url=url.rstrip("/"), aliases=tuple(aliases), **settings)

    @classmethod
    def read(cls, section: Section) -> Self | None:
        url = section.required_text("url", "the upstream's URL, http(s)://host[:port]")
        if url is None:
            return None
        section.text("name", "a host name")
        section.strings("aliases")
        section.text("username", "a user name")
        section.text("password", "a password")
        section.boolean("library_prefix")
        settings = dict(section.values)
        del settings["url"]
        try:
            return cls.from_url(url, settings.pop("name", None), **settings)
        except ValueError as error:
            section.add(section.line, str(error))
            return None


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


def _budget(top: Section, max_size: int | None) -> Budget | None:
    """The store budget from `max_size` (the flag's or the file's) and the watermarks."""
    watermarks: dict[str, float] = {}
    for key in ("high_watermark", "low_watermark"):
        value = top.raw(key)
        if key not in top:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            top.problem(key, f"expected a fraction above 0 and at most 1, not {brief(value)}")
        else:
            watermarks[key] = float(value)
    if max_size is None:
        for key in watermarks:
            top.problem(key, "applies to max_size, which is not set (no budget: no eviction)")
        return None
    budget = Budget(max_size, **watermarks)
    if watermarks and not budget.low_watermark < budget.high_watermark:
        top.add(top.line_of("low_watermark"), "need low_watermark < high_watermark")
    return budget


def _max_size(value: object) -> int:
    """A store budget: a size with its unit (a budget below one blob is warned of at run
    time, `store_budget_too_small`)."""
    if parse_size(value, unit_required=False) == 0:
        raise GrammarError("a budget of 0 would hold nothing: leave max_size out for no limit")
    return parse_size(value, unit_required=True)


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

    @classmethod
    def read(cls, section: Section, users: set[str], upstreams: set[str]) -> Self | None:
        names = section.strings("users") or ()
        for user in names:
            if user not in users:
                section.problem("users", f"user {user!r} is not in the htpasswd file")
        networks = section.networks("networks") or ()
        # (A list with a bad item is its own problem: not also this one.)
        parsed = all(key in section.values or key not in section for key in ("users", "networks"))
        if not names and not networks and parsed:
            section.add(section.line, "a grant needs users or networks")
        granted = section.strings("upstreams") or ()
        for name in granted:
            if name not in upstreams:
                section.problem("upstreams", f"upstream {name!r} is not configured")
        patterns = section.strings("repositories") or ()
        return cls(frozenset(names), networks, frozenset(granted), patterns)


@dataclass(frozen=True)
class ClientsConfig:
    """Who may read private content (see access.py); by default nobody but the public."""

    users: tuple[tuple[str, bytes], ...] = ()  # (user, bcrypt hash) from the htpasswd file
    grants: tuple[Grant, ...] = ()
    require_auth: bool = False
    visibility_ttl: float = 300.0

    @classmethod
    def read(cls, section: Section, upstreams: set[str]) -> Self:
        htpasswd = section.text("htpasswd", "the path of an htpasswd file")
        users = _htpasswd(htpasswd, section) if htpasswd else ()
        known = {user for user, _ in users}
        grants = tuple(
            grant
            for grant_section in section.sections("grants", GRANT_KEYS)
            if (grant := Grant.read(grant_section, known, upstreams)) is not None
        )
        require_auth = section.boolean("require_auth")
        if require_auth and not grants:
            section.problem(
                "require_auth", "require_auth needs grants (nobody could read anything)"
            )
        section.duration("visibility_ttl", 0, DAY)
        settings = {key: section.values[key] for key in SETTINGS if key in section.values}
        return cls(users, grants, **settings)


SETTINGS = ("require_auth", "visibility_ttl")


def _htpasswd(path: str, section: Section) -> tuple[tuple[str, bytes], ...]:
    """`user:$2y$...` lines of an htpasswd file (bcrypt only); problems at file:line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        section.problem("htpasswd", f"cannot read htpasswd {path}: {error}")
        return ()
    problems = section.document.problems
    users: dict[str, bytes] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.strip().partition(":")
        if not sep or not user:
            problems.append(Problem(path, number, "expected user:hash"))
        elif not _BCRYPT.match(hashed):
            problems.append(
                Problem(
                    path,
                    number,
                    f"user {user!r}: only bcrypt hashes are supported "
                    "(create them with `htpasswd -B`)",
                )
            )
        elif user in users:
            problems.append(Problem(path, number, f"user {user!r} given twice"))
        else:
            users[user] = hashed.encode()
    return tuple(users.items())


def default_storage() -> Path:
    """`$XDG_CACHE_HOME/dnsoverride/registry`, else `~/.cache/dnsoverride/registry`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnsoverride" / "registry"


def _default_upstreams() -> tuple[UpstreamConfig, ...]:
    return (UpstreamConfig.from_url(DEFAULT_UPSTREAM),)


DEFAULT_LISTEN = Endpoint("127.0.0.1", 5000)


@dataclass(frozen=True)
class RegistryConfig:
    """Everything `dnsoverride registry` needs, validated."""

    listen: Endpoint = DEFAULT_LISTEN
    storage: Path = field(default_factory=default_storage)
    upstreams: tuple[UpstreamConfig, ...] = field(default_factory=_default_upstreams)
    # The upstream for requests that name none of them; "" is the first upstream.
    default_upstream: str = ""
    budget: Budget | None = None
    tag_ttl: float = 300.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    # HTTPS: certificate/key pairs chosen by SNI (registry/tls.py). With `tls_listen` HTTPS
    # is served there and `listen` stays plain HTTP; without it `listen` is HTTPS.
    tls_pairs: tuple[tuple[Path, Path], ...] = ()
    tls_listen: Endpoint | None = None
    # DNS servers the upstream client asks instead of the system resolver (common/resolve.py).
    resolvers: tuple[Endpoint, ...] = ()
    metrics: Endpoint | None = None
    clients: ClientsConfig = field(default_factory=ClientsConfig)

    def __post_init__(self) -> None:
        if not self.default_upstream:
            object.__setattr__(self, "default_upstream", self.upstreams[0].name)

    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)


# The keys of the file, section by section (the top level's are not RegistryConfig's
# fields: `max_size` and the watermarks make `budget`, `tls` makes the TLS fields).
TOP_KEYS = (
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
)
TIMEOUT_KEYS = ("connect", "idle")
UPSTREAM_KEYS = ("name", "url", "aliases", "username", "password", "library_prefix")
TLS_KEYS = ("cert", "key", "certificates", "listen")
PAIR_KEYS = ("cert", "key")
CLIENTS_KEYS = ("htpasswd", "grants", "require_auth", "visibility_ttl")
GRANT_KEYS = ("users", "networks", "upstreams", "repositories")


@dataclass(frozen=True)
class RegistryFlags:
    """What the command line of `registry` sets over the config file (None: not given)."""

    listen: str | None = None
    upstream: str | None = None
    storage: str | None = None
    max_size: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics: str | None = None


def _tls(tls: Section | None, flags: RegistryFlags, command_line: Flags) -> dict[str, Any]:
    """`tls_pairs` and `tls_listen`: the flag pair (else `tls: cert/key`) first, then every
    `tls: certificates` entry."""
    values: dict[str, Any] = {}
    pairs: list[tuple[Path, Path]] = []
    cert, key = flags.tls_cert, flags.tls_key
    if bool(cert) != bool(key):
        command_line.problems.append(Problem("--tls-cert", None, "--tls-key goes with it"))
    elif tls is not None and not cert:
        cert = tls.text("cert", "a certificate file path")
        key = tls.text("key", "a key file path")
        if bool(cert) != bool(key):
            tls.add(tls.line, "cert and key go together")
    if cert and key:
        pairs.append((Path(cert), Path(key)))
    if tls is not None:
        for pair in tls.sections("certificates", PAIR_KEYS):
            cert_file = pair.text("cert", "a certificate file path")
            key_file = pair.text("key", "a key file path")
            if cert_file and key_file:
                pairs.append((Path(cert_file), Path(key_file)))
            else:
                pair.add(pair.line, "needs cert and key")
        listen = tls.endpoint("listen", HTTP_LISTENER)
        if listen is not None:
            values["tls_listen"] = listen
            if not pairs:
                tls.problem("listen", "needs a certificate (cert/key or certificates)")
    values["tls_pairs"] = tuple(pairs)
    return values


def _upstreams(top: Section, flag: UpstreamConfig | None) -> dict[str, Any]:
    """`upstreams` and `default_upstream`, the `--upstream` flag's upstream added (and made
    the default)."""
    upstreams = [
        upstream
        for section in top.sections("upstreams", UPSTREAM_KEYS)
        if (upstream := UpstreamConfig.read(section)) is not None
    ]
    values: dict[str, Any] = {}
    default = top.text("default_upstream", "an upstream name")
    if flag is not None:
        upstreams = [upstream for upstream in upstreams if upstream.name != flag.name] + [flag]
        default = flag.name
    if upstreams:
        values["upstreams"] = tuple(upstreams)
    names = [upstream.name for upstream in upstreams] or [_default_upstreams()[0].name]
    if len(set(names)) != len(names):
        top.problem("upstreams", "duplicate upstream names")
    if default is not None:
        if default not in names:
            top.problem("default_upstream", f"{default!r} is not an upstream")
        values["default_upstream"] = default
    return values


def _read_file(top: Section) -> dict[str, Any]:
    """Every setting of the file (its problems recorded), as RegistryConfig values; the
    upstreams, TLS and budget, which flags combine with, are read by `load`."""
    values: dict[str, Any] = {}
    top.endpoint("listen", HTTP_LISTENER)
    top.text("storage", "a directory path")
    top.duration("tag_ttl", 0, 30 * DAY)
    top.endpoints("resolvers", RESOLVER)
    top.endpoint("metrics", HTTP_LISTENER)
    for key in ("listen", "tag_ttl", "resolvers", "metrics"):
        if key in top.values:
            values[key] = top.values[key]
    if "storage" in top.values:
        values["storage"] = Path(top.values["storage"])
    timeouts = top.section("timeouts", TIMEOUT_KEYS)
    if timeouts is not None:
        values["timeouts"] = Timeouts.read(timeouts)
    return values


def load(path: Path | None, flags: RegistryFlags | None = None) -> RegistryConfig:
    """The config from the file at `path` (optional) with `flags` over it; ConfigError with
    every problem, of the file and of the flags."""
    flags = flags or RegistryFlags()
    document = Document(path or Path("(no config file)"))
    top: Section | None = None
    if path is not None:
        require_file(path, f"config file {path}")
        top = document.top(TOP_KEYS)
    if top is None:
        top = document.blank(TOP_KEYS)
    values = _read_file(top)
    command_line = Flags()
    for key, given in (
        ("listen", command_line.read("--listen", flags.listen, _http_listener)),
        ("metrics", command_line.read("--metrics", flags.metrics, _http_listener)),
        ("storage", Path(flags.storage) if flags.storage else None),
    ):
        if given is not None:
            values[key] = given
    max_size = top.read("max_size", _max_size)
    max_size = command_line.read("--max-size", flags.max_size, _max_size) or max_size
    values["budget"] = _budget(top, max_size)
    flag_upstream = command_line.read("--upstream", flags.upstream, UpstreamConfig.from_url)
    values.update(_upstreams(top, flag_upstream))
    values.update(_tls(top.section("tls", TLS_KEYS), flags, command_line))
    clients = top.section("clients", CLIENTS_KEYS)
    if clients is not None:
        names = {upstream.name for upstream in values.get("upstreams", _default_upstreams())}
        values["clients"] = ClientsConfig.read(clients, names)
    document.raise_problems(*command_line.problems)
    return RegistryConfig(**{key: value for key, value in values.items() if value is not None})


def _http_listener(text: str) -> Endpoint:
    return parse_endpoint(text, HTTP_LISTENER)
