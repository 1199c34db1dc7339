"""dnsoverride.admin served over real TCP and read with a real HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from structlog.testing import capture_logs

from dnsoverride.common import admin as admin_module
from dnsoverride.common.admin import AdminServer, start_admin
from dnsoverride.common.errors import UserError
from tests.support.metrics import parse_samples


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def admin(
    registry: CollectorRegistry, readiness: Readiness
) -> AsyncIterator[tuple[AdminServer, aiohttp.ClientSession, str]]:
    server = await start_admin("127.0.0.1", 0, registry, readiness)
    try:
        async with aiohttp.ClientSession() as session:
            yield server, session, f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def test_metrics_expose_the_daemon_registry(
    admin: tuple[AdminServer, aiohttp.ClientSession, str], registry: CollectorRegistry
) -> None:
    _, session, base = admin
    # Declared without the suffix; prometheus-client exposes it as *_total.
    queries = Counter("dnsoverride_test_queries", "queries", ["view"], registry=registry)
    queries.labels(view="ci").inc(3)
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await response.text()
    samples = parse_samples(text)
    assert samples[("dnsoverride_test_queries_total", (("view", "ci"),))] == 3.0
    # Only the daemon's own registry: no default process/python collectors leak in.
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)

    queries.labels(view="ci").inc()
    async with session.get(f"{base}/metrics") as response:
        assert 'dnsoverride_test_queries_total{view="ci"} 4.0' in await response.text()


async def test_healthz_answers_while_not_ready(
    admin: tuple[AdminServer, aiohttp.ClientSession, str],
) -> None:
    _, session, base = admin
    async with session.get(f"{base}/healthz") as response:
        assert response.status == 200
        assert (await response.text()).strip() == "ok"


async def test_readyz_follows_the_ready_callback(
    admin: tuple[AdminServer, aiohttp.ClientSession, str], readiness: Readiness
) -> None:
    _, session, base = admin
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 503
    readiness.ready = True
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 200
    readiness.ready = False
    async with session.get(f"{base}/readyz") as response:
        assert response.status == 503


async def test_unknown_path_is_404(admin: tuple[AdminServer, aiohttp.ClientSession, str]) -> None:
    _, session, base = admin
    async with session.get(f"{base}/metricz") as response:
        assert response.status == 404


async def test_close_releases_the_port(registry: CollectorRegistry) -> None:
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    port = server.port
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz"),
        ):
            pass


async def test_port_in_use_is_a_user_error(registry: CollectorRegistry) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"127.0.0.1:{port}"):
            await start_admin("127.0.0.1", port, registry, lambda: True)


async def _raw(port: int, request: bytes) -> bytes:
    """Everything the listener sends back to `request` until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(1 << 20) + await reader.read()
    finally:
        writer.close()


async def test_hostile_requests_get_a_status_and_a_close(registry: CollectorRegistry) -> None:
    """Garbage, a request body, an oversized head, a method other than GET/HEAD: each
    gets its status line (never a hang, never a traceback) and the connection closes."""
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    try:
        port = server.port
        assert (await _raw(port, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        body = b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        assert (await _raw(port, body)).startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await _raw(port, huge)).startswith(b"HTTP/1.1 431 ")
        put = await _raw(port, b"PUT /readyz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert put.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in put
        head = await _raw(port, b"HEAD /healthz HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
    finally:
        await server.close()


async def test_keep_alive_serves_requests_in_turn(registry: CollectorRegistry) -> None:
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        for path in ("/healthz", "/readyz", "/metrics"):
            writer.write(f"GET {path}?x=1 HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: keep-alive" in head
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.close()
    finally:
        await server.close()


async def test_silent_clients_are_dropped_and_capped(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that idles (sends nothing more) is closed after the request timeout; past
    the connection cap a new client is closed at once, and answered again after."""
    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(admin_module, "MAX_CONNECTIONS", 3)
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    try:
        silent = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        for reader, writer in silent:  # each served once (so surely accepted), then idle
            writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 ")
        with contextlib.suppress(ConnectionResetError):  # closed unanswered (or reset)
            assert await _raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n") == b""
        for reader, _ in silent:
            async with asyncio.timeout(3):
                assert await reader.read() == b""  # closed by the server
        answer = await _raw(server.port, b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")
        for _, writer in silent:
            writer.close()
    finally:
        await server.close()


async def test_close_ends_the_handlers_of_open_keep_alive_connections(
    registry: CollectorRegistry,
) -> None:
    """A scraper's keep-alive connection open at shutdown: `close()` ends its handler (the
    client sees the close) instead of leaving it to be cancelled with the loop, which
    Python 3.11 logs as a traceback (seen in the registry's shutdown before the fix)."""
    server = await start_admin("127.0.0.1", 0, registry, lambda: True)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200 ")
    await server.close()
    handlers = [task for task in asyncio.all_tasks() if "AdminServer.serve" in repr(task)]
    assert handlers == []
    async with asyncio.timeout(3):
        assert await reader.read() == b""
    writer.close()


class Recorder:
    """A JSON endpoint that keeps the parameters it was called with and answers them,
    a 400 for `fail=client` and an error of ours for `fail=bug`."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []

    async def __call__(self, parameters: Mapping[str, str]) -> object:
        self.calls.append(dict(parameters))
        if parameters.get("fail") == "client":
            raise ValueError("not a DNS name: '..'")
        if parameters.get("fail") == "bug":
            raise KeyError("a bug")
        return {"got": dict(parameters)}


async def _json_get(port: int, target: str) -> tuple[int, object]:
    answer = await _raw(port, f"GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, head
    return int(head.split(b" ")[1]), json.loads(body)


async def test_json_endpoints_get_decoded_parameters_and_say_what_was_wrong(
    registry: CollectorRegistry,
) -> None:
    """The query string arrives decoded (percent escapes, `+`, the first of a repeated
    name, bytes that are not UTF-8 replaced); a ValueError is the client's 400 with its
    message; a bug of ours is a 500 and one log event, and the listener serves on."""
    endpoint = Recorder()
    server = await start_admin(
        "127.0.0.1", 0, registry, lambda: True, endpoints={"/explain": endpoint}
    )
    try:
        port = server.port
        status, body = await _json_get(port, "/explain?name=a%2Eb+c&type=AAAA&name=x&from=")
        assert status == 200
        assert body == {"got": {"name": "a.b c", "type": "AAAA", "from": ""}}
        status, body = await _json_get(port, "/explain?name=%ff%fe%zz")
        assert status == 200 and body == {"got": {"name": "\ufffd\ufffd%zz"}}
        assert await _json_get(port, "/explain?fail=client") == (
            400,
            {"error": "not a DNS name: '..'"},
        )
        many = "&".join(f"k{n}=v" for n in range(100))
        assert await _json_get(port, f"/explain?{many}") == (
            400,
            {"error": "too many query parameters"},
        )
        with capture_logs() as logs:
            status, body = await _json_get(port, "/explain?fail=bug")
        assert status == 500 and body == {"error": "internal error, see the daemon's log"}
        assert [(e["event"], e["path"]) for e in logs] == [("admin_endpoint_failed", "/explain")]
        head = await _raw(port, b"HEAD /explain?name=a HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")  # no body
        post = await _raw(port, b"POST /explain HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        assert (await _raw(port, b"GET /explainx HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.1 404 ")
        assert len(endpoint.calls) == 5  # the HEAD too; never the 405, 404, too many
    finally:
        await server.close()


async def test_actions_answer_post_on_the_unix_socket_and_loopback_only(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """Issue 14: actions (a cache's purge, warm) are POST only, on the control socket or a
    loopback listener; a wildcard listener refuses them (403, logged), whoever asks."""
    done: list[Mapping[str, str]] = []

    async def act(query: Mapping[str, str]) -> object:
        done.append(query)
        return {"did": query.get("what")}

    path = tmp_path / "run" / "admin.sock"
    local = await start_admin(
        "127.0.0.1", 0, registry, lambda: True, actions={"/act": act}, unix=path
    )
    wild = await start_admin("0.0.0.0", 0, registry, lambda: True, actions={"/act": act})
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660 and stat.S_ISSOCK(os.stat(path).st_mode)
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as over_socket:
            async with over_socket.post("http://localhost/act?what=purge") as response:
                assert response.status == 200 and await response.json() == {"did": "purge"}
            async with over_socket.get("http://localhost/act") as response:
                assert response.status == 405 and response.headers["Allow"] == "POST"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{local.port}/act?what=warm") as response:
                assert response.status == 200
            with capture_logs() as logs:
                async with session.post(f"http://127.0.0.1:{wild.port}/act?what=x") as response:
                    assert response.status == 403
                    assert "loopback" in (await response.json())["error"]
            async with session.post(f"http://127.0.0.1:{wild.port}/metrics") as response:
                assert response.status == 405  # not an action: read-only paths stay GET
        assert [q["what"] for q in done] == ["purge", "warm"]
        [refused] = [e for e in logs if e["event"] == "admin_action_refused"]
        assert refused["request"] == "POST /act" and refused["client"].startswith("127.0.0.1:")
    finally:
        await local.close()
        await wild.close()
    assert not path.exists()  # removed at close


async def test_a_stale_control_socket_is_replaced_and_a_live_one_refused(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: left by a killed daemon
    server = await start_admin(None, 0, registry, lambda: True, unix=path)
    try:
        with pytest.raises(UserError, match=f"control socket {path}: another process listens"):
            await start_admin(None, 0, registry, lambda: True, unix=path)
        assert path.exists()  # the live one's socket is left alone
    finally:
        await server.close()
    path.write_text("not a socket")
    with pytest.raises(UserError, match="exists and is not a socket"):
        await start_admin(None, 0, registry, lambda: True, unix=path)


async def test_a_control_socket_in_a_directory_every_user_may_write_is_refused(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """/tmp-like directories (mode 1777) are refused with the reason: another user could
    have their socket there first. Failed before: the socket was made in any directory."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(UserError, match=f"{shared} is writable by every user"):
        await start_admin(None, 0, registry, lambda: True, unix=shared / "admin.sock")
    assert not (shared / "admin.sock").exists()


async def test_local_reads_are_refused_off_loopback(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A read that lists what the daemon holds (the cache's `/contents`: every repository,
    tag and digest, private ones too) is answered on the control socket and a loopback
    listener only; a wildcard listener answers 403 and logs it, like an action. Failed on
    s14-ops: `/contents` was an ordinary endpoint, answered to anyone reaching the
    metrics port."""

    async def contents(query: Mapping[str, str]) -> object:
        return {"images": ["acme/private-app:v2"]}

    local = await start_admin("127.0.0.1", 0, registry, lambda: True, local_reads={"/c": contents})
    wild = await start_admin("0.0.0.0", 0, registry, lambda: True, local_reads={"/c": contents})
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{local.port}/c") as response:
                assert response.status == 200
                assert await response.json() == {"images": ["acme/private-app:v2"]}
            async with session.post(f"http://127.0.0.1:{local.port}/c") as response:
                assert response.status == 405
            with capture_logs() as logs:
                async with session.get(f"http://127.0.0.1:{wild.port}/c") as response:
                    assert response.status == 403
                    body = await response.text()
            assert "private-app" not in body and "loopback" in body
        [refused] = [e for e in logs if e["event"] == "admin_action_refused"]
        assert refused["request"] == "GET /c"
    finally:
        await local.close()
        await wild.close()


async def test_the_control_socket_listens_only_once_its_mode_is_set(
    registry: CollectorRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between creating the socket file (with the umask's mode: 0777 under umask 0) and
    setting 0660, nobody may connect: the socket listens only after its mode and group
    are set. Failed on s14-ops: it listened (and served) from creation, so a connection
    made in that window stayed open after the chmod, past the mode meant to keep it out."""
    path = tmp_path / "admin.sock"
    real_chmod = os.chmod
    connected: list[bool] = []

    def chmod(target: object, mode: int) -> None:
        with socket.socket(socket.AF_UNIX) as early:
            try:
                early.connect(str(target))
                connected.append(True)
            except ConnectionRefusedError:
                connected.append(False)
        real_chmod(target, mode)  # type: ignore[arg-type]

    monkeypatch.setattr("dnsoverride.common.admin.os.chmod", chmod)
    server = await start_admin(None, 0, registry, lambda: True, unix=path)
    try:
        assert connected == [False]
        with socket.socket(socket.AF_UNIX) as later:
            later.connect(str(path))  # and it does listen afterwards
    finally:
        await server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another user")
async def test_a_control_socket_where_another_user_may_replace_it_is_refused(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """A directory of another user (not world-writable, so the mode check alone passed
    it), or a symlink on the way that another user owns in a sticky directory (they may
    point it elsewhere): either lets that user put their own socket where `cache purge`
    connects. Failed before: both were accepted."""
    nobody = 65534
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, nobody, nobody)
    with pytest.raises(UserError, match=f"{theirs} belongs to another user"):
        await start_admin(None, 0, registry, lambda: True, unix=theirs / "admin.sock")
    ours, sticky = tmp_path / "ours", tmp_path / "sticky"
    ours.mkdir(mode=0o755)
    sticky.mkdir()
    sticky.chmod(0o1777)
    link = sticky / "link"
    link.symlink_to(ours)
    os.lchown(link, nobody, nobody)
    with pytest.raises(UserError, match=f"{link} belongs to another user"):
        await start_admin(None, 0, registry, lambda: True, unix=link / "admin.sock")
    assert list(ours.iterdir()) == []


async def test_the_control_socket_directory_the_daemon_makes_is_not_world_writable(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    """Under a umask of 0 the directory made for the socket is still 0755, not 0777 (which
    the daemon would then refuse as every user's). Failed before: mkdir took the
    umask's mode, 0777, and the start failed on its own directory."""
    made = tmp_path / "run" / "dnsoverride"
    old = os.umask(0)
    try:
        server = await start_admin(None, 0, registry, lambda: True, unix=made / "admin.sock")
    finally:
        os.umask(old)
    await server.close()
    assert stat.S_IMODE(made.stat().st_mode) == 0o755
