"""The cache config's `warm:` list: warmed at start, re-resolved on a schedule (a moved tag
is fetched), failures logged once each and retried at the next interval, the last warm of
each image in `/status` and /metrics. The schedule is turned by an injected sleep (in
process) or by the explicit trigger `cache warm --listed` (a running daemon), never by
waiting for it. Fails before issue 14 item 3: there was no `warm:` key.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.daemon import build_cache
from dnsoverride.common.errors import ConfigError
from tests.support.ports import free_port
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import DistributionRegistry, TestProxy
from tests.support.systemd import NotifySocket

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLI = [sys.executable, "-m", "dnsoverride"]


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        *CLI, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(args, process.returncode, out.decode(), err.decode())


async def status(admin: str) -> dict[str, Any]:
    result = await run("status", "--json", "--admin", admin)
    assert result.returncode == 0, result.stderr
    [document] = json.loads(result.stdout)
    return document  # type: ignore[no-any-return]


async def test_the_warm_list_is_warmed_at_start_and_refreshed_when_triggered(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache
) -> None:
    first = await publish("team/app:v1", platforms=("linux/amd64", "linux/arm64"))
    control = tmp_path / "cache.sock"
    admin = f"127.0.0.1:{free_port()}"
    config = {
        "registry": {"upstreams": [{"url": proxy.url}]},
        "metrics": admin,
        "control_socket": str(control),
        "warm": {"interval": "1h", "images": ["team/app:v1", {"image": "team/gone:v1"}]},
    }
    cache = start_cache(config=config)
    image = f"{proxy.host}:{proxy.port}/team/app:v1"
    deadline = time.monotonic() + 30  # the start-up warm, seen from outside: polled
    while True:
        warm = {w["image"]: w for w in (await status(admin))["warm"]}
        if all(w["runs"] for w in warm.values()):
            break
        assert time.monotonic() < deadline, warm
        await asyncio.sleep(0.1)
    assert warm["team/app:v1"]["last_error"] is None
    assert warm["team/app:v1"]["interval"] == 3600
    assert warm["team/gone:v1"]["last_error"] == "manifest unknown: team/gone:v1"
    assert cache.stored_blobs() == set(first.blobs)
    [failed] = cache.wait_log('"warm_failed"')
    assert f'"image": "{proxy.host}:{proxy.port}/team/gone:v1"' in failed
    assert '"reason": "manifest unknown: team/gone:v1"' in failed

    moved = await publish("team/app:v1", platforms=("linux/amd64", "linux/arm64"))
    again = await run("cache", "warm", "--listed", "--admin", str(control))
    assert again.returncode == 1  # team/gone:v1 still fails
    assert f"warmed {image} {moved.top_digest}: 2 platforms" in again.stdout, again.stdout
    assert cache.stored_blobs() == set(first.blobs) | set(moved.blobs)
    listing = json.loads((await run("cache", "ls", "--json", "--admin", admin)).stdout)
    assert [i["digest"] for i in listing["images"]] == [moved.top_digest]
    # Found from the config's control_socket: as an admin runs it.
    config_file = str(cache.log_path.with_suffix(".yaml"))
    found = await run("cache", "ls", "--json", "--cache-config", config_file)
    assert json.loads(found.stdout)["images"] == listing["images"]

    proxy.fail_status = 503
    failing = await run("cache", "warm", "--listed", "--admin", str(control))
    assert failing.returncode == 1
    assert f"FAILED {image}: {proxy.host}:{proxy.port}: HTTP 503" in failing.stdout
    assert len(cache.wait_log('"warm_failed"', "team/app:v1")) == 1
    warm = {w["image"]: w for w in (await status(admin))["warm"]}
    assert warm["team/app:v1"]["failures"] == 1 and "HTTP 503" in warm["team/app:v1"]["last_error"]
    proxy.fail_status = None
    assert "warmed" in (await run("cache", "warm", "--listed", "--admin", str(control))).stdout
    done = {w["image"]: w for w in (await status(admin))["warm"]}["team/app:v1"]
    assert done["last_error"] is None and done["runs"] == 4 and done["failures"] == 1
    over_socket = await run("status", "--json", "--admin", str(control))
    assert json.loads(over_socket.stdout)[0]["warm"] == (await status(admin))["warm"]
    plain = (await run("status", "--admin", admin)).stdout
    assert "team/gone:v1  every 60 min" in plain and "FAILED: manifest unknown" in plain
    metrics = (await run_metrics(admin)).splitlines()
    assert 'dnsoverride_cache_warm_failures_total{image="team/app:v1"} 1.0' in metrics
    assert any(
        line.startswith(
            'dnsoverride_cache_warm_last_success_timestamp_seconds{image="team/app:v1"}'
        )
        for line in metrics
    )


async def run_metrics(admin: str) -> str:

    async with aiohttp.ClientSession() as http, http.get(f"http://{admin}/metrics") as response:
        return await response.text()


async def test_the_schedule_refetches_a_moved_tag_and_retries_a_failure(
    tmp_path: Path, publish: Publish, upstream: DistributionRegistry
) -> None:
    first = await publish("team/app:v1", platforms=("linux/amd64",))
    path = tmp_path / "cache.yaml"
    path.write_text(
        f"storage: {tmp_path / 'store'}\n"
        f"registry:\n  upstreams:\n    - url: {upstream.url}\n"
        "warm:\n  images:\n    - image: team/app:v1\n      interval: 10m\n"
    )
    cache = build_cache(cache_config.load(path))
    warmer = cache.warmer
    asked: list[float] = []
    turn = asyncio.Event()

    async def sleep(seconds: float) -> None:  # the injected clock: the test turns it
        asked.append(seconds)
        await turn.wait()
        turn.clear()

    warmer.sleep = sleep
    [last] = warmer.schedule.values()

    async def runs(count: int) -> None:
        while last.runs < count or len(asked) < count:
            await asyncio.sleep(0)
            await asyncio.sleep(0.01)

    try:
        warmer.start_schedule()
        await asyncio.wait_for(runs(1), 20)
        assert asked == [600.0] and last.last_error is None
        assert {str(d) for d, _ in cache.store.items("blobs")} == set(first.blobs)
        moved = await publish("team/app:v1", platforms=("linux/amd64",))
        turn.set()
        await asyncio.wait_for(runs(2), 20)
        assert warmer.jobs()[-1].digest == moved.top_digest
        assert {str(d) for d, _ in cache.store.items("blobs")} == set(first.blobs) | set(
            moved.blobs
        )
        upstream.stop()
        turn.set()
        await asyncio.wait_for(runs(3), 20)
        assert last.failures == 1 and last.last_error and "Connect" in last.last_error
        assert asked == [600.0, 600.0, 600.0]  # tried again at the next interval
        upstream.start()
        turn.set()
        await asyncio.wait_for(runs(4), 20)
        assert last.last_error is None and last.last_success == warmer.jobs()[-1].finished
    finally:
        await cache.close()


def test_warm_config_problems_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "cache.yaml"
    path.write_text(
        "warm:\n"
        "  interval: 5s\n"
        "  images:\n"
        "    - team/app:v1\n"
        "    - {image: 'Team/App', intervl: 1h}\n"
        "    - team/app:v1\n"
        "  imgs: []\n"
    )
    with pytest.raises(ConfigError) as raised:
        cache_config.load(path)
    assert [str(p) for p in raised.value.problems] == [
        f"{path}:2: warm: interval: expected a number from 60 to 2592000 seconds, not '5s'",
        f"{path}:3: warm: images: an image is listed twice",
        f"{path}:5: warm: images[1]: unknown key 'intervl' (did you mean 'interval'?)",
        f"{path}:5: warm: images[1]: invalid repository name 'Team/App'",
        f"{path}:7: warm: unknown key 'imgs' (did you mean 'images'?)",
    ]


def warm_config(proxy: TestProxy, admin: str, images: list[str]) -> dict[str, Any]:
    """A cache config for `proxy` warming `images` hourly, its admin listener `admin`."""
    return {
        "registry": {"upstreams": [{"url": proxy.url}]},
        "metrics": admin,
        "warm": {"interval": "1h", "images": images},
    }


async def test_sighup_follows_a_new_warm_list_and_names_what_needs_a_restart(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache
) -> None:
    """`systemctl reload` (SIGHUP) re-reads the config: a new `warm:` list is followed at
    once (an added image warmed, a removed one no longer listed), a changed setting that
    needs a restart is named in one line, and a config with a problem changes nothing and
    says where. Fails before: SIGHUP only re-read TLS pairs (`reload_ignored` without
    them), the warm list was the one read at start."""
    app = await publish("team/app:v1", platforms=("linux/amd64",))
    other = await publish("team/other:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    config = warm_config(proxy, admin, ["team/app:v1"])
    cache = start_cache(config=config)
    process = cache.proc
    assert process is not None
    config_file = cache.log_path.with_suffix(".yaml")

    async def warmed(images: set[str]) -> dict[str, Any]:
        deadline = time.monotonic() + 30  # warms seen from outside: polled
        while True:
            warm = {w["image"]: w for w in (await status(admin))["warm"]}
            if set(warm) == images and all(w["runs"] for w in warm.values()):
                return warm
            assert time.monotonic() < deadline, warm
            await asyncio.sleep(0.1)

    def reload_with(images: list[str], count: int) -> str:
        """SIGHUP after writing `images` as the list; the `count`th reload's line."""
        config["warm"]["images"] = images
        config_file.write_text(json.dumps(config))
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(lines := cache.wait_log('"warm_list_reloaded"')) < count:
            assert time.monotonic() < deadline, cache.logs()
            time.sleep(0.05)
        return lines[-1]

    await warmed({"team/app:v1"})
    config["max_size"] = "2G"
    reloaded = reload_with(["team/app:v1", "team/other:v1"], 1)
    assert '"added": ["team/other:v1"]' in reloaded and '"removed": []' in reloaded
    [restart] = cache.wait_log('"config_reload_needs_restart"')
    assert '"settings": ["budget"]' in restart
    warm = await warmed({"team/app:v1", "team/other:v1"})
    assert warm["team/other:v1"]["last_error"] is None
    assert warm["team/app:v1"]["runs"] == 1  # unchanged: on its schedule, not warmed again
    assert set(other.blobs) | set(app.blobs) <= cache.stored_blobs()
    reloaded = reload_with(["team/other:v1"], 2)
    assert '"added": []' in reloaded and '"removed": ["team/app:v1"]' in reloaded
    await warmed({"team/other:v1"})

    config_file.write_text(config_file.read_text()[:-1] + ", nonsense: 1}")
    process.send_signal(signal.SIGHUP)
    [failed] = cache.wait_log('"config_reload_failed"')
    assert str(config_file) in failed and "nonsense" in failed, failed
    assert [w["image"] for w in (await status(admin))["warm"]] == ["team/other:v1"]


async def test_a_warm_list_naming_a_new_upstream_waits_for_the_restart(
    tmp_path: Path,
    publish: Publish,
    proxy: TestProxy,
    start_cache: StartCache,
    systemd_notify: NotifySocket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload whose config adds an upstream and a `warm:` image on it: the running cache
    still has the old upstreams (they need a restart), so the new list is not followed
    (it would warm an image against an upstream the cache does not have) and `warm` is
    named with `registry` as needing a restart (in the log and systemd's STATUS); the old
    list keeps its schedule. Failed
    before: `warm_list_reloaded` named the new image, whose schedule then died on
    `no upstream named 'mirror.test' is configured` (a task exception nobody read) and
    never ran."""
    await publish("team/app:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    config = warm_config(proxy, admin, ["team/app:v1"])
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd_notify.path))
    cache = start_cache(config=config)
    assert cache.proc is not None
    systemd_notify.next_with("READY")
    cache.wait_log('"warm_done"')
    config["registry"]["upstreams"].append({"url": proxy.url, "name": "mirror.test"})
    config["warm"]["images"] = ["team/app:v1", "mirror.test/team/app:v1"]
    cache.log_path.with_suffix(".yaml").write_text(json.dumps(config))
    cache.proc.send_signal(signal.SIGHUP)
    [restart] = cache.wait_log('"config_reload_needs_restart"')
    assert '"settings": ["registry", "warm"]' in restart, restart
    systemd_notify.next_with("RELOADING")
    reloaded = systemd_notify.next_with("READY").fields["STATUS"]
    assert reloaded == "warm list unchanged; registry, warm: restart needed", reloaded
    assert '"warm_list_reloaded"' not in cache.logs()
    assert [w["image"] for w in (await status(admin))["warm"]] == ["team/app:v1"]


async def test_warm_metrics_withhold_image_names_on_an_admin_listener_others_reach(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache
) -> None:
    """`/metrics` on a wildcard admin listener (where Prometheus scrapes) labels the warm
    list's series by their place in the list, as `/status` there shows them, not by the
    image (a private repository's name); the control socket's `/metrics` names them.
    Failed before: `dnsoverride_cache_warm_runs_total{image="team/secret:v1"}` was on
    the wildcard listener while its `/status` withheld the same name."""
    await publish("team/secret:v1", platforms=("linux/amd64",))
    port, control = free_port(), tmp_path / "control" / "cache.sock"
    config = {
        "registry": {"upstreams": [{"url": proxy.url}]},
        "metrics": f"0.0.0.0:{port}",
        "control_socket": str(control),
        "warm": {"interval": "1h", "images": ["team/secret:v1"]},
    }
    start_cache(config=config)
    deadline = time.monotonic() + 30  # the start-up warm, seen from outside: polled
    while not all(w["runs"] for w in (await status(str(control)))["warm"]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        public = await response.text()
    unix = aiohttp.UnixConnector(str(control))
    async with (
        aiohttp.ClientSession(connector=unix) as http,
        http.get("http://cache/metrics") as response,
    ):
        local = await response.text()
    assert 'dnsoverride_cache_warm_runs_total{image="team/secret:v1"} 1.0' in local, local
    assert "team/secret" not in public, public
    assert 'dnsoverride_cache_warm_runs_total{image="(withheld) 1"} 1.0' in public, public
    [document] = json.loads((await run("status", "--json", "--admin", f"127.0.0.1:{port}")).stdout)
    assert [w["image"] for w in document["warm"]] == ["(withheld) 1"]
