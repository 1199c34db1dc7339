"""cache/app.py: the Host header (and path prefix) picks the part of the cache that answers,
in the design's order; anything else is a 404 with a one-line reason, in the access log."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from dnsoverride.cache.app import Order, Route, host_name
from tests.support.cache_routes import get, serving


def _answer(name: str) -> web.Response:
    return web.Response(text=name)


def _route(name: str, order: Order, hosts: set[str] | None, *prefixes: str) -> Route:
    async def handler(request: web.Request) -> web.StreamResponse:
        return _answer(name)

    return Route(
        name,
        order,
        handler,
        frozenset(hosts) if hosts is not None else None,
        prefixes or ("/",),
    )


ROUTES = [
    # Registered out of order on purpose: the Order decides.
    _route("repositories", Order.REPOSITORIES, {"vault.centos.org", "dl.fedoraproject.org"}),
    _route("mirror-paths", Order.MIRROR_PATHS, None, "/packages/"),
    _route("registry", Order.REGISTRY, None, "/v2", "/token"),
    _route("mirrorlist", Order.MIRRORLIST, {"mirrorlist.centos.org"}),
    _route("metalink", Order.METALINK, {"mirrors.centos.org", "mirrors.fedoraproject.org"}),
]


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    async with serving(ROUTES) as url:
        yield url


async def _get(base_url: str, host: str, path: str) -> tuple[int, str]:
    status, _, body = await get(base_url + path, host)
    return status, body


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("cache.ci.example:5000", "/v2/", "registry"),
        ("registry-1.docker.io", "/v2/library/alpine/manifests/3", "registry"),
        ("cache.ci.example", "/token?scope=x", "registry"),
        ("mirrorlist.centos.org", "/?release=7&arch=x86_64&repo=os", "mirrorlist"),
        ("MirrorList.CentOS.org.:80", "/mirrorlist?release=7", "mirrorlist"),
        # A host a package route names is that route's, /v2 or not.
        ("mirrorlist.centos.org", "/v2/", "mirrorlist"),
        ("mirrors.fedoraproject.org", "/metalink?repo=epel-9&arch=x86_64", "metalink"),
        ("mirrors.centos.org:443", "/metalink?repo=centos-baseos-9-stream", "metalink"),
        ("vault.centos.org", "/7.9.2009/os/x86_64/repodata/repomd.xml", "repositories"),
        ("dl.fedoraproject.org", "/pub/epel/9/Everything/x86_64/", "repositories"),
        ("cache.ci.example", "/packages/epel/repodata/repomd.xml", "mirror-paths"),
        ("127.0.0.1:5000", "/packages/epel/Packages/h/hello.rpm", "mirror-paths"),
    ],
)
async def test_host_and_path_pick_the_handler(
    base_url: str, host: str, path: str, expected: str
) -> None:
    assert await _get(base_url, host, path) == (200, expected)


async def test_anything_else_is_a_404_with_its_reason_logged(base_url: str) -> None:
    with capture_logs() as logs:
        status, body = await _get(base_url, "cache.ci.example", "/index.html")
    reason = "nothing is served here for host 'cache.ci.example' at /index.html"
    assert (status, body) == (404, reason + "\n")
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["log_level"] == "warning"
    assert (line["status"], line["error_code"], line["error"]) == (404, "NOT_ROUTED", reason)


def test_host_name_normalises_ports_case_and_the_trailing_dot() -> None:
    assert host_name("Vault.CentOS.org.:8080") == "vault.centos.org"
    assert host_name("[::1]:5000") == "[::1]"
    assert host_name("::1") == "::1"
    assert host_name(None) == ""
