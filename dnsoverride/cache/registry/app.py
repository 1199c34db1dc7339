"""The registry's HTTP face: the pull side of the distribution API (`/v2/...`, `/token`),
as one handler that cache/app.py routes requests to.

Requests are routed to an upstream by containerd's `?ns=` parameter, else by the Host
header (the names the DNS overrides point here), else to the default upstream (mirror
mode). Every name, reference and digest is validated before use; every failure is an
OCI error JSON, logged once by the access log with its code and message. Only
`.../blobs/uploads/...` is the push API; push and delete answer 405 UNSUPPORTED.

Before anything is served, access.py decides whether this client may read this
repository, and whether stored content may be served under this (upstream, repository)
or has to be confirmed by that upstream first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

import structlog
from aiohttp import web

from dnsoverride.cache import accesslog
from dnsoverride.cache.accesslog import CACHE_KEY, ERROR_KEY, UPSTREAM_KEY, USER_KEY, remember
from dnsoverride.cache.registry.access import Access, Probe, challenge
from dnsoverride.cache.registry.blobs import Blobs
from dnsoverride.cache.registry.client_tokens import LIFETIME as TOKEN_LIFETIME
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.manifests import (
    INDEX_TYPES,
    Descriptor,
    Manifest,
    Manifests,
    acceptable,
)
from dnsoverride.cache.registry.names import is_digest, parse_digest, parse_name, parse_tag
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import (
    ACCEPT_MANIFESTS,
    Upstream,
    UpstreamDeniedError,
    UpstreamUnavailableError,
    as_registry_error,
    read_body,
)
from dnsoverride.cache.serving import content_etag, refusal
from dnsoverride.cache.store import Digest, Kind

log = structlog.get_logger(__name__)

API_VERSION = {"Docker-Distribution-API-Version": "registry/2.0"}
_READ_METHODS = frozenset({"GET", "HEAD"})
# A tag list is passed through, not parsed; this only bounds what one answer may cost.
MAX_TAG_LIST = 16 << 20
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The paths the registry answers (on any host no package route claims, cache/app.py).
PATHS = ("/v2", "/token")


def _is_push(parts: list[str]) -> bool:
    """`<name>/blobs/uploads/` and `<name>/blobs/uploads/<id>`: the push API, nothing else."""
    return parts[-2:] == ["blobs", "uploads"] or parts[-3:-1] == ["blobs", "uploads"]


class Routes:
    """Request handlers over the cache's components."""

    def __init__(
        self,
        upstreams: dict[str, Upstream],
        default: str,
        manifests: Manifests,
        blobs: Blobs,
        access: Access,
    ) -> None:
        self.by_host: dict[str, Upstream] = {}
        for upstream in upstreams.values():
            for host in upstream.config.hosts:
                self.by_host[host.lower()] = upstream
        self.default = upstreams[default]
        self.manifests = manifests
        self.blobs = blobs
        self.access = access

    def upstream_for(self, request: web.Request) -> Upstream:
        ns = request.query.get("ns")
        if ns is not None:
            upstream = self.by_host.get(ns.lower())
            if upstream is None:
                raise RegistryError("NAME_UNKNOWN", f"no upstream configured for ns={ns[:100]!r}")
        else:
            host = (request.host or "").lower()
            upstream = self.by_host.get(host) or self.by_host.get(host.rsplit(":", 1)[0])
            upstream = upstream or self.default
        remember(request, UPSTREAM_KEY, upstream.name)
        return upstream

    async def v2(self, request: web.Request) -> web.StreamResponse:
        tail = request.path.removeprefix("/v2").lstrip("/")
        if not tail:
            return await self.base(request)
        parts = tail.split("/")
        if _is_push(parts) or request.method not in _READ_METHODS:
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

    async def base(self, request: web.Request) -> web.Response:
        """`/v2/`: the Bearer challenge when users are configured, so that clients fetch a
        token, with the credentials they have (only then do they send any) or without;
        with a token, anonymous or not, a client goes on (unless `require_auth`)."""
        user = await self._identify(request)
        if (
            user is None
            and self.access.challenges()
            and ("Authorization" not in request.headers or self.access.require_auth)
        ):
            raise challenge(request, "credentials are needed for private repositories only")
        return web.json_response({}, headers=API_VERSION)

    async def token(self, request: web.Request) -> web.Response:
        """The Bearer realm (client_tokens.py): a token naming the client's user, checked
        like any credentials, or nobody. GET with Basic credentials (docker, skopeo), or
        containerd's OAuth2 form POST (`grant_type=password`)."""
        if request.method == "POST":
            form = await request.post()
            user = None
            if form.get("grant_type") == "password":
                name, password = str(form.get("username", "")), str(form.get("password", ""))
                user = await self.access.check_password(request, name, password)
                if user is not None:
                    remember(request, USER_KEY, user)
        else:
            user = await self._identify(request)
        token = self.access.tokens.issue(user)
        answer = {"token": token, "access_token": token, "expires_in": TOKEN_LIFETIME}
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def _identify(self, request: web.Request) -> str | None:
        user = await self.access.identify(request)
        if user is not None:
            remember(request, USER_KEY, user)
        return user

    async def _authorize(
        self, request: web.Request, upstream: Upstream, name: str, probe: Probe | None
    ) -> bool:
        """Raise 401 unless this client may read (upstream, name).

        True when a grant covers the client; False when the repository is public to it.
        With `probe` None the caller asks the upstream anonymously itself.
        """
        user = await self._identify(request)
        if self.access.granted(request.remote, user, upstream.name, name):
            return True
        if self.access.require_auth:
            raise challenge(request, f"authentication required for {upstream.name}/{name}", name)
        if probe is not None and not await self.access.public(upstream, name, probe):
            raise challenge(request, f"{upstream.name}/{name} is private: authenticate", name)
        return False

    async def _own(self, upstream: Upstream, name: str, kind: Kind, digest: Digest) -> None:
        """Let stored `digest` be served under (upstream, name) only if it is shared or the
        upstream confirms it has it there (with the cache's credentials)."""
        owner = (upstream.name, name)
        if not self.access.store_has(kind, digest) or self.access.shareable(kind, digest, owner):
            return
        # With the full Accept: distribution answers 404 to a manifest HEAD whose type the
        # request does not take (aiohttp's default is */*, which takes no OCI type).
        accept = {"Accept": ACCEPT_MANIFESTS} if kind == "manifests" else None
        response = await upstream.call("HEAD", name, f"{kind}/{digest}", accept)
        response.release()
        if response.status == 404:
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            raise RegistryError(code, f"{kind[:-1]} unknown upstream: {name}@{digest}")
        self.access.links.add(owner, [(kind, digest)])

    async def manifest(self, request: web.Request, raw_name: str, reference: str) -> web.Response:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        digest = parse_digest(reference) if is_digest(reference) else None
        tag = parse_tag(reference) if digest is None else ""
        unknown = RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {name}:{reference}")
        await self._authorize(request, upstream, name, Probe(f"manifests/{reference}", unknown))
        accept = [
            item.split(";")[0].strip()
            for value in request.headers.getall("Accept", [])
            for item in value.split(",")
            if item.strip()
        ]
        found: Manifest | Descriptor
        if digest is not None:
            await self._own(upstream, name, "manifests", digest)
            found = await self.manifests.by_digest(upstream, name, digest)
            if found.media_type in INDEX_TYPES and not acceptable(found.media_type, accept):
                # By digest it is that digest or nothing, never a substitute.
                raise RegistryError(
                    "MANIFEST_UNKNOWN",
                    f"{name}@{digest} is an index ({found.media_type}), "
                    "which the request's Accept does not take",
                )
        else:
            if request.method == "HEAD":
                found = await self.manifests.peek_tag(upstream, name, tag)
                if isinstance(found, Descriptor) and not acceptable(found.media_type, accept):
                    # An index the client cannot take: negotiating needs the index itself.
                    found = await self.manifests.by_tag(upstream, name, tag)
            else:
                found = await self.manifests.by_tag(upstream, name, tag)
            if isinstance(found, Manifest):
                child = self.manifests.negotiate(found, accept)
                if child is not None:
                    # Named by the index, so confirmed like any digest asked for by name.
                    await self._own(upstream, name, "manifests", child)
                    found = await self.manifests.by_digest(upstream, name, child)
        etag = content_etag(found.digest)
        headers = {
            **API_VERSION,
            "Docker-Content-Digest": found.digest,
            "ETag": etag,
            "Content-Type": found.media_type,
        }
        refused = refusal(request, etag)
        if refused is not None:
            return web.Response(status=refused, headers=headers)
        if isinstance(found, Descriptor):
            headers["Content-Length"] = str(found.size)
            return web.Response(headers=headers)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(found.data))
            return web.Response(headers=headers)
        return web.Response(body=found.data, headers=headers)

    async def blob(self, request: web.Request, raw_name: str, reference: str) -> web.StreamResponse:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        digest = parse_digest(reference)
        unknown = RegistryError("BLOB_UNKNOWN", f"blob unknown: {name}@{digest}")
        await self._authorize(request, upstream, name, Probe(f"blobs/{digest}", unknown))
        # In flight for another repository that may be private: not joined; once stored it
        # is confirmed with this request's upstream like any stored blob. Checked again
        # after each wait: a failed download may have been restarted for another one.
        while (fetching_for := self.blobs.fetching_for(digest)) not in (
            None,
            (upstream.name, name),
        ) and not self.access.known_public(fetching_for):
            await self.blobs.wait_for(digest)
        await self._own(upstream, name, "blobs", digest)
        return await self.blobs.serve(request, upstream, name, digest)

    async def tags(self, request: web.Request, raw_name: str) -> web.Response:
        upstream = self.upstream_for(request)
        name = upstream.repository(parse_name(raw_name))
        # Never cached: a client no grant covers is passed through as anonymous, so the
        # upstream decides what it may list.
        granted = await self._authorize(request, upstream, name, None)
        query = urlencode([(k, v) for k, v in request.query.items() if k in ("n", "last")])
        path = "tags/list" + (f"?{query}" if query else "")
        try:
            response = await upstream.request("GET", name, path, anonymous=not granted)
        except UpstreamDeniedError as error:
            if granted or not upstream.has_credentials:
                raise
            message = f"{upstream.name}/{name} is private: authenticate"
            raise challenge(request, message, name) from error
        try:
            if response.status == 404:
                raise RegistryError("NAME_UNKNOWN", f"repository unknown: {name}")
            body = await read_body(response, MAX_TAG_LIST, f"tags/list of {name}")
            # Pagination: the next page is a path on this same API, so it is passed as is.
            link = response.headers.get("Link")
        finally:
            response.release()
        headers = {**API_VERSION, **({"Link": link} if link else {})}
        return web.Response(body=body, content_type="application/json", headers=headers)


def _endpoint(path: str) -> str:
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    if path.endswith("/tags/list"):
        return "tags"
    return "base" if path.rstrip("/") == "/v2" else "other"


class RegistryHandler:
    """The one handler cache/app.py routes registry requests to: `/v2/...` and `/token`,
    every failure turned into an OCI error response noted for the request's log line."""

    def __init__(self, routes: Routes, stats: Stats) -> None:
        self.routes = routes
        self.stats = stats

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """Only an unexpected exception (a bug) is logged here, with its traceback."""
        head = request.method == "HEAD"
        accesslog.note_cache("")
        error: RegistryError | None = None
        try:
            response = await self._dispatch(request)
        except RegistryError as caught:
            error = caught
        except (UpstreamUnavailableError, UpstreamDeniedError) as caught:
            error = as_registry_error(caught)
        except web.HTTPException as caught:
            error = RegistryError("UNSUPPORTED", caught.reason, status=caught.status)
        except Exception:
            log.exception("request_failed", method=request.method, path=request.path_qs)
            error = RegistryError("UNKNOWN", "internal error (logged by the cache)", 500)
        if error is not None:
            response = error.response(head)
            remember(request, ERROR_KEY, (error.code, error.message))
            if not (response.status == 401 and request.path == "/v2/"):  # the auth handshake
                self.stats.note_error(
                    request.method, request.path_qs, response.status, error.code, error.message
                )
        if accesslog.cache_result():
            remember(request, CACHE_KEY, accesslog.cache_result())
        self.stats.requests[(_endpoint(request.path), response.status)] += 1
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/token":
            if request.method not in ("GET", "HEAD", "POST"):
                raise web.HTTPMethodNotAllowed(request.method, ["GET", "POST"])
            return await self.routes.token(request)
        if path == "/v2" or path.startswith("/v2/"):
            return await self.routes.v2(request)
        raise web.HTTPNotFound()
