"""Blob serving: sendfile for hits, one shared upstream fetch for misses.

A miss starts exactly one download task per digest. It writes into a temp file in the
store, hashing and counting bytes as they arrive; every request for that digest (the
first and all that join while it runs) streams from the growing file, so each client
gets its first byte without waiting for the whole blob. Only a blob whose length and
digest match is fsynced and renamed into the store. On a mismatch or an upstream
failure the temp file is removed and every waiting response is cut short, so the
client's own digest check fails (the last byte of a stream is only sent once the blob is
verified and stored). The download is a task of its own: a client that
disconnects does not cancel it for the others.

While a blob downloads, a HEAD answers at once with the upstream's Content-Length, and a
`Range` request (206) is sent as soon as its bytes have landed in the growing file; a range
that takes in the last byte waits for the verified blob like a whole GET does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

from dnsoverride.registry.accesslog import ERROR_KEY, SENDFILE_KEY, note_cache, remember
from dnsoverride.registry.errors import RegistryError
from dnsoverride.registry.links import Links, Owner
from dnsoverride.registry.names import Digest
from dnsoverride.registry.stats import Stats
from dnsoverride.registry.store import Store, StoreWriteError
from dnsoverride.registry.upstream import Upstream, as_registry_error

log = structlog.get_logger(__name__)

_CHUNK = 1 << 20
BLOB_TYPE = "application/octet-stream"


class Download:
    """One in-flight upstream fetch of one blob into a growing temp file."""

    def __init__(self, digest: Digest, temp: Path, owner: Owner) -> None:
        self.digest = digest
        self.temp = temp
        self.owner = owner  # the (upstream, repository) it is fetched for
        self.size: int | None = None  # expected length, from upstream Content-Length
        self.written = 0
        self.waiters = 0  # client requests being answered from this download now
        self.final: Path | None = None
        self.error: RegistryError | None = None
        # Resolved once upstream headers arrived (size known) or the fetch failed.
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.final is not None or self.error is not None

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    @property
    def landed(self) -> int:
        """How many bytes from the start may be sent to clients now.

        The blob's last byte is held back until it is verified and stored, so no client
        ever holds a complete copy of bytes that failed verification.
        """
        if self.final is not None:
            return self.written
        end = self.size if self.size is not None else self.written
        return min(self.written, end - 1)

    async def wait_change(self) -> None:
        await self._changed.wait()

    async def wait_finished(self) -> None:
        while not self.finished:
            await self.wait_change()


class _PinnedFileResponse(web.FileResponse):
    """A sendfile response that keeps its blob pinned (not evictable) while it is sent."""

    def __init__(
        self,
        path: Path,
        pin: contextlib.AbstractContextManager[None],
        stats: Stats,
        headers: dict[str, str],
    ) -> None:
        super().__init__(path, headers=headers)
        self._pin = pin
        self._stats = stats

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        # FileResponse.prepare sends the whole file (sendfile) before it returns.
        with self._pin:
            writer = await super().prepare(request)
        if request.method == "GET":
            self._stats.bytes_served += self.content_length or 0
            remember(request, SENDFILE_KEY, self.content_length or 0)
        return writer


class Blobs:
    def __init__(self, store: Store, links: Links, stats: Stats) -> None:
        self.store = store
        self.links = links
        self.stats = stats
        self._downloads: dict[str, Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rechecks: dict[str, asyncio.Future[bool]] = {}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def fetching_for(self, digest: Digest) -> Owner | None:
        """The (upstream, repository) a download of `digest` in flight is for, if any."""
        download = self._downloads.get(str(digest))
        return None if download is None else download.owner

    async def wait_for(self, digest: Digest) -> None:
        """Until the download of `digest` in flight (if any) has finished, either way."""
        download = self._downloads.get(str(digest))
        if download is not None:
            await download.wait_finished()

    async def serve(
        self, request: web.Request, upstream: Upstream, name: str, digest: Digest
    ) -> web.StreamResponse:
        headers = {"Docker-Content-Digest": str(digest), "Content-Type": BLOB_TYPE}
        path = self.store.lookup("blobs", digest)
        if path is not None and not self.store.checked("blobs", digest):
            path = path if await self._recheck(digest, path) else None
        if path is not None:
            self.stats.hits["blob"] += 1
            note_cache("hit")
            return await self._send_file(request, digest, path, headers)
        self.stats.misses["blob"] += 1
        note_cache("miss")
        download = self._downloads.get(str(digest))
        if download is None and request.method == "HEAD":
            return await self._head_upstream(request, upstream, name, digest, headers)
        if download is None:
            download = self._start(upstream, name, digest)
        else:
            self.stats.coalesced += 1
            note_cache("coalesced")
        download.waiters += 1
        try:
            return await self._serve_download(request, download, digest, headers)
        finally:
            download.waiters -= 1

    def downloads(self) -> list[Download]:
        """The downloads in flight, oldest first."""
        return list(self._downloads.values())

    async def _serve_download(
        self, request: web.Request, download: Download, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        await asyncio.shield(download.started)
        if download.error is not None:
            raise download.error
        if download.final is not None:
            return await self._send_file(request, digest, download.final, headers)
        if download.size is None:
            return await self._serve_unsized(request, download, digest, headers)
        if request.method == "HEAD":
            # In flight: the length is the upstream's, known since its headers arrived.
            return web.Response(headers={**headers, "Content-Length": str(download.size)})
        if "Range" not in request.headers:
            return await self._stream(request, download, headers, (0, download.size))
        window = _range(request, download.size)
        if window is None:
            return web.Response(
                status=416, headers={**headers, "Content-Range": f"bytes */{download.size}"}
            )
        start, stop = window
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{download.size}"
        return await self._stream(request, download, headers, (start, stop), status=206)

    async def _serve_unsized(
        self, request: web.Request, download: Download, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        """A blob in flight without an upstream Content-Length: neither a length nor a range
        can be given until it has landed (FileResponse handles ranges of the finished file)."""
        if request.method == "HEAD" or "Range" in request.headers:
            await download.wait_finished()
            if download.final is None:
                raise download.error or RegistryError("UNAVAILABLE", "download failed")
            return await self._send_file(request, digest, download.final, headers)
        return await self._stream(request, download, headers, (0, None))

    async def _recheck(self, digest: Digest, path: Path) -> bool:
        """Re-hash a blob indexed at start-up before its first serve (once, shared by the
        requests that come meanwhile); a damaged one is removed, to be fetched again."""
        task = self._rechecks.get(str(digest))
        if task is None:
            task = asyncio.ensure_future(self._rehash(digest, path))
            self._rechecks[str(digest)] = task
            task.add_done_callback(lambda _: self._rechecks.pop(str(digest), None))
        return await asyncio.shield(task)

    async def _rehash(self, digest: Digest, path: Path) -> bool:
        with self.store.pinned("blobs", digest):
            if not self.store.has("blobs", digest):
                return False  # evicted before the check began: a miss, not damage
            matches = await asyncio.to_thread(_file_matches, path, digest)
        if matches:
            self.store.mark_checked("blobs", digest)
        else:
            self.store.remove_corrupt("blobs", digest, "content does not match its digest")
        return matches

    async def _send_file(
        self, request: web.Request, digest: Digest, path: Path, headers: dict[str, str]
    ) -> web.StreamResponse:
        pin = self.store.pinned("blobs", digest)
        return _PinnedFileResponse(path, pin, self.stats, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        download: Download,
        headers: dict[str, str],
        window: tuple[int, int | None],
        status: int = 200,
    ) -> web.StreamResponse:
        """Send bytes [start, stop) of the growing file as they land; stop None = to the end."""
        # Opened before any await: the temp file cannot be renamed or removed under us
        # in between, and once open the descriptor stays valid through both.
        start, stop = window
        fd = os.open(download.temp, os.O_RDONLY)
        response = web.StreamResponse(status=status, headers=headers)
        if stop is not None:
            response.content_length = stop - start
        try:
            await response.prepare(request)
            sent = start
            while True:
                landed = download.landed if stop is None else min(download.landed, stop)
                if sent < landed:
                    data = os.pread(fd, min(landed - sent, _CHUNK), sent)
                    await response.write(data)
                    sent += len(data)
                    self.stats.bytes_served += len(data)
                elif sent == stop or download.final is not None:
                    break
                elif download.error is not None:
                    # Cut the connection short: the client must not take this as complete.
                    # Its access log line carries the reason (the status was already sent).
                    error = download.error
                    reason = f"cut short: {error.message}"
                    remember(request, ERROR_KEY, (error.code, reason))
                    self.stats.note_error(
                        request.method, request.path_qs, status, error.code, reason
                    )
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                else:
                    await download.wait_change()
            await response.write_eof()
        except ConnectionResetError:
            # The client went away; the download carries on for the others.
            log.debug("client_disconnected", digest=str(download.digest))
        finally:
            os.close(fd)
        return response

    async def _head_upstream(
        self,
        request: web.Request,
        upstream: Upstream,
        name: str,
        digest: Digest,
        headers: dict[str, str],
    ) -> web.StreamResponse:
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

    def _start(self, upstream: Upstream, name: str, digest: Digest) -> Download:
        try:
            fd, temp = self.store.new_temp()
        except StoreWriteError as error:
            log.error("store_write_failed", digest=str(digest), reason=error.message)
            raise RegistryError("UNAVAILABLE", error.message) from error
        download = Download(digest, temp, (upstream.name, name))
        self._downloads[str(digest)] = download
        task = asyncio.create_task(self._fetch(upstream, name, download, fd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download

    async def _fetch(self, upstream: Upstream, name: str, download: Download, fd: int) -> None:
        digest = download.digest
        closed = False
        try:
            response = await upstream.call("GET", name, f"blobs/{digest}")
            with contextlib.closing(response):
                if response.status == 404:
                    raise RegistryError("BLOB_UNKNOWN", f"blob unknown upstream: {digest}")
                download.size = response.content_length
                if download.size is not None:
                    self.store.check_fits(download.size)
                download.started.set_result(None)
                received = await self._receive(response, upstream, download, fd)
            if download.size is not None and download.written != download.size:
                raise RegistryError(
                    "UNAVAILABLE", f"upstream closed blob {digest} short", status=502
                )
            if received != digest.hex:
                self.stats.verify_failures += 1
                raise _verify_failed(digest, "content does not match its digest")
            closed = True
            try:
                await asyncio.to_thread(Store.sync_close, fd)
            except OSError as error:
                raise self.store.write_failed(error, f"blob {digest}", download.written) from error
            download.final = self.store.commit("blobs", digest, download.temp, download.written)
            self.links.add((upstream.name, name), [("blobs", digest)])
            log.info(
                "blob_stored", digest=str(digest), size=download.written, upstream=upstream.name
            )
        except StoreWriteError as error:
            download.error = RegistryError("UNAVAILABLE", error.message)
            log.error("store_write_failed", digest=str(digest), reason=error.message)
            self._abandon(download, fd, closed)
        except (Exception, asyncio.CancelledError) as error:
            download.error = as_registry_error(error)
            log.warning(
                "blob_fetch_failed",
                digest=str(digest),
                upstream=upstream.name,
                received=download.written,
                error=download.error.message,
            )
            self._abandon(download, fd, closed)
            if isinstance(error, asyncio.CancelledError):
                raise
        finally:
            if not download.started.done():
                download.started.set_result(None)
            del self._downloads[str(digest)]
            download.notify()

    async def _receive(
        self, response: aiohttp.ClientResponse, upstream: Upstream, download: Download, fd: int
    ) -> str:
        """Write the body to `fd` as it arrives, waking the readers of `download`; the
        hash (hex) of what came."""
        digest = download.digest
        hasher = hashlib.new(digest.algorithm)
        async for chunk in response.content.iter_chunked(_CHUNK):
            try:
                Store.write_all(fd, chunk)
            except OSError as error:
                raise self.store.write_failed(
                    error, f"blob {digest}", download.size or download.written + len(chunk)
                ) from error
            hasher.update(chunk)
            download.written += len(chunk)
            self.stats.upstream_bytes[upstream.name] += len(chunk)
            if download.size is not None and download.written > download.size:
                raise _verify_failed(digest, "longer than its Content-Length")
            download.notify()
        return hasher.hexdigest()

    @staticmethod
    def _abandon(download: Download, fd: int, closed: bool) -> None:
        if not closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        Store.discard(download.temp)


def _file_matches(path: Path, digest: Digest) -> bool:
    """Whether the file at `path` hashes to `digest` (blocking: run it in a thread)."""
    hasher = hashlib.new(digest.algorithm)
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return hasher.hexdigest() == digest.hex


def _range(request: web.Request, size: int) -> tuple[int, int] | None:
    """[start, stop) of the request's single byte range within `size`; None: unsatisfiable."""
    try:
        wanted = request.http_range
    except ValueError:
        return None
    start, stop = wanted.start or 0, wanted.stop
    if start < 0:  # bytes=-N: the last N bytes
        start, stop = max(size + start, 0), size
    stop = size if stop is None else min(stop, size)
    return (start, stop) if start < stop else None


def _verify_failed(digest: Digest, why: str) -> RegistryError:
    return RegistryError("DIGEST_INVALID", f"upstream blob {digest}: {why}", status=502)
