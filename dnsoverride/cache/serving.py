"""Sending stored content to clients: the direct path for hits, byte ranges, and the send
deadline that closes a client which stops taking bytes.

A GET/HEAD of a stored file, whole or a single byte range, takes the direct path: the
file is opened and `fstat`ed inline (a local file, already looked up: no thread-pool
round trip), the headers are written and the bytes go with `loop.sendfile`; a body of at
most `_SMALL` bytes is read and written with the headers instead, in one write (sendfile's
setup costs more than copying 64 KiB). Over TLS, where the kernel cannot send a file,
it is read inline `_SMALL` bytes at a time. For a body larger than `_LARGE` the socket's
send buffer is raised first, so the kernel takes it in a few sendfile calls rather than
hundreds. The content is pinned against eviction while it is sent.

Validators: the ETag is the content's digest (`"sha256:<hex>"`, content_etag), stable
across restarts and mtime rewrites; there is no Last-Modified (the store's mtimes record
last use). If-Match, If-None-Match and If-Range are evaluated against it in RFC 9110
§13.2.2's order, before the range: a 304 or 412 opens no file.

Ranges follow RFC 9110 §14: a single `bytes=` range is served as 206; a range that cannot
be satisfied (`bytes=-0`, a first byte past the end) is 416 with `Content-Range: bytes
*/size`; several ranges, another unit or a malformed range are ignored (§14.2 allows it):
the whole content, 200.

The send deadline (`timeouts: send`): while a response is being sent, a client that takes
no bytes for that long (the kernel's count of bytes it acknowledged, `TCP_INFO`, has not
moved while bytes wait for it) is disconnected, logged once as `client_send_stalled` with
the client, the path and the bytes it took, and the content it pinned is released. Waiting
for bytes that have not arrived from upstream yet is not a stall. A small body's one
write never waits, so it has no deadline, unless the transport's buffer is past its
high-water mark after it (a client pipelining requests it does not read): then the next
request waits for it to drain, under the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import io
import os
import socket
import struct
import termios
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import ETAG_ANY
from aiohttp.web_request import BaseRequest

from dnsoverride.cache.store import Digest

log = structlog.get_logger(__name__)

DEFAULT_SEND_TIMEOUT = 60.0

# Bodies up to this size are read into memory and written with the headers in one write.
_SMALL = 64 << 10
# Bodies above this size get a larger socket send buffer before sendfile (_large_sndbuf).
_LARGE = 1 << 20
_LARGE_SNDBUF = 8 << 20
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a __u64 at byte 120 (Linux 4.1+).
_TCP_INFO_LENGTH = 128
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_OFFSET = 120
# SIOCOUTQ (= TIOCOUTQ) fills in an int.
_QUEUED = struct.Struct("=i")


class RangeNotSatisfiableError(Exception):
    """The request's byte range selects nothing of the content (answered 416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) of a single `bytes=` range `header` within `size` bytes; None when the
    whole content is to be sent (no range, or one ignored: several ranges, another unit,
    malformed). RangeNotSatisfiableError when it selects nothing."""
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if not first:  # bytes=-N: the last N bytes
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError
        return max(size - suffix, 0), size
    start = int(first)
    stop = size if not last else int(last) + 1
    if last and stop <= start:
        return None  # last before first: an invalid range, ignored (RFC 9110 §14.1.1)
    if start >= size:
        raise RangeNotSatisfiableError
    return start, min(stop, size)


def not_satisfiable(size: int, headers: dict[str, str]) -> web.Response:
    return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})


# -- the send deadline ------------------------------------------------------------------
def _acked(sock: Any) -> int | None:
    """The bytes the peer of `sock` has acknowledged; None where TCP_INFO lacks the count."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    except (OSError, AttributeError):
        return None
    if len(info) < _BYTES_ACKED_OFFSET + _BYTES_ACKED.size:
        return None
    return int(_BYTES_ACKED.unpack_from(info, _BYTES_ACKED_OFFSET)[0])


def _unsent(sock: Any) -> int:
    """Bytes in the socket's send queue not yet acknowledged (SIOCOUTQ)."""
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_QUEUED.size))
    except OSError:
        return 0
    return int(_QUEUED.unpack(queued)[0])


@contextlib.asynccontextmanager
async def send_deadline(request: BaseRequest, seconds: float) -> AsyncIterator[None]:
    """Disconnect the client of `request` (and leave the block) when it takes no bytes for
    `seconds` while bytes wait for it; see the module docstring."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    start = None if sock is None else _acked(sock)
    if transport is None or start is None:
        yield  # not TCP on Linux 4.1+: no way to tell a slow client from a stalled one
        return
    loop = asyncio.get_running_loop()
    interval = min(seconds / 4, 1.0)
    last = start
    timer: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(loop.time() + seconds) as deadline:

            def check() -> None:
                nonlocal last, timer
                acked = _acked(sock)
                waiting = transport.get_write_buffer_size() + _unsent(sock)
                if acked is not None and (acked != last or not waiting):
                    last = acked
                    deadline.reschedule(loop.time() + seconds)
                timer = loop.call_later(interval, check)

            timer = loop.call_later(interval, check)
            yield
    except TimeoutError:
        log.warning(
            "client_send_stalled",
            client=request.remote,
            path=request.path_qs,
            bytes_taken=last - start,
            seconds=seconds,
            reason=f"the client took no bytes for {seconds:g} s: disconnected",
        )
        transport.abort()
    finally:
        if timer is not None:
            timer.cancel()


@functools.cache
def _large_sndbuf() -> int | None:
    """The SO_SNDBUF for a large body; None when one would not beat TCP's own tuning.

    Setting SO_SNDBUF turns the kernel's send-buffer autotuning off for the socket, and
    the kernel caps the value at net.core.wmem_max (and doubles it). Where wmem_max is
    small (212992 on most distributions) that is far below what autotuning reaches
    (net.ipv4.tcp_wmem's maximum, 4 MiB), so the buffer is only set where it is larger.
    """
    try:
        wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
        autotuned = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        return None
    size = min(_LARGE_SNDBUF, wmem_max)
    return size if 2 * size > autotuned else None


def _encrypted(request: BaseRequest) -> bool:
    transport = request.transport
    return transport is not None and transport.get_extra_info("sslcontext") is not None


async def sendfile(request: BaseRequest, fd: int, offset: int, count: int) -> int:
    """`count` bytes of `fd` from `offset` to the client with `loop.sendfile`; the bytes
    sent, fewer when the file ends early."""
    transport = request.transport
    if transport is None:
        raise ConnectionResetError("connection lost")
    if count > _LARGE and (sndbuf := _large_sndbuf()) is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    # closefd=False: the caller owns fd; loop.sendfile needs a file object.
    with io.FileIO(fd, "rb", closefd=False) as file:
        return await asyncio.get_running_loop().sendfile(transport, file, offset, count)


# -- validators -------------------------------------------------------------------------
def content_etag(digest: Digest | str) -> str:
    """The ETag of content-addressed content: its digest, strong (what distribution sends
    for a blob), so the same for as long as the content exists, across restarts and
    whatever the store does to the file's mtime (its record of last use)."""
    return f'"{digest}"'


def refusal(request: BaseRequest, etag: str) -> int | None:
    """304 or 412 when the request's preconditions, evaluated in RFC 9110 §13.2.2's order
    against `etag`, stop it; None when it goes ahead. Stored content has no Last-Modified
    (a file's mtime records its last use, not a change), so If-Unmodified-Since and
    If-Modified-Since are ignored, as §13.1.3 and §13.1.4 require without one."""
    value = etag[1:-1]
    if_match = request.if_match  # strong comparison (§13.1.1)
    if if_match is not None and not any(
        tag.value == ETAG_ANY or (not tag.is_weak and tag.value == value) for tag in if_match
    ):
        return 412
    if_none_match = request.if_none_match  # weak comparison (§13.1.2)
    if if_none_match is not None and any(tag.value in (ETAG_ANY, value) for tag in if_none_match):
        return 304 if request.method in ("GET", "HEAD") else 412
    return None


def range_asked(request: BaseRequest, etag: str) -> str | None:
    """The request's Range header, unless an If-Range that is not `etag` (compared
    strongly; a date never matches, there being no Last-Modified) voids it: then the
    whole content is sent (§13.1.5). None for a method other than GET, the only one
    with range handling, whose Range a server must ignore (§14.2)."""
    if request.method != "GET":
        return None
    asked = request.headers.get(hdrs.RANGE)
    if_range = request.headers.get(hdrs.IF_RANGE)
    if asked is None or if_range is None or if_range.strip() == etag:
        return asked
    return None


# -- responses --------------------------------------------------------------------------
@dataclass(frozen=True)
class Delivery:
    """What a response of stored content needs besides the file: the pin held while it
    is sent, the caller's count of body bytes sent (with whether they went by sendfile,
    which aiohttp's own count of a response's bytes leaves out), the send deadline in
    seconds."""

    pin: contextlib.AbstractContextManager[None]
    sent: Callable[[BaseRequest, int, bool], None]
    send_timeout: float


class StoredFile(web.StreamResponse):
    """Stored content (whole, one range, 304 or 412), pinned while sent; `headers` carry
    its ETag (content_etag)."""

    def __init__(self, path: Path, delivery: Delivery, headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self._delivery = delivery
        self._path = path

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        etag = self._headers[hdrs.ETAG]
        refused = refusal(request, etag)
        if refused is not None:  # before the file is opened: a revalidation costs no I/O
            self.set_status(refused)
            self.content_length = 0
            return await super().prepare(request)
        with self._delivery.pin:
            try:
                fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                log.error(
                    "stored_file_unreadable",
                    path=str(self._path),
                    client=request.remote,
                    request=request.path_qs,
                    error=str(error),
                )
                self.set_status(404)
                return await super().prepare(request)
            try:
                return await self._send(request, fd, range_asked(request, etag))
            finally:
                os.close(fd)

    async def _send(
        self, request: BaseRequest, fd: int, asked: str | None
    ) -> AbstractStreamWriter | None:
        size = os.fstat(fd).st_size
        self._headers[hdrs.ACCEPT_RANGES] = "bytes"
        try:
            window = byte_range(asked, size)
        except RangeNotSatisfiableError:
            self.set_status(416)
            self._headers[hdrs.CONTENT_RANGE] = f"bytes */{size}"
            self.content_length = 0
            return await super().prepare(request)
        start, stop = window if window is not None else (0, size)
        if window is not None:
            self.set_status(206)
            self._headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{stop - 1}/{size}"
        count = stop - start
        self.content_length = count
        if request.method != "GET" or count == 0:
            return await super().prepare(request)
        if count <= _SMALL:
            return await self._send_small(request, fd, start, count)
        writer = None  # stays None when the client stalls before the headers are out
        async with send_deadline(request, self._delivery.send_timeout):
            by_sendfile = not _encrypted(request)
            writer = await super().prepare(request)
            if by_sendfile:
                sent = await sendfile(request, fd, start, count)
            else:
                sent = await self._write_chunks(fd, start, count)
            self._delivery.sent(request, sent, by_sendfile)
            if sent < count:
                self._cut_short(request, count, sent)
                return writer
            await self.write_eof()
        return writer

    async def _send_small(
        self, request: BaseRequest, fd: int, start: int, count: int
    ) -> AbstractStreamWriter | None:
        """A body of at most `_SMALL` bytes, read and written with the headers in one
        write. That write never waits (aiohttp drains a response only past 64 KiB of its
        own, and not at its end), so a client that does not read would have every
        pipelined response piled up in the transport's buffer, without limit: past the
        buffer's high-water mark the next request waits for it to drain, under the send
        deadline. Below it (nearly always) no deadline is set up: ~16 µs of a 4 KiB hit."""
        body = os.pread(fd, count, start)
        self._send_headers_immediately = False  # one write: headers and body
        writer = await super().prepare(request)
        await self.write(body)
        self._delivery.sent(request, len(body), False)
        if len(body) < count:
            self._cut_short(request, count, len(body))
            return writer
        await self.write_eof()
        transport = request.transport
        if (
            writer is not None
            and transport is not None
            and transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]
        ):
            async with send_deadline(request, self._delivery.send_timeout):
                await writer.drain()
        return writer

    async def _write_chunks(self, fd: int, start: int, count: int) -> int:
        """`count` bytes of `fd` from `start`, read inline `_SMALL` bytes at a time; the
        bytes sent, fewer when the file ends early. For TLS, where loop.sendfile falls
        back to reading 16 KiB per thread-pool round trip (3.4x the CPU)."""
        sent = 0
        while sent < count:
            chunk = os.pread(fd, min(_SMALL, count - sent), start + sent)
            if not chunk:
                break
            await self.write(chunk)  # waits while the transport's buffer is full
            sent += len(chunk)
        return sent

    def _cut_short(self, request: BaseRequest, count: int, sent: int) -> None:
        """The file shrank under the response (its stored size was checked when it was
        looked up): the client must not take what it got as complete, nor wait for the
        rest on a connection kept alive."""
        log.error(
            "stored_file_short",
            path=str(self._path),
            client=request.remote,
            request=request.path_qs,
            expected=count,
            sent=sent,
            reason="the stored file ended early: connection cut",
        )
        if request.transport is not None:
            request.transport.abort()
