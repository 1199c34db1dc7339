"""Blob serving for the registry: sendfile for hits, one shared upstream fetch for misses
(cache/fetch.py: download once, stream to every waiter, verified before the last byte).

What is the registry's own: the OCI headers, the upstream HEAD for a blob not in flight,
the links recording which (upstream, repository) a stored blob was fetched for, and the
translation of a failed download into the OCI error a client gets.
"""

from __future__ import annotations

import contextlib
from typing import cast

import aiohttp
import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest

from dnsoverride.cache.accesslog import ERROR_KEY, SENDFILE_KEY, note_cache, remember
from dnsoverride.cache.fetch import Download, Fetcher, FetchError
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.links import Links, Owner
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import Upstream, as_registry_error
from dnsoverride.cache.store import Digest, Store

log = structlog.get_logger(__name__)

BLOB_TYPE = "application/octet-stream"


class RegistryMeter:
    """The registry's counters and access-log fields, as cache/fetch.py reports them."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def received(self, source: str, count: int) -> None:
        self.stats.upstream_bytes[source] += count

    def sent(self, request: BaseRequest, count: int, *, sendfile: bool) -> None:
        self.stats.bytes_served += count
        if sendfile:
            remember(request, SENDFILE_KEY, count)

    def cut_short(self, request: BaseRequest, status: int, error: FetchError) -> None:
        code = registry_error(error).code
        reason = f"cut short: {error.reason}"
        remember(request, ERROR_KEY, (code, reason))
        self.stats.note_error(request.method, request.path_qs, status, code, reason)

    def verify_failed(self, download: Download) -> None:
        self.stats.verify_failures += 1
        self.body_failed(download)

    def body_failed(self, download: Download) -> None:
        # Its 200 counted as an answer; a body cut or wrong behind it is a failure (`status`).
        reason = download.error.reason if download.error else "content does not match"
        self.stats.upstream(download.source).failed(f"{download.source}: {reason}")


def registry_error(error: FetchError) -> RegistryError:
    """The OCI error for a failed blob download."""
    if error.cause is not None and not isinstance(error.cause, OSError):
        return as_registry_error(error.cause)
    if error.verification:
        return RegistryError("DIGEST_INVALID", error.reason, status=502)
    return RegistryError("UNAVAILABLE", error.reason, status=503 if error.status != 502 else 502)


class Blobs:
    def __init__(self, store: Store, links: Links, stats: Stats, fetcher: Fetcher) -> None:
        self.store = store
        self.links = links
        self.stats = stats
        self.fetcher = fetcher

    def fetching_for(self, digest: Digest) -> Owner | None:
        """The (upstream, repository) a download of `digest` in flight is for, if any."""
        download = self.fetcher.in_flight("blobs", digest)
        return None if download is None else cast(Owner, download.owner)

    async def wait_for(self, digest: Digest) -> None:
        """Until the download of `digest` in flight (if any) has finished, either way."""
        download = self.fetcher.in_flight("blobs", digest)
        if download is not None:
            await download.wait_finished()

    async def serve(
        self, request: web.Request, upstream: Upstream, name: str, digest: Digest
    ) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": str(digest), "Content-Type": BLOB_TYPE}
        path = await self.fetcher.stored("blobs", digest)
        if path is not None:
            self.stats.hits["blob"] += 1
            note_cache("hit")
            return self.fetcher.send_file(request, "blobs", digest, path, headers)
        self.stats.misses["blob"] += 1
        note_cache("miss")
        download = self.fetcher.in_flight("blobs", digest)
        if download is None and request.method == "HEAD":
            return await self._head_upstream(request, upstream, name, headers)
        if download is None:
            download = self._start(upstream, name, digest)
        else:
            self.stats.coalesced += 1
            note_cache("coalesced")
        try:
            return await self.fetcher.respond(request, download, headers)
        except FetchError as error:
            raise registry_error(error) from error

    def _start(self, upstream: Upstream, name: str, digest: Digest) -> Download:
        owner = (upstream.name, name)

        async def opener() -> aiohttp.ClientResponse:
            response = await upstream.call("GET", name, f"blobs/{digest}")
            if response.status == 404:
                response.release()
                raise RegistryError("BLOB_UNKNOWN", f"blob unknown upstream: {digest}")
            return response

        try:
            return self.fetcher.start(
                "blobs",
                digest,
                opener,
                source=upstream.name,
                owner=owner,
                on_stored=lambda _: self.links.add(owner, [("blobs", digest)]),
            )
        except FetchError as error:
            raise registry_error(error) from error

    async def _head_upstream(
        self, request: web.Request, upstream: Upstream, name: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        digest = headers["Docker-Content-Digest"]
        upstream_response = await upstream.call("HEAD", name, f"blobs/{digest}")
        with contextlib.closing(upstream_response):
            if upstream_response.status == 404:
                raise RegistryError("BLOB_UNKNOWN", f"blob unknown upstream: {digest}")
            response = web.StreamResponse(headers=headers)
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            await response.write_eof()
            return response

    async def prefetch(self, upstream: Upstream, name: str, digest: Digest) -> bool:
        """Store `digest` for (upstream, name) with no client waiting (`cache warm`): True
        when it was fetched now (or joined in flight), False when it was stored already.
        RegistryError when it cannot be had."""
        if self.store.has("blobs", digest):
            return False
        download = self.fetcher.in_flight("blobs", digest) or self._start(upstream, name, digest)
        await download.wait_finished()
        if download.error is not None:
            raise registry_error(download.error)
        return True
