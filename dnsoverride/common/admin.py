"""The admin HTTP listener each daemon runs beside its service port.

Owns `/metrics` (Prometheus exposition of the daemon's own CollectorRegistry), `/healthz`
(the process answers), `/readyz` (the daemon's `ready()` says it can do its job), and
the daemon's read-only JSON endpoints (`/status`, DNS's `/explain`: `JsonEndpoint`s, what
`dnsoverride status` and `explain --live` read). It is a separate listener so that
metrics and state never share a port, an ACL or a TLS setup with DNS or registry clients.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dnsoverride.common.errors import listen_error

log = structlog.get_logger(__name__)

# A read-only JSON endpoint: the request's query parameters -> a JSON-able value.
# ValueError is the caller's mistake (400, its message as `error`).
JsonEndpoint = Callable[[Mapping[str, str]], object]


class AdminServer:
    """A running admin listener; `close()` stops it."""

    def __init__(self, runner: web.AppRunner) -> None:
        self._runner = runner

    @property
    def port(self) -> int:
        """The bound TCP port (useful when started with port 0)."""
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        await self._runner.cleanup()


def _build_app(
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    why_not_ready: Callable[[], str | None] | None = None,
    endpoints: Mapping[str, JsonEndpoint] | None = None,
) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ready\n")
        reason = why_not_ready() if why_not_ready is not None else None
        return web.Response(status=503, text=f"not ready: {reason}\n" if reason else "not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for path, endpoint in (endpoints or {}).items():
        app.router.add_get(path, _json_handler(endpoint))
    return app


def _json_handler(endpoint: JsonEndpoint) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        try:
            body = endpoint(request.query)
        except ValueError as error:
            return _json({"error": str(error)}, status=400)
        return _json(body)

    return handle


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=1) + "\n", status=status, content_type="application/json"
    )


async def start_admin(
    host: str,
    port: int,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    why_not_ready: Callable[[], str | None] | None = None,
    *,
    endpoints: Mapping[str, JsonEndpoint] | None = None,
) -> AdminServer:
    """Serve /metrics, /healthz and /readyz on host:port until `close()`.

    `why_not_ready`, when given, puts the reason into the body of a 503 from /readyz;
    `endpoints` adds read-only JSON endpoints by path.

    Raises UserError when the address cannot be bound (port in use, bad host).
    """
    # Scrapes every few seconds would drown the daemon's own events in access logs.
    app = _build_app(registry, ready, why_not_ready, endpoints)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        # aiohttp's message repeats the address and the errno text ("error while attempting
        # to bind on address (...): address already in use"); the errno's own is enough.
        raise listen_error(f"admin listener {host}:{port}", port, error) from error
    server = AdminServer(runner)
    log.info("admin_listening", host=host, port=server.port)
    return server
