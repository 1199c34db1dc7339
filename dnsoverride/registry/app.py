"""The HTTP face of the cache: aiohttp routes of the pull side of the distribution API.

Requests are routed to an upstream by containerd's `?ns=` parameter, else by the Host
header (the names the DNS overrides point here), else to the default upstream (mirror
mode). Every name, reference and digest is validated before use; every failure is an
OCI error JSON. Push and delete endpoints answer 405 UNSUPPORTED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import structlog
from aiohttp import web

from dnsoverride.registry.blobs import Blobs
from dnsoverride.registry.errors import RegistryError
from dnsoverride.registry.manifests import Manifest, Manifests
from dnsoverride.registry.names import is_digest, parse_digest, parse_name, parse_tag
from dnsoverride.registry.stats import Stats
from dnsoverride.registry.upstream import Upstream

log = structlog.get_logger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_READ_METHODS = frozenset({"GET", "HEAD"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATS_KEY = web.AppKey("stats", Stats)


class Routes:
    """Request handlers over the cache's components."""

    def __init__(
        self,
        upstreams: dict[str, Upstream],
        default: str,
        manifests: Manifests,
        blobs: Blobs,
        stats: Stats,
    ) -> None:
        self.by_host: dict[str, Upstream] = {}
        for upstream in upstreams.values():
            for host in upstream.config.hosts:
                self.by_host[host.lower()] = upstream
        self.default = upstreams[default]
        self.manifests = manifests
        self.blobs = blobs
        self.stats = stats

    def upstream_for(self, request: web.Request) -> Upstream:
        ns = request.query.get("ns")
        if ns is not None:
            upstream = self.by_host.get(ns.lower())
            if upstream is None:
                raise RegistryError("NAME_UNKNOWN", f"no upstream configured for ns={ns[:100]!r}")
            return upstream
        host = (request.host or "").lower()
        upstream = self.by_host.get(host) or self.by_host.get(host.rsplit(":", 1)[0])
        return upstream or self.default

    async def v2(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"].lstrip("/")
        if not tail:
            return web.json_response({}, headers=API_VERSION)
        parts = tail.split("/")
        if "uploads" in parts or request.method not in _READ_METHODS:
            raise RegistryError(
                "UNSUPPORTED", "this is a pull-through cache: push and delete are not supported"
            )
        if len(parts) >= 3 and parts[-2] == "manifests":
            return await self.manifest(request, "/".join(parts[:-2]), parts[-1])
        if len(parts) >= 3 and parts[-2] == "blobs":
            return await self.blob(request, "/".join(parts[:-2]), parts[-1])
        if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
            return await self.tags(request, "/".join(parts[:-2]))
        raise RegistryError("UNSUPPORTED", f"unsupported endpoint /v2/{tail[:200]}", status=404)

    async def manifest(self, request: web.Request, raw_name: str, reference: str) -> web.Response:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        manifest: Manifest
        if is_digest(reference):
            manifest = await self.manifests.by_digest(upstream, name, parse_digest(reference))
        else:
            manifest = await self.manifests.by_tag(upstream, name, parse_tag(reference))
        accept = [
            item.split(";")[0].strip()
            for value in request.headers.getall("Accept", [])
            for item in value.split(",")
            if item.strip()
        ]
        replacement = self.manifests.negotiate(manifest, accept)
        if replacement is not None:
            manifest = await self.manifests.by_digest(upstream, name, parse_digest(replacement))
        etag = f'"{manifest.digest}"'
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": manifest.digest,
            "ETag": etag,
            "Content-Type": manifest.media_type,
        }
        if _matches(request.headers.getall("If-None-Match", []), etag):
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(manifest.data))
            return web.Response(headers=headers)
        return web.Response(body=manifest.data, headers=headers)

    async def blob(self, request: web.Request, raw_name: str, reference: str) -> web.StreamResponse:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        return await self.blobs.serve(request, upstream, name, parse_digest(reference))

    async def tags(self, request: web.Request, raw_name: str) -> web.Response:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        query = urlencode([(k, v) for k, v in request.query.items() if k in ("n", "last")])
        path = "tags/list" + (f"?{query}" if query else "")
        response = await upstream.call("GET", name, path)
        try:
            if response.status == 404:
                raise RegistryError("NAME_UNKNOWN", f"repository unknown: {name}")
            body = await response.read()
            # Pagination: the next page is a path on this same API, so it is passed as is.
            link = response.headers.get("Link")
        finally:
            response.release()
        headers = {**API_VERSION, **({"Link": link} if link else {})}
        return web.Response(body=body, content_type="application/json", headers=headers)


def _matches(if_none_match: list[str], etag: str) -> bool:
    """Whether an If-None-Match header names `etag` (or `*`); weak tags compare equal."""
    tags = {tag.strip().removeprefix("W/") for value in if_none_match for tag in value.split(",")}
    return "*" in tags or etag in tags


def _endpoint(path: str) -> str:
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    if path.endswith("/tags/list"):
        return "tags"
    return "base" if path.rstrip("/") == "/v2" else "other"


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    stats = request.app[STATS_KEY]
    head = request.method == "HEAD"
    try:
        response = await handler(request)
    except RegistryError as error:
        response = error.response(head)
    except web.HTTPException as error:
        response = RegistryError("UNSUPPORTED", error.reason, status=error.status).response(head)
    stats.requests[(_endpoint(request.path), response.status)] += 1
    return response


def build_app(routes: Routes, stats: Stats) -> web.Application:
    app = web.Application(middlewares=[_errors])
    app[STATS_KEY] = stats
    app.router.add_route("*", "/v2{tail:/.*|}", routes.v2)
    return app
