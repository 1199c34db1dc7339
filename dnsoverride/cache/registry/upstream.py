"""HTTP client for one upstream registry: auth, redirects, timeouts, rate-limit headers.

Each upstream has its own aiohttp session (cache/session.py builds it: timeouts,
resolvers), so that one upstream's connections stay its own. On a 401 the client answers
the `WWW-Authenticate` challenge: Bearer (fetch a token from the realm for the scope,
anonymously or with the upstream's credentials, cached per scope until it expires)
or Basic. Redirects (to a CDN) are followed here, and the registry's Authorization
is never sent to another host. `anonymous=True` sends a request as a client without
credentials would (anonymous tokens, kept apart), which is how access.py asks whether a
repository is public.

Concurrent requests for one scope share one in-flight token fetch, bounded by the idle
timeout as a whole: a hanging token server costs each waiting request at most that once.
A token answer that is not JSON (an HTML login page) is an upstream failure (502) with
the reason, never a crash.

A 429, or a 503 with `Retry-After`, puts (upstream, repository) in a negative cache until
that time: requests in between fail at once with the remaining `Retry-After` and cost the
upstream nothing. Bodies are read whole, bounded (`read_body`): aiohttp's `read(n)`
returns what has arrived so far, not n bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from dnsoverride.cache.registry.config import UpstreamConfig
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.session import Timeouts, make_session

log = structlog.get_logger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_TYPES)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*"([^"]*)"')
# Tokens without `expires_in` are valid for 60 s (distribution token spec).
_DEFAULT_TOKEN_LIFETIME = 60.0
_MAX_TOKEN_ANSWER = 1 << 20
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header value may carry
# A Retry-After beyond this is taken as this: an upstream's typo must not block a
# repository for days.
_MAX_RETRY_AFTER = 3600.0


class UpstreamUnavailableError(Exception):
    """The upstream could not answer: connection failure, timeout, 429 or 5xx, or an answer
    that is not what the protocol promises (`bad_answer`: 502 for the client)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        bad_answer: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status  # the upstream's HTTP status, when it answered one
        self.retry_after = retry_after
        # The upstream answered, but not what the protocol promises: 502 for the client.
        self.bad_answer = bad_answer


class UpstreamDeniedError(Exception):
    """The upstream refused our credentials (401/403 after answering the challenge)."""


@dataclass(frozen=True)
class _Token:
    value: str
    expires: float


async def read_body(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of `response`, at most `limit` bytes; UpstreamUnavailableError: 502
    when it is longer, or shorter than its Content-Length; 503 when it stops coming (the
    idle timeout, the connection lost).

    `response.content.read(n)` returns what has arrived so far; this reads to the end.
    """
    declared = response.content_length
    if declared is not None and declared > limit:
        raise UpstreamUnavailableError(
            f"{what}: Content-Length {declared} > {limit}", bad_answer=True
        )
    parts: list[bytes] = []
    received = 0
    try:
        while chunk := await response.content.read(min(limit + 1 - received, 1 << 16) or 1):
            parts.append(chunk)
            received += len(chunk)
            if received > limit:
                raise UpstreamUnavailableError(
                    f"{what}: body longer than {limit} bytes", bad_answer=True
                )
    except aiohttp.ClientPayloadError as error:
        raise UpstreamUnavailableError(
            f"{what}: body cut short after {received} bytes ({error})", bad_answer=True
        ) from error
    except (aiohttp.ClientError, TimeoutError) as error:
        # The idle timeout (SocketTimeoutError) or the connection lost mid-body.
        raise UpstreamUnavailableError(
            f"{what}: body stopped after {received} bytes ({type(error).__name__}: {error})"
        ) from error
    if declared is not None and received != declared:
        raise UpstreamUnavailableError(
            f"{what}: body of {received} bytes, Content-Length said {declared}", bad_answer=True
        )
    return b"".join(parts)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date); None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit takes "²" and "٣" too
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


class Upstream:
    def __init__(
        self,
        config: UpstreamConfig,
        timeouts: Timeouts,
        stats: Stats,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` (seconds, monotonic) tells when a token expires and a Retry-After ends;
        tests turn their own."""
        self.config = config
        self._clock = clock
        self.name = config.name
        self.stats = stats
        self.timeouts = timeouts
        self._session = session or make_session(timeouts)
        self._origin = urlsplit(config.url).netloc
        # (scope, anonymous) -> token; anonymous tokens never mix with ours.
        self._tokens: dict[tuple[str, bool], _Token] = {}
        self._token_fetches: dict[tuple[str, bool], asyncio.Future[_Token]] = {}
        # repository -> (monotonic time until which it is not asked, status, reason)
        self._backoff: dict[str, tuple[float, int, str]] = {}
        # The Bearer realm/service from the first challenge, so later scopes are fetched
        # without a 401 round trip first.
        self._bearer: dict[str, str] | None = None
        # The Basic credentials header (aiohttp.BasicAuth is deprecated).
        self._basic = (
            "Basic "
            + base64.b64encode(f"{config.username}:{config.password or ''}".encode()).decode()
            if config.username
            else None
        )

    async def close(self) -> None:
        await self._session.close()

    def repository(self, name: str) -> str:
        if self.config.library_prefix and "/" not in name:
            return f"library/{name}"
        return name

    @property
    def has_credentials(self) -> bool:
        return self.config.username is not None

    async def request(
        self,
        method: str,
        name: str,
        path: str,
        headers: dict[str, str] | None = None,
        anonymous: bool = False,
    ) -> aiohttp.ClientResponse:
        """`method /v2/<name>/<path>` upstream; the caller must release the response.

        Returns 2xx and 404 responses; raises UpstreamUnavailableError / UpstreamDeniedError.
        """
        self._check_backoff(name)
        url = f"{self.config.url}/v2/{name}/{path}"
        scope = f"repository:{name}:pull"
        try:
            response = await self._send(
                method, url, headers, await self._auth_for(scope, anonymous)
            )
            if response.status == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.release()
                auth = await self._answer_challenge(challenge, scope, anonymous)
                response = await self._send(method, url, headers, auth)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            self.stats.upstream_errors[self.name] += 1
            reason = f"{self.name}: {type(error).__name__}: {error}"
            self.stats.upstream(self.name).failed(reason)
            raise UpstreamUnavailableError(reason) from error
        self._record_ratelimit(response)
        if response.status < 300 or response.status in (401, 403, 404):
            self.stats.upstream(self.name).answered()
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
            reason = f"{self.name}: HTTP {response.status} for {method} {name}/{path}"
            self.stats.upstream(self.name).failed(reason)
            retry_after = _retry_after(response.headers.get("Retry-After"))
            if response.status in (429, 503) and retry_after:
                self._backoff[name] = (self._clock() + retry_after, response.status, reason)
                log.warning(
                    "upstream_backoff",
                    upstream=self.name,
                    name=name,
                    status=response.status,
                    retry_after=retry_after,
                )
            raise UpstreamUnavailableError(reason, response.status, retry_after)
        return response

    def backoffs(self) -> dict[str, dict[str, object]]:
        """Repositories inside a Retry-After now: seconds left, the status that set it."""
        now = time.monotonic()
        return {
            name: {"seconds_left": round(until - now, 1), "status": status, "reason": reason}
            for name, (until, status, reason) in self._backoff.items()
            if until > now
        }

    def _check_backoff(self, name: str) -> None:
        """Fail at once, costing the upstream nothing, while `name` is in its Retry-After."""
        entry = self._backoff.get(name)
        if entry is None:
            return
        until, status, reason = entry
        remaining = until - self._clock()
        if remaining <= 0:
            del self._backoff[name]
            return
        self.stats.backoff_refusals[self.name] += 1
        raise UpstreamUnavailableError(
            f"{reason} (not asked again for {remaining:.0f} s)", status, remaining
        )

    async def call(
        self, method: str, name: str, path: str, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """`request`, with upstream failures turned into the OCI error for the client."""
        try:
            return await self.request(method, name, path, headers)
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

    async def _auth_for(self, scope: str, anonymous: bool) -> str | None:
        token = self._tokens.get((scope, anonymous))
        if token and token.expires > self._clock():
            return f"Bearer {token.value}"
        if self._bearer is not None:
            return await self._token(self._bearer, scope, anonymous)
        return None

    async def _answer_challenge(self, header: str, scope: str, anonymous: bool) -> str | None:
        kind, _, rest = header.partition(" ")
        if kind.lower() == "basic":
            if self._basic is None or anonymous:
                raise UpstreamDeniedError(f"{self.name}: requires credentials (Basic)")
            return self._basic
        if kind.lower() != "bearer":
            raise UpstreamDeniedError(f"{self.name}: unsupported challenge {kind!r}")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        if "realm" not in params:
            raise UpstreamDeniedError(f"{self.name}: Bearer challenge without realm")
        self._bearer = {"realm": params["realm"], "service": params.get("service", "")}
        self._tokens.pop((scope, anonymous), None)
        return await self._token(self._bearer, params.get("scope") or scope, anonymous)

    async def _token(self, bearer: dict[str, str], scope: str, anonymous: bool) -> str:
        """A token for `scope`: cached, or from the one fetch in flight for it, or a new one."""
        key = (scope, anonymous)
        token = self._tokens.get(key)
        if token and token.expires > self._clock():
            return f"Bearer {token.value}"
        fetch = self._token_fetches.get(key)
        if fetch is None:
            fetch = asyncio.ensure_future(self._fetch_token(bearer, scope, anonymous))
            self._token_fetches[key] = fetch
            fetch.add_done_callback(lambda done: self._token_fetched(key, done))
        # Shielded: a waiter that goes away does not cancel the fetch for the others.
        return f"Bearer {(await asyncio.shield(fetch)).value}"

    def _token_fetched(self, key: tuple[str, bool], fetch: asyncio.Future[_Token]) -> None:
        del self._token_fetches[key]
        if not fetch.cancelled() and fetch.exception() is None:
            self._tokens[key] = fetch.result()

    async def _fetch_token(self, bearer: dict[str, str], scope: str, anonymous: bool) -> _Token:
        query = {"scope": scope}
        if bearer["service"]:
            query["service"] = bearer["service"]
        realm = bearer["realm"]
        # The whole fetch is bounded, not each read: a server that trickles bytes or never
        # answers costs the waiters one idle timeout.
        limit = self.timeouts.connect + self.timeouts.idle
        try:
            async with (
                asyncio.timeout(limit),
                self._session.get(
                    realm,
                    params=query,
                    headers={"Authorization": self._basic}
                    if self._basic and not anonymous
                    else None,
                ) as response,
            ):
                if response.status in (401, 403):
                    raise UpstreamDeniedError(
                        f"{self.name}: token server refused ({response.status})"
                    )
                if response.status != 200:
                    raise UpstreamUnavailableError(
                        f"{self.name}: token server {realm} answered HTTP {response.status}",
                        response.status,
                        _retry_after(response.headers.get("Retry-After")),
                        bad_answer=response.status < 500 and response.status != 429,
                    )
                content_type = response.headers.get("Content-Type", "")
                body = await read_body(response, _MAX_TOKEN_ANSWER, f"token server {realm}")
        except TimeoutError as error:
            raise UpstreamUnavailableError(
                f"{self.name}: token server {realm} did not answer within {limit:.0f} s"
            ) from error
        except aiohttp.ClientError as error:
            raise UpstreamUnavailableError(
                f"{self.name}: token server {realm}: {type(error).__name__}: {error}"
            ) from error
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        value = (
            answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        )
        if not isinstance(value, str) or not value:
            raise UpstreamUnavailableError(
                f"{self.name}: token server {realm} answered {content_type or 'no type'} "
                f"without a token: {body[:80]!r}",
                bad_answer=True,
            )
        if not _TOKEN.fullmatch(value):
            # It goes into an Authorization header: aiohttp refuses control characters.
            raise UpstreamUnavailableError(
                f"{self.name}: token server {realm} answered a token that is not printable "
                f"ASCII: {value[:40]!r}",
                bad_answer=True,
            )
        assert isinstance(answer, dict)
        try:
            lifetime = float(answer.get("expires_in") or _DEFAULT_TOKEN_LIFETIME)
        except (TypeError, ValueError):
            lifetime = _DEFAULT_TOKEN_LIFETIME
        log.debug("token_fetched", upstream=self.name, scope=scope, lifetime=lifetime)
        # Renew a little early so a token never expires in flight.
        return _Token(value, self._clock() + max(lifetime - 10, 1))


def as_registry_error(error: BaseException) -> RegistryError:
    """The OCI error a client gets for an upstream failure."""
    if isinstance(error, RegistryError):
        return error
    if isinstance(error, UpstreamDeniedError):
        return RegistryError("UNAUTHORIZED", str(error))
    if isinstance(error, UpstreamUnavailableError):
        headers = {}
        if error.retry_after:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
        if error.status == 429:
            return RegistryError("TOOMANYREQUESTS", str(error), headers=headers)
        status = 502 if error.bad_answer else 503
        return RegistryError("UNAVAILABLE", str(error), status, headers)
    if isinstance(error, asyncio.CancelledError):
        return RegistryError("UNAVAILABLE", "download cancelled (shutting down)")
    return RegistryError("UNAVAILABLE", f"upstream failed: {type(error).__name__}: {error}")
