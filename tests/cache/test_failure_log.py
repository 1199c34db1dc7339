"""Every client-visible failure of the registry cache is one log line naming the request
and the reason: the access log's `request` event carries method, path, upstream, status,
OCI error code and message.

Fails before the fix (issue 9): there was no access log, 7 of 10 such failures wrote no
line at all and one wrote a traceback that did not name the request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest

from tests.support.registry_fixtures import StartCache
from tests.support.registry_liar import LOGIN_PAGE, LyingRegistry, digest_of, real_size_manifest
from tests.support.registry_peers import OCI_MANIFEST

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
async def liar() -> AsyncIterator[LyingRegistry]:
    async with LyingRegistry() as server:
        yield server


async def test_each_failure_class_is_one_line_with_request_and_reason(
    tmp_path: Path, liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    liar.add_manifest("ci/app", "v1", real_size_manifest(6 << 10)[0], OCI_MANIFEST)
    liar.add_manifest("ci/app", "portal", LOGIN_PAGE, "text/html")
    liar.digest_header = False
    wrong = os.urandom(20_000)
    claimed = digest_of(b"what the upstream should have sent")
    liar.blobs[claimed] = wrong
    users = tmp_path / "htpasswd"
    users.write_text(f"dev:{bcrypt.hashpw(b'devpw', bcrypt.gensalt(6)).decode()}\n")
    config = {
        "upstreams": [{"url": liar.url}, {"name": "down.example", "url": "http://127.0.0.1:9"}],
        "timeouts": {"connect": 1},
        "clients": {"htpasswd": str(users), "grants": [{"users": ["dev"]}]},
    }
    cache = start_cache(config=config)
    bad_password = {"Authorization": "Basic " + base64.b64encode(b"dev:wrong").decode()}
    cases = [
        ("GET", "/v2/ci/app/manifests/nosuchtag", {}, 404, "MANIFEST_UNKNOWN", "manifest unknown"),
        ("GET", "/v2/ci/nosuch/tags/list", {}, 404, "NAME_UNKNOWN", "repository unknown"),
        ("GET", "/v2/Bad/manifests/v1", {}, 400, "NAME_INVALID", "invalid repository name"),
        ("GET", "/v2/ci/app/manifests/v1", bad_password, 401, "UNAUTHORIZED", "invalid password"),
        ("GET", "/v2/ci/app/manifests/portal", {}, 502, "MANIFEST_INVALID", "not JSON"),
        ("GET", "/v2/ci/app/manifests/v1?ns=down.example", {}, 503, "UNAVAILABLE", "down.example"),
        ("GET", "/v2/ci/app/manifests/v1?ns=nope.example", {}, 404, "NAME_UNKNOWN", "nope.example"),
        ("PUT", "/v2/ci/app/manifests/v1", {}, 405, "UNSUPPORTED", "pull-through cache"),
        # Wrong bytes for a digest: a 502, or a 200 cut short when the stream had begun.
        ("GET", f"/v2/ci/app/blobs/{claimed}", {}, 0, "DIGEST_INVALID", "does not match"),
    ]
    for number, (method, path, headers, status, code, reason) in enumerate(cases):
        async with http.request(method, cache.url + path, headers=headers) as response:
            assert response.status == status or (status == 0 and response.status in (200, 502))
            try:
                await response.read()
            except aiohttp.ClientPayloadError:
                assert status == 0  # the blob stream is cut short, as it must be
            cases[number] = (method, path, headers, response.status, code, reason)
    liar.fail = (429, {"Retry-After": "20"})
    path = "/v2/ci/limited/manifests/v1"
    async with http.get(cache.url + path) as response:
        assert response.status == 429
    cases.append(("GET", path, {}, 429, "TOOMANYREQUESTS", "HTTP 429"))

    for method, path, _, status, code, reason in cases:
        lines = cache.wait_log(f'"method": "{method}", "path": {json.dumps(path)}')
        assert len(lines) == 1, (path, lines)
        line = json.loads(lines[0])
        assert (line["method"], line["status"], line["error_code"]) == (method, status, code)
        assert reason in line["error"], line
        assert line["level"] == "warning"
        assert line["client"] == "127.0.0.1"
    # The successful requests are logged too, at info, with what the cache did.
    assert cache.stop() == 0
    assert "Traceback" not in cache.logs()


async def _raw_request(port: int, request: bytes) -> bytes:
    """Send bytes no well-behaved client library would send; the status line answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.readline()
    finally:
        writer.close()


async def test_client_credentials_the_cache_cannot_check(
    tmp_path: Path, liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: non-ASCII Basic credentials and a password longer than 72 bytes
    (bcrypt 5 refuses to check those) each gave a 500 and a traceback."""
    body, _ = real_size_manifest(6 << 10)
    liar.add_manifest("ci/app", "v1", body, OCI_MANIFEST)
    long_password = b"p" * 72 + b"-and-beyond"
    users = tmp_path / "htpasswd"
    # As `htpasswd -B` makes it: bcrypt only ever looks at the first 72 bytes.
    users.write_text(f"dev:{bcrypt.hashpw(long_password[:72], bcrypt.gensalt(6)).decode()}\n")
    config = {
        "upstreams": [{"url": liar.url}],
        "clients": {"htpasswd": str(users), "grants": [{"users": ["dev"]}], "require_auth": True},
    }
    cache = start_cache(config=config)
    path = "/v2/ci/app/manifests/v1"
    status = await _raw_request(
        cache.port,
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ".encode()
        + "dév:pw".encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status.startswith(b"HTTP/1.1 401"), status
    lines = cache.wait_log(f'"path": "{path}"', '"status": 401')
    assert len(lines) == 1 and "malformed Basic credentials" in lines[0], lines
    credentials = base64.b64encode(b"dev:" + long_password).decode()
    async with http.get(cache.url + path, headers={"Authorization": f"Basic {credentials}"}) as r:
        assert r.status == 200
        assert await r.read() == body
    assert "Traceback" not in cache.logs()


async def test_requests_aiohttp_cannot_parse_are_one_line_each(
    liar: LyingRegistry, start_cache: StartCache
) -> None:
    """Fails before the fix: aiohttp's own logger wrote `Error handling request` with a
    traceback, as plain text beside the JSON lines, and the access line had no reason."""
    cache = start_cache(liar.url)
    garbage = {
        "Got more than 8190 bytes": b"GET /v2/" + b"a/" * 5000 + b"manifests/v1 HTTP/1.1\r\n\r\n",
        "Invalid header token": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y\r\n\r\n",
        "Content-Length": b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    }
    for request in garbage.values():
        status = await _raw_request(cache.port, request)
        assert status.split(b" ")[1] == b"400", status
    for reason in garbage:
        lines = cache.wait_log('"status": 400', reason)
        assert len(lines) == 1, (reason, cache.logs())
        assert json.loads(lines[0])["level"] == "warning"
    assert cache.stop() == 0
    for line in cache.logs().splitlines():
        json.loads(line)  # every line is a structlog event: nothing beside them


async def test_access_log_bytes_count_the_blob_sent_from_the_store(
    liar: LyingRegistry, start_cache: StartCache, http: aiohttp.ClientSession
) -> None:
    """Fails before the fix: a hit goes out with sendfile, which aiohttp does not count, so
    a 3 MiB blob served from the store was logged as a few hundred bytes (its headers)."""
    blob = os.urandom(3 << 20)
    digest = digest_of(blob)
    liar.blobs[digest] = blob
    cache = start_cache(liar.url)
    path = f"/v2/ci/app/blobs/{digest}"
    for _ in range(2):  # a miss (streamed as it downloads), then a hit (sendfile)
        async with http.get(cache.url + path) as response:
            assert await response.read() == blob
    async with http.get(cache.url + path, headers={"Range": "bytes=100-1099"}) as response:
        assert response.status == 206 and len(await response.read()) == 1000
    lines = [json.loads(line) for line in cache.wait_log(f'"path": "{path}"', '"status": 206')]
    assert len(lines) == 1 and 1000 <= lines[0]["bytes"] < 2000
    lines = [json.loads(line) for line in cache.wait_log(f'"path": "{path}"', '"status": 200')]
    assert [line["cache"] for line in lines] == ["miss", "hit"]
    for line in lines:
        assert len(blob) <= line["bytes"] < len(blob) + 1000, line  # the body and headers
