"""The access log: one structlog event per request, whichever part of the cache answered
it, written after the response is sent.

aiohttp calls `AccessLogger.log` once a response has gone out (or the connection ended),
with the time it took; the event names the request (method, path, upstream, client and
user), its status, bytes sent (headers and body, sendfile included), duration and the
cache's part in it (`cache`: hit/miss/coalesced/stale, set by the handlers through
`note_cache`). An error response carries its code and message (`error_code`, `error`:
an OCI code from the registry, MIRRORLIST_UNKNOWN, NOT_ROUTED, ...), noted by the
handler with `remember(request, ERROR_KEY, (code, message))`, so every failure is one
line that names the request and the reason; a stream cut short after its 200 went out
carries the reason too. Successful requests log at info, failures at warning; so
`--log-level warning` keeps the failures and drops the rest.

A request aiohttp cannot parse (a request line past 8190 bytes, a bad header) never
reaches the app: aiohttp answers 400 itself. Its access line carries the parser's reason,
and `server_logger` keeps aiohttp from also logging it as an error with a traceback.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import TypeVar

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

log = structlog.get_logger("dnsoverride.cache.access")

T = TypeVar("T")

# What the cache did for the current request; handlers run in the request's own task.
_cache_result: ContextVar[str | None] = ContextVar("cache_result", default=None)

# What a handler keeps with the request for its line (typed keys: aiohttp warns of str
# keys in a request's storage, and two modules' keys cannot collide).
UPSTREAM_KEY = web.RequestKey[str]("upstream")
USER_KEY = web.RequestKey[str]("user")
CACHE_KEY = web.RequestKey[str | None]("cache")
ERROR_KEY = web.RequestKey[tuple[str, str]]("error")  # (code, message)
# Body bytes sent with sendfile, which aiohttp's count (`body_length`) leaves out.
SENDFILE_KEY = web.RequestKey[int]("sendfile_bytes")
_FIELDS = (("upstream", UPSTREAM_KEY), ("user", USER_KEY), ("cache", CACHE_KEY))


def note_cache(result: str) -> None:
    """Record hit/miss/coalesced/stale for the access log line of the current request."""
    _cache_result.set(result)


def cache_result() -> str | None:
    return _cache_result.get()


def remember(request: BaseRequest, key: web.RequestKey[T], value: T) -> None:
    """Keep a field (upstream, user, error, cache) with the request for its log line."""
    request[key] = value


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access-log hook, writing structlog events instead of formatted lines."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields: dict[str, object] = {
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": response.body_length + request.get(SENDFILE_KEY, 0),
            "duration_ms": round(time * 1000, 1),
            "client": request.remote,
        }
        for field, key in _FIELDS:
            value = request.get(key)
            if value is not None:
                fields[field] = value
        error = request.get(ERROR_KEY)
        if error is not None:
            fields["error_code"], fields["error"] = error
        elif response.status >= 400 and isinstance(response, web.Response) and response.text:
            # aiohttp's own plain-text answer to a request it could not parse: the reason.
            fields["error"] = " ".join(response.text.split())[:300]
        # The 401 a client without credentials gets at /v2/ is the auth handshake (with
        # users configured), not a failure.
        handshake = (
            response.status == 401
            and request.path == "/v2/"
            and "Authorization" not in request.headers
        )
        if (response.status >= 400 or "error" in fields) and not handshake:
            log.warning("request", **fields)
        else:
            log.info("request", **fields)


class _ServerErrors(logging.Handler):
    """aiohttp's server log, as structlog events: a request it could not parse is the
    client's doing, and its access line says why; anything else keeps its traceback."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            return
        log.log(record.levelno, "http_server", message=record.getMessage(), exc_info=error)


def server_logger() -> logging.Logger:
    """The logger to give aiohttp's request handler (`logger=`) instead of aiohttp.server."""
    logger = logging.getLogger("dnsoverride.cache.server")
    if not logger.handlers:
        logger.addHandler(_ServerErrors())
        logger.propagate = False
    return logger
