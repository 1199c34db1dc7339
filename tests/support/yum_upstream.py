"""A plain HTTP(S) server standing in for the package internet: vault.centos.org,
mirror.stream.centos.org, dl.fedoraproject.org, and (for the tests that run a client
without the cache) the pre-end-of-life mirrorlist.centos.org and mirrors.centos.org.

It serves the directory trees of a tests/support/yum_repos.py `World` by `Host` header
(`<world>/<host>/<path>`), with ETag/Last-Modified and conditional GET (304) as real
mirrors answer, on any number of listeners (plain and TLS), from a thread of its own with
its own event loop — inside a network namespace when given one (`Netns.call`'s setns
trick), so a test keeps direct control of its lying modes while clients run:

- `publish(location, directory)`: serve another tree at `host/path` (a new repository
  generation; the switch is atomic, as an rsync'd mirror's `repodata/` is not);
- `wrong_bytes`: path suffixes answered with as many bytes, all different (a corrupted
  mirror file: same size, wrong checksum);
- `html`: path suffixes answered `200 text/html` with a login page (a captive portal);
- `fail`: path suffix -> status for matching requests (e.g. 404, 503);
- `stall`: path suffix -> seconds of silence before the answer;
- `chunk`: bodies in writes of this many bytes (many small writes);
- `rate`: bytes per second per response (a remote mirror's speed, for the benchmark);
- `after`: path suffix -> a callable run once right after such an answer was sent (to
  change the upstream between two requests of one client, deterministically);
- `hold`: path suffix -> threading.Event; such requests wait for it (`holding` is set);
- `set_down(True)`: the listeners close (connection refused) and a request on a kept-alive
  connection has it reset; `set_down(False)` reopens.

Every answered request is recorded in `requests` with the body bytes sent, so tests count
upstream traffic per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.transparent_netns import join_netns

LOGIN_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Wi-Fi login</body></html>"
)
TYPES = {".rpm": "application/x-rpm", ".xml": "text/xml"}


@dataclass
class Served:
    """One answered request: host, path (with query), status and body bytes sent (so far,
    while the body is going out)."""

    host: str
    path: str
    status: int
    sent: int


class YumUpstream:
    def __init__(self, world: Path, netns: str | None = None) -> None:
        self.world = world
        self.netns = netns
        self.published: dict[str, Path] = {}
        self.wrong_bytes: set[str] = set()
        self.html: set[str] = set()
        self.fail: dict[str, int] = {}
        self.stall: dict[str, float] = {}
        self.chunk: int | None = None
        self.rate: float | None = None
        self.after: dict[str, Callable[[], None]] = {}
        self.hold: dict[str, threading.Event] = {}
        self.holding = threading.Event()
        self.requests: list[Served] = []
        self.down = False
        self.mirrorlist_base = "http://vault.centos.org"
        self.metalink_base = "https://mirror.stream.centos.org"
        self.listeners: list[tuple[str, int, ssl.SSLContext | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite] = []
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------

    def publish(self, location: str, directory: Path) -> None:
        """Serve `directory` at `host/path` from now on (atomically, for the next request)."""
        self.published[location.strip("/")] = directory

    def sent_bytes(self, suffix: str = "") -> int:
        return sum(item.sent for item in self.requests if item.path.endswith(suffix))

    def count(self, suffix: str) -> int:
        return sum(1 for item in self.requests if item.path.split("?")[0].endswith(suffix))

    def start(self, listeners: list[tuple[str, int, ssl.SSLContext | None]]) -> None:
        self.listeners = listeners
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                if self.netns is not None:
                    join_netns(self.netns)
                loop = asyncio.new_event_loop()
                self._loop = loop
                loop.run_until_complete(self._open())
            except BaseException as error:
                failure.append(error)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, name="yum-upstream", daemon=True)
        self._thread.start()
        started.wait(30)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        for event in self.hold.values():
            event.set()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def set_down(self, down: bool) -> None:
        assert self._loop is not None
        self.down = down
        future = asyncio.run_coroutine_threadsafe(
            self._stop_sites() if down else self._start_sites(), self._loop
        )
        future.result(30)

    # -- server --------------------------------------------------------------------------

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await self._start_sites()

    async def _start_sites(self) -> None:
        assert self._runner is not None
        for host, port, context in self.listeners:
            site = web.TCPSite(self._runner, host, port, ssl_context=context, reuse_address=True)
            await site.start()
            self._sites.append(site)

    async def _stop_sites(self) -> None:
        for site in self._sites:
            await site.stop()
        self._sites = []

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _match(self, table: dict[str, Any] | set[str], path: str) -> Any:
        for suffix in table:
            if path.endswith(suffix):
                return table[suffix] if isinstance(table, dict) else suffix
        return None

    def _file(self, host: str, path: str) -> Path | None:
        location = f"{host}{path}"
        best = ""
        for prefix in self.published:
            if location.startswith(prefix + "/") and len(prefix) > len(best):
                best = prefix
        if best:
            candidate = self.published[best] / location[len(best) + 1 :]
        else:
            candidate = self.world / host / path.lstrip("/")
        if ".." in Path(path).parts or not candidate.is_file():
            return None
        return candidate

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.down and request.transport is not None:
            request.transport.abort()  # a kept-alive connection of a server that is gone
            raise asyncio.CancelledError
        host = (request.host or "").split(":")[0]
        path = request.path
        full = request.path_qs
        if (event := self._match(self.hold, path)) is not None:
            self.holding.set()
            await asyncio.to_thread(event.wait)
        if (seconds := self._match(self.stall, path)) is not None:
            await asyncio.sleep(seconds)
        if (status := self._match(self.fail, path)) is not None:
            return self._record(host, full, web.Response(status=status, text="failed\n"), 7)
        if self._match(self.html, path) is not None:
            response = web.Response(body=LOGIN_PAGE, content_type="text/html")
            return self._record(host, full, response, len(LOGIN_PAGE))
        if host == "mirrorlist.centos.org":
            return self._record_text(host, full, self._mirrorlist(request))
        if host in ("mirrors.centos.org", "mirrors.fedoraproject.org") and path == "/metalink":
            return await self._metalink(request, host, full)
        file = self._file(host, path)
        if file is None:
            return self._record(host, full, web.Response(status=404, text="not found\n"), 10)
        return await self._send_file(request, host, full, file)

    def _mirrorlist(self, request: web.Request) -> str:
        """What mirrorlist.centos.org answered before its end of life (one vault line here)."""
        release = request.query.get("release", "")
        repo = request.query.get("repo", "").lower()
        arch = request.query.get("arch", "")
        if release != "7":
            return "Invalid release/repo/arch combination\n"
        return f"{self.mirrorlist_base}/7.9.2009/{repo}/{arch}/\n"

    async def _metalink(self, request: web.Request, host: str, full: str) -> web.StreamResponse:
        repo = request.query.get("repo", "")
        arch = request.query.get("arch", "")
        if repo == "centos-baseos-9-stream":
            location = f"mirror.stream.centos.org/9-stream/BaseOS/{arch}/os"
        elif repo == "epel-9":
            location = f"dl.fedoraproject.org/pub/epel/9/Everything/{arch}"
        elif repo == "fedora-41":
            location = f"dl.fedoraproject.org/pub/fedora/linux/releases/41/Everything/{arch}/os"
        else:
            return self._record(host, full, web.Response(status=404, text="no such repo\n"), 13)
        host_part, _, path_part = location.partition("/")
        file = self._file(host_part, f"/{path_part}/repodata/repomd.xml")
        if file is None:
            return self._record(host, full, web.Response(status=404, text="no repomd\n"), 10)
        body = metalink_for(read(file)[0], f"https://{location}/repodata/repomd.xml")
        response = web.Response(body=body, content_type="application/metalink+xml")
        return self._record(host, full, response, len(body))

    def _record_text(self, host: str, full: str, text: str) -> web.Response:
        return self._record(host, full, web.Response(text=text), len(text.encode()))

    def _record(self, host: str, full: str, response: web.Response, sent: int) -> web.Response:
        self.requests.append(Served(host, full, response.status, sent))
        return response

    async def _send_file(
        self, request: web.Request, host: str, full: str, file: Path
    ) -> web.StreamResponse:
        data, mtime = read(file)
        etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
        modified = formatdate(mtime, usegmt=True)
        headers = {"ETag": etag, "Last-Modified": modified}
        # RFC 9110 13.2.2: If-None-Match, when present, decides alone.
        if_none_match = request.headers.get("If-None-Match")
        if (
            (if_none_match == etag)
            if if_none_match is not None
            else not_modified_since(request.headers.get("If-Modified-Since"), mtime)
        ):
            return self._record(host, full, web.Response(status=304, headers=headers), 0)
        if self._match(self.wrong_bytes, request.path) is not None:
            data = bytes(byte ^ 0x5A for byte in data)
        content_type = TYPES.get(file.suffix, "application/octet-stream")
        response = web.StreamResponse(headers={**headers, "Content-Type": content_type})
        response.content_length = len(data)
        await response.prepare(request)
        # Recorded before the body goes out, its bytes counted as each part is handed over:
        # a client may have the whole body (and a test look at `requests`) before this
        # handler runs again after its last write.
        served = Served(host, full, 200, 0)
        self.requests.append(served)
        if request.method != "HEAD":
            step = self.chunk or (1 << 16 if self.rate else len(data)) or 1
            began = asyncio.get_running_loop().time()
            for offset in range(0, len(data), step):
                part = data[offset : offset + step]
                served.sent += len(part)
                try:
                    await response.write(part)
                except BaseException:
                    served.sent -= len(part)
                    raise
                if self.chunk:
                    await asyncio.sleep(0.001)
                if self.rate:  # pace: the body so far may not have taken less time
                    ahead = began + served.sent / self.rate - asyncio.get_running_loop().time()
                    await asyncio.sleep(max(ahead, 0))
            await response.write_eof()
        for suffix in [suffix for suffix in self.after if request.path.endswith(suffix)]:
            self.after.pop(suffix)()
        return response


def read(file: Path) -> tuple[bytes, float]:
    """The file's bytes and modification time (test files are small enough to block on)."""
    return file.read_bytes(), file.stat().st_mtime


def not_modified_since(header: str | None, mtime: float) -> bool:
    if not header:
        return False
    with contextlib.suppress(TypeError, ValueError):
        return int(mtime) <= parsedate_to_datetime(header).timestamp()
    return False


def metalink_for(repomd: bytes, url: str) -> bytes:
    """A MirrorManager-style metalink 3.0 document for one repomd.xml at `url`."""
    stamps = [int(value) for value in re.findall(rb"<timestamp>(\d+)</timestamp>", repomd)]
    hashes = "".join(
        f'<hash type="{name}">{hashlib.new(name, repomd).hexdigest()}</hash>'
        for name in ("md5", "sha1", "sha256", "sha512")
    )
    scheme = urllib.parse.urlsplit(url).scheme
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<metalink version="3.0" xmlns="http://www.metalinker.org/" type="dynamic" '
        'generator="mirrormanager" xmlns:mm0="http://fedorahosted.org/mirrormanager">\n'
        ' <files>\n  <file name="repomd.xml">\n'
        f"   <mm0:timestamp>{max(stamps, default=0)}</mm0:timestamp>\n"
        f"   <size>{len(repomd)}</size>\n"
        f"   <verification>{hashes}</verification>\n"
        '   <resources maxconnections="1">\n'
        f'    <url protocol="{scheme}" type="{scheme}" location="US" preference="100">'
        f"{url}</url>\n"
        "   </resources>\n  </file>\n </files>\n</metalink>\n"
    ).encode()
