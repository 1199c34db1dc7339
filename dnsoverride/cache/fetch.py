"""Download once, stream to all: the single-flight fetch of verified content into the store.

Used alike by registry blobs and package-repository files. A miss starts exactly one
download per (kind, digest). It writes into a temp file in the store, hashing and
counting bytes as they arrive; every request for that content (the first and all that
join while it runs) streams from the growing file, so each client gets its first byte
without waiting for the whole file. Only content whose length and digest match is
fsynced and renamed into the store (`Store.commit`). On a mismatch or an upstream
failure the temp file is removed and every waiting response is cut short, so the
client's own check fails: the last byte of a stream is only sent once the content is
verified and stored. The download is a task of its own: a client that disconnects does
not cancel it for the others.

The expected size is the caller's when it knows one (a package's `size package` from the
repository metadata: an upstream Content-Length that disagrees fails the download at
once), else the upstream's Content-Length. A caller without an expected size may give a
`limit`: a body longer than that fails (an upstream that never stops fills no disk).
While content downloads, a HEAD answers at once with that size, and a `Range` request
(206) is sent as soon as its bytes have landed in the growing file; a range that takes in
the last byte waits for the verified content like a whole GET does. Stored content is sent
by serving.py (the direct path, ranges, the send deadline), pinned against eviction while
it is sent; a streamed response is under the same send deadline.

What a failure means to a client is the caller's protocol (an OCI error, a plain-text
404): a failed download carries a `FetchError` whose `cause` is the exception it came
from, for the caller to translate; counters and the access log are fed through the
caller's `Meter`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest

from dnsoverride.cache.serving import (
    DEFAULT_SEND_TIMEOUT,
    Delivery,
    RangeNotSatisfiableError,
    StoredFile,
    byte_range,
    content_etag,
    not_satisfiable,
    range_asked,
    refusal,
    send_deadline,
)
from dnsoverride.cache.store import Digest, Kind, Store, StoreWriteError

log = structlog.get_logger(__name__)

_CHUNK = 1 << 20
# What a response in flight reads of the temp file per write: inline on the event loop,
# so no more than serving.py reads at once.
_SEND_CHUNK = 64 << 10

# Starts the upstream GET and returns the response once its status is known good (the
# opener raises for a 404, a 5xx, ...: that exception becomes the download's error cause).
Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]


# What a body breaking off after the upstream's answer raises (not our shutdown's cancel).
_BROKEN_BODY = (aiohttp.ClientError, TimeoutError)


class FetchError(Exception):
    """Why a download failed, in one line; `status` is what a client should get (502: the
    upstream sent wrong bytes, 503: it could not be reached, 507: the store is full);
    `verification` is true when the bytes came but were not the content asked for."""

    def __init__(
        self,
        reason: str,
        *,
        status: int = 502,
        verification: bool = False,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.verification = verification
        self.cause = cause


class Meter(Protocol):
    """What a fetch reports to its caller's counters and access log."""

    def received(self, source: str, count: int) -> None:
        """`count` body bytes came from upstream `source`."""

    def sent(self, request: BaseRequest, count: int, *, sendfile: bool) -> None:
        """`count` body bytes went to the client of `request`."""

    def cut_short(self, request: BaseRequest, status: int, error: FetchError) -> None:
        """The response to `request` was aborted after its `status` was sent: the download
        failed."""

    def verify_failed(self, download: Download) -> None:
        """The upstream's bytes did not match the expected digest or size."""

    def body_failed(self, download: Download) -> None:
        """The upstream answered, then its body broke off (a reset, a stall)."""


class Download:
    """One in-flight upstream fetch of one item into a growing temp file."""

    def __init__(self, kind: Kind, digest: Digest, temp: Path, source: str, owner: object) -> None:
        self.kind = kind
        self.digest = digest
        self.temp = temp
        self.source = source  # the upstream's name, for counters and logs
        self.owner = owner  # the caller's tag (the registry: the (upstream, repository))
        self.size: int | None = None  # expected length: the caller's, else Content-Length
        self.limit: int | None = None  # the most bytes accepted when no size is expected
        self.written = 0
        self.waiters = 0  # client requests being answered from this download now
        self.final: Path | None = None
        self.error: FetchError | None = None
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

        The last byte is held back until the content is verified and stored, so no client
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


class Fetcher:
    """The downloads in flight over one store; see the module docstring."""

    def __init__(
        self, store: Store, meter: Meter, send_timeout: float = DEFAULT_SEND_TIMEOUT
    ) -> None:
        self.store = store
        self.meter = meter
        self.send_timeout = send_timeout
        self._downloads: dict[tuple[Kind, Digest], Download] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rechecks: dict[tuple[Kind, Digest], asyncio.Future[bool]] = {}

    async def close(self) -> None:
        """Cancel every download (their waiters are cut short)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def in_flight(self, kind: Kind, digest: Digest) -> Download | None:
        return self._downloads.get((kind, digest))

    def downloads(self) -> list[Download]:
        """The downloads in flight, oldest first."""
        return list(self._downloads.values())

    async def stored(self, kind: Kind, digest: Digest) -> Path | None:
        """The stored file of `digest`, re-hashed first if it was only indexed at start-up
        (a damaged one is removed: a miss); None when absent."""
        path = self.store.lookup(kind, digest)
        if path is not None and not self.store.checked(kind, digest):
            path = path if await self._recheck(kind, digest, path) else None
        return path

    def send_file(
        self, request: BaseRequest, kind: Kind, digest: Digest, path: Path, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Stored content (serving.py: the direct path, ranges, If-*), pinned while sent."""
        delivery = Delivery(self.store.pinned(kind, digest), self._sent, self.send_timeout)
        return StoredFile(path, delivery, {**headers, "ETag": content_etag(digest)})

    def _sent(self, request: BaseRequest, count: int, sendfile: bool) -> None:
        self.meter.sent(request, count, sendfile=sendfile)

    def start(
        self,
        kind: Kind,
        digest: Digest,
        opener: Opener,
        *,
        source: str,
        size: int | None = None,
        limit: int | None = None,
        owner: object = None,
        on_stored: Callable[[Download], None] | None = None,
    ) -> Download:
        """The download of `digest` in flight, or a new one from `opener` (its response's
        body must hash to `digest` and be `size` bytes long when given, at most `limit`
        bytes when it is not); `on_stored` is
        called once it is committed to the store. Raises FetchError (507/503) when no temp
        file can be made."""
        download = self._downloads.get((kind, digest))
        if download is not None:
            return download
        try:
            fd, temp = self.store.new_temp()
        except StoreWriteError as error:
            log.error("store_write_failed", kind=kind, digest=str(digest), reason=error.message)
            raise _store_error(error) from error
        download = Download(kind, digest, temp, source, owner)
        download.size, download.limit = size, limit
        self._downloads[(kind, digest)] = download
        task = asyncio.create_task(self._fetch(download, opener, fd, on_stored))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download

    async def respond(
        self, request: web.Request, download: Download, headers: dict[str, str]
    ) -> web.StreamResponse:
        """The response to GET/HEAD (Range or not) of content being downloaded. Raises the
        download's FetchError when it failed before anything was sent."""
        download.waiters += 1
        try:
            return await self._respond(request, download, headers)
        finally:
            download.waiters -= 1

    async def _respond(
        self, request: web.Request, download: Download, headers: dict[str, str]
    ) -> web.StreamResponse:
        await asyncio.shield(download.started)
        if download.error is not None:
            raise download.error
        if download.final is not None:
            return self.send_file(request, download.kind, download.digest, download.final, headers)
        # In flight the ETag is already the digest's: a client only ever gets all of the
        # body when it hashes to it (else the connection is cut).
        etag = content_etag(download.digest)
        headers = {**headers, "ETag": etag}
        refused = refusal(request, etag)
        if refused is not None:
            return web.Response(status=refused, headers=headers)
        asked = range_asked(request, etag)
        if download.size is None:
            return await self._respond_unsized(request, download, headers, asked)
        if request.method == "HEAD":
            # In flight: the length is the expected one, known since the headers arrived.
            return web.Response(headers={**headers, "Content-Length": str(download.size)})
        try:
            window = byte_range(asked, download.size)
        except RangeNotSatisfiableError:
            return not_satisfiable(download.size, headers)
        if window is None:
            return await self._stream(request, download, headers, (0, download.size))
        start, stop = window
        headers = {**headers, "Content-Range": f"bytes {start}-{stop - 1}/{download.size}"}
        return await self._stream(request, download, headers, (start, stop), status=206)

    async def _respond_unsized(
        self,
        request: web.Request,
        download: Download,
        headers: dict[str, str],
        asked: str | None,
    ) -> web.StreamResponse:
        """Content in flight without a known length: neither a length nor the range
        `asked` can be given until it has landed (then served as stored)."""
        if request.method == "HEAD" or asked is not None:
            await download.wait_finished()
            if download.final is None:
                raise download.error or FetchError("download failed", status=503)
            return self.send_file(request, download.kind, download.digest, download.final, headers)
        return await self._stream(request, download, headers, (0, None))

    async def _recheck(self, kind: Kind, digest: Digest, path: Path) -> bool:
        """Re-hash content indexed at start-up before its first serve (once, shared by the
        requests that come meanwhile); damaged content is removed, to be fetched again."""
        key = (kind, digest)
        task = self._rechecks.get(key)
        if task is None:
            task = asyncio.ensure_future(self._rehash(kind, digest, path))
            self._rechecks[key] = task
            task.add_done_callback(lambda _: self._rechecks.pop(key, None))
        return await asyncio.shield(task)

    async def _rehash(self, kind: Kind, digest: Digest, path: Path) -> bool:
        with self.store.pinned(kind, digest):
            if not self.store.has(kind, digest):
                return False  # evicted before the check began: a miss, not damage
            matches = await asyncio.to_thread(file_matches, path, digest)
        if matches:
            self.store.mark_checked(kind, digest)
        else:
            self.store.remove_corrupt(kind, digest, "content does not match its digest")
        return matches

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
            async with send_deadline(request, self.send_timeout):
                await self._send_landed(request, response, download, fd, window)
        except ConnectionResetError:
            # The client went away; the download carries on for the others.
            log.debug("client_disconnected", kind=download.kind, digest=str(download.digest))
        finally:
            os.close(fd)
        return response

    async def _send_landed(
        self,
        request: web.Request,
        response: web.StreamResponse,
        download: Download,
        fd: int,
        window: tuple[int, int | None],
    ) -> None:
        start, stop = window
        await response.prepare(request)
        sent = start
        while True:
            landed = download.landed if stop is None else min(download.landed, stop)
            if sent < landed:
                data = os.pread(fd, min(landed - sent, _SEND_CHUNK), sent)
                await response.write(data)
                sent += len(data)
                self.meter.sent(request, len(data), sendfile=False)
            elif sent == stop or download.final is not None:
                break
            elif download.error is not None:
                # Cut the connection short: the client must not take this as complete.
                # Its access log line carries the reason (the status was already sent).
                self.meter.cut_short(request, response.status, download.error)
                if request.transport is not None:
                    request.transport.abort()
                return
            else:
                await download.wait_change()
        await response.write_eof()

    async def _fetch(
        self,
        download: Download,
        opener: Opener,
        fd: int,
        on_stored: Callable[[Download], None] | None,
    ) -> None:
        kind, digest = download.kind, download.digest
        expected = download.size
        closed = False
        try:
            response = await opener()
            with contextlib.closing(response):
                download.size = _declared_size(download, response.content_length)
                if download.size is not None:
                    self.store.check_fits(download.size)
                download.started.set_result(None)
                received = await self._receive(response, download, fd)
            if download.size is not None and download.written != download.size:
                raise FetchError(
                    f"upstream closed {kind} {digest} short: "
                    f"{download.written} of {download.size} bytes",
                    verification=expected is not None,
                )
            if received != digest.hex:
                raise FetchError(
                    f"upstream {kind} {digest}: content does not match its digest",
                    verification=True,
                )
            closed = True
            try:
                await asyncio.to_thread(Store.sync_close, fd)
            except OSError as error:
                raise self.store.write_failed(
                    error, f"{kind} {digest}", download.written
                ) from error
            download.final = self.store.commit(kind, digest, download.temp, download.written)
            if on_stored is not None:
                on_stored(download)
            log.info(
                "content_stored",
                kind=kind,
                digest=str(digest),
                size=download.written,
                upstream=download.source,
            )
        except StoreWriteError as error:
            download.error = _store_error(error)
            log.error("store_write_failed", kind=kind, digest=str(digest), reason=error.message)
            self._abandon(download, fd, closed)
        except (Exception, asyncio.CancelledError) as error:
            download.error = _as_fetch_error(error)
            if download.error.verification:
                self.meter.verify_failed(download)
            elif download.started.done() and isinstance(error, _BROKEN_BODY):
                # Its answer counted for the upstream; the body it then cut is a failure.
                download.error = FetchError(
                    f"upstream {kind} {digest} broke off after {download.written} bytes: "
                    f"{error or type(error).__name__}",
                    status=503,
                    cause=error,
                )
                self.meter.body_failed(download)
            log.warning(
                "content_fetch_failed",
                kind=kind,
                digest=str(digest),
                upstream=download.source,
                received=download.written,
                error=download.error.reason,
            )
            self._abandon(download, fd, closed)
            if isinstance(error, asyncio.CancelledError):
                raise
        finally:
            if not download.started.done():
                download.started.set_result(None)
            del self._downloads[(kind, digest)]
            download.notify()

    async def _receive(self, response: aiohttp.ClientResponse, download: Download, fd: int) -> str:
        """Write the body to `fd` as it arrives, waking the readers of `download`; the
        hash (hex) of what came."""
        kind, digest = download.kind, download.digest
        hasher = hashlib.new(digest.algorithm)
        # Never more than one byte past the size or limit is taken from the stream: what
        # aiohttp buffered beyond it is neither written nor counted as received.
        bounds = [b for b in (download.size, download.limit) if b is not None]
        while chunk := await response.content.read(
            min(_CHUNK, min(bounds) - download.written + 1) if bounds else _CHUNK
        ):
            try:
                Store.write_all(fd, chunk)
            except OSError as error:
                raise self.store.write_failed(
                    error, f"{kind} {digest}", download.size or download.written + len(chunk)
                ) from error
            hasher.update(chunk)
            download.written += len(chunk)
            self.meter.received(download.source, len(chunk))
            if download.size is not None and download.written > download.size:
                raise FetchError(
                    f"upstream {kind} {digest}: longer than its {download.size} bytes",
                    verification=True,
                )
            if download.limit is not None and download.written > download.limit:
                raise FetchError(
                    f"upstream {kind} {digest}: longer than the limit {download.limit} bytes"
                )
            download.notify()
        return hasher.hexdigest()

    @staticmethod
    def _abandon(download: Download, fd: int, closed: bool) -> None:
        if not closed:
            with contextlib.suppress(OSError):
                os.close(fd)
        Store.discard(download.temp)


def _store_error(error: StoreWriteError) -> FetchError:
    return FetchError(error.message, status=507 if error.no_space else 503, cause=error)


def _as_fetch_error(error: BaseException) -> FetchError:
    if isinstance(error, FetchError):
        return error
    if isinstance(error, asyncio.CancelledError):
        return FetchError("download cancelled (shutting down)", status=503, cause=error)
    return FetchError(f"upstream failed: {error}", status=503, cause=error)


def file_matches(path: Path, digest: Digest) -> bool:
    """Whether the file at `path` hashes to `digest` (blocking: run it in a thread)."""
    hasher = hashlib.new(digest.algorithm)
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return hasher.hexdigest() == digest.hex


def _declared_size(download: Download, length: int | None) -> int | None:
    """The size a download will have: the caller's, else the upstream's Content-Length;
    FetchError when they disagree or the length is past the download's limit."""
    expected, what = download.size, f"{download.kind} {download.digest}"
    if expected is not None and length is not None and length != expected:
        raise FetchError(
            f"upstream sends {length} bytes for {what}, expected {expected}", verification=True
        )
    limit = download.limit
    if expected is None and length is not None and limit is not None and length > limit:
        raise FetchError(f"upstream sends {length} bytes for {what}, more than the limit {limit}")
    return expected if expected is not None else length
