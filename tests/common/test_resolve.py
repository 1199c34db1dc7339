"""dnsoverride.resolve: the registry's own resolver (real dnsmasq on loopback) and loop check."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web

from dnsoverride.common.errors import UserError
from dnsoverride.common.loops import listener_owns
from dnsoverride.common.resolve import UpstreamResolver, refuse_loop
from tests.support import peers
from tests.support.ports import free_port

BIG_RRSET = 40  # A records: more than fit a 512-byte UDP reply, so dnsmasq sets TC


@pytest.fixture(scope="module")
def dnsmasq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    records = [f"--host-record=big.test,127.0.1.{i}" for i in range(1, BIG_RRSET + 1)]
    options = [
        "--address=/up.test/127.0.0.9",
        "--address=/nx.test/",
        "--host-record=target.test,127.0.0.11",
        "--cname=alias.test,target.test",
        "--host-record=dual.test,127.0.0.10,fd00::10",
        *records,
    ]
    with peers.dnsmasq(tmp_path_factory.mktemp("dnsmasq"), *options) as server:
        yield (server.host, server.port)


@pytest.mark.e2e
async def test_queries_the_given_servers(dnsmasq: tuple[str, int]) -> None:
    resolver = UpstreamResolver(servers=[dnsmasq])
    results = await resolver.resolve("UP.test", 443, socket.AF_INET)
    assert results == [
        {
            "hostname": "UP.test",
            "host": "127.0.0.9",
            "port": 443,
            "family": socket.AF_INET,
            "proto": 0,
            "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
        }
    ]
    assert await resolver.addresses("alias.test") == ["127.0.0.11"]  # followed CNAME
    assert await resolver.addresses("dual.test") == ["127.0.0.10", "fd00::10"]
    assert await resolver.addresses("dual.test", socket.AF_INET6) == ["fd00::10"]


@pytest.mark.e2e
async def test_truncated_answer_is_retried_over_tcp(dnsmasq: tuple[str, int]) -> None:
    addresses = await UpstreamResolver(servers=[dnsmasq]).addresses("big.test", socket.AF_INET)
    assert sorted(addresses) == sorted(f"127.0.1.{i}" for i in range(1, BIG_RRSET + 1))


@pytest.mark.e2e
async def test_nxdomain_and_refused_are_errors(dnsmasq: tuple[str, int]) -> None:
    resolver = UpstreamResolver(servers=[dnsmasq])
    with pytest.raises(OSError, match="no address found"):
        await resolver.addresses("nx.test")
    with pytest.raises(OSError, match="REFUSED"):
        await resolver.addresses("elsewhere.test")


@pytest.mark.e2e
async def test_dead_server_is_skipped(dnsmasq: tuple[str, int]) -> None:
    dead = ("127.0.0.1", free_port())  # nothing listens: ICMP port unreachable
    resolver = UpstreamResolver(servers=[dead, dnsmasq], timeout=1.0)
    assert await resolver.addresses("up.test", socket.AF_INET) == ["127.0.0.9"]
    with pytest.raises(OSError, match="no resolver answered"):
        await UpstreamResolver(servers=[dead], timeout=1.0).addresses("up.test")


async def test_fixed_hosts_win_and_filter_by_family() -> None:
    resolver = UpstreamResolver(hosts={"Registry-1.Docker.IO.": ["127.0.0.3", "fd00::3"]})
    assert await resolver.addresses("registry-1.docker.io") == ["127.0.0.3", "fd00::3"]
    assert await resolver.addresses("registry-1.docker.io", socket.AF_INET) == ["127.0.0.3"]
    assert await resolver.addresses("127.0.0.7") == ["127.0.0.7"]


@pytest.mark.e2e
async def test_aiohttp_client_connects_where_the_resolver_says(
    dnsmasq: tuple[str, int],
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.host}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.9", 0).start()
    port = runner.addresses[0][1]
    connector = aiohttp.TCPConnector(resolver=UpstreamResolver(servers=[dnsmasq]))
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(f"http://up.test:{port}/") as response,
        ):
            assert await response.text() == f"hello up.test:{port}"
    finally:
        await runner.cleanup()


async def test_loop_to_own_listener_is_refused() -> None:
    resolver = UpstreamResolver(hosts={"registry-1.docker.io": ["127.0.0.2"]})
    with pytest.raises(UserError, match=r"resolves to 127\.0\.0\.2.*forwarding loop"):
        await refuse_loop([("registry-1.docker.io", 443)], [("127.0.0.2", 443)], resolver)
    with pytest.raises(UserError, match="forwarding loop"):
        await refuse_loop([("registry-1.docker.io", 443)], [("0.0.0.0", 443)], resolver)


async def test_loop_to_a_listener_given_by_name_is_refused() -> None:
    """`listen: localhost:5000` binds 127.0.0.1 (or ::1): an upstream there is a loop."""
    resolver = UpstreamResolver()
    with pytest.raises(UserError, match="forwarding loop"):
        await refuse_loop([("127.0.0.1", 5000)], [("localhost", 5000)], resolver)
    await refuse_loop([("127.0.0.1", 5001)], [("localhost", 5000)], resolver)


async def test_no_loop_when_port_or_address_differ() -> None:
    resolver = UpstreamResolver(
        hosts={"registry-1.docker.io": ["127.0.0.3"], "far.test": ["192.0.2.1"]}
    )
    await refuse_loop([("registry-1.docker.io", 443)], [("127.0.0.2", 443)], resolver)
    await refuse_loop([("127.0.0.2", 5001)], [("127.0.0.2", 5000)], resolver)
    # 192.0.2.1 (TEST-NET-1) is not an address of this host, so a wildcard listener is not it.
    await refuse_loop([("far.test", 443)], [("0.0.0.0", 443)], resolver)


@pytest.mark.e2e
async def test_unresolvable_upstream_is_not_a_loop(dnsmasq: tuple[str, int]) -> None:
    resolver = UpstreamResolver(servers=[dnsmasq])
    await refuse_loop([("nx.test", 443)], [("127.0.0.1", 443)], resolver)


@pytest.mark.parametrize(
    ("listener", "address", "port", "owns"),
    [
        (("127.0.0.2", 53), "127.0.0.2", 53, True),
        (("127.0.0.2", 53), "127.0.0.3", 53, False),
        (("127.0.0.2", 53), "127.0.0.2", 5353, False),
        (("0.0.0.0", 53), "127.0.0.7", 53, True),  # any loopback address is this host's
        (("0.0.0.0", 53), "0.0.0.0", 53, True),
        (("", 5000), "127.0.0.1", 5000, True),
        (("::", 53), "192.0.2.1", 53, False),  # TEST-NET-1 is nobody's here
        (("::1", 53), "0:0::1", 53, True),
    ],
)
def test_listener_owns(listener: tuple[str, int], address: str, port: int, owns: bool) -> None:
    """The one loop test behind both daemons' start-up checks."""
    assert listener_owns(listener, address, port) is owns
