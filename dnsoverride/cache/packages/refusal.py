"""How the package responders take and refuse a request: query values checked before
they go into a URL or a reason, and a refusal as one plain-text line with the reason
(dnf shows it with the status) and the same reason on the request's access-log line."""

from __future__ import annotations

import re

from aiohttp import web

from dnsoverride.cache.accesslog import ERROR_KEY, remember

# A release, repo or arch: what the real servers' names look like (`7`, `8-stream`,
# `7.9.2009`, `centos-baseos-9-stream`, `epel-10.0`, `x86_64`), nothing that could change
# a URL's path or add a line to a list.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class NoAnswerError(Exception):
    """The request has no answer here; the message is the client's one-line reason."""


def query_name(request: web.Request, key: str) -> str:
    """The query parameter `key`, a release/repo/arch name; NoAnswerError when it is
    missing or not such a name."""
    value = request.query.get(key)
    if not value:
        raise NoAnswerError(f"{key} not specified")
    if not _NAME.match(value):
        raise NoAnswerError(f"invalid {key} {value[:100]!r}")
    return value


def refuse(request: web.Request, status: int, code: str, reason: str) -> web.Response:
    """`status` with `reason` as a plain-text line, noted (`code`) for the access log."""
    remember(request, ERROR_KEY, (code, reason))
    return web.Response(status=status, text=reason + "\n")
