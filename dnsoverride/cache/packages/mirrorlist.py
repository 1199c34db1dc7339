"""The CentOS mirrorlist responder: what `mirrorlist.centos.org` answered, answered here.

`GET /?release=R&arch=A&repo=N[&infra=...]` (and `/mirrorlist?...`) -> `text/plain`, one
repository base URL per line. `repo` is case-insensitive; every other parameter (`infra`,
`cc`, a literal `$infra` from an image without the yum variable) is ignored. The
configured rules answer first (the first that matches), then the `centos-vault` preset:
the end-of-life releases mapped to their vault.centos.org trees, so that a CentOS 6/7/8
image's unchanged `yum install` works through the DNS override of vault.centos.org to
this same cache:

    release    tree                        repositories
    6          6.10/<repo>/<arch>/          os updates extras centosplus fasttrack
                                            sclo-rh sclo-sclo (6.10/sclo/<arch>/{rh,sclo}/)
               arches x86_64 i386
    7          7.9.2009/<repo>/x86_64/      os updates extras centosplus fasttrack cr
               altarch/7.9.2009/<repo>/<arch>/ for aarch64 ppc64le ppc64 armhfp i386
                                            sclo-rh sclo-sclo (.../sclo/<arch>/{rh,sclo}/)
    8          8.5.2111/<Repo>/<arch>/os/   BaseOS AppStream PowerTools extras centosplus
               arches x86_64 aarch64 ppc64le  fasttrack cr Devel HighAvailability
    8-stream   8-stream/<Repo>/<arch>/os/   BaseOS AppStream PowerTools extras centosplus
               arches x86_64 aarch64 ppc64le  RT HighAvailability Devel

(the full point release, e.g. `release=7.9.2009`, is taken too; sources in the research
note for issue 12: mock's vault templates, the CentOS repo files, third-party uses of
the altarch tree).

An unknown release, repository or architecture, or a missing parameter, is a 404 with a
one-line plain-text reason, which dnf shows verbatim and the access log carries; never an
empty 200, which yum and dnf report only as "no URLs in mirrorlist".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aiohttp import web

from dnsoverride.cache.packages.config import MirrorlistConfig, MirrorRule
from dnsoverride.cache.packages.refusal import NoAnswerError, query_name, refuse

PATHS = ("/", "/mirrorlist", "/mirrorlist/")
_VARIABLE = re.compile(r"\$(\w+)")


@dataclass(frozen=True)
class VaultTree:
    """One end-of-life release in the vault: its directory, repositories (lower-case name
    -> path below the release directory, `{arch}` for the architecture) and the
    architectures of the main tree and of the `altarch/` tree."""

    directory: str
    repos: dict[str, str]
    arches: tuple[str, ...]
    altarches: tuple[str, ...] = ()

    def path(self, repo: str, arch: str) -> str | None:
        """The tree's path for (repo, arch) below the vault's root; None when it has none."""
        template = self.repos.get(repo.lower())
        if template is None:
            return None
        if arch in self.arches:
            return f"{self.directory}/{template.format(arch=arch)}"
        if arch in self.altarches:
            return f"altarch/{self.directory}/{template.format(arch=arch)}"
        return None


_EL67_REPOS = {
    name: f"{name}/{{arch}}/" for name in ("os", "updates", "extras", "centosplus", "fasttrack")
} | {"sclo-rh": "sclo/{arch}/rh/", "sclo-sclo": "sclo/{arch}/sclo/"}
_EL8_REPOS = (
    "BaseOS",
    "AppStream",
    "PowerTools",
    "extras",
    "centosplus",
    "fasttrack",
    "cr",
    "Devel",
    "HighAvailability",
)
_STREAM8_REPOS = (
    "BaseOS",
    "AppStream",
    "PowerTools",
    "extras",
    "centosplus",
    "RT",
    "HighAvailability",
    "Devel",
)
_EL8_ARCHES = ("x86_64", "aarch64", "ppc64le")

CENTOS_VAULT = {
    "6": VaultTree("6.10", _EL67_REPOS, ("x86_64", "i386")),
    "7": VaultTree(
        "7.9.2009",
        _EL67_REPOS | {"cr": "cr/{arch}/"},
        ("x86_64",),
        ("aarch64", "ppc64le", "ppc64", "armhfp", "i386"),
    ),
    "8": VaultTree(
        "8.5.2111", {name.lower(): f"{name}/{{arch}}/os/" for name in _EL8_REPOS}, _EL8_ARCHES
    ),
    "8-stream": VaultTree(
        "8-stream", {name.lower(): f"{name}/{{arch}}/os/" for name in _STREAM8_REPOS}, _EL8_ARCHES
    ),
}
# The point releases clients of a pinned image may send instead of the major one.
_POINT_RELEASES = {tree.directory: major for major, tree in CENTOS_VAULT.items()}


def substitute(template: str, release: str, repo: str, arch: str) -> str:
    """`template` with `$release`, `$repo`, `$arch` and `$basearch` filled in."""
    values = {"release": release, "repo": repo, "arch": arch, "basearch": arch}
    return _VARIABLE.sub(lambda match: values.get(match[1], match[0]), template)


def vault_urls(vault_url: str, release: str, repo: str, arch: str) -> list[str]:
    """The `centos-vault` preset's list for (release, repo, arch); NoAnswerError when none."""
    tree = CENTOS_VAULT.get(_POINT_RELEASES.get(release, release))
    if tree is None:
        known = ", ".join(CENTOS_VAULT)
        raise NoAnswerError(f"unknown release {release!r} (the vault preset knows {known})")
    if repo.lower() not in tree.repos:
        raise NoAnswerError(
            f"unknown repo {repo!r} for release {release} (known: {', '.join(tree.repos)})"
        )
    path = tree.path(repo, arch)
    if path is None:
        known = ", ".join((*tree.arches, *tree.altarches))
        raise NoAnswerError(f"unknown arch {arch!r} for release {release} (known: {known})")
    return [vault_url + path]


class Mirrorlist:
    """The responder over one `mirrorlist:` config."""

    def __init__(self, config: MirrorlistConfig) -> None:
        self.config = config

    def urls(self, release: str, repo: str, arch: str) -> list[str]:
        """The base URLs for the request; NoAnswerError with the reason when there are none."""
        rule = self._rule(release, repo, arch)
        if rule is not None:
            return [substitute(url, release, repo, arch) for url in rule.urls]
        if self.config.preset == "centos-vault":
            return vault_urls(self.config.vault_url, release, repo, arch)
        raise NoAnswerError(f"no mirrorlist rule for release={release} repo={repo} arch={arch}")

    def _rule(self, release: str, repo: str, arch: str) -> MirrorRule | None:
        for rule in self.config.rules:
            if rule.matches(release, repo, arch):
                return rule
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            if request.path not in PATHS:
                raise NoAnswerError(
                    f"no mirrorlist at {request.path[:200]}: ask /?release=R&arch=A&repo=N"
                )
            if request.method not in ("GET", "HEAD"):
                raise NoAnswerError(f"{request.method} is not answered here: GET /?release=..")
            release, repo, arch = (query_name(request, key) for key in ("release", "repo", "arch"))
            urls = self.urls(release, repo, arch)
        except NoAnswerError as unknown:
            return refuse(request, 404, "MIRRORLIST_UNKNOWN", str(unknown))
        return web.Response(text="".join(f"{url}\n" for url in urls))
