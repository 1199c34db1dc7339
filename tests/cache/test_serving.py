"""cache/serving.py: stored content sent to real clients on loopback, over TCP and TLS —
the direct path, the digest as ETag and the If-* preconditions, byte ranges by RFC 9110,
a file shrinking under a response, and the send deadline that disconnects a client which
stops reading (a real socket that never reads a 24 MiB blob while the store is over its
budget and eviction waits on the blob's pin; many of them; pipelined small GETs; the
slowest reader it keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dnsoverride.cache.app import Order, Route
from dnsoverride.cache.fetch import Fetcher
from dnsoverride.cache.registry.blobs import RegistryMeter
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.serving import RangeNotSatisfiableError, _acked, _unsent, byte_range
from dnsoverride.cache.store import Budget, Digest, Store
from tests.support.cache_routes import serving
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import DistributionRegistry
from tests.support.transparent_certs import make_ca
from tests.support.waits import poll_async

SMALL = os.urandom(4096)
MEDIUM = os.urandom(300_000)  # above the one-write size: sent with sendfile
SEND_TIMEOUT = 1.0


def _digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


@dataclass
class Served:
    store: Store
    stats: Stats
    base_url: str

    def url(self, data: bytes) -> str:
        return f"{self.base_url}/blob/{_digest(data).hex}"

    @property
    def port(self) -> int:
        return int(self.base_url.rpartition(":")[2])


@contextlib.asynccontextmanager
async def _serving(root: Path, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Served]:
    """Stored blobs under `root` served by digest (GET /blob/HEX) through
    Fetcher.send_file; a 40 MB budget (high watermark 38 MB)."""
    store = Store(root, Budget(40_000_000))
    store.open()
    stats = Stats()
    fetcher = Fetcher(store, RegistryMeter(stats), send_timeout=SEND_TIMEOUT)

    async def handler(request: web.Request) -> web.StreamResponse:
        digest = Digest("sha256", request.path.rpartition("/")[2])
        path = await fetcher.stored("blobs", digest)
        if path is None:
            return web.Response(status=404)
        return fetcher.send_file(request, "blobs", digest, path, {"Content-Type": "x-blob"})

    async with serving([Route("blobs", Order.REGISTRY, handler)], ssl_context) as base_url:
        yield Served(store, stats, base_url)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with _serving(tmp_path / "store") as served:
        for data in (SMALL, MEDIUM):
            served.store.put_bytes("blobs", _digest(data), data)
        yield served


async def _get(url: str, method: str = "GET", **headers: str) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, response.headers, await response.read()


# -- byte ranges ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "window"),
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=100-", (100, 1000)),
        ("bytes=990-5000", (990, 1000)),  # a last byte past the end: to the end
        ("bytes=-10", (990, 1000)),
        ("bytes=-5000", (0, 1000)),  # a suffix longer than the content: all of it
        (" Bytes = 5 - 9 ", (5, 10)),
        ("bytes=0-1,5-9", None),  # several ranges: ignored (RFC 9110 §14.2 allows it)
        ("bytes=9-5", None),  # last before first: invalid, ignored
        ("bytes=abc", None),
        ("bytes=-", None),
        ("items=0-9", None),  # another unit
    ],
)
def test_byte_range(header: str | None, window: tuple[int, int] | None) -> None:
    assert byte_range(header, 1000) == window


@pytest.mark.parametrize(("header", "size"), [("bytes=-0", 1000), ("bytes=1000-", 1000)])
def test_byte_range_not_satisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiableError):
        byte_range(header, size)


@pytest.mark.parametrize("data", [SMALL, MEDIUM], ids=["one-write", "sendfile"])
async def test_whole_head_and_ranges_of_stored_content(served: Served, data: bytes) -> None:
    url, size = served.url(data), len(data)
    with capture_logs() as logs:
        status, headers, body = await _get(url)
        await poll_async(lambda: any(e["event"] == "request" for e in logs), 5, "access log")
    assert (status, body) == (200, data)
    # The access log counts the body once, whichever way it went (headers: ~250 bytes).
    [access] = [e for e in logs if e["event"] == "request"]
    assert size < access["bytes"] < size + 400, access
    assert headers["Content-Length"] == str(size)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["Content-Type"] == "x-blob"
    assert headers["ETag"] == f'"{_digest(data)}"'
    assert "Last-Modified" not in headers
    status, headers, body = await _get(url, "HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(size), b"")

    status, headers, body = await _get(url, Range="bytes=100-199")
    assert (status, headers["Content-Range"], body) == (206, f"bytes 100-199/{size}", data[100:200])
    status, headers, body = await _get(url, Range="bytes=-10")
    assert (status, body) == (206, data[-10:])
    assert served.stats.bytes_served == size + 100 + 10


async def test_suffix_range_of_zero_is_416_and_several_ranges_are_the_whole_content(
    served: Served,
) -> None:
    """RFC 9110 §14.1.2: `bytes=-0` selects nothing (416); several ranges may be ignored
    (§14.2): 200 with everything. Before: 206 with the whole content, and 416 (aiohttp's
    FileResponse and `request.http_range`), with a conditional header or without."""
    size = len(MEDIUM)
    for conditional in ({}, {"If-None-Match": '"another"'}):
        status, headers, body = await _get(served.url(MEDIUM), Range="bytes=-0", **conditional)
        assert (status, headers["Content-Range"], body) == (416, f"bytes */{size}", b"")
        status, headers, body = await _get(served.url(MEDIUM), Range="bytes=0-1,5-9", **conditional)
        assert (status, body) == (200, MEDIUM)
        assert "Content-Range" not in headers


@pytest.mark.parametrize("data", [SMALL, MEDIUM], ids=["one-write", "sendfile"])
async def test_head_ignores_range(served: Served, data: bytes) -> None:
    """RFC 9110 §14.2: range handling is defined for GET only, and a server MUST ignore
    Range on other methods: HEAD with a Range is the whole content's 200 and length.
    Before: 206 with the range's Content-Range and length."""
    status, headers, body = await _get(served.url(data), "HEAD", Range="bytes=0-9")
    assert (status, headers["Content-Length"], body) == (200, str(len(data)), b"")
    assert "Content-Range" not in headers
    status, headers, _ = await _get(served.url(data), "HEAD", Range="bytes=-0")
    assert (status, headers["Content-Length"]) == (200, str(len(data)))


async def test_conditional_requests_are_answered_by_their_validators(served: Served) -> None:
    url = served.url(SMALL)
    _, headers, _ = await _get(url)
    etag = headers["ETag"]
    status, _, body = await _get(url, **{"If-None-Match": etag})
    assert (status, body) == (304, b"")
    status, _, body = await _get(url, **{"If-Match": '"another"'})
    assert status == 412
    status, headers, body = await _get(url, Range="bytes=0-9", **{"If-Range": etag})
    assert (status, body) == (206, SMALL[:10])
    # Preconditions before the range (RFC 9110 §13.2.2): a match is 304, not 416.
    status, _, _ = await _get(url, Range="bytes=-0", **{"If-None-Match": etag})
    assert status == 304


async def test_the_etag_is_the_digest_and_survives_mtime_rewrites_and_restarts(
    tmp_path: Path,
) -> None:
    """The ETag is the content's digest: the store rewriting the file's mtime (its record
    of last use) or a restart changes nothing, so a client's revalidation (If-None-Match:
    304) and resumption (If-Range: 206) keep working; an If-Range with another validator
    (the mtime-size ETag served before) gets the whole content. Before: ETag and
    Last-Modified came from the mtime, so after os.utime If-None-Match was a full 200 and
    If-Range a full 200 instead of the range."""
    root = tmp_path / "store"
    async with _serving(root) as served:
        path = served.store.put_bytes("blobs", _digest(MEDIUM), MEDIUM)
        info = path.stat()
        before = f'"{info.st_mtime_ns:x}-{info.st_size:x}"'  # what FileResponse sent
        _, headers, _ = await _get(served.url(MEDIUM))
        etag = headers["ETag"]
        assert etag == f'"sha256:{_digest(MEDIUM).hex}"'
        os.utime(path, (time.time() - 86400, time.time() - 86400))
        _, headers, _ = await _get(served.url(MEDIUM), "HEAD")
        assert headers["ETag"] == etag
    async with _serving(root) as served:  # a restart: a new store over the same files
        status, headers, body = await _get(served.url(MEDIUM), **{"If-None-Match": etag})
        assert (status, headers["ETag"], body) == (304, etag, b"")
        status, _, body = await _get(served.url(MEDIUM), **{"If-None-Match": f"W/{etag}"})
        assert (status, body) == (304, b"")  # If-None-Match compares weakly
        status, headers, body = await _get(
            served.url(MEDIUM), Range="bytes=1000-1999", **{"If-Range": etag}
        )
        assert (status, headers["Content-Range"], body) == (
            206,
            f"bytes 1000-1999/{len(MEDIUM)}",
            MEDIUM[1000:2000],
        )
        for other in (before, f"W/{etag}", "Sun, 29 Nov 2026 10:00:00 GMT"):
            # Another validator, a weak one (If-Range compares strongly), a date (there is
            # no Last-Modified to compare it with): the Range is ignored, all of it is sent.
            status, headers, body = await _get(
                served.url(MEDIUM), Range="bytes=1000-1999", **{"If-Range": other}
            )
            assert (status, body) == (200, MEDIUM), other
            assert "Content-Range" not in headers
        status, _, _ = await _get(served.url(MEDIUM), **{"If-Match": etag})
        assert status == 200
        status, _, body = await _get(served.url(MEDIUM), **{"If-Match": f"W/{etag}"})
        assert (status, body) == (412, b"")  # If-Match compares strongly
        # No Last-Modified: If-Modified-Since and If-Unmodified-Since are ignored.
        status, _, body = await _get(
            served.url(MEDIUM), **{"If-Unmodified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}
        )
        assert (status, body) == (200, MEDIUM)


# -- the send deadline --------------------------------------------------------------------
def _queued(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


async def _ask(port: int, path: str) -> socket.socket:
    """A non-blocking client with a 16 KiB receive buffer that has sent GET `path` and
    has read nothing yet; the caller closes it."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    except BaseException:
        client.close()
        raise
    return client


async def test_a_client_that_never_reads_is_disconnected_and_its_pin_released(
    served: Served,
) -> None:
    """A client that takes no bytes for `timeouts.send` is disconnected and logged once,
    and the blob it pinned can be evicted again. Before the deadline existed the pin was
    held for as long as the client kept the connection: the store stayed over budget."""
    large, other = os.urandom(24 << 20), os.urandom(16 << 20)
    store = served.store
    store.put_bytes("blobs", _digest(large), large)
    loop = asyncio.get_running_loop()
    path = f"/blob/{_digest(large).hex}"
    with capture_logs() as logs, contextlib.closing(await _ask(served.port, path)) as client:
        await poll_async(lambda: _queued(client) > 0, 10, "the response to start")
        asked = time.monotonic()

        # Over the high watermark: eviction would take the large blob, but it is pinned.
        store.put_bytes("blobs", _digest(other), other)
        assert store.has("blobs", _digest(large))
        assert store.stats.size > served.store.budget.max_size  # type: ignore[union-attr]

        def stalled() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "client_send_stalled"]

        await poll_async(stalled, 10, "client_send_stalled")
        waited = time.monotonic() - asked
        assert SEND_TIMEOUT <= waited < SEND_TIMEOUT + 2, waited
        [event] = stalled()
        assert event["client"] == "127.0.0.1"
        assert event["path"] == path
        assert 0 < event["bytes_taken"] < len(large)

        # The pin is gone: the next eviction takes the least recently used blob.
        await poll_async(lambda: not store._pins, 5, "the pin to be released")
        store.evict()
        assert not store.has("blobs", _digest(large))
        assert store.stats.size <= served.store.budget.high  # type: ignore[union-attr]

        # The client sees the connection end short of the blob.
        received = 0
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 5):
            received += len(chunk)
        assert received < len(large)


async def test_many_stalled_clients_leak_no_pin_and_no_fd(served: Served) -> None:
    """32 clients that never read a 24 MiB blob: each is cut once after the deadline, and
    afterwards no pin is held and the process has the file descriptors it had before
    (the stored file's and the sockets')."""
    large = os.urandom(24 << 20)
    served.store.put_bytes("blobs", _digest(large), large)
    fds = len(os.listdir("/proc/self/fd"))
    clients = []
    with capture_logs() as logs:
        for _ in range(32):
            clients.append(await _ask(served.port, f"/blob/{_digest(large).hex}"))

        def stalled() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "client_send_stalled"]

        await poll_async(lambda: len(stalled()) == 32, 20, "32 client_send_stalled")
        await poll_async(lambda: not served.store._pins, 5, "the pins to be released")
        for client in clients:
            client.close()
        await poll_async(
            lambda: len(os.listdir("/proc/self/fd")) <= fds, 5, "the descriptors to be closed"
        )
    assert len(stalled()) == 32


async def test_a_client_pipelining_small_gets_and_never_reading_is_cut(served: Served) -> None:
    """Small bodies go out without a send deadline only while the transport can hold
    them: 2000 pipelined GETs of a 4 KiB blob from a client that never reads fill the
    kernel's buffers and then the transport's, and the deadline cuts the client once,
    its pin released (without the deadline a response would wait forever in drain)."""
    path = f"/blob/{_digest(SMALL).hex}"
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    with capture_logs() as logs, contextlib.closing(await _ask(served.port, path)) as client:
        await loop.sock_sendall(client, request * 1999)

        def stalled() -> list[MutableMapping[str, Any]]:
            return [e for e in logs if e["event"] == "client_send_stalled"]

        await poll_async(stalled, 10, "client_send_stalled")
        await poll_async(lambda: not served.store._pins, 5, "the pin to be released")
    assert len(stalled()) == 1


async def test_a_slow_client_that_keeps_reading_gets_the_whole_blob(served: Served) -> None:
    """The deadline is on no bytes taken, not on the whole response: a client that reads
    2 MiB every 0.5 s takes about 3 s (3x the send timeout) for 12 MiB and gets all."""
    data = os.urandom(12 << 20)
    served.store.put_bytes("blobs", _digest(data), data)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port, limit=1 << 16)
    with capture_logs() as logs:
        writer.write(f"GET /blob/{_digest(data).hex} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        body = bytearray()
        while len(body) < len(data):
            body += await reader.readexactly(min(2 << 20, len(data) - len(body)))
            await asyncio.sleep(0.5)
        writer.close()
    assert body == data
    assert [e for e in logs if e["event"] == "client_send_stalled"] == []


async def test_a_client_reading_64_kib_a_quarter_second_is_not_cut(served: Served) -> None:
    """Near the slowest reader the deadline can see: the kernel only counts bytes as taken
    once the client's receive window reopens, which on loopback takes a whole 64 KiB
    segment consumed (1 B/s is indistinguishable from a stall and is cut, as with nginx's
    send_timeout). A client reading 64 KiB every 0.25 s from a 48 MiB blob for 4 s, with
    a 1 s deadline, is not disconnected."""
    data = os.urandom(48 << 20)
    served.store.put_bytes("blobs", _digest(data), data)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    with contextlib.closing(client), capture_logs() as logs:
        await loop.sock_connect(client, ("127.0.0.1", served.port))
        request = f"GET /blob/{_digest(data).hex} HTTP/1.1\r\nHost: x\r\n\r\n"
        await loop.sock_sendall(client, request.encode())
        received = 0
        until = time.monotonic() + 4
        while time.monotonic() < until:
            chunk = await asyncio.wait_for(loop.sock_recv(client, 64 << 10), 5)
            assert chunk, "the connection was cut"
            received += len(chunk)
            await asyncio.sleep(0.25)
    assert received > 512 << 10
    assert [e for e in logs if e["event"] == "client_send_stalled"] == []


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_the_daemon_applies_timeouts_send(
    publish: Publish, upstream: DistributionRegistry, start_cache: StartCache
) -> None:
    """`timeouts: {send: 1s}` in the config file reaches the running `dnsoverride cache`:
    a client that never reads a stored 24 MiB blob is disconnected and logged."""
    image = await publish("ci/big:v1", platforms=("linux/amd64",), layer_sizes=(24 << 20,))
    digest, size = max(image.blobs.items(), key=lambda item: item[1])
    config = {"registry": {"upstreams": [{"url": upstream.url}]}, "timeouts": {"send": "1s"}}
    cache = start_cache(config=config)
    path = f"/v2/ci/big/blobs/{digest}"
    async with aiohttp.ClientSession() as session, session.get(cache.url + path) as response:
        assert (response.status, len(await response.read())) == (200, size)  # now stored

    with contextlib.closing(await _ask(cache.port, path)):
        lines = await asyncio.to_thread(cache.wait_log, "client_send_stalled", path)
        assert len(lines) == 1, cache.logs()
        assert '"client": "127.0.0.1"' in lines[0]


def test_unsent_counts_the_whole_send_queue() -> None:
    """`_unsent` is the socket's send queue as an int (SIOCOUTQ): unacknowledged plus
    unsent bytes, which with a peer that reads nothing is everything sent minus what the
    peer's kernel acknowledged (TCP_INFO). Before: the ioctl's first byte only, the
    queue's length mod 256 (256 queued bytes read as 0, which the send deadline took for
    "nothing waits for the client" and so never cut it)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        with contextlib.closing(sender), contextlib.closing(receiver):
            sender.setblocking(False)
            before = _acked(sender)  # counts the SYN on Linux: only differences mean bytes
            assert before is not None
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    sent += sender.send(b"x" * 65536)
            for _ in range(50):  # in case the last ACK is still on its way
                acked, unsent = (_acked(sender) or 0) - before, _unsent(sender)
                if acked + unsent == sent:
                    break
                time.sleep(0.01)
            assert unsent > 256
            assert acked + unsent == sent


async def test_a_stored_file_truncated_while_sent_cuts_the_connection(served: Served) -> None:
    """A stored file that shrinks while it is sent (disk trouble, someone else's hand in
    the store) ends the response short of its Content-Length with the connection cut and
    one `stored_file_short` error, so the client sees a failed download. Before:
    loop.sendfile returned early at the new end of file, the response was finished as if
    complete and the connection kept alive: the client waited for bytes that never came."""
    large = os.urandom(24 << 20)
    path = served.store.put_bytes("blobs", _digest(large), large)
    loop = asyncio.get_running_loop()
    path_asked = f"/blob/{_digest(large).hex}"
    with capture_logs() as logs, contextlib.closing(await _ask(served.port, path_asked)) as client:
        await poll_async(lambda: _queued(client) > 0, 10, "the response to start")
        os.truncate(path, 8 << 20)
        received = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 5):
            received += chunk
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert len(body) < len(large)
        assert body == large[: len(body)]  # no wrong byte, only missing ones
        await poll_async(
            lambda: [e for e in logs if e["event"] == "stored_file_short"], 5, "the error"
        )
    [event] = [e for e in logs if e["event"] == "stored_file_short"]
    assert event["log_level"] == "error"
    assert event["path"] == str(path)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["stored_file_short"]
    assert not any("exc_info" in e or "exception" in e for e in logs), logs


@pytest.mark.parametrize("reset", [True, False], ids=["rst", "fin"])
async def test_a_client_gone_mid_sendfile_releases_its_pin_quietly(
    served: Served, reset: bool
) -> None:
    """A client that disconnects (RST or FIN) in the middle of a 24 MiB sendfile: its pin
    is released, the request still gets its access log line, and nothing is logged as an
    error or with a traceback (a client leaving is not a fault of the cache)."""
    large = os.urandom(24 << 20)
    served.store.put_bytes("blobs", _digest(large), large)
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        client = await _ask(served.port, f"/blob/{_digest(large).hex}")
        await poll_async(lambda: _queued(client) > 0, 10, "the response to start")
        await loop.sock_recv(client, 4096)
        assert served.store._pins
        if reset:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        await poll_async(lambda: not served.store._pins, 5, "the pin to be released")
        await poll_async(lambda: any(e["event"] == "request" for e in logs), 5, "access log")
    assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
    assert not any("exc_info" in e or "exception" in e for e in logs), logs


async def test_the_direct_path_and_the_send_deadline_over_tls(tmp_path: Path) -> None:
    """Over a TLS listener the kernel's sendfile cannot be used: a stored 300 kB and
    24 MiB blob arrive whole and exact, a range too, with no thread-pool round trip, and
    a TLS client that never reads is cut by the send deadline with its pin released.
    Before: loop.sendfile's fallback read the file 16 KiB per thread-pool round trip
    (1536 for 24 MiB)."""
    ca = make_ca(tmp_path)
    cert, key = ca.issue(tmp_path, "cache", "cache.test")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=ca.cert_file)
    client_context.check_hostname = False
    large = os.urandom(24 << 20)
    async with _serving(tmp_path / "store", server) as served:
        for data in (MEDIUM, large):
            served.store.put_bytes("blobs", _digest(data), data)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context)
        ) as session:
            for data in (MEDIUM, large):
                async with session.get(served.url(data)) as response:
                    assert (response.status, await response.read() == data) == (200, True)
            headers = {"Range": "bytes=100000-199999"}
            async with session.get(served.url(large), headers=headers) as response:
                assert response.status == 206
                assert await response.read() == large[100000:200000]
            # Over TLS the bytes are read inline (64 KiB at a time), not by loop.sendfile's
            # fallback, which reads 16 KiB per thread-pool round trip: 3.4x the CPU.
            loop = asyncio.get_running_loop()
            executor_calls = 0
            run_in_executor = loop.run_in_executor

            def counted(*args: Any) -> Any:
                nonlocal executor_calls
                executor_calls += 1
                return run_in_executor(*args)

            loop.run_in_executor = counted  # type: ignore[method-assign,assignment]
            try:
                async with session.get(served.url(large)) as response:
                    assert await response.read() == large
            finally:
                loop.run_in_executor = run_in_executor  # type: ignore[method-assign]
            assert executor_calls == 0

        with capture_logs() as logs:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, ssl=client_context, limit=1 << 16
            )
            transport_socket = writer.get_extra_info("socket")
            transport_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
            writer.write(f"GET /blob/{_digest(large).hex} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            await poll_async(
                lambda: [e for e in logs if e["event"] == "client_send_stalled"],
                10,
                "client_send_stalled",
            )
            await poll_async(lambda: not served.store._pins, 5, "the pin to be released")
            writer.close()


async def test_a_stored_file_gone_between_lookup_and_open_is_one_error(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored file removed after the store looked it up and before it is opened (someone
    else's hand in the store): 404 and one `stored_file_unreadable` error naming the file
    and the request, no traceback. The lookup is made to hand out the removed path."""
    path = served.store.path("blobs", _digest(SMALL))
    lookup = served.store.lookup

    def looked_up_then_removed(*args: Any) -> Path | None:
        found = lookup(*args)
        path.unlink(missing_ok=True)
        return found

    monkeypatch.setattr(served.store, "lookup", looked_up_then_removed)
    with capture_logs() as logs:
        status, _, _ = await _get(served.url(SMALL))
    assert status == 404
    [event] = [e for e in logs if e["log_level"] == "error"]
    assert event["event"] == "stored_file_unreadable"
    assert (event["path"], event["request"]) == (str(path), f"/blob/{_digest(SMALL).hex}")
