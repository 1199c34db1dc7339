"""The cache's one app (cache/app.py) over given routes, served on a loopback port with
the cache's access logger, and a client for it: the parts of the cache tested over real
HTTP without the daemon around them."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Sequence

import aiohttp
from aiohttp import web

from dnsoverride.cache.accesslog import AccessLogger
from dnsoverride.cache.app import Route, Router, build_app


@contextlib.asynccontextmanager
async def serving(
    routes: Sequence[Route], ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """The base URL (`http://127.0.0.1:PORT`, https with `ssl_context`) of the app over
    `routes`, while in the block."""
    runner = web.AppRunner(
        build_app(Router(routes)),
        access_log=logging.getLogger("test.access"),
        access_log_class=AccessLogger,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
        scheme = "http" if ssl_context is None else "https"
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def get(url: str, host: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, with the Host header `host` if given."""
    headers = {"Host": host} if host else None
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.content_type, await response.text()
