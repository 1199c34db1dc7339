"""A lying upstream registry for the cache's tests: an aiohttp server on loopback.

It serves the manifests and blobs it is given under the distribution API paths, and on
request misbehaves the way real upstreams and middleboxes do:

- `chunk`: bodies go out in many small writes (`chunk` bytes each, a pause between);
- `digest_header=False`: no `Docker-Content-Digest` (allowed for by-tag answers);
- `html`: references answered `200 text/html` with a login page (a captive portal);
- `length_delta`: Content-Length off by this many bytes (positive: the body is short
  and the connection closes; negative: the body is cut to the declared length);
- `stall`: seconds of silence before the answer (HEAD and GET alike); with
  `stall_after`, the silence comes after that many bytes of the body instead;
- `fail`: (status, headers) for every `/v2/<name>/...` request, e.g. 429 + Retry-After;
- `token`: None (no auth), "ok" (Bearer tokens from /token), "html" (the token server
  answers a login page) or "hang" (the token server never answers); `token_body`: the
  token server's exact answer instead;
- `private`: repositories served only with a token fetched with credentials (as Docker
  Hub's private repositories): an anonymous token gets 401 there;
- `hold`: path suffix -> event; such requests are recorded, then answered once it is set
  (`holding` is set while one waits).

`tags` (repository -> tag list) answers `tags/list`.

Every request is recorded in `requests` as (method, path), token requests too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.support.ports import free_port
from tests.support.registry_peers import OCI_INDEX, OCI_MANIFEST

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LOGIN_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Wi-Fi login</body></html>"
)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}


def real_size_manifest(size: int, layers: int = 12) -> tuple[bytes, dict[str, bytes]]:
    """An OCI image manifest of about `size` bytes (layers plus annotations, as real
    many-layer images and build tools make them) and its blobs."""
    blobs = {}
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(8).hex()})
    blobs[digest_of(config.encode())] = config.encode()
    layer_descriptors = []
    for _ in range(layers):
        layer = os.urandom(512)
        blobs[digest_of(layer)] = layer
        layer_descriptors.append(_descriptor(OCI_LAYER, layer))
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor(OCI_CONFIG, config.encode()),
        "layers": layer_descriptors,
        "annotations": {},
    }
    filler = 0
    while len(json.dumps(document)) < size:
        document["annotations"][f"org.example.build.step{filler}"] = os.urandom(48).hex()
        filler += 1
    return json.dumps(document).encode(), blobs


def real_size_index(manifests: list[bytes], size: int = 0) -> bytes:
    """An OCI index over `manifests` (one platform each), padded to about `size` bytes."""
    arches = ["amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64", "mips64le"]
    entries = []
    for number, manifest in enumerate(manifests):
        entry = _descriptor(OCI_MANIFEST, manifest)
        entry["platform"] = {"os": "linux", "architecture": arches[number % len(arches)]}
        if number >= len(arches):
            entry["platform"]["variant"] = f"v{number}"
        entries.append(entry)
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    filler = 0
    while len(json.dumps(document)) < size:
        document.setdefault("annotations", {})[f"org.example.attestation{filler}"] = os.urandom(
            48
        ).hex()
        filler += 1
    return json.dumps(document).encode()


@dataclass
class LyingRegistry:
    # reference (tag or digest) -> (body, media type), per repository name
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    chunk: int | None = None
    digest_header: bool = True
    html: set[str] = field(default_factory=set)
    length_delta: int = 0
    stall: float = 0.0
    stall_after: int | None = None
    fail: tuple[int, dict[str, str]] | None = None
    token: str | None = None
    token_body: bytes | None = None
    private: set[str] = field(default_factory=set)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    tags: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    runner: web.AppRunner | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_manifest(self, name: str, tag: str, body: bytes, media_type: str) -> str:
        digest = digest_of(body)
        self.manifests[(name, tag)] = (body, media_type)
        self.manifests[(name, digest)] = (body, media_type)
        return digest

    def upstream_requests(self, kind: str = "/manifests/") -> list[tuple[str, str]]:
        return [(method, path) for method, path in self.requests if kind in path]

    async def start(self) -> LyingRegistry:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_route("*", "/v2/{tail:.*}", self._v2)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self.stopping.set()  # hanging handlers end, so the runner's cleanup need not wait
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> LyingRegistry:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        if self.token_body is not None:
            return web.Response(body=self.token_body, content_type="application/json")
        if self.token == "html":
            return web.Response(body=LOGIN_PAGE, content_type="text/html")
        if self.token == "hang":
            await self.stopping.wait()
        # With credentials the token opens private repositories too.
        token = "t0k" if "Authorization" in request.headers else "anon"
        return web.json_response({"token": token, "expires_in": 300})

    async def _v2(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        tail = request.match_info["tail"]
        name, _, rest = tail.rpartition("/")
        name, _, kind = name.rpartition("/")
        accepted = {"Bearer t0k"} if name in self.private else {"Bearer t0k", "Bearer anon"}
        if self.token is not None and request.headers.get("Authorization") not in accepted:
            challenge = f'Bearer realm="{self.url}/token",service="liar"'
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        for suffix, release in self.hold.items():
            if request.path.endswith(suffix):
                self.holding.set()
                await release.wait()
        if not tail:
            return web.json_response({})
        if self.fail is not None:
            status, headers = self.fail
            return web.json_response(
                {"errors": [{"code": "TOOMANYREQUESTS"}]}, status=status, headers=headers
            )
        if kind == "tags" and rest == "list" and name in self.tags:
            listing = json.dumps({"name": name, "tags": self.tags[name]}).encode()
            return await self._send(request, listing, "application/json", None)
        if kind == "manifests":
            if rest in self.html:
                return await self._send(request, LOGIN_PAGE, "text/html", None)
            found = self.manifests.get((name, rest))
            if found is None:
                return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
            body, media_type = found
            return await self._send(request, body, media_type, digest_of(body))
        if kind == "blobs" and rest in self.blobs:
            return await self._send(request, self.blobs[rest], "application/octet-stream", rest)
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)

    async def _silence(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.stall)

    async def _send(
        self, request: web.Request, body: bytes, media_type: str, digest: str | None
    ) -> web.StreamResponse:
        headers = {"Content-Type": media_type}
        if digest is not None and self.digest_header:
            headers["Docker-Content-Digest"] = digest
        if self.stall and self.stall_after is None:
            await self._silence()
        response = web.StreamResponse(headers=headers)
        response.content_length = len(body) + self.length_delta
        with contextlib.suppress(ConnectionResetError):  # the cache may have hung up
            await response.prepare(request)
        if request.method == "HEAD" or request.transport is None or request.transport.is_closing():
            return response
        step = self.chunk or len(body)
        with contextlib.suppress(ConnectionResetError):  # the cache may hang up first
            if self.stall_after is not None:
                await response.write(body[: self.stall_after])
                await self._silence()
                body = body[self.stall_after :]
            for start in range(0, len(body), step):
                await response.write(body[start : start + step])
                if self.chunk:
                    await asyncio.sleep(0.002)  # each piece its own TCP segment
        if self.length_delta > 0:  # promised more than it sends: hang up
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write_eof()
        return response
