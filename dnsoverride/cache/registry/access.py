"""Who may read what: client identity, grants, and public versus private repositories.

The cache may hold upstream credentials only to raise a pull-rate limit while serving
public images to anonymous CI jobs, so privacy is decided per repository, not per
upstream:

- An upstream without credentials only ever gives the cache what it gives anyone: all of
  it is public.
- For an upstream with credentials, a repository is public when the upstream serves it
  to an anonymous request: one anonymous HEAD (the request's own manifest or blob), the
  verdict remembered for `visibility_ttl`. 401/403 makes it private; a 404 is answered
  as the upstream answered the anonymous request; an upstream that cannot answer leaves
  the last verdict in force, or fails the request (503) when there is none.
- Private repositories are served only to clients a grant covers (`clients:` config:
  htpasswd bcrypt users and/or source networks, each granted upstreams and repository
  patterns); anyone else gets 401 with a `WWW-Authenticate: Bearer` challenge, whose
  realm (client_tokens.py) gives a token with credentials or without. `require_auth:
  true` extends that to everything.

Stored content is shared between repositories only when it is public: a stored digest
is served for (upstream, repository) when links.py links it there, or when one of its
links is public; otherwise the request goes to that upstream, which decides.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.web_request import BaseRequest

from dnsoverride.cache.registry.client_tokens import SERVICE, ClientTokens, realm
from dnsoverride.cache.registry.config import ClientsConfig
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.links import Links, Owner
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.upstream import (
    ACCEPT_MANIFESTS,
    Upstream,
    UpstreamDeniedError,
    UpstreamUnavailableError,
    as_registry_error,
)
from dnsoverride.cache.store import Digest, Kind, Store

log = structlog.get_logger(__name__)

_VERIFIED_ENTRIES = 256
_BCRYPT_BYTES = 72


@dataclass(frozen=True)
class Probe:
    """The anonymous request that tells whether a repository is public, and the error a
    client gets when the upstream answers it with 404."""

    path: str
    unknown: RegistryError


@dataclass
class _Verdict:
    public: bool
    until: float


def challenge(request: BaseRequest, message: str, name: str | None = None) -> RegistryError:
    """401 with the Bearer challenge docker, containerd and skopeo answer, with credentials
    when they have them and without otherwise (see client_tokens.py)."""
    value = f'Bearer realm="{realm(request)}",service="{SERVICE}"'
    if name is not None:
        value += f',scope="repository:{name}:pull"'
    return RegistryError("UNAUTHORIZED", message, headers={"WWW-Authenticate": value})


class Access:
    def __init__(
        self,
        config: ClientsConfig,
        upstreams: dict[str, Upstream],
        store: Store,
        links: Links,
        stats: Stats,
    ) -> None:
        self.config = config
        self.upstreams = upstreams
        self.store = store
        self.links = links
        self.stats = stats
        self._hashes = dict(config.users)
        self.tokens = ClientTokens()
        # Authorization header -> user, for headers bcrypt has already accepted (a check
        # costs ~100 ms of CPU; a pull sends the header with every request).
        self._verified: OrderedDict[str, str] = OrderedDict()
        self._verdicts: dict[Owner, _Verdict] = {}
        # The visibility check in flight per repository, and the path it asks for.
        self._probes: dict[Owner, tuple[str, asyncio.Future[bool | None]]] = {}

    @property
    def require_auth(self) -> bool:
        return self.config.require_auth

    # -- identity -------------------------------------------------------------------------
    async def identify(self, request: web.Request) -> str | None:
        """The authenticated user of `request`, None for an anonymous one.

        A client is identified by a Bearer token from our realm or by Basic credentials.
        A wrong password of a known user is a 401, never a silent downgrade to anonymous.
        Credentials that are not for this cache are anonymous: an empty user and password,
        a user the htpasswd file does not know, a token we did not issue (or that expired)
        or another scheme (a CI job's own Docker Hub login, sent to the cache in
        transparent mode).
        """
        header = request.headers.get("Authorization")
        if not header:
            return None
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "bearer":
            return self.tokens.user_of(encoded.strip())
        user = self._verified.get(header)
        if user is not None:
            self._verified.move_to_end(header)
            return user
        if scheme.lower() != "basic":
            return None
        try:
            name, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except ValueError:  # not base64, not ASCII, not UTF-8 inside
            raise challenge(request, "malformed Basic credentials") from None
        user = await self.check_password(request, name, password)
        if user is not None:
            self._verified[header] = user
            while len(self._verified) > _VERIFIED_ENTRIES:
                self._verified.popitem(last=False)
        return user

    async def check_password(self, request: web.Request, user: str, password: str) -> str | None:
        """`user` when `password` is theirs; None for a user the htpasswd file does not
        know (an anonymous client); a 401 for a known user's wrong password."""
        hashed = self._hashes.get(user)
        if hashed is None:
            return None
        import bcrypt  # here: only a cache with an htpasswd file loads it

        # bcrypt only ever looked at the first 72 bytes (so does `htpasswd -B`); bcrypt 5
        # refuses longer passwords instead of truncating them itself.
        secret = password.encode()[:_BCRYPT_BYTES]
        # Verified off the loop: bcrypt takes its time by design.
        if not await asyncio.to_thread(bcrypt.checkpw, secret, hashed):
            raise challenge(request, f"invalid password for user {user[:100]!r}")
        return user

    def granted(self, address: str | None, user: str | None, upstream: str, name: str) -> bool:
        """Whether a grant covers this client for (upstream, repository)."""
        ip = _address(address)
        for grant in self.config.grants:
            if not grant.covers(upstream, name):
                continue
            if user is not None and user in grant.users:
                return True
            if ip is not None and any(ip in network for network in grant.networks):
                return True
        return False

    def challenges(self) -> bool:
        """Whether `/v2/` challenges clients that come without a token (users are
        configured): clients send credentials only to a realm named by a challenge."""
        return bool(self._hashes) or self.require_auth

    # -- public or private ----------------------------------------------------------------
    async def public(self, upstream: Upstream, name: str, probe: Probe) -> bool:
        """Whether (upstream, repository) is served to anonymous requests."""
        if not upstream.has_credentials:
            return True
        owner = (upstream.name, name)
        while True:
            verdict = self._verdicts.get(owner)
            if verdict is not None and verdict.until > time.monotonic():
                return verdict.public
            shared = self._probes.get(owner)
            if shared is None:
                shared = (probe.path, asyncio.ensure_future(self._probe(upstream, name, probe)))
                self._probes[owner] = shared
                shared[1].add_done_callback(functools.partial(self._probe_done, owner, shared))
            path, task = shared
            public = await asyncio.shield(task)
            if public is not None:
                return public
            if path == probe.path:
                raise probe.unknown
            # The shared check asked for a path the upstream does not have, which says
            # nothing of the repository: ask again, with this request's own path.

    def _probe_done(
        self, owner: Owner, shared: tuple[str, asyncio.Future[bool | None]], _: object
    ) -> None:
        if self._probes.get(owner) is shared:
            del self._probes[owner]

    async def _probe(self, upstream: Upstream, name: str, probe: Probe) -> bool | None:
        """The verdict from one anonymous HEAD of `probe.path`; None when that is a 404."""
        owner = (upstream.name, name)
        self.stats.visibility_checks[upstream.name] += 1
        try:
            # With the full Accept: distribution answers 404 to a manifest HEAD whose type
            # the client does not take.
            response = await upstream.request(
                "HEAD", name, probe.path, {"Accept": ACCEPT_MANIFESTS}, anonymous=True
            )
            response.release()
        except UpstreamDeniedError:
            public = False
        except UpstreamUnavailableError as error:
            stale = self._verdicts.get(owner)
            if stale is None:
                raise as_registry_error(error) from error
            log.warning(
                "visibility_stale",
                upstream=upstream.name,
                name=name,
                public=stale.public,
                reason=str(error),
            )
            return stale.public
        else:
            if response.status == 404:
                return None
            public = True
        self._verdicts[owner] = _Verdict(public, time.monotonic() + self.config.visibility_ttl)
        log.info("visibility_checked", upstream=upstream.name, name=name, public=public)
        return public

    def known_public(self, owner: Owner) -> bool:
        """Whether `owner` is public by a verdict still within `visibility_ttl`: a
        repository made private since must not keep sharing what it once shared."""
        upstream = self.upstreams.get(owner[0])
        if upstream is not None and not upstream.has_credentials:
            return True
        verdict = self._verdicts.get(owner)
        return verdict is not None and verdict.public and verdict.until > time.monotonic()

    def store_has(self, kind: Kind, digest: Digest) -> bool:
        return self.store.has(kind, digest)

    def shareable(self, kind: Kind, digest: Digest, owner: Owner) -> bool:
        """Whether stored `digest` may be served for `owner` without asking its upstream."""
        if self.links.linked(kind, digest, owner):
            return True
        return any(self.known_public(other) for other in self.links.owners(kind, digest))


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
