"""`dnsoverride status` against real running daemons: the DNS server (with a dnsmasq
upstream, views, a health-withdrawn override, a reload that fails) and the cache daemon's
registry (with a lying upstream holding a blob, so a download is in flight with waiters, and a
429 with Retry-After). The JSON is compared with what was loaded and asked; the table is
checked under a real pseudo-terminal, the plain text through a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import dns.message
import dns.name
import dns.rcode
import pytest

from dnsoverride.dns.forwarder import DEMOTE_AFTER, DEMOTION
from tests.support import terminal
from tests.support.edits import health_withdrawn_zone
from tests.support.peers import dnsmasq, dnsoverride_serve, lying_upstream
from tests.support.ports import free_port, silent_port
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_liar import LyingRegistry, digest_of
from tests.support.registry_peers import TestProxy

pytestmark = pytest.mark.e2e  # every test runs the CLI or a daemon
DNSMASQ = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq")
COMMAND = [sys.executable, "-m", "dnsoverride", "status"]


def status_json(*args: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [*COMMAND, "--json", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result
    documents: list[dict[str, Any]] = json.loads(result.stdout)
    return documents


def upstream_status(admin: str, name: str) -> dict[str, Any]:
    """The registry upstream `name` of the cache's `status --json` at `admin`."""
    [document] = status_json("--admin", admin)
    [upstream] = [u for u in document["upstreams"] if u["name"] == name]
    return upstream  # type: ignore[no-any-return]


async def read_through_a_cut(http: aiohttp.ClientSession, url: str) -> None:
    """GET `url` to its end, or to the cut that ends a body streamed as it came from an
    upstream whose bytes then failed."""
    with contextlib.suppress(aiohttp.ClientPayloadError):
        async with http.get(url) as response:
            await response.read()


def on_a_terminal(*args: str) -> str:
    """The output of `status ARGS` with stdout on a pseudo-terminal, as a user sees it."""
    return terminal.on_a_terminal([*COMMAND, *args])


@DNSMASQ
@pytest.mark.timeout(90)
def test_dns_status_reports_what_was_loaded_and_asked(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(
        "records:\n  registry-1.docker.io:\n    A: 10.0.0.5\n  quay.io:\n    A: 10.0.0.6\n"
    )
    admin = f"127.0.0.1:{free_port()}"
    config = (
        f"zones: {zones}\nmetrics: {admin}\n"
        "views:\n  - {name: cache-host, clients: [10.0.0.5/32], zones: []}\n"
    )
    with (
        health_withdrawn_zone(zones),
        dnsmasq(tmp_path, "--address=/forwarded.test/192.0.2.1") as upstream,
        dnsoverride_serve(tmp_path, zones, [upstream.address], config=config) as server,
    ):
        for _ in range(5):
            server.query("registry-1.docker.io")
        server.query("forwarded.test")
        config_file = next(tmp_path.glob("dnsoverride-*.yaml"))
        deadline = time.monotonic() + 20
        while True:
            [dns] = status_json("--config", str(config_file))  # found from its `metrics:`
            if dns["health"] and dns["health"][0]["withdrawn"]:
                break
            assert time.monotonic() < deadline, dns
            time.sleep(0.1)
        assert dns["daemon"] == "dns" and dns["admin"] == admin
        assert dns["listeners"] == [server.address]
        assert dns["zones"]["names"] == 3
        assert dns["zones"]["files"] == [
            {"name": "ci.yaml", "names": 2},
            {"name": "gated.yaml", "names": 1},
        ]
        assert dns["reload"]["last_result"] == "success"
        assert dns["reload"]["successes"] == 1
        assert [(v["name"], v["clients"], v["default"]) for v in dns["views"]] == [
            ("cache-host", ["10.0.0.5/32"], False),
            ("default", [], True),
        ]
        assert dns["health"] == [
            {"name": "gated.test", "withdrawn": True, "targets": {"127.0.0.1": False}}
        ]
        assert dns["upstreams"][0]["address"] == upstream.address
        assert dns["upstreams"][0]["up"] is True
        answer = dns["caches"]["answer"]
        assert answer["hits"] >= 4 and answer["entries"] >= 1, answer
        assert dns["queries"]["total"] >= 6
        assert dns["queries"]["qps"] is not None and dns["queries"]["qps"] > 0

        (zones / "ci.yaml").write_text("records:\n  bad.test:\n    A: 10.0.0.300\n")
        deadline = time.monotonic() + 20
        while dns["reload"]["last_result"] != "failure":
            assert time.monotonic() < deadline, dns["reload"]
            time.sleep(0.1)
            [dns] = status_json("--admin", admin)
        [problem] = dns["reload"]["last_problems"]
        assert problem.startswith(f"{zones / 'ci.yaml'}:3: ")
        assert "not an IPv4 address" in problem
        assert dns["zones"]["names"] == 3  # the last good set is still served

        drawn = on_a_terminal("--admin", admin)
        assert "\x1b[" in drawn  # colour
        table = re.sub(r"\x1b\[[0-9;]*m", "", drawn)
        assert re.search(r"┃ upstream +┃ state +┃ failures +┃", table), table
        assert re.search(rf"│ {re.escape(upstream.address)} +│ up +│", table), table
        assert re.search(r"│ gated\.test +│ WITHDRAWN +│ 127\.0\.0\.1 down +│", table), table
        assert re.search(rf"│ +problem +│ {re.escape(problem)} +│", table), table
        plain = subprocess.run(
            [*COMMAND, "--admin", admin], capture_output=True, text=True, check=True
        ).stdout
        assert "\x1b[" not in plain and "│" not in plain
        assert f"dns {admin}: DNS server, pid" in plain
        assert re.search(rf"^ +problem +{re.escape(problem)}$", plain, re.MULTILINE), plain
        assert "gated.test  WITHDRAWN  127.0.0.1 down" in plain


def _drops_questions(data: bytes, _tcp: bool) -> bytes | None:
    """An upstream that answers the health probe but lets every client question time out
    (a resolver whose own uplink is gone)."""
    query = dns.message.from_wire(data)
    if query.question[0].name.is_subdomain(dns.name.from_text("fwd.test")):
        return None
    reply = dns.message.make_response(query)
    reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply.to_wire()


@DNSMASQ
def test_dns_status_shows_a_demoted_upstream(tmp_path: Path) -> None:
    """An upstream that let DEMOTE_AFTER questions time out that the other answered is
    tried after the others for DEMOTION seconds; `status` showed it as `up`, like one that
    answers. Now: `demoted, N s left`, and the DNS server's headline a problem. Fails on
    the code before (no demoted state in /status)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    admin = f"127.0.0.1:{free_port()}"
    with (
        lying_upstream(_drops_questions) as dropping,
        dnsmasq(tmp_path, "--address=/fwd.test/192.0.2.1") as good,
        dnsoverride_serve(
            tmp_path, zones, [dropping.address, good.address], "--metrics", admin
        ) as server,
    ):
        for index in range(DEMOTE_AFTER):
            assert server.query(f"n{index}.fwd.test", timeout=5).rcode() == dns.rcode.NOERROR
        [doc] = status_json("--admin", admin)
        first, second = doc["upstreams"]
        assert first["address"] == dropping.address and first["up"] is True
        assert 0 < first["demoted_seconds"] <= DEMOTION, first
        assert second["demoted_seconds"] is None, second
        plain = subprocess.run(
            [*COMMAND, "--admin", admin], capture_output=True, text=True, check=True
        ).stdout
        assert re.search(
            rf"^ +{re.escape(dropping.address)} +demoted, [0-9.]+ s left +timeout {DEMOTE_AFTER}$",
            plain,
            re.MULTILINE,
        ), plain
        drawn = on_a_terminal("--admin", admin)
        assert "\x1b[1;31mdns" in drawn, drawn  # the headline drawn as a problem


def test_an_unreachable_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [*COMMAND, "--admin", f"127.0.0.1:{port}"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == (
        f"unreachable 127.0.0.1:{port}: 127.0.0.1:{port} (--admin): cannot connect: "
        "Connection refused"
    )
    nothing = tmp_path / "serve.yaml"
    nothing.write_text("listen: 127.0.0.1:5353\n")
    missing = subprocess.run(
        [*COMMAND, "--config", str(nothing)], capture_output=True, text=True, check=False
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines() == [
        f"dnsoverride: error: no admin endpoint found in {nothing} (no such file, or no "
        "`metrics:` or `control_socket:` in it); give --admin HOST:PORT (the daemon's --metrics)"
    ]


@pytest.mark.timeout(60)
async def test_registry_status_shows_downloads_waiters_backoff_and_errors(
    tmp_path: Path, start_cache: StartCache
) -> None:
    blob = os.urandom(3 << 20)
    digest = digest_of(blob)
    async with LyingRegistry() as liar:
        liar.blobs[digest] = blob
        release = liar.hold[f"/blobs/{digest}"] = asyncio.Event()
        admin = f"127.0.0.1:{free_port()}"
        cache = start_cache(liar.url, "--metrics", admin, "--max-size", "1G")

        async def status() -> dict[str, Any]:
            process = await asyncio.create_subprocess_exec(
                *COMMAND, "--json", "--admin", admin, stdout=subprocess.PIPE
            )
            out, _ = await process.communicate()
            assert process.returncode == 0
            [document] = json.loads(out)
            return document  # type: ignore[no-any-return]

        try:
            async with aiohttp.ClientSession() as http:
                url = f"http://{cache.address}/v2/team/app/blobs/{digest}"
                pulls = [asyncio.create_task(http.get(url)) for _ in range(3)]
                await asyncio.wait_for(liar.holding.wait(), 10)
                deadline = time.monotonic() + 10
                while True:
                    document = await status()
                    downloads = document["downloads"]
                    if downloads and downloads[0]["waiters"] == 3:
                        break
                    assert time.monotonic() < deadline, downloads
                    await asyncio.sleep(0.05)
                assert downloads == [
                    {
                        "side": "registry",
                        "kind": "blobs",
                        "digest": digest,
                        "upstream": f"127.0.0.1:{liar.port}",  # an upstream's name: its URL's host
                        "repository": "team/app",
                        "bytes": 0,
                        "size": None,
                        "waiters": 3,
                    }
                ]
                release.set()
                for pull in pulls:
                    response = await pull
                    assert await response.read() == blob
                liar.fail = (429, {"Retry-After": "120"})
                missing = f"http://{cache.address}/v2/team/other/manifests/v1"
                async with http.get(missing) as response:
                    assert response.status == 429
        finally:
            release.set()  # a failed assertion must not leave the liar's handler held
        document = await status()
    assert document["downloads"] == []
    assert document["daemon"] == "cache"
    store = document["store"]
    assert store["budget_bytes"] == 1 << 30 and store["bytes"] == len(blob)
    assert document["hits"]["blob"]["misses"] == 3
    # The package side's kinds, from the same daemon and store (nothing asked of them here).
    for kind in ("packages", "repodata"):
        assert document["hits"][kind] == {"hits": 0, "misses": 0, "hit_ratio": None}
    [upstream] = document["upstreams"]
    assert upstream["backoff"]["team/other"]["status"] == 429
    assert 100 < upstream["backoff"]["team/other"]["seconds_left"] <= 120
    [error] = document["recent_errors"]
    assert (error["request"], error["status"], error["code"]) == (
        "GET /v2/team/other/manifests/v1",
        429,
        "TOOMANYREQUESTS",
    )
    assert document["coalesced"] == 2
    process = await asyncio.create_subprocess_exec(
        *COMMAND, "--admin", admin, stdout=subprocess.PIPE
    )
    plain = (await process.communicate())[0].decode()
    assert "3.0 MiB in 1 entries of 1.0 GiB (0%)" in plain, plain
    assert "team/other 429 for" in plain
    assert re.search(r"GET /v2/team/other/manifests/v1 +429 TOOMANYREQUESTS", plain), plain


@pytest.mark.timeout(60)
async def test_an_admin_listener_others_reach_withholds_repository_names(
    tmp_path: Path, start_cache: StartCache
) -> None:
    """On an admin listener bound to a wildcard address (where Prometheus scrapes), `/status`
    names no repository, digest or failure reason: a private repository's name is what
    `cache ls` is refused there for. The control socket still has them all. Failed before:
    the download in flight named team/secret and its digest, the error team/other."""
    blob = os.urandom(1 << 20)
    digest = digest_of(blob)
    async with LyingRegistry() as liar:
        liar.blobs[digest] = blob
        release = liar.hold[f"/blobs/{digest}"] = asyncio.Event()
        port = free_port()
        wildcard, socket_path = f"127.0.0.1:{port}", tmp_path / "control" / "cache.sock"
        cache = start_cache(
            liar.url, "--metrics", f"0.0.0.0:{port}", "--control-socket", str(socket_path)
        )
        try:
            async with aiohttp.ClientSession() as http:
                pull = asyncio.create_task(
                    http.get(f"http://{cache.address}/v2/team/secret/blobs/{digest}")
                )
                await asyncio.wait_for(liar.holding.wait(), 10)
                [local] = status_json("--admin", str(socket_path))
                assert [d["repository"] for d in local["downloads"]] == ["team/secret"]
                [remote] = status_json("--admin", wildcard)
                [download] = remote["downloads"]
                assert (download["repository"], download["digest"]) == ("(withheld)",) * 2
                assert "team/secret" not in json.dumps(remote) and digest not in json.dumps(remote)
                release.set()
                assert await (await pull).read() == blob
                liar.fail = (429, {"Retry-After": "120"})
                missing = f"http://{cache.address}/v2/team/other/manifests/v1"
                async with http.get(missing) as response:
                    assert response.status == 429
        finally:
            release.set()
        [local] = status_json("--admin", str(socket_path))
        assert local["names_withheld"] is False and "team/other" in json.dumps(local)
        [remote] = status_json("--admin", wildcard)
        assert remote["names_withheld"] is True
        assert "team/other" not in json.dumps(remote), remote
        [error] = remote["recent_errors"]
        assert (error["request"], error["status"]) == ("GET (withheld)", 429)
        [upstream] = remote["upstreams"]
        assert [b["status"] for b in upstream["backoff"].values()] == [429]
        process = await asyncio.create_subprocess_exec(
            *COMMAND, "--admin", wildcard, stdout=subprocess.PIPE
        )
        plain = (await process.communicate())[0].decode()
        assert "withheld on this listener" in plain and "team/other" not in plain, plain


@pytest.mark.timeout(60)
async def test_status_shows_no_credentials_of_an_upstream_url(
    tmp_path: Path, start_cache: StartCache
) -> None:
    """An upstream URL with credentials in it (`http://user:password@mirror/`, as yum's
    baseurl takes them) is shown without them, on the control socket too, and a wildcard
    listener's document, its failing repositories withheld, renders as plain text and on
    a terminal. Failed before: `url` carried `mirror:s3cret` to anyone reaching the
    Prometheus port."""
    port, control = free_port(), tmp_path / "control" / "cache.sock"
    with silent_port() as dead:
        config = {
            "registry": {
                "upstreams": [{"url": f"http://robot:s3cret@{dead}", "name": "registry.test"}]
            },
            "packages": {
                "upstreams": [
                    {"name": "vault", "url": f"http://mirror:s3cret@{dead}/vault/", "hosts": ["v"]}
                ]
            },
            "metrics": f"0.0.0.0:{port}",
            "control_socket": str(control),
        }
        cache = start_cache(config=config)
        async with aiohttp.ClientSession() as http:
            url = f"http://{cache.address}/packages/vault/9/repodata/repomd.xml"
            async with http.get(url) as response:
                assert response.status == 502
        [local] = status_json("--admin", str(control))
        [remote] = status_json("--admin", f"127.0.0.1:{port}")
        assert "s3cret" not in json.dumps(local) + json.dumps(remote), (local, remote)
        assert [u["url"] for u in local["upstreams"]] == [f"http://{dead}"]
        assert [u["url"] for u in local["package_upstreams"]] == [f"http://{dead}/vault/"]
        assert "vault/9/" in local["package_upstreams"][0]["detail"]
        process = await asyncio.create_subprocess_exec(
            *COMMAND, "--admin", f"127.0.0.1:{port}", stdout=subprocess.PIPE
        )
        plain = (await process.communicate())[0].decode()
        drawn = on_a_terminal("--admin", f"127.0.0.1:{port}")
        for text in (plain, drawn):
            assert "withheld on this listener" in text and "vault/9" not in text, text
            assert "s3cret" not in text and "Traceback" not in text, text


@pytest.mark.timeout(60)
async def test_a_blob_with_wrong_bytes_makes_its_upstream_failing(
    tmp_path: Path, start_cache: StartCache, proxy: TestProxy, publish: Publish
) -> None:
    """An upstream that answers a blob 200 with bytes that do not match its digest is
    failing in `status`, with the reason (as a manifest's wrong bytes already were).
    Fails before: the 200 counted as an answer and the upstream stayed `up`."""
    image = await publish("team/app:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    cache = start_cache(config={"registry": {"upstreams": [{"url": proxy.url}]}, "metrics": admin})
    live = f"{proxy.host}:{proxy.port}"
    blob = max(image.blobs, key=lambda digest: image.blobs[digest])
    proxy.corrupt.add(blob)
    async with aiohttp.ClientSession() as http:
        base = f"http://{cache.address}"
        async with http.get(f"{base}/v2/team/app/manifests/v1") as response:
            assert response.status == 200
        await read_through_a_cut(http, f"{base}/v2/team/app/blobs/{blob}")
    upstream = upstream_status(admin, live)
    assert upstream["state"] == "DOWN", upstream
    assert "does not match its digest" in upstream["detail"], upstream


@pytest.mark.timeout(60)
async def test_a_blob_body_the_upstream_cuts_short_makes_it_failing(
    tmp_path: Path, start_cache: StartCache, proxy: TestProxy, publish: Publish
) -> None:
    """An upstream that answers a blob 200 and then resets the connection mid-body is
    failing in `status` (a reset connection is a failure, whenever it comes), and the next
    whole answer makes it `recent failures`, not DOWN. Failed before: the 200 counted as
    an answer, the cut nowhere, and the upstream stayed `up`."""
    image = await publish("team/app:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    cache = start_cache(config={"registry": {"upstreams": [{"url": proxy.url}]}, "metrics": admin})
    live = f"{proxy.host}:{proxy.port}"
    blob = max(image.blobs, key=lambda digest: image.blobs[digest])
    proxy.cut_after = 1000
    async with aiohttp.ClientSession() as http:
        base = f"http://{cache.address}"
        await read_through_a_cut(http, f"{base}/v2/team/app/blobs/{blob}")
        upstream = upstream_status(admin, live)
        assert upstream["state"] == "DOWN", upstream
        assert str(blob) in upstream["detail"], upstream
        proxy.cut_after = None
        async with http.get(f"{base}/v2/team/app/blobs/{blob}") as response:
            assert response.status == 200 and len(await response.read()) == image.blobs[blob]
    upstream = upstream_status(admin, live)
    assert upstream["state"] == "recent failures", upstream


@pytest.mark.timeout(60)
async def test_cache_status_says_which_upstreams_are_down(
    tmp_path: Path, start_cache: StartCache, proxy: TestProxy, publish: Publish
) -> None:
    """A registry and a package upstream nobody answers for are DOWN (with the reason), one
    that failed and answered again has `recent failures`, and the report is not ok. Fails
    before issue 14's status fix: the cache's upstreams had no verdict at all, a dead one
    looked like any other."""
    await publish("team/app:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    with silent_port() as dead:
        config = {
            "registry": {
                "upstreams": [{"url": f"http://{dead}"}, {"url": proxy.url}],
                "default_upstream": dead,
            },
            "packages": {
                "upstreams": [
                    {"name": "vault", "url": f"http://{dead}/vault/", "hosts": ["vault.test"]}
                ]
            },
            "metrics": admin,
        }
        cache = start_cache(config=config)
        live = f"{proxy.host}:{proxy.port}"
        async with aiohttp.ClientSession() as http:
            base = f"http://{cache.address}"
            async with http.get(f"{base}/v2/team/app/manifests/v1") as response:
                assert response.status == 503
            async with http.get(f"{base}/packages/vault/9/repodata/repomd.xml") as response:
                assert response.status == 502
            proxy.fail_status = 500
            async with http.get(f"{base}/v2/team/app/manifests/v1?ns={live}") as response:
                assert response.status == 503
            proxy.fail_status = None
            async with http.get(f"{base}/v2/team/app/manifests/v1?ns={live}") as response:
                assert response.status == 200
        [document] = status_json("--admin", admin)
        registry = {u["name"]: u for u in document["upstreams"]}
        assert registry[dead]["state"] == "DOWN"
        assert "Connect" in registry[dead]["detail"], registry[dead]
        assert registry[live]["state"] == "recent failures"
        assert "HTTP 500" in registry[live]["detail"]
        [vault] = document["package_upstreams"]
        assert (vault["name"], vault["state"]) == ("vault", "DOWN")
        assert vault["detail"].startswith("failing for ") and "vault/9/: " in vault["detail"]
        process = await asyncio.create_subprocess_exec(
            *COMMAND, "--admin", admin, stdout=subprocess.PIPE
        )
        plain = (await process.communicate())[0].decode()
        assert re.search(rf"^ +{re.escape(dead)} +DOWN +failing for \d+ s: ", plain, re.M), plain
        assert re.search(rf"^ +{re.escape(live)} +recent failures +1 failed", plain, re.M)
        assert re.search(r"^ +vault +DOWN +", plain, re.M), plain
        drawn = on_a_terminal("--admin", admin)
        assert "\x1b[1;31mcache " in drawn  # the report drawn as a problem: red
