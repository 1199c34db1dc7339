"""The admin HTTP listener each daemon runs beside its service port.

Owns `/metrics` (Prometheus exposition of the daemon's own collectors), `/healthz`
(the process answers), `/readyz` (the daemon's `ready()` says it can do its job), and
the daemon's read-only JSON endpoints (`/status`, DNS's `/explain`: `JsonEndpoint`s, what
`dnsoverride status` and `explain --live` read). It is a separate listener so that
metrics and state never share a port, an ACL or a TLS setup with DNS or registry clients.

A small HTTP/1.1 server on asyncio streams rather than aiohttp.web: a few GET routes do
not need a web framework, and aiohttp's server is 12 MB of an otherwise 34 MB idle
`serve` (issue 13). The standard library's http.server is thread-based, and the
collectors must run on the loop thread that mutates what they read. What it accepts:
GET and HEAD (405 otherwise), no request bodies (400), a request head of at most
`MAX_HEAD` bytes (431) read within `REQUEST_TIMEOUT` seconds, keep-alive as HTTP/1.1
asks, at most `MAX_CONNECTIONS` clients at once. A JSON endpoint gets the query string's
parameters decoded (the first of a repeated one; bytes that are not UTF-8 replaced, never
an error of their own); the ValueError it raises is the client's mistake, a 400 with
`{"error": ...}`; anything else it raises is logged and a 500.

Actions (the cache's purge and warm trigger: `Action`s) change what the daemon holds, so
they are answered to POST only, and only on a listener nobody else can reach: the unix
control socket (`listen_unix`: mode 0660, group `dnsoverride` when that group exists,
else the daemon's, like unbound-control's) or a TCP listener bound to a loopback address.
On a listener bound to any other address an action is refused (403) and logged
(`admin_action_refused`), whoever asks: a wildcard listener is reachable from the network.
So is a local read (`local_reads`: GET, such as the cache's `/contents`), which lists
what the daemon holds, private repositories' names included; a path that is both a local
read and an endpoint (the cache's `/status`) gets the endpoint's answer elsewhere (the
cache's has those names withheld) instead of a refusal, and /metrics there is read from
`public_registry` when one is given (the cache's labels no warm entry by its image).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import ipaddress
import json
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dnsoverride.common.errors import UserError, listen_error
from dnsoverride.common.listen import bound_socket, is_ip_address
from dnsoverride.common.metrics import content_type, exposition, load_exposition

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)

MAX_HEAD = 8192
REQUEST_TIMEOUT = 10.0  # seconds for a request head, and for a response to be read
MAX_CONNECTIONS = 64
MAX_PARAMETERS = 32  # in one query string: no endpoint takes more than a few
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_FIXED = frozenset({"/metrics", "/healthz", "/readyz"})

# A read-only JSON endpoint: the request's query parameters -> a JSON-able value, awaited
# (a supervisor asks its workers). ValueError is the caller's mistake (400, its message
# as `error`).
JsonEndpoint = Callable[[Mapping[str, str]], Awaitable[object]]
# A mutating action: the same shape, answered to POST on a local listener only.
Action = JsonEndpoint
SOCKET_MODE = 0o660
SOCKET_GROUP = "dnsoverride"


def is_loopback(host: str) -> bool:
    """Whether a listener bound to `host` can only be reached from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Reply:
    """A response before framing."""

    def __init__(self, status: int, body: bytes, content_type: str = _TEXT) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type


class AdminServer:
    """A running admin listener; `close()` stops it and its connections."""

    def __init__(
        self,
        registry: Collector,
        ready: Callable[[], bool],
        why_not_ready: Callable[[], str | None] | None,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
        endpoints: Mapping[str, JsonEndpoint] | None = None,
        *,
        actions: Mapping[str, Action] | None = None,
        local_reads: Mapping[str, JsonEndpoint] | None = None,
        public_registry: Collector | None = None,
    ) -> None:
        self._registry = registry
        self._public_registry = public_registry or registry
        self._ready = ready
        self._why_not_ready = why_not_ready
        self._before_scrape = before_scrape
        self._endpoints = dict(endpoints or {})
        self._actions = dict(actions or {})
        self._local_reads = dict(local_reads or {})
        self._server: asyncio.Server | None = None
        self._unix: asyncio.Server | None = None
        self._unix_path: Path | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound TCP port (useful when started with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def listen(self, host: str, port: int) -> None:
        """Bind host:port and accept clients; OSError when it cannot be bound. Actions are
        answered there only when `host` is a loopback address."""
        serve = functools.partial(self.serve, local=is_loopback(host))
        if not is_ip_address(host):  # a name (localhost): the loop binds each of its addresses
            self._server = await asyncio.start_server(serve, host, port, limit=MAX_HEAD)
            return
        sock = bound_socket(host, port, socket.SOCK_STREAM)  # no lookup: common/listen.py
        try:
            self._server = await asyncio.start_server(serve, sock=sock, limit=MAX_HEAD)
        except OSError:
            sock.close()
            raise

    async def listen_unix(self, path: Path) -> None:
        """Accept clients on the unix socket `path` (mode 0660, group `dnsoverride` if it
        exists, else the process's); a stale socket file there is replaced, a live one
        (another daemon's) is OSError EADDRINUSE, as is anything that is not a socket."""
        _make_directory(path.parent)
        _refuse_shared_directory(path.parent)
        _remove_stale_socket(path)
        serve = functools.partial(self.serve, local=True)
        # Not listening until its mode is set: the file is made with the umask's mode, and
        # a connection accepted meanwhile would outlive the chmod.
        self._unix = await asyncio.start_unix_server(
            serve, path, limit=MAX_HEAD, start_serving=False
        )
        self._unix_path = path
        try:
            group = grp.getgrnam(SOCKET_GROUP).gr_gid
        except KeyError:
            group = os.getegid()
        with contextlib.suppress(PermissionError):  # not root: the process's group it is
            os.chown(path, -1, group)
        os.chmod(path, SOCKET_MODE)
        await self._unix.start_serving()

    async def close(self) -> None:
        for server in (self._server, self._unix):
            if server is not None:
                server.close()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
        for writer in list(self._clients):
            writer.close()
        # Their handlers end on the close (bounded): a handler task still waiting when the
        # loop shuts down is cancelled, and Python 3.11's start_server then logs a
        # traceback for it.
        if self._handlers:
            await asyncio.wait(set(self._handlers), timeout=REQUEST_TIMEOUT)
        for server in (self._server, self._unix):
            if server is not None:
                await server.wait_closed()

    async def _route(self, method: str, target: str, local: bool, peer: str) -> _Reply:
        path, _, query = target.partition("?")
        local_only = self._actions.get(path) or self._local_reads.get(path)
        if local_only is not None and not local and path in self._endpoints:
            local_only = None  # a read with a version for every listener (names withheld)
        if local_only is not None:
            allowed = ("POST",) if path in self._actions else ("GET", "HEAD")
            if method not in allowed:
                return _Reply(HTTPStatus.METHOD_NOT_ALLOWED, " or ".join(allowed).encode() + b"\n")
            if not local:
                what = "actions" if path in self._actions else "the daemon's contents"
                refusal = (
                    f"{what} are answered on the control socket or a loopback admin listener only"
                )
                log.warning(
                    "admin_action_refused", request=f"{method} {path}", client=peer, reason=refusal
                )
                return _json_reply({"error": refusal}, HTTPStatus.FORBIDDEN)
            return await _answer_json(path, local_only, query)
        if path not in _FIXED and path not in self._endpoints:
            return _Reply(HTTPStatus.NOT_FOUND, b"not found\n")
        if method not in {"GET", "HEAD"}:
            return _Reply(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n")
        endpoint = self._endpoints.get(path)
        if endpoint is not None:
            return await _answer_json(path, endpoint, query)
        if path == "/metrics":
            await load_exposition()  # the first scrape's import, off the loop's thread
            if self._before_scrape is not None:
                await self._before_scrape()
            registry = self._registry if local else self._public_registry
            return _Reply(HTTPStatus.OK, exposition(registry), content_type())
        if path == "/healthz":
            return _Reply(HTTPStatus.OK, b"ok\n")
        if self._ready():
            return _Reply(HTTPStatus.OK, b"ready\n")
        reason = self._why_not_ready() if self._why_not_ready is not None else None
        text = f"not ready: {reason}\n" if reason else "not ready\n"
        return _Reply(HTTPStatus.SERVICE_UNAVAILABLE, text.encode())

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, local: bool = False
    ) -> None:
        """One client connection: requests answered in turn until it closes or idles;
        `local`: it came through a listener only this machine reaches (actions allowed)."""
        if len(self._clients) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._clients.add(writer)
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            while await self._exchange(reader, writer, local):
                pass
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass  # the client left, stalled or idled: nothing to answer
        finally:
            self._clients.discard(writer)
            self._handlers.discard(handler)
            writer.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: bool
    ) -> bool:
        """Read one request, write its response; whether the connection stays open."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await _send(writer, _Reply(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b""), "HEAD")
            return False
        request_line, *lines = head.decode("latin-1").split("\r\n")
        parts = request_line.split(" ")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[2] not in {"HTTP/1.0", "HTTP/1.1"}:
            await _send(writer, _Reply(HTTPStatus.BAD_REQUEST, b"bad request line\n"), "GET")
            return False
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            await _send(writer, _Reply(HTTPStatus.BAD_REQUEST, b"no request bodies\n"), "GET")
            return False
        method, target, version = parts
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix socket"
        reply = await self._route(method, target, local, client)
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        await _send(writer, reply, method, keep=keep)
        return keep


async def _answer_json(path: str, endpoint: JsonEndpoint, query: str) -> _Reply:
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_PARAMETERS)
    except ValueError:  # more fields than that
        return _json_reply({"error": "too many query parameters"}, HTTPStatus.BAD_REQUEST)
    parameters: dict[str, str] = {}
    for key, value in pairs:
        parameters.setdefault(key, value)
    try:
        body = await endpoint(parameters)
    except ValueError as error:
        return _json_reply({"error": str(error)}, HTTPStatus.BAD_REQUEST)
    except Exception as error:  # a bug of ours, not the client's: said once, served on
        log.exception("admin_endpoint_failed", path=path, error=str(error))
        return _json_reply({"error": "internal error, see the daemon's log"}, 500)
    return _json_reply(body, HTTPStatus.OK)


def _json_reply(body: object, status: int) -> _Reply:
    return _Reply(status, (json.dumps(body, indent=1) + "\n").encode(), _JSON)


async def _send(
    writer: asyncio.StreamWriter, reply: _Reply, method: str, *, keep: bool = False
) -> None:
    status = HTTPStatus(reply.status)
    head = (
        f"HTTP/1.1 {status.value} {status.phrase}\r\n"
        f"Content-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n"
    )
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        head += f"Allow: {reply.body.decode().strip().replace(' or ', ', ')}\r\n"
    writer.write(head.encode() + b"\r\n" + (b"" if method == "HEAD" else reply.body))
    async with asyncio.timeout(REQUEST_TIMEOUT):  # a client that does not read is dropped
        await writer.drain()


def _make_directory(directory: Path) -> None:
    """`directory` and its missing parents, mode 0755: the umask narrows mkdir's mode,
    never widens it, and the default 0777 under a umask of 0 would be every user's."""
    for missing in reversed([directory, *directory.parents]):
        if not missing.exists():
            missing.mkdir(mode=0o755, exist_ok=True)


def _refuse_shared_directory(directory: Path) -> None:
    """Refuse a place where another user could put their own socket first, or replace
    ours, so that `cache purge` would talk to them: a directory every user may write to
    (/tmp, /var/tmp), or a directory, symlink or ancestor of another user (not root, not
    the daemon's), or an ancestor every user may write to without the sticky bit (they
    could rename the directory away). A group-writable directory is allowed: its group
    is trusted as the socket's group is."""
    trusted = {0, os.geteuid()}
    absolute, real = Path(os.path.abspath(directory)), directory.resolve()
    for path in [*reversed(absolute.parents), absolute, *reversed(real.parents), real]:
        info = path.lstat()
        if info.st_uid not in trusted:
            raise OSError(errno.EPERM, f"{path} belongs to another user (uid {info.st_uid})")
        shared = info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX
        if stat.S_ISDIR(info.st_mode) and shared:
            raise OSError(errno.EPERM, f"{path} is writable by every user")
    if directory.stat().st_mode & stat.S_IWOTH:
        raise OSError(
            errno.EPERM,
            f"{directory} is writable by every user: use a directory of the daemon's own "
            "(the packaged /run/dnsoverride)",
        )


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file no daemon listens on any more (left by a SIGKILL)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(98, f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
    raise OSError(98, f"another process listens on {path}")


async def start_admin(
    host: str | None,
    port: int,
    registry: Collector,
    ready: Callable[[], bool],
    why_not_ready: Callable[[], str | None] | None = None,
    *,
    before_scrape: Callable[[], Awaitable[None]] | None = None,
    endpoints: Mapping[str, JsonEndpoint] | None = None,
    actions: Mapping[str, Action] | None = None,
    local_reads: Mapping[str, JsonEndpoint] | None = None,
    public_registry: Collector | None = None,
    unix: Path | None = None,
) -> AdminServer:
    """Serve /metrics, /healthz and /readyz on host:port (None: no TCP listener) and on the
    unix socket `unix` (when given) until `close()`.

    `why_not_ready`, when given, puts the reason into the body of a 503 from /readyz;
    `before_scrape` is awaited before each /metrics answer; `endpoints` adds read-only
    JSON endpoints by path, `actions` mutating ones (POST, local listeners only),
    `local_reads` read-only ones answered on local listeners only; `public_registry`,
    when given, is what /metrics serves on a listener others reach (names withheld).
    Scrapes are not logged (every few seconds, they would drown the daemon's own events).

    Raises UserError when an address cannot be bound (port in use, bad host, a socket path
    in use or not writable).
    """
    server = AdminServer(
        registry,
        ready,
        why_not_ready,
        before_scrape,
        endpoints,
        actions=actions,
        local_reads=local_reads,
        public_registry=public_registry,
    )
    if host is not None:
        try:
            await server.listen(host, port)
        except OSError as error:
            raise listen_error(f"admin listener {host}:{port}", port, error) from error
        log.info("admin_listening", host=host, port=server.port)
    if unix is not None:
        try:
            await server.listen_unix(unix)
        except OSError as error:
            await server.close()
            raise UserError(
                f"control socket {unix}: {error.strerror or error} "
                "(set control_socket: to a path the daemon may create)"
            ) from error
        log.info("admin_listening", socket=str(unix))
    return server
