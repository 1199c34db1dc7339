"""The metalink responder: what `mirrors.centos.org` and `mirrors.fedoraproject.org` answer
dnf (CentOS Stream 9/10, EPEL, Fedora repo files), answered here.

`GET /metalink?repo=R&arch=A[&protocol=..&countme=..&infra=..&content=..]` -> a metalink
3.0 document (MirrorManager's form) describing the `repomd.xml` THIS cache serves for that
repository (the repository cache's snapshot, revalidated by the request like a
`repomd.xml` request is): its exact byte `size`, `mm0:timestamp` (the newest `<timestamp>`
of its `<data>` entries: yum compares it with the repomd.xml it gets), its sha256 and
sha512 (librepo checks the strongest it knows, dnf's metalink revival both), the previous
snapshots still served as `mm0:alternates`, and one `<url>` ending in
`repodata/repomd.xml` at the upstream repository's URL, whose host the DNS override sends
to this cache. The `mm0` prefix is literal: librepo matches qualified names, not
namespaces. Unknown query parameters are ignored.

(repo, arch) -> upstream base URL: the configured rules first (the first that matches),
then the presets:

    centos-stream  centos-<repo>-<N>-stream, N 9 or 10 ->
                   https://mirror.stream.centos.org/<N>-stream/<Repo>/<arch>/os/
                   (Repo: BaseOS AppStream CRB HighAvailability NFV RT ResilientStorage;
                   centos-<repo>-debug-<N>-stream -> .../<Repo>/<arch>/debug/tree/,
                   centos-<repo>-source-<N>-stream -> .../<Repo>/source/tree/,
                   centos-extras-sig-extras-common-<N>-stream ->
                   .../SIGs/<N>-stream/extras/<arch>/extras-common/)
    epel           epel-<N> -> https://dl.fedoraproject.org/pub/epel/<N>/Everything/<arch>/
                   (epel-debug-<N> .../<arch>/debug/, epel-source-<N> .../source/tree/,
                   epel-next-<N> .../epel/next/<N>/Everything/<arch>/,
                   epel-7 -> .../pub/archive/epel/7/<arch>/, epel-10.<M> -> .../epel/10.<M>/...)
    fedora         fedora-<N> -> .../pub/fedora/linux/releases/<N>/Everything/<arch>/os/,
                   updates-released-f<N> -> .../pub/fedora/linux/updates/<N>/Everything/<arch>/,
                   updates-testing-f<N> -> .../updates/testing/<N>/Everything/<arch>/

`GET /mirrorlist?repo=R&arch=A` (MirrorManager's mirror-list form, in older EPEL and
Fedora repo files) answers the same repository's base URL as `text/plain`.

Unknown repo/arch: 404 with the reason (as MirrorManager answers), in the access log.
A repository no configured upstream covers: 404; no snapshot to serve (the upstream
down and nothing cached): 503 with the reason.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web

from dnsoverride.cache.fetch import FetchError
from dnsoverride.cache.packages.config import MetalinkConfig
from dnsoverride.cache.packages.refusal import NoAnswerError, query_name, refuse

CONTENT_TYPE = "application/metalink+xml"
_REPO_NS = "{http://linux.duke.edu/metadata/repo}"
STREAM_MIRROR = "https://mirror.stream.centos.org/"
FEDORA_MIRROR = "https://dl.fedoraproject.org/pub/"
STREAM_REPOS = {
    name.lower(): name
    for name in ("BaseOS", "AppStream", "CRB", "HighAvailability", "NFV", "RT", "ResilientStorage")
}
_STREAM = re.compile(r"^centos-([a-z]+)(-debug|-source)?-(9|10)-stream$")
_STREAM_SIG = re.compile(r"^centos-extras-sig-extras-common-(9|10)-stream$")
_EPEL = re.compile(r"^epel(-debug|-source|-next)?-(8|9|10\.\d+|10)$")
_FEDORA = re.compile(r"^(fedora-|updates-released-f|updates-testing-f)(\d{2,3})$")


class Repomd(Protocol):
    """One repomd.xml version the repository cache serves (repomd.py)."""

    @property
    def body(self) -> bytes:
        """Its exact bytes."""
        ...


Served = tuple[Repomd, Sequence[Repomd]]


class RepomdSource(Protocol):
    """The repository cache as the metalink responder uses it (repos.py)."""

    def served_repomd(self, upstream_base_url: str) -> Awaitable[Served | None]:
        """(the repomd.xml served now, the previous ones still served) for the repository
        at `upstream_base_url`, revalidated like a repomd.xml request; None when no
        configured upstream covers it; raises FetchError when there is none to serve."""
        ...


def _stream(repo: str, arch: str) -> str | None:
    if match := _STREAM_SIG.match(repo):
        return f"{STREAM_MIRROR}SIGs/{match[1]}-stream/extras/{arch}/extras-common/"
    match = _STREAM.match(repo)
    if match is None or match[1] not in STREAM_REPOS:
        return None
    name, variant, release = STREAM_REPOS[match[1]], match[2], match[3]
    base = f"{STREAM_MIRROR}{release}-stream/{name}/"
    if variant == "-source":
        return base + "source/tree/"
    return base + f"{arch}/{'debug/tree' if variant == '-debug' else 'os'}/"


def _epel(repo: str, arch: str) -> str | None:
    match = _EPEL.match(repo)
    if repo == "epel-7":
        return f"{FEDORA_MIRROR}archive/epel/7/{arch}/"
    if match is None:
        return None
    variant, release = match[1], match[2]
    if variant == "-next":
        return f"{FEDORA_MIRROR}epel/next/{release}/Everything/{arch}/"
    base = f"{FEDORA_MIRROR}epel/{release}/Everything/"
    if variant == "-source":
        return base + "source/tree/"
    return base + f"{arch}/{'debug/' if variant == '-debug' else ''}"


def _fedora(repo: str, arch: str) -> str | None:
    match = _FEDORA.match(repo)
    if match is None:
        return None
    kind, release = match[1], match[2]
    linux = f"{FEDORA_MIRROR}fedora/linux/"
    if kind == "fedora-":
        return f"{linux}releases/{release}/Everything/{arch}/os/"
    if kind == "updates-released-f":
        return f"{linux}updates/{release}/Everything/{arch}/"
    return f"{linux}updates/testing/{release}/Everything/{arch}/"


PRESETS: dict[str, Callable[[str, str], str | None]] = {
    "centos-stream": _stream,
    "epel": _epel,
    "fedora": _fedora,
}


def repomd_timestamp(repomd: bytes) -> int | None:
    """The newest `<data><timestamp>` of a repomd.xml (yum's idea of its timestamp); None
    when it has none or is not XML."""
    # The XML modules are imported where they are used, like repomd.py's.
    from xml.etree import ElementTree

    try:
        root = ElementTree.fromstring(repomd)
    except ElementTree.ParseError:
        return None
    stamps = []
    for data in root.iter(f"{_REPO_NS}data"):
        text = data.findtext(f"{_REPO_NS}timestamp")
        try:
            stamps.append(int(float(text or "")))
        except ValueError:
            continue
    return max(stamps, default=None)


def _file_details(repomd: bytes, indent: str) -> str:
    """`mm0:timestamp`, `size` and `verification` of one repomd.xml version."""
    stamp = repomd_timestamp(repomd)
    lines = [f"{indent}<mm0:timestamp>{stamp}</mm0:timestamp>"] if stamp is not None else []
    lines.append(f"{indent}<size>{len(repomd)}</size>")
    lines.append(f"{indent}<verification>")
    for algorithm in ("sha256", "sha512"):
        digest = hashlib.new(algorithm, repomd).hexdigest()
        lines.append(f'{indent}  <hash type="{algorithm}">{digest}</hash>')
    lines.append(f"{indent}</verification>")
    return "\n".join(lines)


def metalink_document(served: Served, urls: Sequence[str], now: float | None = None) -> str:
    """The metalink 3.0 document (MirrorManager's layout) for `served` at `urls` (each the
    full URL of repomd.xml)."""
    from xml.sax.saxutils import escape, quoteattr

    current, previous_versions = served
    alternates = ""
    if previous_versions:
        entries = "".join(
            "        <mm0:alternate>\n"
            + _file_details(previous.body, "          ")
            + "\n        </mm0:alternate>\n"
            for previous in previous_versions
        )
        alternates = f"      <mm0:alternates>\n{entries}      </mm0:alternates>\n"
    resources = "".join(
        f'        <url protocol="{url.partition(":")[0]}" type="{url.partition(":")[0]}" '
        f'location="ZZ" preference="{max(100 - index, 1)}">{escape(url)}</url>\n'
        for index, url in enumerate(urls)
    )
    pubdate = quoteattr(email.utils.formatdate(now, usegmt=True))
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<metalink version="3.0" xmlns="http://www.metalinker.org/" type="dynamic" '
        f'pubdate={pubdate} generator="dnsoverride" '
        'xmlns:mm0="http://fedorahosted.org/mirrormanager">\n'
        "  <files>\n"
        '    <file name="repomd.xml">\n'
        f"{_file_details(current.body, '      ')}\n"
        f"{alternates}"
        '      <resources maxconnections="1">\n'
        f"{resources}"
        "      </resources>\n"
        "    </file>\n"
        "  </files>\n"
        "</metalink>\n"
    )


class Metalink:
    """The responder over one `metalink:` config and the repository cache."""

    def __init__(self, config: MetalinkConfig, repositories: RepomdSource) -> None:
        self.config = config
        self.repositories = repositories

    def base_url(self, repo: str, arch: str) -> str:
        """The upstream repository's base URL for (repo, arch); NoAnswerError when none."""
        for rule in self.config.rules:
            if rule.matches(repo, arch):
                return re.sub(
                    r"\$(\w+)",
                    lambda match: {"repo": repo, "arch": arch, "basearch": arch}[match[1]],
                    rule.url,
                )
        for preset in self.config.presets:
            url = PRESETS[preset](repo.lower(), arch)
            if url is not None:
                return url
        raise NoAnswerError(f"repo = {repo} arch = {arch} error: invalid repo or arch")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            base = self._base_url(request)
        except NoAnswerError as unknown:
            return refuse(request, 404, "METALINK_UNKNOWN", str(unknown))
        if request.path.rstrip("/") == "/mirrorlist":
            # MirrorManager's mirror-list form of the same service (older EPEL/Fedora
            # repo files): the repository's base URL, which the DNS override sends here.
            return web.Response(text=base + "\n")
        try:
            served = await self.repositories.served_repomd(base)
        except FetchError as error:
            return refuse(request, 503, "UNAVAILABLE", f"{base}: {error.reason}")
        if served is None:
            reason = f"no upstream repository is configured for {base}"
            return refuse(request, 404, "METALINK_UNKNOWN", reason)
        body = metalink_document(served, [base + "repodata/repomd.xml"])
        return web.Response(
            text=body, content_type=CONTENT_TYPE, headers={"Cache-Control": "no-cache"}
        )

    def _base_url(self, request: web.Request) -> str:
        if request.path.rstrip("/") not in ("/metalink", "/mirrorlist"):
            raise NoAnswerError(f"no metalink at {request.path[:200]}: ask /metalink?repo=R&arch=A")
        if request.method not in ("GET", "HEAD"):
            raise NoAnswerError(f"{request.method} is not answered here: GET /metalink?..")
        return self.base_url(query_name(request, "repo"), query_name(request, "arch"))
