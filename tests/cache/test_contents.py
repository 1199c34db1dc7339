"""`dnsoverride cache ls / purge / warm` against a running cache whose upstream is a real
distribution registry (behind a counting proxy), with skopeo and containerd pulling
through it: warm makes the next pull hit only, ls reports what was stored, purge removes
exactly what was asked (the store re-hashed after), and the actions are refused where
they must be. Fails before issue 14 item 3: none of these commands or endpoints existed.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.ports import free_port
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_liar import LyingRegistry, digest_of, real_size_manifest
from tests.support.registry_peers import (
    OCI_MANIFEST,
    Containerd,
    Image,
    TestProxy,
    pull,
    push,
    verify_dir,
)
from tests.support.terminal import on_a_terminal

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
CLI = [sys.executable, "-m", "dnsoverride", "cache"]
# Real shapes: a dozen platforms, padded manifests and index (Docker Hub's run 5-60 KiB).
PLATFORMS = tuple(f"linux/arch{n}" for n in range(12))
REAL: dict[str, Any] = {
    "platforms": PLATFORMS,
    "layer_sizes": (30_000, 20_000),
    "manifest_size": 6_000,
    "index_size": 24_000,
}


# Root without the capabilities that override file permissions: a user the socket's mode
# keeps out (the tests run as root, whose site-packages another user cannot read).
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


async def cli(*args: str, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [*CLI, *args]
    if unprivileged:
        argv = [*UNPRIVILEGED, *argv]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(), err.decode())


def one_line_error(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("dnsoverride: error: ") and needle in line, line


def store_files(storage: Path) -> dict[str, str]:
    """kind/digest -> sha256 of the file's content, for every stored file."""
    found = {}
    for kind in ("blobs", "manifests", "packages", "repodata"):
        for path in (storage / kind).glob("sha256/*/*"):
            found[f"{kind}/sha256:{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def image_items(image: Image) -> set[str]:
    return {f"blobs/{d}" for d in image.blobs} | {f"manifests/{d}" for d in image.manifests}


@pytest.fixture
def control(tmp_path: Path) -> Path:
    return tmp_path / "run" / "cache.sock"


async def test_warm_makes_the_next_pulls_hit_only(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache, control: Path
) -> None:
    image = await publish("team/app:v1", **REAL)
    cache = start_cache(proxy.url, "--control-socket", str(control))
    info = os.stat(control)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    try:  # the group `dnsoverride` when it exists, else the daemon's (root's here)
        group = grp.getgrnam("dnsoverride").gr_gid
    except KeyError:
        group = os.getgid()
    assert info.st_gid == group

    warmed = await cli("warm", "--admin", str(control), "team/app:v1")
    assert warmed.returncode == 0, warmed.stderr + cache.logs()
    [line] = warmed.stdout.splitlines()  # piped: one line per image
    assert line.startswith(f"warmed {proxy.host}:{proxy.port}/team/app:v1 {image.top_digest}: ")
    blobs = len(image.blobs)
    assert f"12 platforms, 13 manifests, {blobs} blobs ({blobs} fetched now)" in line, line
    assert cache.stored_blobs() == set(image.blobs)
    [logged] = cache.wait_log('"warm_done"')
    assert f'"blobs_fetched": {blobs}' in logged

    asked = len(proxy.requests)
    code, out = await pull(f"{cache.address}/team/app:v1", tmp_path / "out", all_platforms=True)
    assert code == 0, out
    assert verify_dir(tmp_path / "out") == set(image.blobs)
    assert proxy.requests[asked:] == [], "the pulls after the warm asked the upstream"

    # A second warm of an unchanged image asks the upstream for the tag only.
    again = await cli("warm", "--admin", str(control), "team/app:v1")
    assert again.returncode == 0 and f"{blobs} blobs (0 fetched now)" in again.stdout
    assert [path for _, path, _ in proxy.requests[asked:]] == ["/v2/team/app/manifests/v1"]


async def test_ctr_pull_after_warm_hits_only(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache, control: Path
) -> None:
    if shutil.which("ctr") is None or shutil.which("containerd") is None:
        pytest.skip("needs containerd")
    image = await publish("team/app:v1", platforms=("linux/amd64", "linux/arm64"))
    cache = start_cache(proxy.url, "--control-socket", str(control))
    warmed = await cli("warm", "--admin", str(control), f"{proxy.host}:{proxy.port}/team/app:v1")
    assert warmed.returncode == 0, warmed.stderr
    asked = len(proxy.requests)
    with Containerd(tmp_path / "containerd") as containerd:
        code, out = await containerd.pull(f"{cache.address}/team/app:v1")
    assert code == 0, out + cache.logs()
    assert proxy.requests[asked:] == []
    assert cache.stored_blobs() == set(image.blobs)


async def test_ls_and_purge_remove_exactly_what_was_asked(
    tmp_path: Path,
    publish: Publish,
    proxy: TestProxy,
    start_cache: StartCache,
    control: Path,
    upstream: Any,
) -> None:
    shared = await publish("team/app:v1", **REAL)
    await push(shared, f"{upstream.address}/team/copy:v1")  # the same content, another name
    solo = await publish("team/solo:v2", platforms=("linux/amd64",))
    cache = start_cache(proxy.url, "--control-socket", str(control))
    admin = ["--admin", str(control)]
    for reference in ("team/app:v1", "team/copy:v1", "team/solo:v2"):
        assert (await cli("warm", *admin, reference)).returncode == 0

    listing = await cli("ls", *admin, "--json")
    assert listing.returncode == 0, listing.stderr
    document = json.loads(listing.stdout)
    images = {i["repository"]: i for i in document["images"]}
    assert set(images) == {"team/app", "team/copy", "team/solo"}
    app = images["team/app"]
    size = sum(shared.blobs.values()) + sum(shared.manifests.values())
    assert (app["tag"], app["digest"]) == ("v1", shared.top_digest)
    assert app["bytes"] == size and app["shared_bytes"] == size  # team/copy has it all too
    assert [p["platform"] for p in app["platforms"]] == list(PLATFORMS)
    assert all(p["cached"] for p in app["platforms"])
    assert app["manifests"] == 13 and app["blobs"] == len(shared.blobs)
    lone = images["team/solo"]
    assert lone["bytes"] == sum(solo.blobs.values()) + sum(solo.manifests.values())
    assert lone["shared_bytes"] == 0 and lone["platforms"] == []
    assert lone["last_use_unix"] is not None
    assert document["loose"] == {"items": 0, "bytes": 0}
    only = json.loads((await cli("ls", *admin, "--json", "--repo", "team/s*")).stdout)
    assert [i["repository"] for i in only["images"]] == ["team/solo"]
    plain = (await cli("ls", *admin)).stdout
    assert "\x1b[" not in plain
    assert re.search(r"team/app:v1 +sha256:\S+ +all 12: linux/arch0, ", plain), plain

    before = store_files(cache.storage)
    dry = await cli("purge", *admin, "team/solo:v2", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.startswith(
        f"would remove {len(image_items(solo))} items"
    )
    assert store_files(cache.storage) == before

    purged = await cli("purge", *admin, "team/solo:v2")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.startswith(f"removed {len(image_items(solo))} items"), purged.stdout
    after = store_files(cache.storage)
    # Re-hashed: every remaining file is what its name says, and exactly the image is gone.
    assert all(key.endswith(digest) for key, digest in after.items())
    assert set(after) == set(before) - image_items(solo)
    assert not list((cache.storage / "tags").glob("*/team/solo/_tags/v2"))

    # Everything of team/app is shared with team/copy: only its tag goes.
    tag_only = await cli("purge", *admin, "team/app:v1")
    assert tag_only.returncode == 0 and tag_only.stdout.startswith("removed 0 items")
    assert set(store_files(cache.storage)) == set(after)
    listed = json.loads((await cli("ls", *admin, "--json")).stdout)
    assert [i["repository"] for i in listed["images"]] == ["team/copy"]
    [logged] = cache.wait_log('"cache_purged"', "team/app:v1")
    assert '"removed": 0' in logged

    # A purged image comes back from the upstream.
    asked = len(proxy.blob_requests())
    code, out = await pull(f"{cache.address}/team/solo:v2", tmp_path / "solo")
    assert code == 0, out
    assert len(proxy.blob_requests()) - asked == len(solo.blobs)
    assert image_items(solo) <= set(store_files(cache.storage))

    # A blob by its digest: that blob alone.
    blob = next(iter(solo.blobs))
    by_digest = await cli("purge", *admin, blob)
    assert by_digest.returncode == 0 and by_digest.stdout.startswith("removed 1 items")
    assert set(store_files(cache.storage)) == set(after) | image_items(solo) - {f"blobs/{blob}"}

    # A platform's manifest that team/copy's index still lists stays, and is said so.
    child = shared.platforms[PLATFORMS[0]]
    kept = json.loads((await cli("purge", *admin, child, "--json")).stdout)
    assert kept["removed"] == [] and [s["digest"] for s in kept["skipped"]] == [child]
    assert kept["skipped"][0]["reason"].startswith("still listed by a kept image")

    one_line_error(await cli("purge", *admin, "team/nothing:v9"), "no cached image")
    one_line_error(await cli("purge", *admin, "sha256:" + "0" * 64), "is not stored")
    one_line_error(await cli("purge", *admin, "Bad Name"), "invalid")
    one_line_error(await cli("warm", *admin, "quay.io/org/app:1"), "no upstream named 'quay.io'")
    one_line_error(await cli("purge", *admin, "--older-than", "soon"), "expected a duration")
    one_line_error(await cli("purge", *admin), "give IMAGE, DIGEST or --older-than")


async def test_purge_older_than_keeps_what_was_used_since(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache, control: Path
) -> None:
    old = await publish("team/old:v1", platforms=("linux/amd64",))
    new = await publish("team/new:v1", platforms=("linux/amd64",))
    cache = start_cache(proxy.url, "--control-socket", str(control))
    admin = ["--admin", str(control)]
    for reference in ("team/old:v1", "team/new:v1"):
        assert (await cli("warm", *admin, reference)).returncode == 0
    # The cache restarts (its use times are its files' mtimes then), and the old image's
    # files were last used two days ago.
    assert cache.stop() == 0
    for item in image_items(old):
        kind, _, digest = item.partition("/")
        path = cache.storage / kind / "sha256" / digest[7:9] / digest[7:]
        stamp = path.stat().st_mtime - 2 * 86400
        os.utime(path, (stamp, stamp))
    cache.start()
    purged = await cli("purge", *admin, "--older-than", "1d", "--json")
    assert purged.returncode == 0, purged.stderr
    document = json.loads(purged.stdout)
    assert document["tags"] == [f"{proxy.host}:{proxy.port}/team/old:v1"]
    assert {f"{r['kind']}/{r['digest']}" for r in document["removed"]} == image_items(old)
    assert image_items(new) <= set(store_files(cache.storage))


async def test_actions_are_refused_off_loopback_and_on_the_public_port(
    publish: Publish, proxy: TestProxy, start_cache: StartCache
) -> None:
    await publish("team/app:v1", platforms=("linux/amd64",))
    port = free_port()
    cache = start_cache(proxy.url, "--metrics", f"0.0.0.0:{port}")
    admin = f"127.0.0.1:{port}"
    # The listing names every repository, private ones too: refused like the actions.
    one_line_error(await cli("ls", "--admin", admin, "--json"), "loopback admin listener only")
    refused = await cli("warm", "--admin", admin, "team/app:v1")
    one_line_error(refused, "control socket or a loopback admin listener only")
    one_line_error(await cli("purge", "--admin", admin, "team/app:v1"), "loopback")
    [logged] = cache.wait_log('"admin_action_refused"', "POST /purge")
    assert '"client": "127.0.0.1:' in logged
    assert cache.stored_blobs() == set()  # the warm did not happen
    async with aiohttp.ClientSession() as http:
        url = f"http://{cache.address}/purge?image=team/app:v1"
        async with http.post(url) as response:
            assert response.status == 404
        async with http.post(f"http://{admin}/purge?image=team/app:v1") as response:
            assert response.status == 403
    # The public listener has no such route: a 404, logged like any request.
    assert cache.wait_log('"path": "/purge?image=team/app:v1"', '"status": 404', "NOT_ROUTED")
    assert len(cache.wait_log('"admin_action_refused"')) == 4


async def test_a_loopback_admin_listener_takes_actions(
    publish: Publish, proxy: TestProxy, start_cache: StartCache
) -> None:
    image = await publish("team/app:v1", platforms=("linux/amd64",))
    admin = f"127.0.0.1:{free_port()}"
    cache = start_cache(proxy.url, "--metrics", admin)
    warmed = await cli("warm", "--admin", admin, "--json", "team/app:v1")
    assert warmed.returncode == 0, warmed.stderr
    [job] = json.loads(warmed.stdout)
    assert job["state"] == "done" and job["blobs"] == len(image.blobs)
    assert cache.stored_blobs() == set(image.blobs)


async def test_command_line_errors_are_one_line(
    tmp_path: Path, publish: Publish, proxy: TestProxy, start_cache: StartCache, control: Path
) -> None:
    missing = tmp_path / "no" / "cache.sock"
    one_line_error(
        await cli("ls", "--admin", str(missing)), "no such socket (is the cache running?)"
    )
    one_line_error(
        await cli("warm", "--admin", f"127.0.0.1:{free_port()}", "a:b"), "Connection refused"
    )
    one_line_error(await cli("warm", "--admin", str(missing)), "give IMAGE... or --listed")
    await publish("team/app:v1", platforms=("linux/amd64",))
    start_cache(proxy.url, "--control-socket", str(control))
    # Owned by another user and group now: mode 0660 leaves root-without-overrides out.
    nobody = pwd.getpwnam("nobody")
    os.chown(control, nobody.pw_uid, nobody.pw_gid)
    result = await cli("ls", "--admin", str(control), unprivileged=True)
    one_line_error(result, "permission denied: the control socket is for root and the")
    unknown = await cli("warm", "--admin", str(control), "team/missing:v1")
    assert unknown.returncode == 1 and unknown.stderr == ""
    assert unknown.stdout.splitlines() == [
        f"FAILED {proxy.host}:{proxy.port}/team/missing:v1: manifest unknown: team/missing:v1"
    ]


async def test_ls_draws_a_table_and_warm_a_progress_bar_on_a_terminal(
    publish: Publish, proxy: TestProxy, start_cache: StartCache, control: Path
) -> None:
    image = await publish("team/app:v1", **REAL)
    start_cache(proxy.url, "--control-socket", str(control))
    admin = ["--admin", str(control)]
    drawn = await asyncio.to_thread(on_a_terminal, [*CLI, "warm", *admin, "team/app:v1"])
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", drawn)
    assert "━" in text  # rich's bar
    assert f"team/app:v1 {len(image.blobs)}/{len(image.blobs)} blobs" in text, text
    assert f"warmed {proxy.host}:{proxy.port}/team/app:v1 {image.top_digest}" in text
    table = await asyncio.to_thread(on_a_terminal, [*CLI, "ls", *admin])
    assert "\x1b[" in table  # colour
    plain = re.sub(r"\x1b\[[0-9;]*m", "", table)
    assert re.search(r"┃ image +┃ digest +┃ platforms +┃ bytes +┃ last use +┃", plain), plain
    assert re.search(rf"│ {re.escape(proxy.host)}:{proxy.port}/team/app:v1 +│ sha256:", plain)


async def test_purge_skips_a_blob_downloading_and_says_so(
    start_cache: StartCache, control: Path
) -> None:
    """A layer whose download is in flight (held by the upstream) when its image is
    purged: the rest goes, the layer is reported skipped, and it lands once released."""
    manifest, blobs = real_size_manifest(8_000, layers=3)
    *rest, held = list(blobs)
    async with LyingRegistry() as liar:
        liar.blobs.update(blobs)
        liar.add_manifest("team/app", "v1", manifest, OCI_MANIFEST)
        release = liar.hold[f"/blobs/{held}"] = asyncio.Event()
        cache = start_cache(liar.url, "--control-socket", str(control))
        admin = ["--admin", str(control)]
        try:
            async with aiohttp.ClientSession() as http:
                base = f"http://{cache.address}/v2/team/app"
                async with http.get(f"{base}/manifests/v1") as response:
                    assert response.status == 200
                for digest in rest:
                    async with http.get(f"{base}/blobs/{digest}") as response:
                        assert await response.read() == blobs[digest]
                pending = asyncio.create_task(http.get(f"{base}/blobs/{held}"))
                await asyncio.wait_for(liar.holding.wait(), 10)
                purged = await cli("purge", *admin, "team/app:v1", "--json")
                assert purged.returncode == 0, purged.stderr
                document = json.loads(purged.stdout)
                removed = {r["digest"] for r in document["removed"]}
                assert removed == {*rest, digest_of(manifest)}
                assert document["skipped"] == [
                    {
                        "kind": "blobs",
                        "digest": held,
                        "reason": "a download of it is in flight: stored when it ends",
                    }
                ]
                release.set()
                response = await pending
                assert await response.read() == blobs[held]
        finally:
            release.set()
    assert cache.stored_blobs() == {held}
