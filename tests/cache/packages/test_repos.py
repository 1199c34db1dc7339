"""The repository cache in-process, with an injected clock: revalidation after
`metadata_ttl` (conditional GET, one at a time), no state kept for roots with nothing to
serve, a restart with the upstream gone. The same real repositories and upstream as the
end-to-end tests (tests/cache/packages/test_cache.py), without dnf and a namespace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import structlog.testing
from aiohttp.test_utils import TestClient, TestServer

from dnsoverride.cache.app import Router, build_app
from dnsoverride.cache.fetch import Fetcher
from dnsoverride.cache.packages import repos
from dnsoverride.cache.packages.repos import PackagesMeter, RepositoryCache, upstream_health
from dnsoverride.cache.packages.repos_config import RepositoriesConfig, RepositoryUpstream
from dnsoverride.cache.store import Budget, Store
from tests.support.ports import free_port
from tests.support.yum_repos import C7_OS, PackageSet, World
from tests.support.yum_upstream import YumUpstream

TTL = 300.0
REPOMD = "/7.9.2009/os/x86_64/repodata/repomd.xml"
VAULT = {"Host": "vault.centos.org"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def upstream(world: World) -> Iterator[YumUpstream]:
    server = YumUpstream(world.root)
    # The cache asks it by address: its tree is published under that host too.
    server.publish(f"127.0.0.1/{C7_OS.partition('/')[2]}", world.repos[C7_OS].root)
    port = free_port()
    server.start([("127.0.0.1", port, None)])
    server.mirrorlist_base = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


@dataclass
class Running:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    cache: RepositoryCache
    clock: Clock


async def start(
    storage: Path, upstream: YumUpstream, budget: Budget | None = None
) -> AsyncIterator[Running]:
    port = upstream.listeners[0][1]
    config = RepositoriesConfig(
        metadata_ttl=TTL,
        upstreams=(
            RepositoryUpstream.make("vault", f"http://127.0.0.1:{port}/", ("vault.centos.org",)),
        ),
    )
    store = Store(storage, budget)
    store.open()
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        health = upstream_health(config)  # as PackagesService shares it
        fetcher = Fetcher(store, PackagesMeter(health))
        cache = RepositoryCache(config, store, fetcher, session, clock=clock, health=health)
        async with TestClient(TestServer(build_app(Router(cache.routes())))) as client:
            yield Running(client, cache, clock)
        await cache.close()
        await fetcher.close()


@pytest.fixture
async def running(tmp_path: Path, upstream: YumUpstream) -> AsyncIterator[Running]:
    async for item in start(tmp_path / "store", upstream):
        yield item


async def get(running: Running, path: str) -> tuple[int, bytes]:
    async with running.client.get(path, headers=VAULT) as response:
        return response.status, await response.read()


async def test_repomd_is_revalidated_after_the_ttl_with_a_conditional_get(
    running: Running, upstream: YumUpstream, world: World
) -> None:
    assert await get(running, REPOMD) == (200, world.repos[C7_OS].repomd)
    running.clock.now += TTL - 1
    assert (await get(running, REPOMD))[0] == 200
    assert upstream.count(REPOMD) == 1  # within the TTL: not asked
    running.clock.now += 1
    assert await get(running, REPOMD) == (200, world.repos[C7_OS].repomd)
    assert [r.status for r in upstream.requests if r.path == REPOMD] == [200, 304]
    # Nothing else was fetched again for an unchanged repomd.xml.
    assert len(upstream.requests) == 1 + len(world.repos[C7_OS].data()) + 1


async def test_concurrent_requests_share_one_revalidation(
    running: Running, upstream: YumUpstream
) -> None:
    results = await asyncio.gather(*(get(running, REPOMD) for _ in range(16)))
    assert {status for status, _ in results} == {200}
    assert len({body for _, body in results}) == 1
    running.clock.now += TTL
    await asyncio.gather(*(get(running, REPOMD) for _ in range(16)))
    assert upstream.count(REPOMD) == 2


async def test_roots_with_nothing_to_serve_leave_no_state(
    running: Running, upstream: YumUpstream
) -> None:
    """Fails without the clean-up in `snapshot`: every made-up path kept a Repository."""
    for index in range(50):
        status, body = await get(running, f"/made-up/{index}/repodata/repomd.xml")
        assert status == 502 and b"upstream answered 404" in body
    assert running.cache.repositories == {}
    assert (await get(running, REPOMD))[0] == 200
    assert list(running.cache.repositories) == [("vault", "7.9.2009/os/x86_64/")]


async def test_a_restarted_cache_serves_its_snapshot_with_the_upstream_down(
    tmp_path: Path, upstream: YumUpstream, world: World
) -> None:
    repo = world.repos[C7_OS]
    package = next(iter(repo.packages.values()))
    path = "/7.9.2009/os/x86_64/" + package
    async for first in start(tmp_path / "store", upstream):
        assert (await get(first, REPOMD))[0] == 200
        assert await get(first, path) == (200, (repo.root / package).read_bytes())
    upstream.set_down(True)
    async for second in start(tmp_path / "store", upstream):
        assert await get(second, REPOMD) == (200, repo.repomd)
        primary = repo.data()["primary"].href
        assert await get(second, "/7.9.2009/os/x86_64/" + primary) == (
            200,
            (repo.root / primary).read_bytes(),
        )
        assert await get(second, path) == (200, (repo.root / package).read_bytes())


async def test_a_slow_new_version_does_not_hold_clients_up(
    running: Running, upstream: YumUpstream, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a new repomd.xml's files download, clients get the served snapshot after
    REVALIDATE_WAIT; once they are in, the new one."""
    monkeypatch.setattr(repos, "REVALIDATE_WAIT", 0.2)
    old, new = world.repos[C7_OS], world.next_generation[C7_OS]
    assert await get(running, REPOMD) == (200, old.repomd)
    upstream.publish(f"127.0.0.1/{C7_OS.partition('/')[2]}", new.root)
    release = threading.Event()
    upstream.hold[new.data()["primary"].href] = release
    running.clock.now += TTL
    assert await get(running, REPOMD) == (200, old.repomd)
    assert upstream.holding.is_set()
    # Past REVALIDATE_WAIT from the revalidation's start, later requests do not wait again
    # (failed before: each waited REVALIDATE_WAIT, 5 s per request against a slow mirror).
    monkeypatch.setattr(repos, "REVALIDATE_WAIT", 30.0)
    assert await asyncio.wait_for(get(running, REPOMD), 5) == (200, old.repomd)
    release.set()
    refresh = running.cache.repositories[("vault", "7.9.2009/os/x86_64/")].refresh
    assert refresh is not None
    await refresh
    assert await get(running, REPOMD) == (200, new.repomd)


async def test_content_lookups_are_counted_by_kind_for_status(
    running: Running, world: World
) -> None:
    """What `/status` reports as the package side's hit ratio (cache/status.py): a package
    is a miss, then a hit; repodata the snapshot fetched is a hit when a client asks."""
    repo = world.repos[C7_OS]
    package = "/7.9.2009/os/x86_64/" + next(iter(repo.packages.values()))
    assert (await get(running, REPOMD))[0] == 200
    for _ in range(2):
        assert (await get(running, package))[0] == 200
    assert (await get(running, "/7.9.2009/os/x86_64/" + repo.data()["primary"].href))[0] == 200
    assert running.cache.lookups == {
        ("packages", "miss"): 1,
        ("packages", "hit"): 1,
        ("repodata", "hit"): 1,
    }


async def test_a_version_that_failed_to_build_is_tried_again(
    running: Running, upstream: YumUpstream, world: World
) -> None:
    """A new repomd.xml whose primary failed once is fetched in full at the next
    revalidation and served once its files come. Failed before the fix: its ETag was kept
    although it was never served, the upstream answered 304 and the old snapshot stayed
    served for good, without a log line."""
    old, new = world.repos[C7_OS], world.next_generation[C7_OS]
    assert await get(running, REPOMD) == (200, old.repomd)
    upstream.publish(f"127.0.0.1/{C7_OS.partition('/')[2]}", new.root)
    upstream.fail[new.data()["primary"].href] = 503
    running.clock.now += TTL
    assert await get(running, REPOMD) == (200, old.repomd)
    del upstream.fail[new.data()["primary"].href]
    running.clock.now += TTL
    assert await get(running, REPOMD) == (200, new.repomd)
    assert [r.status for r in upstream.requests if r.path == REPOMD][-1] == 200


async def test_upstream_redirects_are_followed_only_within_its_origin(
    tmp_path: Path, upstream: YumUpstream, world: World
) -> None:
    """A redirect to another origin (here an address standing for one inside the network)
    is refused with a 502 and a log line; one within the upstream's origin is followed.
    Failed before the fix: the passthrough answered 200 with the other address's body."""
    elsewhere = f"http://127.0.0.1:{upstream.listeners[0][1]}/7.9.2009/os/x86_64/"
    repo = world.repos[C7_OS]
    package = next(iter(repo.packages.values()))

    async def mirror(request: aiohttp.web.Request) -> aiohttp.web.Response:
        name = request.match_info["name"]
        if name.startswith("a/"):  # moved, within the origin
            raise aiohttp.web.HTTPFound("/b/" + name.removeprefix("a/"))
        if name.startswith("b/"):
            file = repo.root / name.removeprefix("b/")
            if not file.is_file():
                raise aiohttp.web.HTTPNotFound()
            return aiohttp.web.Response(body=file.read_bytes())
        raise aiohttp.web.HTTPFound(elsewhere + name)

    app = aiohttp.web.Application()
    app.router.add_get("/{name:.*}", mirror)
    async with TestServer(app) as redirector:
        config = RepositoriesConfig(
            metadata_ttl=TTL,
            upstreams=(
                RepositoryUpstream.make(
                    "vault", f"http://127.0.0.1:{redirector.port}/", ("vault.centos.org",)
                ),
            ),
        )
        store = Store(tmp_path / "store")
        store.open()
        async with aiohttp.ClientSession() as session:
            fetcher = Fetcher(store, PackagesMeter())
            cache = RepositoryCache(config, store, fetcher, session)
            async with TestClient(TestServer(build_app(Router(cache.routes())))) as client:
                with structlog.testing.capture_logs() as logs:
                    async with client.get("/RPM-GPG-KEY-CentOS-7", headers=VAULT) as r:
                        assert r.status == 502
                        assert "another origin" in await r.text()
                assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
                    "upstream_redirect_refused"
                ]
                async with client.get("/a/repodata/repomd.xml", headers=VAULT) as r:
                    assert (r.status, await r.read()) == (200, repo.repomd)
                async with client.get("/a/" + package, headers=VAULT) as r:
                    assert (r.status, await r.read()) == (200, (repo.root / package).read_bytes())
            await cache.close()
            await fetcher.close()


async def test_a_trickling_repomd_is_given_up_after_a_total_timeout(
    running: Running, upstream: YumUpstream, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream that sends repomd.xml a few bytes at a time (never idle long enough for
    the idle timeout): the revalidation gives up after REPOMD_TIMEOUT, the snapshot is
    served stale with `repository_stale`. Failed before the fix: no total bound, no log
    line, the revalidation ran on (and cold clients waited for it)."""
    monkeypatch.setattr(repos, "REPOMD_TIMEOUT", 0.3, raising=False)
    assert await get(running, REPOMD) == (200, world.repos[C7_OS].repomd)
    upstream.publish(f"127.0.0.1/{C7_OS.partition('/')[2]}", world.next_generation[C7_OS].root)
    upstream.chunk, upstream.rate = 16, 200.0
    running.clock.now += TTL
    with structlog.testing.capture_logs() as logs:
        assert await asyncio.wait_for(get(running, REPOMD), 3) == (200, world.repos[C7_OS].repomd)
    stale = [e for e in logs if e["event"] == "repository_stale"]
    assert stale and "longer than 0.3 s" in stale[0]["reason"]


async def test_dot_and_empty_segments_name_the_same_repository(
    running: Running, world: World
) -> None:
    """`./` and `//` in a path are one repository with the plain path, not one each.
    Failed before the fix: every alias was a repository of its own (fetched, built and
    recorded again)."""
    assert await get(running, REPOMD) == (200, world.repos[C7_OS].repomd)
    for alias in ("/./7.9.2009/os/x86_64/", "/7.9.2009/./os//x86_64/", "//7.9.2009/os/x86_64/./"):
        # Raw: the HTTP client would remove the dot segments itself.
        reader, writer = await asyncio.open_connection("127.0.0.1", running.client.port)
        writer.write(
            f"GET {alias}repodata/repomd.xml HTTP/1.1\r\nHost: vault.centos.org\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(world.repos[C7_OS].repomd)
    assert list(running.cache.repositories) == [("vault", "7.9.2009/os/x86_64/")]


async def test_a_snapshot_larger_than_the_budget_is_kept_whole(
    tmp_path: Path, upstream: YumUpstream, world: World
) -> None:
    """A budget of half one snapshot's metadata: the snapshot is kept whole (pinned from the
    start of its build, its repomd.xml with it) above the budget, with one
    `store_budget_too_small` line; its files and repomd.xml are served with the upstream
    down, also after a restart and packages downloaded meanwhile. Failed before the fix:
    files committed early in the build were evicted by later ones (pins came only at the
    switch), so the served repomd.xml listed files the store had lost, and the recorded
    repomd.xml was evicted by the packages (after a restart: 502)."""
    repo = world.repos[C7_OS]
    root = "/7.9.2009/os/x86_64/"
    budget = Budget(sum(item.size for item in repo.data().values()) // 2)
    packages = list(repo.packages.values())[:3]
    async for first in start(tmp_path / "store", upstream, budget):
        with structlog.testing.capture_logs() as logs:
            assert await get(first, REPOMD) == (200, repo.repomd)
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
            "store_budget_too_small"
        ]
        for package in packages:
            assert await get(first, root + package) == (200, (repo.root / package).read_bytes())
        upstream.set_down(True)
        for item in repo.data().values():
            assert await get(first, root + item.href) == (
                200,
                (repo.root / item.href).read_bytes(),
            ), item.type
    async for second in start(tmp_path / "store", upstream, budget):
        assert await get(second, REPOMD) == (200, repo.repomd)


@pytest.mark.parametrize("damage", ["null", "[]", '{"repomd": 5}', "{not json", "flipped"])
async def test_a_damaged_record_is_logged_and_not_served(
    tmp_path: Path, upstream: YumUpstream, world: World, damage: str
) -> None:
    """A state file that is JSON but not an object, names no digest, is not JSON, or names a
    stored repomd.xml whose bytes changed on disk: with the upstream down the client gets
    502 with the reason, the log `repository_not_restored` naming the file. Failed before
    the fix: `null` raised TypeError (500 and a traceback on every request), `flipped`
    served the changed bytes, the others were dropped without a log line."""
    repo = world.repos[C7_OS]
    async for first in start(tmp_path / "store", upstream):
        assert (await get(first, REPOMD))[0] == 200
    [state] = (tmp_path / "store" / "packages-state").glob("*/*.json")
    if damage == "flipped":
        recorded = json.loads(state.read_text())["repomd"].removeprefix("sha256:")
        [blob] = (tmp_path / "store" / "repodata").glob(f"sha256/*/{recorded}")
        blob.write_bytes(repo.repomd.replace(b"<revision>", b"<revision>9"))
    else:
        state.write_text(damage)
    upstream.set_down(True)
    async for second in start(tmp_path / "store", upstream):
        with structlog.testing.capture_logs() as logs:
            assert (await get(second, REPOMD))[0] == 502
            assert (await get(second, REPOMD))[0] == 502
        # Once: the unusable record is removed.
        [line] = [e for e in logs if e["event"] == "repository_not_restored"]
        assert line["file"] == str(state)
        assert not state.exists()


async def test_escaped_query_and_fragment_characters_stay_in_the_upstream_path(
    running: Running, upstream: YumUpstream
) -> None:
    """`%3F` and `%23` in a client's path are path characters: the upstream is asked for
    the same path, not a query or a fragment. Failed before the fix: the decoded path was
    appended as it was, `?x=1` became the upstream request's query."""
    for name in ("RPM-GPG-KEY%3Fx=1", "RPM-GPG-KEY%23frag"):
        status, _ = await get(running, "/7.9.2009/os/x86_64/" + name)
        assert status == 404  # the upstream has no such file, and said so
        assert upstream.requests[-1].path == "/7.9.2009/os/x86_64/" + name


async def test_wrong_package_bytes_make_the_upstream_failing(
    running: Running, upstream: YumUpstream, world: World, package_set: PackageSet
) -> None:
    """A package whose bytes do not match the repodata's checksum is a failure of its
    upstream in `status` (its 200 was counted as an answer), and a package it then sends
    whole is an answer again (`recent failures`, not DOWN). Fails before: the download
    failed and was logged, but the upstream stayed `up`; then (the bad download counted)
    the upstream stayed DOWN after good downloads until the next repomd revalidation."""
    assert (await get(running, REPOMD))[0] == 200
    health = running.cache.health["vault"]
    assert health.failing_since is None
    upstream.wrong_bytes.add("/" + package_set.hello.filename)
    href = world.repos[C7_OS].packages[package_set.hello.filename]
    path = REPOMD.replace("repodata/repomd.xml", href)
    # Streamed as it comes: cut when the checksum fails, or a 502 when it failed first.
    with contextlib.suppress(aiohttp.ClientPayloadError):
        status, body = await get(running, path)
        assert (status, body) != (200, package_set.hello.path.read_bytes())
    assert health.failing_since is not None
    assert "does not match its digest" in (health.reason or ""), health.reason
    upstream.wrong_bytes.clear()
    assert await get(running, path) == (200, package_set.hello.path.read_bytes())
    assert health.failing_since is None and health.failures
