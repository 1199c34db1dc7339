"""The pull-through yum/dnf repository cache: snapshots of repositories, verified files.

A repository is a tree whose root holds `repodata/repomd.xml`. For each root a client
has asked about, the cache keeps the *served snapshot*: the exact bytes of one
repomd.xml, the data files it lists (stored content-addressed by the checksum it gives
them, all fetched and verified before the snapshot is served) and the package map parsed
from its `primary` (location -> checksum and size). The snapshot before it stays
available too, so a client that read the old repomd.xml a moment before a switch finishes
its run against the files it was promised.

- `repodata/repomd.xml`: the served snapshot's bytes. After `metadata_ttl` the upstream's
  is revalidated with a conditional GET (If-None-Match / If-Modified-Since); a changed one
  becomes the served snapshot only once every file it lists is fetched and verified
  (checksum and size) and its primary is parsed; until then, and whenever the upstream
  fails (down, 5xx, an HTML page, a repomd.xml whose files do not match it), the old
  snapshot is served and the failure logged (`repository_stale`). One revalidation per
  repository at a time; the requests that come meanwhile wait for it, those that could
  be served the current snapshot for REVALIDATE_WAIT at most after the revalidation
  began (later ones do not wait again).
- `repodata/<file>`: served only if the served (or previous) snapshot lists it, from the
  store (pinned while a snapshot lists it: never evicted from under a served repomd.xml).
- `*.rpm`: served only if the snapshot's primary describes it, verified against that
  checksum (sha1/sha256/sha512) and `size package` while it downloads: fetched once
  however many clients ask (cache/fetch.py), streamed to all, Range supported, stored
  content-addressed in the shared store and budget. Wrong bytes: the client's response
  is cut short (it never holds a complete wrong copy), nothing is stored, one log line.
- Anything else below a configured upstream (`RPM-GPG-KEY-*`, `.treeinfo`, `images/`,
  `.drpm`): passed through from the upstream unstored and logged (`package_passthrough`).
  These are not described by repository metadata, so the cache cannot verify them; the
  client does (GPG keys by fingerprint, installer images by .treeinfo checksums).

Snapshots live in memory and are rebuilt from the store after a restart: the served
repomd.xml of each root is recorded in a small state file (`packages-state/`), its files
are in the store, so a restarted cache serves its repositories with the upstream down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest
from yarl import URL

from dnsoverride.cache.accesslog import (
    CACHE_KEY,
    ERROR_KEY,
    SENDFILE_KEY,
    UPSTREAM_KEY,
    note_cache,
    remember,
)
from dnsoverride.cache.app import Handler, Order, Route
from dnsoverride.cache.fetch import Download, Fetcher, FetchError, Opener
from dnsoverride.cache.health import UpstreamHealth
from dnsoverride.cache.packages.refusal import refuse
from dnsoverride.cache.packages.repomd import (
    DataFile,
    Package,
    RepodataError,
    Repomd,
    package_map,
    parse_repomd,
)
from dnsoverride.cache.packages.repos_config import RepositoriesConfig, RepositoryUpstream
from dnsoverride.cache.store import Digest, Kind, Store

log = structlog.get_logger(__name__)

REPOMD = "repodata/repomd.xml"
MIRROR_PREFIX = "/packages/"
RPM_TYPE = "application/x-rpm"
STATE_DIR = "packages-state"
RECORDED_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# How many repomd.xml versions one revalidation tries when the mirror changes under it.
REBUILD_ATTEMPTS = 3
# How long a request waits for a revalidation when a snapshot can be served meanwhile.
REVALIDATE_WAIT = 5.0
# The longest a repomd.xml fetch may take, redirects and body included: the idle timeout
# alone lets an upstream that trickles a byte a second hold a revalidation (and the cold
# clients waiting for it) for good. A repomd.xml is a few KiB.
REPOMD_TIMEOUT = 30.0
# The most bytes a repodata file without a `<size>` in repomd.xml may have (very old
# repositories; createrepo_c always writes one): Fedora's largest, filelists.sqlite, is
# some 100 MB.
UNSIZED_REPODATA_LIMIT = 1 << 30
# Redirects followed per upstream request (same host only, see `_upstream`).
MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})


class RepositoryUnavailableError(FetchError):
    """No snapshot of a repository can be served: the reason, for the client and the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, status=503)


@dataclass(frozen=True)
class Snapshot:
    """One repomd.xml with every file it lists stored and verified, and its package map."""

    repomd: Repomd
    files: dict[str, DataFile]
    packages: dict[str, Package]

    @property
    def digests(self) -> list[Digest]:
        """Its data files' digests: pinned from the start of its build while it is built,
        served or previous."""
        return [item.checksum for item in self.repomd.data]

    @property
    def recorded(self) -> Digest:
        """The digest its repomd.xml is stored (and pinned with it) by, for a restart."""
        return repomd_digest(self.repomd.body)


@dataclass
class Repository:
    """The cache's state for one repository root of one upstream."""

    upstream: RepositoryUpstream
    root: str  # below the upstream's URL, "" or ending in "/"
    served: Snapshot | None = None
    previous: Snapshot | None = None
    checked: float = float("-inf")  # monotonic time of the last revalidation
    etag: str | None = None
    last_modified: str | None = None
    refresh: asyncio.Task[None] | None = None
    refresh_deadline: float = 0.0  # loop time until which requests wait for `refresh`
    failure: str | None = None

    @property
    def url(self) -> str:
        return below(self.upstream.url, self.root)

    @property
    def where(self) -> str:
        """How logs name it: upstream name and root."""
        return f"{self.upstream.name}/{self.root}"

    def snapshots(self) -> list[Snapshot]:
        return [snapshot for snapshot in (self.served, self.previous) if snapshot is not None]


@dataclass(frozen=True)
class Fetched:
    """An upstream repomd.xml and its validators (kept only once it is served: a version
    that failed to build must not be revalidated as unchanged)."""

    body: bytes
    etag: str | None
    last_modified: str | None


class PackagesMeter:
    """What the package downloads report (cache/fetch.py's Meter): upstream bytes by
    upstream, the access log's sendfile count and cut-short reason, and wrong bytes as a
    failure of their upstream (`health`, by upstream name: what `status` reads)."""

    def __init__(self, health: Mapping[str, UpstreamHealth] | None = None) -> None:
        self.upstream_bytes: Counter[str] = Counter()
        self.health = health or {}

    def received(self, source: str, count: int) -> None:
        self.upstream_bytes[source] += count

    def sent(self, request: BaseRequest, count: int, *, sendfile: bool) -> None:
        if sendfile:
            remember(request, SENDFILE_KEY, count)

    def cut_short(self, request: BaseRequest, status: int, error: FetchError) -> None:
        remember(request, ERROR_KEY, ("FETCH_FAILED", f"cut short: {error.reason}"))

    def verify_failed(self, download: Download) -> None:
        self.body_failed(download)

    def body_failed(self, download: Download) -> None:
        """Logged by the fetch itself (`content_fetch_failed`), one line per download; its
        200 counted as an answer, wrong bytes or a cut body behind it are a failure."""
        health = self.health.get(download.source)
        if health is not None:
            reason = download.error.reason if download.error else "content does not match"
            health.failed(f"{download.source}: {reason}")


def upstream_health(config: RepositoriesConfig) -> dict[str, UpstreamHealth]:
    """A fresh verdict record per configured package upstream."""
    return {upstream.name: UpstreamHealth() for upstream in config.upstreams}


class RepositoryCache:
    """Every repository of every configured upstream; see the module docstring."""

    def __init__(
        self,
        config: RepositoriesConfig,
        store: Store,
        fetcher: Fetcher,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
        *,
        health: dict[str, UpstreamHealth] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.fetcher = fetcher
        self.session = session
        self.clock = clock
        self.by_name = {upstream.name: upstream for upstream in config.upstreams}
        self.repositories: dict[tuple[str, str], Repository] = {}
        self.state = store.root / STATE_DIR
        # Content requests by (kind, "hit" | "miss"), coalesced ones misses: `/status`.
        self.lookups: Counter[tuple[Kind, str]] = Counter()
        # upstream name -> how its repository revalidations went: `/status`.
        self.health = health if health is not None else upstream_health(config)

    async def close(self) -> None:
        """Cancel the revalidations in flight."""
        tasks = [r.refresh for r in self.repositories.values() if r.refresh is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- routing -------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """One route per upstream (longest prefix first), then mirror mode."""
        upstreams = sorted(self.config.upstreams, key=lambda u: len(u.prefix), reverse=True)
        routes = [
            Route(
                name=f"repositories:{upstream.name}",
                order=Order.REPOSITORIES,
                handler=self._by_host(upstream),
                hosts=upstream.hosts,
                prefixes=(upstream.prefix,),
            )
            for upstream in upstreams
        ]
        routes.append(Route("repositories", Order.MIRROR_PATHS, self._mirror_mode, None,
                            (MIRROR_PREFIX,)))  # fmt: skip
        return routes

    def _by_host(self, upstream: RepositoryUpstream) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request, upstream, request.path[len(upstream.prefix) :])

        return handle

    async def _mirror_mode(self, request: web.Request) -> web.StreamResponse:
        name, _, rest = request.path[len(MIRROR_PREFIX) :].partition("/")
        upstream = self.by_name.get(name)
        if upstream is None:
            return refuse(request, 404, "NO_SUCH_UPSTREAM", f"no package upstream named {name!r}")
        return await self.handle(request, upstream, rest)

    def locate(self, url: str) -> tuple[RepositoryUpstream, str] | None:
        """The upstream and the path below it of a repository URL by its host and path (as
        clients reach it through the overrides): for the metalink responder."""
        parts = URL(url)
        host, path = (parts.host or "").lower(), parts.path
        best: RepositoryUpstream | None = None
        for upstream in self.config.upstreams:
            selected = host in upstream.hosts and path.startswith(upstream.prefix)
            if selected and (best is None or len(upstream.prefix) > len(best.prefix)):
                best = upstream
        return None if best is None else (best, path[len(best.prefix) :])

    # -- requests ------------------------------------------------------------------------

    async def handle(
        self, request: web.Request, upstream: RepositoryUpstream, path: str
    ) -> web.StreamResponse:
        remember(request, UPSTREAM_KEY, upstream.name)
        if request.method not in ("GET", "HEAD"):
            return refuse(request, 405, "METHOD", f"{request.method} is not served here")
        if ".." in path.split("/"):
            return refuse(request, 404, "BAD_PATH", f"unusable path {path[:200]!r}")
        # One key per repository: `a/./b` and `a//b` are `a/b` (each alias would otherwise
        # be a repository of its own, fetched and kept again).
        parts = [part for part in path.split("/") if part not in ("", ".")]
        path = "/".join(parts) + ("/" if parts and path.endswith("/") else "")
        if path.endswith(REPOMD):
            return await self._repomd(request, upstream, path[: -len(REPOMD)])
        if "repodata" in parts[:-1]:
            cut = len(parts) - 1 - parts[::-1].index("repodata")
            root = "/".join(parts[:cut]) + ("/" if cut else "")
            return await self._repodata(request, upstream, root, path[len(root) :])
        if path.endswith(".rpm"):
            return await self._package(request, upstream, path)
        return await self._passthrough(request, upstream, path)

    async def _repomd(
        self, request: web.Request, upstream: RepositoryUpstream, root: str
    ) -> web.StreamResponse:
        try:
            snapshot = await self.snapshot(upstream, root, revalidate=True)
        except RepositoryUnavailableError as error:
            return refuse(request, 502, "REPOSITORY_UNAVAILABLE", str(error))
        failing = self._repository(upstream, root).failure is not None
        noted(request, "stale" if failing else "hit")
        body = snapshot.repomd.body
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return web.Response(body=body, content_type="text/xml", headers={"ETag": etag})

    async def _repodata(
        self, request: web.Request, upstream: RepositoryUpstream, root: str, href: str
    ) -> web.StreamResponse:
        try:
            snapshots = await self._known(upstream, root)
        except RepositoryUnavailableError as error:
            return refuse(request, 502, "REPOSITORY_UNAVAILABLE", str(error))
        entry = next((s.files[href] for s in snapshots if href in s.files), None)
        if entry is None:
            return refuse(
                request, 404, "NOT_IN_SNAPSHOT",
                f"{href} is not listed by the repomd.xml served for {upstream.name}/{root}",
            )  # fmt: skip
        repository = self._repository(upstream, root)
        return await self._verified(
            request, repository, href, digest=entry.checksum, size=entry.size, kind="repodata"
        )

    async def _package(
        self, request: web.Request, upstream: RepositoryUpstream, path: str
    ) -> web.StreamResponse:
        found = self._describe(upstream, path)
        if found is None and "Packages/" in path:
            # No snapshot of this package's repository yet (a client with metadata from
            # before a restart): the conventional tree puts the root just above Packages/.
            root = path[: path.rindex("Packages/")]
            with contextlib.suppress(RepositoryUnavailableError):
                await self._known(upstream, root)
            found = self._describe(upstream, path)
        if found is None:
            return refuse(
                request, 404, "NOT_IN_SNAPSHOT",
                f"{path} is not described by the primary metadata of a repository served "
                f"for {upstream.name}",
            )  # fmt: skip
        repository, package = found
        href = path[len(repository.root) :]
        return await self._verified(
            request, repository, href, digest=package.checksum, size=package.size, kind="packages"
        )

    def _describe(
        self, upstream: RepositoryUpstream, path: str
    ) -> tuple[Repository, Package] | None:
        """The repository whose served (or previous) snapshot lists `path`, longest root first."""
        candidates = [
            repository
            for (name, root), repository in self.repositories.items()
            if name == upstream.name and path.startswith(root)
        ]
        for repository in sorted(candidates, key=lambda r: len(r.root), reverse=True):
            for snapshot in repository.snapshots():
                package = snapshot.packages.get(path[len(repository.root) :])
                if package is not None:
                    return repository, package
        return None

    async def _verified(
        self,
        request: web.Request,
        repository: Repository,
        href: str,
        *,
        digest: Digest,
        size: int | None,
        kind: Kind,
    ) -> web.StreamResponse:
        """A file known by its checksum: from the store, else downloaded once, verified."""
        content_type = RPM_TYPE if kind == "packages" else "application/octet-stream"
        headers = {"Content-Type": content_type}
        path = await self.fetcher.stored(kind, digest)
        if path is not None:
            self.lookups[(kind, "hit")] += 1
            noted(request, "hit")
            return self.fetcher.send_file(request, kind, digest, path, headers)
        self.lookups[(kind, "miss")] += 1
        coalesced = self.fetcher.in_flight(kind, digest) is not None
        noted(request, "coalesced" if coalesced else "miss")
        try:
            download = self.fetcher.start(
                kind,
                digest,
                self._opener(repository, href),
                source=repository.upstream.name,
                size=size,
                limit=UNSIZED_REPODATA_LIMIT,
            )
            return await self.fetcher.respond(request, download, headers)
        except FetchError as error:
            return refuse(request, error.status, "FETCH_FAILED", f"{href}: {error.reason}")

    async def _upstream(
        self, method: str, url: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """The upstream's answer for `url`, following its redirects only within its origin
        (scheme, host, port; or the host's https): a mirror that moves a path is followed,
        one that points elsewhere (another mirror, or an address inside the network: the
        cache would fetch it for any client) is refused with a 502 and a log line."""
        start = URL(url)
        # The same origin, or its https upgrade.
        allowed = {(start.scheme, start.host, start.port), ("https", start.host, 443)}
        for _ in range(MAX_REDIRECTS + 1):
            response = await self.session.request(
                method, url, headers=headers, allow_redirects=False
            )
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or location is None:
                return response
            response.release()
            target = URL(url).join(URL(location))
            if (target.scheme, target.host, target.port) not in allowed:
                log.warning("upstream_redirect_refused", url=url, location=str(target)[:500])
                raise FetchError(
                    f"upstream redirected {url} to {str(target)[:200]} (another origin)",
                    status=502,
                )
            url = str(target)
        raise FetchError(f"upstream redirected {url} more than {MAX_REDIRECTS} times", status=502)

    def _opener(self, repository: Repository, href: str) -> Opener:
        """Opens `href` of `repository`; its 200 is an answer of the upstream (a body that
        then fails is a failure of it: PackagesMeter), so good downloads after a bad one
        make it `recent failures`, not DOWN until the next revalidation."""
        url = repository.url + quoted(href)
        health = self.health[repository.upstream.name]

        async def open_upstream() -> aiohttp.ClientResponse:
            response = await self._upstream("GET", url)
            if response.status != 200:
                response.release()
                raise FetchError(f"upstream answered {response.status} for {url}", status=502)
            health.answered()
            return response

        return open_upstream

    async def _passthrough(
        self, request: web.Request, upstream: RepositoryUpstream, path: str
    ) -> web.StreamResponse:
        url = below(upstream.url, path)
        noted(request, "passthrough")
        log.info("package_passthrough", upstream=upstream.name, path=path)
        response: web.StreamResponse | None = None
        try:
            async with await self._upstream(request.method, url) as answer:
                response = web.StreamResponse(status=answer.status)
                for name in ("Content-Type", "Content-Length", "Last-Modified", "ETag"):
                    if name in answer.headers:
                        response.headers[name] = answer.headers[name]
                await response.prepare(request)
                async for chunk in answer.content.iter_chunked(1 << 16):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError, FetchError) as error:
            reason = f"upstream {upstream.name} failed for {path}: {describe(error)}"
            if response is not None and response.prepared:
                remember(request, ERROR_KEY, ("UPSTREAM_FAILED", f"cut short: {reason}"))
                if request.transport is not None:
                    request.transport.abort()
                return response
            return refuse(request, 502, "UPSTREAM_FAILED", reason)

    # -- snapshots -----------------------------------------------------------------------

    def _repository(self, upstream: RepositoryUpstream, root: str) -> Repository:
        key = (upstream.name, root)
        repository = self.repositories.get(key)
        if repository is None:
            repository = self.repositories[key] = Repository(upstream, root)
        return repository

    async def _known(self, upstream: RepositoryUpstream, root: str) -> list[Snapshot]:
        """The snapshots of a repository for its repodata and packages: no revalidation
        when one is served (the client read its repomd.xml from us moments ago)."""
        repository = self._repository(upstream, root)
        if repository.served is None:
            await self.snapshot(upstream, root, revalidate=False)
        return repository.snapshots()

    async def snapshot(
        self, upstream: RepositoryUpstream, root: str, *, revalidate: bool
    ) -> Snapshot:
        """The served snapshot, revalidated first when asked and due; RepositoryUnavailableError
        when there is none."""
        repository = self._repository(upstream, root)
        if repository.served is None:
            await self._restore(repository)
        due = self.clock() - repository.checked >= self.config.metadata_ttl
        if repository.served is None or (revalidate and due):
            if repository.refresh is None:
                repository.refresh = asyncio.create_task(self._refresh(repository))
                loop = asyncio.get_running_loop()
                repository.refresh_deadline = loop.time() + REVALIDATE_WAIT
                repository.refresh.add_done_callback(lambda _: _clear_refresh(repository))
            if repository.served is None:
                await asyncio.shield(repository.refresh)
            else:
                # A new version's files may take a while to fetch: past a short wait from
                # the revalidation's start the client gets the snapshot served now (it is
                # consistent, only older); a slow revalidation delays clients once.
                wait = repository.refresh_deadline - asyncio.get_running_loop().time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(repository.refresh), max(wait, 0))
        if repository.served is None:
            # Nothing kept for a root that has nothing to serve: requests for made-up
            # paths do not pile up state.
            if repository.refresh is None:
                self.repositories.pop((upstream.name, root), None)
            raise RepositoryUnavailableError(
                f"{upstream.name}/{root}{REPOMD}: {repository.failure or 'not available'}"
            )
        return repository.served

    async def served_repomd(self, url: str) -> tuple[Repomd, list[Repomd]] | None:
        """The repomd.xml this cache serves for the repository at `url` (as clients reach
        it: the upstream's host and path), revalidated like a repomd.xml request, and the
        previous one still served; None when no upstream covers `url`,
        RepositoryUnavailableError when there is nothing to serve."""
        located = self.locate(url)
        if located is None:
            return None
        upstream, path = located
        root = path if path.endswith("/") or not path else path + "/"
        snapshot = await self.snapshot(upstream, root, revalidate=True)
        previous = self._repository(upstream, root).previous
        return snapshot.repomd, [previous.repomd] if previous is not None else []

    async def _refresh(self, repository: Repository) -> None:
        where = repository.where
        try:
            fetched = await self._fetch_repomd(repository)
            if fetched is not None:
                snapshot, fetched = await self._build_latest(repository, fetched)
                self._switch(repository, snapshot)
                repository.etag, repository.last_modified = fetched.etag, fetched.last_modified
                log.info(
                    "repository_updated",
                    repository=where,
                    data_files=len(snapshot.files),
                    packages=len(snapshot.packages),
                    timestamp=snapshot.repomd.timestamp,
                )
            repository.failure = None
            repository.checked = self.clock()
            self.health[repository.upstream.name].answered()
        except (aiohttp.ClientError, TimeoutError, OSError, RepodataError, FetchError) as error:
            repository.failure = describe(error)
            self.health[repository.upstream.name].failed(f"{where}: {repository.failure}")
            if repository.served is not None:
                # Served stale until the next revalidation is due.
                repository.checked = self.clock()
                log.warning("repository_stale", repository=where, reason=repository.failure)
            else:
                log.warning("repository_unavailable", repository=where, reason=repository.failure)

    async def _build_latest(
        self, repository: Repository, fetched: Fetched
    ) -> tuple[Snapshot, Fetched]:
        """The snapshot of `fetched`; when one of its files cannot be fetched, the upstream's
        repomd.xml is read again: a mirror that synced meanwhile lists other files (the
        ones it has now), so the newer one is built instead, a few times at most."""
        for _ in range(REBUILD_ATTEMPTS - 1):
            try:
                return await self._build(repository, fetched.body), fetched
            except FetchError as error:
                newer = await self._fetch_repomd(repository, conditional=False)
                if newer is None or newer.body == fetched.body:
                    raise
                log.info(
                    "repository_changed_while_fetching",
                    repository=repository.where,
                    reason=error.reason,
                )
                fetched = newer
        return await self._build(repository, fetched.body), fetched

    async def _fetch_repomd(
        self, repository: Repository, *, conditional: bool = True
    ) -> Fetched | None:
        """The upstream's repomd.xml, or None when it has not changed from the served one.
        The validators sent are the served version's: a newer one is asked for in full
        until it is built and served."""
        headers = {}
        if conditional and repository.served is not None:
            if repository.etag:
                headers["If-None-Match"] = repository.etag
            if repository.last_modified:
                headers["If-Modified-Since"] = repository.last_modified
        try:
            async with asyncio.timeout(REPOMD_TIMEOUT):
                url = repository.url + REPOMD
                async with await self._upstream("GET", url, headers) as response:
                    if response.status == 304 and repository.served is not None:
                        return None
                    if response.status != 200:
                        raise FetchError(f"upstream answered {response.status} for repomd.xml")
                    body = await read_limited(response, 1 << 20)
                    etag = response.headers.get("ETag")
                    modified = response.headers.get("Last-Modified")
        except TimeoutError:
            raise FetchError(f"repomd.xml took longer than {REPOMD_TIMEOUT:g} s") from None
        if repository.served is not None and body == repository.served.repomd.body:
            repository.etag, repository.last_modified = etag, modified
            return None
        return Fetched(body, etag, modified)

    async def _build(self, repository: Repository, body: bytes) -> Snapshot:
        """Fetch and verify every file `body` lists, parse its primary: the new snapshot."""
        repomd = parse_repomd(body)
        primary = repomd.by_type("primary")
        if primary is None:
            raise RepodataError("repomd.xml lists no primary metadata")
        snapshot_digests = [item.checksum for item in repomd.data]
        # Pinned before they are fetched: a file committed early in the build is not
        # evicted by the ones after it (the snapshot would list a file the store lost).
        for digest in snapshot_digests:
            self.store.pin("repodata", digest)
        try:
            await asyncio.gather(*(self._stored(repository, item) for item in repomd.data))
            path = self.store.lookup("repodata", primary.checksum)
            if path is None:
                raise RepodataError(f"{primary.href} left the store before it was read")
            packages, replaced = await asyncio.to_thread(package_map, path, primary)
        except BaseException:
            for digest in snapshot_digests:
                self.store.unpin("repodata", digest)
            raise
        self._check_budget(repository, repomd)
        for earlier in replaced[:10]:
            log.warning(
                "primary_duplicate_href",
                repository=repository.where,
                href=earlier.href,
                replaced=f"{earlier.checksum} ({earlier.size} bytes)",
                kept=f"{packages[earlier.href].checksum} ({packages[earlier.href].size} bytes)",
                duplicates=len(replaced),
            )
        return Snapshot(repomd, repomd.by_href(), packages)

    def _check_budget(self, repository: Repository, repomd: Repomd) -> None:
        """Warn when one snapshot's metadata is more than the store's budget: it is kept
        (pinned) above the budget rather than evicted and fetched again on every request."""
        budget = self.store.budget
        size = sum(item.size or 0 for item in repomd.data)
        if budget is not None and size > budget.high:
            log.warning(
                "store_budget_too_small",
                repository=repository.where,
                snapshot_bytes=size,
                high_watermark_bytes=budget.high,
                reason="one snapshot's metadata is larger than the budget: kept above it",
            )

    async def _stored(self, repository: Repository, item: DataFile) -> None:
        digest = item.checksum
        if await self.fetcher.stored("repodata", digest) is not None:
            return
        download = self.fetcher.start(
            "repodata",
            digest,
            self._opener(repository, item.href),
            source=repository.upstream.name,
            size=item.size,
            limit=UNSIZED_REPODATA_LIMIT,
        )
        await download.wait_finished()
        if download.error is not None:
            raise FetchError(f"{item.href}: {download.error.reason}")

    def _switch(self, repository: Repository, snapshot: Snapshot) -> None:
        """Serve `snapshot` (its files pinned by its build); the one before becomes
        `previous`, the one before that is unpinned (its files may be evicted now)."""
        self.store.pin("repodata", snapshot.recorded)
        dropped = repository.previous
        if dropped is not None:
            for digest in [*dropped.digests, dropped.recorded]:
                self.store.unpin("repodata", digest)
        repository.previous, repository.served = repository.served, snapshot
        self._record(repository, snapshot)

    # -- state across restarts -----------------------------------------------------------

    async def recorded(self) -> list[Repository]:
        """Every repository with a snapshot, for `cache ls`: those served now, and those
        recorded before a restart as the store holds them (read, never restored: that is
        not a use, pins nothing and never asks the upstream; a client's request restores)."""
        found = [r for r in self.repositories.values() if r.served is not None]
        for upstream in self.config.upstreams:
            for path in sorted((self.state / upstream.name).glob("*.json")):
                try:
                    text = path.read_text()
                    root = json.loads(text)["root"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # logged when a request restores it
                known = self.repositories.get((upstream.name, root))
                if not isinstance(root, str) or (known is not None and known.served):
                    continue
                snapshot = await self._read_recorded(text)
                if snapshot is not None:
                    found.append(Repository(upstream, root, served=snapshot))
        return found

    async def _read_recorded(self, text: str) -> Snapshot | None:
        """The snapshot a state file records, read from the store without a use; None
        when it cannot be (a request that restores it says why)."""
        try:
            repomd = parse_repomd(self._recorded_repomd(text, use=False))
            primary = repomd.by_type("primary")
            if primary is None or not self.store.has("repodata", primary.checksum):
                return None
            where = self.store.path("repodata", primary.checksum)
            packages, _ = await asyncio.to_thread(package_map, where, primary)
        except (OSError, ValueError, RepodataError):
            return None
        return Snapshot(repomd, repomd.by_href(), packages)

    def _state_file(self, repository: Repository) -> Path:
        key = hashlib.sha256(f"{repository.upstream.name}\0{repository.root}".encode())
        return self.state / repository.upstream.name / f"{key.hexdigest()[:32]}.json"

    def _record(self, repository: Repository, snapshot: Snapshot) -> None:
        """Remember the served repomd.xml (stored content-addressed) for after a restart."""
        digest = snapshot.recorded
        try:
            if not self.store.has("repodata", digest):
                self.store.put_bytes("repodata", digest, snapshot.repomd.body)
            path = self._state_file(repository)
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_suffix(".tmp")
            temp.write_text(json.dumps({"root": repository.root, "repomd": str(digest)}))
            os.replace(temp, path)
        except OSError as error:  # StoreWriteError is one: the cache keeps serving
            log.warning(
                "repository_state_not_saved", repository=repository.where, reason=str(error)
            )

    async def _restore(self, repository: Repository) -> None:
        """The snapshot served before a restart, if its files are all still stored; a
        record that cannot be used is logged (`repository_not_restored`), removed when it
        never will be, and the repository fetched from the upstream as if new."""
        path = self._state_file(repository)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return  # never served before
        except (OSError, ValueError) as error:
            self._not_restored(repository, path, describe(error))
            return
        try:
            body = self._recorded_repomd(text)
            repomd = parse_repomd(body)
            missing = [i.href for i in repomd.data if not self.store.has("repodata", i.checksum)]
            if missing:
                raise RepodataError(f"{len(missing)} of its files are no longer stored")
            snapshot = await self._build(repository, body)
        except (ValueError, RepodataError) as error:
            # Unusable for good: removed, so it is logged once, not on every request.
            self._not_restored(repository, path, describe(error))
            with contextlib.suppress(OSError):
                path.unlink()
            return
        except (OSError, FetchError) as error:
            self._not_restored(repository, path, describe(error))
            return
        self._switch(repository, snapshot)
        log.info("repository_restored", repository=repository.where)

    def _recorded_repomd(self, text: str, *, use: bool = True) -> bytes:
        """The repomd.xml a state file names, checked against its digest (the store's
        bytes may have changed on disk since); `use`: a store lookup (a use), else read
        as `cache ls` reads."""
        recorded = json.loads(text)
        named = recorded.get("repomd") if isinstance(recorded, dict) else None
        if not isinstance(named, str) or not RECORDED_DIGEST.fullmatch(named):
            raise ValueError(f"no sha256 repomd.xml digest recorded (found {str(named)[:80]!r})")
        digest = Digest("sha256", named.removeprefix("sha256:"))
        stored: Path | None = None
        if use:
            stored = self.store.lookup("repodata", digest)
        elif self.store.has("repodata", digest):
            stored = self.store.path("repodata", digest)
        if stored is None:
            raise ValueError("its repomd.xml is no longer stored")
        body = stored.read_bytes()
        if repomd_digest(body) != digest:
            raise ValueError(f"its stored repomd.xml does not match {digest}")
        return body

    @staticmethod
    def _not_restored(repository: Repository, path: Path, reason: str) -> None:
        log.warning(
            "repository_not_restored", repository=repository.where, file=str(path), reason=reason
        )


def noted(request: web.Request, result: str) -> None:
    """The cache's part in the request (hit, miss, coalesced, stale, passthrough), for its
    access-log line."""
    note_cache(result)
    remember(request, CACHE_KEY, result)


def _clear_refresh(repository: Repository) -> None:
    repository.refresh = None


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refused past `limit` bytes (read(n) returns what has arrived)."""
    chunks = []
    total = 0
    async for chunk in response.content.iter_chunked(1 << 16):
        total += len(chunk)
        if total > limit:
            raise RepodataError(f"repomd.xml larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def quoted(path: str) -> str:
    """A decoded path (a request's, a metadata href) as a URL path again: `%3F` in a
    client's path, or `?` and `#` in an href, stay part of the path upstream."""
    return urllib.parse.quote(path, safe="/:@!$&'()*+,;=~")


def below(base: str, path: str) -> str:
    return base + quoted(path)


def repomd_digest(body: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(body).hexdigest())


def describe(error: BaseException) -> str:
    if isinstance(error, FetchError):
        return error.reason
    return str(error) or type(error).__name__
