"""The `packages:` section of the cache's config -> frozen dataclasses: the mirrorlist
responder's hosts, preset and rules (`mirrorlist:`), the metalink responder's
(`metalink:`), and the repository cache's settings (repos_config.py).

A rule is `{release: [...], repo: [...], arch: [...], urls: [template, ...]}` (mirrorlist)
or `{repo: [...], arch: [...], url: template}` (metalink); a key left out matches every
value, a single value is a list of one, and `repo` compares case-insensitively (as the
CentOS mirrorlist server did). Templates take `$release`, `$repo`, `$arch` and `$basearch`
(the same as `$arch`: clients send the base architecture).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import urlsplit

from dnsoverride.cache.packages.repos_config import REPOS_KEYS, RepositoriesConfig
from dnsoverride.common.configfile import Section
from dnsoverride.common.grammar import GrammarError
from dnsoverride.common.yamlsource import brief

MIRRORLIST_PRESETS = ("centos-vault",)
METALINK_PRESETS = ("centos-stream", "epel", "fedora")
_VARIABLE = re.compile(r"\$(\w+)")
VARIABLES = ("release", "repo", "arch", "basearch")
_HOST = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def url_template(value: Any, variables: tuple[str, ...] = VARIABLES) -> str:
    """An http(s) URL template ending in `/` (a repository base), whose `$names` are known."""
    if not isinstance(value, str):
        raise GrammarError(f"expected a URL, not {brief(value)}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GrammarError(f"expected an http(s):// URL, not {brief(value)}")
    if not value.endswith("/"):
        raise GrammarError(f"{value!r} must end in '/' (a repository's base URL)")
    for name in _VARIABLE.findall(value):
        if name not in variables:
            known = ", ".join(f"${known}" for known in variables)
            raise GrammarError(f"unknown variable ${name} in {value!r} (known: {known})")
    return value


def _host(value: Any) -> str:
    if not isinstance(value, str) or not _HOST.match(value.lower().rstrip(".")):
        raise GrammarError(f"expected a host name, not {brief(value)}")
    return value.lower().rstrip(".")


def _word(value: Any) -> str:
    """A release, repo or arch name; a whole number is one too (`release: 7`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise GrammarError(f"expected a name, not {brief(value)}")
    return value


def _words(section: Section, key: str, *, fold: bool = False) -> frozenset[str] | None:
    """A rule's match list (None: the key is absent, every value matches)."""
    values = section.each(key, _word)
    if values is None:
        return None
    if not values:
        section.problem(key, "expected at least one name (leave the key out to match any)")
        return None
    return frozenset(value.lower() if fold else value for value in values)


@dataclass(frozen=True)
class MirrorRule:
    """(release, repo, arch) -> base URL templates; None matches any value."""

    urls: tuple[str, ...]
    releases: frozenset[str] | None = None
    repos: frozenset[str] | None = None  # lower case
    arches: frozenset[str] | None = None

    def matches(self, release: str, repo: str, arch: str) -> bool:
        return (
            (self.releases is None or release in self.releases)
            and (self.repos is None or repo.lower() in self.repos)
            and (self.arches is None or arch in self.arches)
        )

    @classmethod
    def read(cls, section: Section) -> Self | None:
        urls = section.each("urls", url_template)
        if "urls" not in section:
            section.add(section.line, "'urls' is required")
        elif urls is not None and not urls:
            section.problem("urls", "expected at least one URL")
        releases = _words(section, "release")
        repos = _words(section, "repo", fold=True)
        arches = _words(section, "arch")
        if not urls:
            return None
        return cls(urls, releases, repos, arches)


MIRROR_RULE_KEYS = ("release", "repo", "arch", "urls")


@dataclass(frozen=True)
class MirrorlistConfig:
    """The CentOS mirrorlist responder: the hosts it answers, rules first, then the preset."""

    hosts: tuple[str, ...] = ("mirrorlist.centos.org",)
    preset: str | None = "centos-vault"
    vault_url: str = "http://vault.centos.org/"
    rules: tuple[MirrorRule, ...] = ()

    @classmethod
    def read(cls, section: Section) -> Self:
        section.each("hosts", _host)
        _preset(section, MIRRORLIST_PRESETS)
        section.read("vault_url", lambda value: url_template(value, ()))
        rules = tuple(
            rule
            for rule_section in section.sections("rules", MIRROR_RULE_KEYS)
            if (rule := MirrorRule.read(rule_section)) is not None
        )
        values: dict[str, Any] = {**section.values, **({"rules": rules} if rules else {})}
        return cls(**values)


MIRRORLIST_KEYS = ("hosts", "preset", "vault_url", "rules")


@dataclass(frozen=True)
class MetalinkRule:
    """(repo, arch) -> the upstream repository's base URL template; None matches any."""

    url: str
    repos: frozenset[str] | None = None  # lower case
    arches: frozenset[str] | None = None

    def matches(self, repo: str, arch: str) -> bool:
        return (self.repos is None or repo.lower() in self.repos) and (
            self.arches is None or arch in self.arches
        )

    @classmethod
    def read(cls, section: Section) -> Self | None:
        url = section.read("url", lambda value: url_template(value, ("repo", "arch", "basearch")))
        if "url" not in section:
            section.add(section.line, "'url' is required")
        repos = _words(section, "repo", fold=True)
        arches = _words(section, "arch")
        return None if url is None else cls(url, repos, arches)


METALINK_RULE_KEYS = ("repo", "arch", "url")


@dataclass(frozen=True)
class MetalinkConfig:
    """The metalink responder: the hosts it answers, rules first, then the presets."""

    hosts: tuple[str, ...] = ("mirrors.centos.org", "mirrors.fedoraproject.org")
    presets: tuple[str, ...] = METALINK_PRESETS
    rules: tuple[MetalinkRule, ...] = ()

    @classmethod
    def read(cls, section: Section) -> Self:
        section.each("hosts", _host)
        presets = section.strings("presets")
        for preset in presets or ():
            if preset not in METALINK_PRESETS:
                section.problem(
                    "presets", f"unknown preset {preset!r} (known: {', '.join(METALINK_PRESETS)})"
                )
        rules = tuple(
            rule
            for rule_section in section.sections("rules", METALINK_RULE_KEYS)
            if (rule := MetalinkRule.read(rule_section)) is not None
        )
        values: dict[str, Any] = {**section.values, **({"rules": rules} if rules else {})}
        return cls(**values)


METALINK_KEYS = ("hosts", "presets", "rules")


def _preset(section: Section, known: tuple[str, ...]) -> None:
    """`preset`: one of `known`, or `none` (kept as None)."""

    def parse(value: Any) -> str | None:
        if value == "none":
            return None
        if value not in known:
            raise GrammarError(f"expected one of {', '.join(known)} or none, not {brief(value)}")
        return str(value)

    if "preset" in section:
        section.read("preset", parse)


PACKAGES_KEYS = ("mirrorlist", "metalink", *REPOS_KEYS)


@dataclass(frozen=True)
class PackagesConfig:
    """Everything the package side of the cache needs, validated."""

    mirrorlist: MirrorlistConfig = field(default_factory=MirrorlistConfig)
    metalink: MetalinkConfig = field(default_factory=MetalinkConfig)
    repositories: RepositoriesConfig = field(default_factory=RepositoriesConfig)

    @classmethod
    def read(cls, section: Section) -> Self:
        values: dict[str, Any] = {"repositories": RepositoriesConfig.read(section)}
        mirrorlist = section.section("mirrorlist", MIRRORLIST_KEYS)
        if mirrorlist is not None:
            values["mirrorlist"] = MirrorlistConfig.read(mirrorlist)
        metalink = section.section("metalink", METALINK_KEYS)
        if metalink is not None:
            values["metalink"] = MetalinkConfig.read(metalink)
        return cls(**values)
