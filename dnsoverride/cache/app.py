"""One aiohttp app for every name the overrides point at: the request's Host picks the
handler (TLS SNI picked the certificate, tls.py).

Each part of the cache registers `Route`s; the first route in `Order` that matches the
request's Host (port and trailing dot dropped, case folded) and path prefix answers it:

1. `/v2/...` and `/token` on any host no package route claims -> the registry (which
   then picks its upstream by `?ns=`, Host, or the default: mirror mode);
2. the mirrorlist hosts (default `mirrorlist.centos.org`) -> the mirrorlist responder;
3. the metalink hosts (`mirrors.centos.org`, `mirrors.fedoraproject.org`) -> metalink;
4. the host (+ path prefix) of a configured package repository -> the repository cache;
5. `/packages/<repository>/...` on any host no route claims (the cache's own name:
   mirror mode for repo files that can be edited) -> the repository cache;

anything else -> 404 with a one-line plain-text reason, which the access log line
carries (every request has one, accesslog.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum

from aiohttp import web

from dnsoverride.cache.accesslog import ERROR_KEY, remember

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Order(IntEnum):
    """Where a route stands in the routing order (the module docstring's list)."""

    REGISTRY = 10
    MIRRORLIST = 20
    METALINK = 30
    REPOSITORIES = 40
    MIRROR_PATHS = 50


@dataclass(frozen=True)
class Route:
    """Requests for `hosts` (None: any host that no route names) under one of `prefixes`
    go to `handler`; `name` is the part of the cache (logged with a routing failure)."""

    name: str
    order: Order
    handler: Handler
    hosts: frozenset[str] | None = None
    prefixes: tuple[str, ...] = ("/",)

    def takes(self, path: str) -> bool:
        return any(path.startswith(prefix) for prefix in self.prefixes)


def host_name(host: str | None) -> str:
    """A Host header as routes name hosts: lower case, no port, no trailing dot."""
    host = (host or "").strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class Router:
    """The routes of the cache, in order; see the module docstring."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = sorted(routes, key=lambda route: route.order)
        self.claimed = frozenset(
            host for route in self.routes if route.hosts is not None for host in route.hosts
        )

    def pick(self, host: str, path: str) -> Route | None:
        for route in self.routes:
            named = host in route.hosts if route.hosts is not None else host not in self.claimed
            if named and route.takes(path):
                return route
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = host_name(request.host)
        route = self.pick(host, request.path)
        if route is None:
            reason = f"nothing is served here for host {host or '(none)'!r} at {request.path[:200]}"
            remember(request, ERROR_KEY, ("NOT_ROUTED", reason))
            return web.Response(status=404, text=reason + "\n")
        return await route.handler(request)


def build_app(router: Router) -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", router.handle)
    return app
