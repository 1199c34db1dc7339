"""The repository cache's part of the `packages:` section: upstream repositories and the
metadata TTL.

    packages:
      metadata_ttl: 5m            # repomd.xml revalidated (conditional GET) after this
      upstreams:                  # replaces the built-in list below when given
        - name: vault             # [a-z0-9._-]; mirror mode serves it at /packages/vault/
          url: http://vault.centos.org/      # where its files are fetched from
          hosts: [vault.centos.org]          # Host headers that select it (default: url's)
          prefix: /                          # path prefix on those hosts (default: url's)

A request for Host `h` and path `p` goes to the upstream with `h` in `hosts` and the
longest `prefix` that starts `p`; its file is fetched from `url` + the rest of `p`. So an
internal mirror stands in for the real host with `hosts: [vault.centos.org]` and
`url: http://mirror.internal/centos-vault/`. Without `upstreams:` the built-in ones serve
the trees the mirrorlist and metalink presets point at: vault.centos.org,
mirror.stream.centos.org and dl.fedoraproject.org (`/pub/`).

`RepositoriesConfig.read(section)` reads the keys of REPOS_KEYS from the `packages:`
section; packages/config.py calls it and keeps the result as `PackagesConfig.repositories`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import urlsplit

from dnsoverride.common.configfile import Section
from dnsoverride.common.grammar import GrammarError

REPOS_KEYS: tuple[str, ...] = ("metadata_ttl", "upstreams")
UPSTREAM_KEYS = ("name", "url", "hosts", "prefix")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
DAY = 86400.0


@dataclass(frozen=True)
class RepositoryUpstream:
    """Where a set of repository trees comes from, and which requests select it."""

    name: str
    url: str  # ends in "/"
    hosts: frozenset[str]
    prefix: str  # starts and ends in "/"

    @classmethod
    def make(
        cls, name: str, url: str, hosts: tuple[str, ...] = (), prefix: str | None = None
    ) -> Self:
        """ValueError (GrammarError) with the reason for a bad name, URL, host or prefix."""
        if not _NAME.match(name):
            raise GrammarError(f"invalid upstream name {name!r} (expected [a-z0-9._-])")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise GrammarError(f"invalid upstream URL {url!r} (expected http(s)://host/path/)")
        hosts = hosts or (parts.hostname,)
        for host in hosts:
            if not _HOST.match(host):
                raise GrammarError(f"invalid host {host!r} (a lower-case DNS name)")
        prefix = prefix if prefix is not None else parts.path or "/"
        if not prefix.startswith("/"):
            raise GrammarError(f"invalid prefix {prefix!r} (a path starting with /)")
        return cls(
            name=name,
            url=url if url.endswith("/") else url + "/",
            hosts=frozenset(hosts),
            prefix=prefix if prefix.endswith("/") else prefix + "/",
        )

    @classmethod
    def read(cls, section: Section) -> Self | None:
        name = section.required_text("name", "a name ([a-z0-9._-])")
        url = section.required_text("url", "the upstream's URL, http(s)://host/path/")
        hosts = section.strings("hosts") or ()
        prefix = section.text("prefix", "a path prefix")
        if name is None or url is None:
            return None
        try:
            return cls.make(name, url, tuple(host.lower() for host in hosts), prefix)
        except ValueError as error:
            section.add(section.line, str(error))
            return None


BUILT_IN = (
    RepositoryUpstream.make("centos-vault", "http://vault.centos.org/"),
    RepositoryUpstream.make("centos-stream", "https://mirror.stream.centos.org/"),
    RepositoryUpstream.make("fedora", "https://dl.fedoraproject.org/pub/"),
)


@dataclass(frozen=True)
class RepositoriesConfig:
    """The upstream package repositories the cache serves pull-through."""

    metadata_ttl: float = 300.0
    upstreams: tuple[RepositoryUpstream, ...] = field(default=BUILT_IN)

    @classmethod
    def read(cls, section: Section) -> Self:
        values: dict[str, object] = {}
        ttl = section.duration("metadata_ttl", 0, DAY)
        if ttl is not None:
            values["metadata_ttl"] = ttl
        if "upstreams" in section:
            values["upstreams"] = _upstreams(section)
        return cls(**values)  # type: ignore[arg-type]


def _upstreams(section: Section) -> tuple[RepositoryUpstream, ...]:
    """The `upstreams:` list; a name, or a host and prefix, used twice is a problem at the
    later item's line."""
    upstreams: list[RepositoryUpstream] = []
    taken: dict[str, int] = {}
    for item in section.sections("upstreams", UPSTREAM_KEYS):
        upstream = RepositoryUpstream.read(item)
        if upstream is None:
            continue
        places = [upstream.name] + [f"{host}{upstream.prefix}" for host in sorted(upstream.hosts)]
        for index, place in enumerate(places):
            if place in taken:
                what = f"name {place!r}" if index == 0 else place
                item.add(item.line, f"{what} is taken (line {taken[place]})")
            taken.setdefault(place, item.line)
        upstreams.append(upstream)
    return tuple(upstreams)
