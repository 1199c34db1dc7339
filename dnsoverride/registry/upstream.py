"""HTTP client for one upstream registry: auth, redirects, timeouts, rate-limit headers.

The aiohttp session is built in one place (`make_session`) so transport concerns
(resolvers, TLS trust) can be added there. On a 401 the client answers the
`WWW-Authenticate` challenge: Bearer (fetch a token from the realm for the scope,
anonymously or with the upstream's credentials, cached per scope until it expires)
or Basic. Redirects (to a CDN) are followed here, and the registry's Authorization
is never sent to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict

from dnsoverride.registry.config import Timeouts, UpstreamConfig
from dnsoverride.registry.errors import RegistryError
from dnsoverride.registry.stats import Stats

log = structlog.get_logger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
# Tokens without `expires_in` are valid for 60 s (distribution token spec).
_DEFAULT_TOKEN_LIFETIME = 60.0


class UpstreamUnavailableError(Exception):
    """The upstream could not answer: connection failure, timeout, 429 or 5xx."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamDeniedError(Exception):
    """The upstream refused our credentials (401/403 after answering the challenge)."""


@dataclass(frozen=True)
class _Token:
    value: str
    expires: float


def make_session(
    timeouts: Timeouts, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The upstream HTTP client; the single place to configure transport.

    `resolver` replaces the system resolver (config `resolvers:`), so that the cache does
    not resolve its upstream through the overrides that point at itself.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect,
            sock_connect=timeouts.connect,
            sock_read=timeouts.idle,
        ),
        connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=60, resolver=resolver),
        # Blobs and manifests are passed through byte for byte.
        auto_decompress=False,
    )


class Upstream:
    def __init__(
        self,
        config: UpstreamConfig,
        timeouts: Timeouts,
        stats: Stats,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.stats = stats
        self._session = session or make_session(timeouts)
        self._origin = urlsplit(config.url).netloc
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        # The Bearer realm/service from the first challenge, so later scopes are fetched
        # without a 401 round trip first.
        self._bearer: dict[str, str] | None = None
        self._basic = (
            aiohttp.BasicAuth(config.username, config.password or "") if config.username else None
        )

    async def close(self) -> None:
        await self._session.close()

    def repository(self, name: str) -> str:
        if self.config.library_prefix and "/" not in name:
            return f"library/{name}"
        return name

    async def request(
        self, method: str, name: str, path: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """`method /v2/<name>/<path>` upstream; the caller must release the response.

        Returns 2xx and 404 responses; raises UpstreamUnavailableError / UpstreamDeniedError.
        """
        url = f"{self.config.url}/v2/{name}/{path}"
        scope = f"repository:{name}:pull"
        try:
            response = await self._send(method, url, headers, await self._auth_for(scope))
            if response.status == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.release()
                auth = await self._answer_challenge(challenge, scope)
                response = await self._send(method, url, headers, auth)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self.stats.upstream_errors[self.name] += 1
            raise UpstreamUnavailableError(
                f"{self.name}: {type(error).__name__}: {error}"
            ) from error
        self._record_ratelimit(response)
        if response.status in (401, 403):
            response.release()
            raise UpstreamDeniedError(f"{self.name}: {response.status} for {name}")
        if (
            response.status == 429
            or response.status >= 500
            or (response.status >= 300 and response.status != 404)
        ):
            response.release()
            self.stats.upstream_errors[self.name] += 1
            raise UpstreamUnavailableError(
                f"{self.name}: HTTP {response.status} for {method} {path}", response.status
            )
        return response

    async def call(self, method: str, name: str, path: str) -> aiohttp.ClientResponse:
        """`request`, with upstream failures turned into the OCI error for the client."""
        try:
            return await self.request(method, name, path)
        except (UpstreamUnavailableError, UpstreamDeniedError) as error:
            raise as_registry_error(error) from error

    async def _send(
        self, method: str, url: str, headers: dict[str, str] | None, auth: str | None
    ) -> aiohttp.ClientResponse:
        request_headers = CIMultiDict(headers or {})
        if auth:
            request_headers["Authorization"] = auth
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._session.request(
                method, url, headers=request_headers, allow_redirects=False
            )
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            response.release()
            url = urljoin(url, location)
            if urlsplit(url).netloc != self._origin:
                # A CDN URL is pre-signed; the registry's credentials stay with the registry.
                request_headers.pop("Authorization", None)
        raise aiohttp.TooManyRedirects(response.request_info, ())

    def _record_ratelimit(self, response: aiohttp.ClientResponse) -> None:
        value = response.headers.get("ratelimit-remaining")
        if value:
            with contextlib.suppress(ValueError):
                self.stats.ratelimit_remaining[self.name] = int(value.split(";", 1)[0])

    async def _auth_for(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token and token.expires > time.monotonic():
            return f"Bearer {token.value}"
        if self._bearer is not None:
            return await self._fetch_token(self._bearer, scope)
        return None

    async def _answer_challenge(self, header: str, scope: str) -> str | None:
        kind, _, rest = header.partition(" ")
        if kind.lower() == "basic":
            if self._basic is None:
                raise UpstreamDeniedError(f"{self.name}: requires credentials (Basic)")
            return self._basic.encode()
        if kind.lower() != "bearer":
            raise UpstreamDeniedError(f"{self.name}: unsupported challenge {kind!r}")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        if "realm" not in params:
            raise UpstreamDeniedError(f"{self.name}: Bearer challenge without realm")
        self._bearer = {"realm": params["realm"], "service": params.get("service", "")}
        self._tokens.pop(scope, None)
        return await self._fetch_token(self._bearer, params.get("scope") or scope)

    async def _fetch_token(self, bearer: dict[str, str], scope: str) -> str:
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:  # concurrent requests for one scope share one token fetch
            token = self._tokens.get(scope)
            if token and token.expires > time.monotonic():
                return f"Bearer {token.value}"
            query = {"scope": scope}
            if bearer["service"]:
                query["service"] = bearer["service"]
            async with self._session.get(
                bearer["realm"], params=query, auth=self._basic
            ) as response:
                if response.status in (401, 403):
                    raise UpstreamDeniedError(
                        f"{self.name}: token server refused ({response.status})"
                    )
                if response.status != 200:
                    raise UpstreamUnavailableError(
                        f"{self.name}: token server HTTP {response.status}", response.status
                    )
                body: dict[str, Any] = await response.json(content_type=None)
            value = body.get("token") or body.get("access_token")
            if not isinstance(value, str):
                raise UpstreamDeniedError(f"{self.name}: token server answer has no token")
            lifetime = float(body.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
            # Renew a little early so a token never expires in flight.
            self._tokens[scope] = _Token(value, time.monotonic() + max(lifetime - 10, 1))
            log.debug("token_fetched", upstream=self.name, scope=scope, lifetime=lifetime)
            return f"Bearer {value}"


def as_registry_error(error: BaseException) -> RegistryError:
    """The OCI error a client gets for an upstream failure."""
    if isinstance(error, RegistryError):
        return error
    if isinstance(error, UpstreamDeniedError):
        return RegistryError("UNAUTHORIZED", str(error))
    if isinstance(error, UpstreamUnavailableError) and error.status == 429:
        return RegistryError("TOOMANYREQUESTS", str(error))
    if isinstance(error, asyncio.CancelledError):
        return RegistryError("UNAVAILABLE", "download cancelled (shutting down)")
    return RegistryError("UNAVAILABLE", f"upstream failed: {type(error).__name__}: {error}")
