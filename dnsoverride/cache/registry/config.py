"""The `registry:` section of the cache's config: upstream registries, the default one, the
tag TTL and who may read private content -> frozen dataclasses.

cache/config.py reads the file and hands this module the section (or, for a config
written before the cache had sections, the same keys at the top level); each parser sits
beside its dataclass and the defaults live in the dataclasses only: with no config at
all the registry mirrors Docker Hub.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from dnsoverride.common.configfile import Section
from dnsoverride.common.errors import Problem
from dnsoverride.common.grammar import (
    GrammarError,
    IPNetwork,
)
from dnsoverride.common.yamlsource import LineMap

DEFAULT_UPSTREAM = "https://registry-1.docker.io"
# Docker Hub serves official images under `library/`; clients may leave the prefix out.
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "docker.io", "index.docker.io")
DAY = 86400.0

_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:\d{1,5})?$")
# htpasswd hashes we verify: bcrypt only (`htpasswd -B`); MD5/SHA1/crypt are refused.
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


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


def _default_upstreams() -> tuple[UpstreamConfig, ...]:
    return (UpstreamConfig.from_url(DEFAULT_UPSTREAM),)


@dataclass(frozen=True)
class RegistryConfig:
    """The registry side of the cache, validated."""

    upstreams: tuple[UpstreamConfig, ...] = field(default_factory=_default_upstreams)
    # The upstream for requests that name none of them; "" is the first upstream.
    default_upstream: str = ""
    tag_ttl: float = 300.0
    clients: ClientsConfig = field(default_factory=ClientsConfig)

    def __post_init__(self) -> None:
        if not self.default_upstream:
            object.__setattr__(self, "default_upstream", self.upstreams[0].name)

    def upstream(self, name: str) -> UpstreamConfig:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    @classmethod
    def read(cls, section: Section, flag_upstream: UpstreamConfig | None) -> Self:
        """The section's settings, the `--upstream` flag's upstream added (and made the
        default)."""
        values = _upstreams(section, flag_upstream)
        section.duration("tag_ttl", 0, 30 * DAY)
        if "tag_ttl" in section.values:
            values["tag_ttl"] = section.values["tag_ttl"]
        clients = section.section("clients", CLIENTS_KEYS)
        if clients is not None:
            names = {upstream.name for upstream in values.get("upstreams", _default_upstreams())}
            values["clients"] = ClientsConfig.read(clients, names)
        return cls(**values)


# The keys of the section (and of a config from before the sections, at the top level).
REGISTRY_KEYS = ("upstreams", "default_upstream", "tag_ttl", "clients")
UPSTREAM_KEYS = ("name", "url", "aliases", "username", "password", "library_prefix")
CLIENTS_KEYS = ("htpasswd", "grants", "require_auth", "visibility_ttl")
GRANT_KEYS = ("users", "networks", "upstreams", "repositories")


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


DEFAULT_WARM_INTERVAL = 3600.0
WARM_KEYS = ("interval", "images")
WARM_IMAGE_KEYS = ("image", "interval")


@dataclass(frozen=True)
class WarmImage:
    """One image of the `warm:` list, as written (resolved against the upstreams when
    warmed: registry/references.py) and how often it is refreshed."""

    image: str
    interval: float


@dataclass(frozen=True)
class WarmConfig:
    """The images the cache keeps hot: fetched at start and every `interval` after."""

    images: tuple[WarmImage, ...] = ()

    @classmethod
    def read(cls, section: Section, check: Callable[[str], object]) -> Self:
        """The `warm:` section; `check(text)` raises ValueError for an image reference the
        upstreams cannot resolve (the problem is recorded at its line)."""
        interval = section.duration("interval", 60, 30 * DAY)
        default = interval if interval is not None else DEFAULT_WARM_INTERVAL
        images = []
        raw = section.raw("images")
        if raw is not None and not isinstance(raw, list):
            section.problem("images", "expected a list of images (NAME:TAG or image: + interval:)")
            return cls()
        lines = getattr(raw, "item_lines", None) or []
        for index, item in enumerate(raw or []):
            line = lines[index] if index < len(lines) else section.line_of("images")
            if isinstance(item, str):
                text, every = item, default
            elif isinstance(item, LineMap):
                entry = Section(section.document, item, f"warm: images[{index}]", WARM_IMAGE_KEYS)
                text = entry.required_text("image", "an image reference, NAME:TAG") or ""
                every = entry.duration("interval", 60, 30 * DAY) or default
                if not text:
                    continue
            else:
                section.add(line, f"images[{index}]: expected NAME:TAG or a mapping with image")
                continue
            try:
                check(text)
            except ValueError as error:
                section.add(line, f"images[{index}]: {error}")
                continue
            images.append(WarmImage(text, every))
        if len({image.image for image in images}) != len(images):
            section.problem("images", "an image is listed twice")
        return cls(tuple(images))
