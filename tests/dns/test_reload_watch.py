"""Reloader mechanics on real files with a real watchdog observer and the real zone loader.

Each save style editors and tools use is performed for real (vim, sed -i, rename, a
ConfigMap `..data` swap, ...) and the test waits, with a deadline, for the served set
to change. The DNS wire side is covered by tests/dns/test_reload_server.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import dnslib
import pytest
import structlog
from prometheus_client import CollectorRegistry

from dnsoverride.dns.config import ServeFlags, load_config
from dnsoverride.dns.reload import fingerprint, serve_loader, zone_reloader
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import ZoneFileCache, load_zone_set
from dnsoverride.dns.zones.model import ZoneSet, ZoneSetError
from tests.support.edits import BROKEN, configmap, write_unseen, zone_text
from tests.support.transparent_certs import make_ca

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(30)]


def addresses(zone_set: ZoneSet, name: str) -> tuple[str, ...] | None:
    entry = zone_set.select(None).lookup(name)
    if entry is None:
        return None
    return entry.rrsets[dnslib.QTYPE.A].texts


class Harness:
    """A started Reloader over `zones`, with every swapped-in set recorded."""

    def __init__(
        self,
        zones: Path,
        load: Callable[[], ZoneSet],
        config: Path | None,
        interval: float = 0,
        baseline: str | None = None,
    ) -> None:
        self.zones = zones
        self.live = LiveZones(load())
        self.swapped: list[ZoneSet] = []
        self.registry = CollectorRegistry()
        self.reloader = zone_reloader(
            load=load,
            swap=self._swap,
            current=self.live.current,
            zones_dir=zones,
            config_file=config,
            interval=interval,
            registry=self.registry,
            baseline=baseline,
        )

    def _swap(self, new: ZoneSet) -> None:
        self.swapped.append(new)
        self.live.swap(new)

    def answer(self, name: str) -> tuple[str, ...] | None:
        return addresses(self.live.current, name)

    async def until(self, predicate: Callable[[], bool], within: float = 2.0) -> None:
        deadline = asyncio.get_running_loop().time() + within
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, "timed out"
            await asyncio.sleep(0.01)

    async def answer_becomes(self, name: str, expected: tuple[str, ...] | None) -> None:
        await self.until(lambda: self.answer(name) == expected)


async def run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    assert await asyncio.wait_for(process.wait(), 10) == 0, argv


@asynccontextmanager
async def running(harness: Harness) -> AsyncIterator[Harness]:
    await harness.reloader.start()
    try:
        yield harness
    finally:
        await harness.reloader.stop()


def reloading(
    zones: Path,
    load: Callable[[], ZoneSet] | None = None,
    config: Path | None = None,
    interval: float = 0,
) -> AbstractAsyncContextManager[Harness]:
    return running(Harness(zones, load or (lambda: load_zone_set(zones)), config, interval))


@pytest.fixture
def zones(tmp_path: Path) -> Path:
    directory = tmp_path / "zones"
    directory.mkdir()
    (directory / "a.yaml").write_text(zone_text({"a.test": "10.0.0.1", "keep.test": "10.9.9.9"}))
    return directory


async def test_in_place_truncate_and_write(zones: Path) -> None:
    async with reloading(zones) as h:
        with (zones / "a.yaml").open("w") as file:
            file.write(zone_text({"a.test": "10.0.0.2", "keep.test": "10.9.9.9"}))
        await h.answer_becomes("a.test", ("10.0.0.2",))
        await h.until(lambda: h.reloader.stats.successes == 1)
        assert h.reloader.stats.failures == 0


async def test_slow_in_place_writer_is_never_seen_half_written(zones: Path) -> None:
    """The first half is valid YAML on its own; serving it would drop keep.test."""
    full = zone_text({"a.test": "10.0.0.2", "keep.test": "10.9.9.9"})
    half = full[: full.index("  keep.test")]
    async with reloading(zones) as h:
        with (zones / "a.yaml").open("w") as file:
            file.write(half)
            file.flush()
            # A writer that stalls mid-file for longer than the debounce period.
            await asyncio.sleep(0.6)
            file.write(full[len(half) :])
        await h.answer_becomes("a.test", ("10.0.0.2",))
        assert all(addresses(s, "keep.test") == ("10.9.9.9",) for s in h.swapped)
        assert h.reloader.stats.failures == 0


@pytest.mark.parametrize("backupcopy", ["yes", "no"])
async def test_vim_save(zones: Path, backupcopy: str) -> None:
    """backupcopy=yes rewrites in place; =no renames the original to a backup and writes a
    new file (vim skips backups under /tmp unless `backupskip` is cleared)."""
    inode = (zones / "a.yaml").stat().st_ino
    async with reloading(zones) as h:
        await run(
            "vim", "-Es", "-u", "NONE", "-c", f"set backupcopy={backupcopy} backupskip=",
            "-c", "%s/10.0.0.1/10.0.0.3/", "-c", "wq", str(zones / "a.yaml"),
        )  # fmt: skip
        await h.answer_becomes("a.test", ("10.0.0.3",))
        assert ((zones / "a.yaml").stat().st_ino == inode) == (backupcopy == "yes")
        assert h.reloader.stats.failures == 0


async def test_sed_in_place(zones: Path) -> None:
    async with reloading(zones) as h:
        await run("sed", "-i", "s/10.0.0.1/10.0.0.4/", str(zones / "a.yaml"))
        await h.answer_becomes("a.test", ("10.0.0.4",))


async def test_write_hidden_temp_then_rename(zones: Path) -> None:
    """Ansible's atomic_move: a hidden temp file in the same directory, fsync, rename."""
    async with reloading(zones) as h:
        temp = zones / ".ansible_tmp1234a.yaml"
        with temp.open("w") as file:
            file.write(zone_text({"a.test": "10.0.0.5", "keep.test": "10.9.9.9"}))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, zones / "a.yaml")
        await h.answer_becomes("a.test", ("10.0.0.5",))
        assert len(h.swapped) == 1
        assert h.reloader.stats.failures == 0


async def test_file_deleted_and_added(zones: Path) -> None:
    async with reloading(zones) as h:
        (zones / "b.yml").write_text(zone_text({"b.test": "10.0.1.1"}))
        await h.answer_becomes("b.test", ("10.0.1.1",))
        (zones / "a.yaml").unlink()
        await h.answer_becomes("a.test", None)
        assert h.answer("b.test") == ("10.0.1.1",)
        await h.until(lambda: h.reloader.stats.successes == 2)


async def test_kubernetes_configmap_data_swap(tmp_path: Path) -> None:
    root = tmp_path / "configmap"
    root.mkdir()
    configmap(root, "2026_11_28_18_00_00.1", {"ci.yaml": zone_text({"a.test": "10.0.0.1"})})
    async with reloading(root) as h:
        assert h.answer("a.test") == ("10.0.0.1",)
        configmap(root, "2026_11_28_18_05_00.2", {"ci.yaml": zone_text({"a.test": "10.0.0.6"})})
        await h.answer_becomes("a.test", ("10.0.0.6",))
        assert h.reloader.stats.failures == 0


async def test_zones_directory_symlink_repointed(tmp_path: Path) -> None:
    """`ln -sfn v2 zones` style: the old directory is left alone, the new one is watched."""
    for version, address in (("v1", "10.0.0.1"), ("v2", "10.0.0.7")):
        (tmp_path / version).mkdir()
        (tmp_path / version / "a.yaml").write_text(zone_text({"a.test": address}))
    zones = tmp_path / "zones"
    zones.symlink_to("v1")
    async with reloading(zones) as h:
        (tmp_path / "zones.new").symlink_to("v2")
        os.replace(tmp_path / "zones.new", zones)
        await h.answer_becomes("a.test", ("10.0.0.7",))
        # The watch followed the link: an edit inside v2 is seen, one inside v1 is not served.
        (tmp_path / "v2" / "a.yaml").write_text(zone_text({"a.test": "10.0.0.8"}))
        await h.answer_becomes("a.test", ("10.0.0.8",))


async def test_editor_scratch_files_do_not_reload(zones: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            (zones / ".#a.yaml").symlink_to("root@host.4242")  # Emacs lock: dangling link
            (zones / "a.yaml~").write_text("not: [valid")
            (zones / ".a.yaml.swp").write_bytes(b"\x00binary")
            (zones / "4913").write_text("")
            # Nothing may happen; give a reload more than its debounce period to show up.
            await asyncio.sleep(0.5)
            assert not [e for e in logs if e["event"].startswith("zones_")]
            (zones / "a.yaml").write_text(zone_text({"a.test": "10.0.0.9"}))
            await h.answer_becomes("a.test", ("10.0.0.9",))
            await h.until(lambda: h.reloader.stats.successes == 1)
    assert h.reloader.stats.failures == 0
    assert [e["event"] for e in logs if e["event"].startswith("zones_")] == ["zones_reloaded"]


async def test_file_rewritten_non_stop_still_reloads(zones: Path) -> None:
    """Events that never pause for the debounce period do not hold reloads back forever."""
    async with reloading(zones) as h:
        loop = asyncio.get_running_loop()
        started = loop.time()
        version = 0
        while h.reloader.stats.successes == 0:
            assert loop.time() - started < 5, "no reload while the file kept changing"
            version += 1
            temp = zones / ".a.yaml.tmp"
            temp.write_text(zone_text({"a.test": f"10.0.0.{version % 250 + 1}"}))
            os.replace(temp, zones / "a.yaml")
            await asyncio.sleep(0.05)  # a writer saving every 50 ms, faster than the debounce
        assert h.reloader.stats.failures == 0


@pytest.mark.parametrize("case", sorted(BROKEN))
async def test_broken_file_keeps_last_good_set_then_fix_reloads(zones: Path, case: str) -> None:
    text, line, reason = BROKEN[case]
    (zones / "b.yaml").write_text(zone_text({"b.test": "10.0.1.1"}))
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            before = h.live.current
            (zones / "a.yaml").write_text(text)
            await h.until(lambda: h.reloader.stats.failures == 1)
            assert h.live.current is before
            assert h.answer("a.test") == ("10.0.0.1",)
            assert h.answer("keep.test") == ("10.9.9.9",)
            problems = [e for e in logs if e["event"] == "zone_problem"]
            assert len(problems) == 1
            assert problems[0]["file"] == str(zones / "a.yaml")
            assert problems[0]["line"] == line
            assert reason in problems[0]["reason"]
            assert problems[0]["log_level"] == "error"
            failed = [e for e in logs if e["event"] == "zones_reload_failed"]
            assert len(failed) == 1
            assert failed[0]["kept_content_hash"] == before.content_hash
            # Editing the broken file into shape makes the next reload succeed.
            (zones / "a.yaml").write_text(zone_text({"a.test": "10.0.0.2"}))
            await h.answer_becomes("a.test", ("10.0.0.2",))
            assert h.answer("b.test") == ("10.0.1.1",)
            await h.until(lambda: h.reloader.stats.successes == 1)
            assert h.reloader.stats.failures == 1
            sample = h.registry.get_sample_value
            assert sample("dnsoverride_zone_reloads_total", {"result": "failure"}) == 1
            assert sample("dnsoverride_zone_reloads_total", {"result": "success"}) == 1
            assert sample("dnsoverride_zone_reload_last_success_timestamp_seconds") is not None


async def test_a_failed_reload_logs_at_most_100_problems(zones: Path) -> None:
    """Before, every problem was one log line on every failed reload: an edit that broke
    all 1,000,000 names of a big set would log 1,000,000 lines each time."""
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            bad = zone_text({f"n{i}.test": "10.0.0.256" for i in range(500)})
            (zones / "a.yaml").write_text(bad)
            await h.until(lambda: h.reloader.stats.failures == 1)
    assert len([e for e in logs if e["event"] == "zone_problem"]) == 100
    [failed] = [e for e in logs if e["event"] == "zones_reload_failed"]
    assert (failed["problems"], failed["problems_logged"]) == (500, 100)
    assert len(failed["reasons"]) == 10


async def test_success_event_has_hash_and_change_summary(zones: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            (zones / "a.yaml").write_text(zone_text({"a.test": "10.0.0.2", "new.test": "10.0.0.3"}))
            await h.answer_becomes("new.test", ("10.0.0.3",))
            await h.until(lambda: h.reloader.stats.successes == 1)
    [event] = [e for e in logs if e["event"] == "zones_reloaded"]
    assert event["content_hash"] == h.live.current.content_hash
    assert event["trigger"] == "event"
    assert (event["added"], event["removed"], event["changed"]) == (1, 1, 1)
    assert event["added_names"] == ["new.test"]
    assert event["removed_names"] == ["keep.test"]
    assert event["changed_names"] == ["a.test"]


async def test_sighup_request_reloads_what_events_missed(zones: Path, tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            write_unseen(zones, tmp_path / "other", "a.yaml", zone_text({"a.test": "10.0.0.2"}))
            h.reloader.request("sighup")
            await h.answer_becomes("a.test", ("10.0.0.2",))
            # A forced reload runs even when nothing changed.
            h.reloader.request("sighup")
            await h.until(lambda: h.reloader.stats.successes == 2)
    triggers = [e["trigger"] for e in logs if e["event"] == "zones_reloaded"]
    assert triggers == ["sighup", "sighup"]


async def test_periodic_check_catches_missed_changes(zones: Path, tmp_path: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones, interval=0.2) as h:
            write_unseen(zones, tmp_path / "other", "a.yaml", zone_text({"a.test": "10.0.0.2"}))
            await h.answer_becomes("a.test", ("10.0.0.2",))
            # Unchanged files: later periodic checks do not reload again.
            await h.until(lambda: sum(e["event"] == "zones_unchanged" for e in logs) >= 2)
    assert [e["trigger"] for e in logs if e["event"] == "zones_reloaded"] == ["periodic"]


async def test_a_load_that_raises_is_a_failure_and_its_bytes_are_not_retried(
    zones: Path, tmp_path: Path
) -> None:
    """Before the fix, a loader that raised (a bug, or the MemoryError of a YAML bomb)
    was logged as `zone_reload_crashed` and recorded nothing: every periodic check loaded
    the same bytes again, and the failure counter never moved."""
    calls = 0

    def load() -> ZoneSet:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise MemoryError("simulated")
        return load_zone_set(zones)

    with structlog.testing.capture_logs() as logs:
        async with reloading(zones, load, interval=0.1) as h:
            write_unseen(zones, tmp_path / "other", "a.yaml", zone_text({"a.test": "10.0.0.2"}))
            await h.until(lambda: h.reloader.stats.failures == 1)
            # Three periodic checks later: the same bytes were not loaded again.
            await h.until(lambda: sum(e["event"] == "zones_unchanged" for e in logs) >= 3)
            assert calls == 2
            assert h.answer("a.test") == ("10.0.0.1",)
    [problem] = [e for e in logs if e["event"] == "zone_problem"]
    assert problem["reason"] == "internal error while loading: MemoryError: 'simulated'"
    assert len([e for e in logs if e["event"] == "zone_reload_crashed"]) == 1


VIEW_CONFIG = "upstreams: [127.0.0.1:1]\nviews:\n  - name: ci\n    clients: [127.0.0.0/8]\n"


@asynccontextmanager
async def serving_config(zones: Path, config: Path) -> AsyncIterator[Harness]:
    """A reloader built as `dnsoverride serve --config` builds it (serve_loader)."""
    running = load_config(config)
    load = serve_loader(running, config, ServeFlags())
    async with reloading(zones, lambda: load().zone_set, config) as harness:
        yield harness


def save_by_rename(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)


async def test_config_view_naming_missing_zone_file_fails_reload(zones: Path) -> None:
    """The edited config is validated as `dnsoverride check` would, views included."""
    config = zones.parent / "dnsoverride.yaml"
    config.write_text(VIEW_CONFIG + f"    zones: [a]\nzones: {zones.name}\n")
    with structlog.testing.capture_logs() as logs:
        async with serving_config(zones, config) as h:
            save_by_rename(config, VIEW_CONFIG + f"    zones: [missing]\nzones: {zones.name}\n")
            await h.until(lambda: h.reloader.stats.failures == 1)
            [problem] = [e for e in logs if e["event"] == "zone_problem"]
            assert "'missing'" in problem["reason"]
            assert h.answer("a.test") == ("10.0.0.1",)
            save_by_rename(config, VIEW_CONFIG + f"    zones: [a.yaml]\nzones: {zones.name}\n")
            await h.until(lambda: h.reloader.stats.successes == 1)


async def append_to_config(
    zones: Path, line: str, done: Callable[[Harness], bool]
) -> tuple[Path, list[MutableMapping[str, Any]]]:
    """Serve with a two-line config, append `line` to it in place, wait until `done`;
    the config file and what was logged meanwhile."""
    config = zones.parent / "dnsoverride.yaml"
    text = f"zones: {zones.name}\nupstreams: [127.0.0.1:1]\n"
    config.write_text(text)
    with structlog.testing.capture_logs() as logs:
        async with serving_config(zones, config) as h:
            config.write_text(text + line)
            await h.until(lambda: done(h))
    return config, logs


async def test_config_syntax_error_fails_reload_with_file_and_line(zones: Path) -> None:
    config, logs = await append_to_config(
        zones, "bogus: 1\n", lambda h: h.reloader.stats.failures == 1
    )
    [problem] = [e for e in logs if e["event"] == "zone_problem"]
    assert (problem["file"], problem["line"]) == (str(config), 3)
    assert "unknown key 'bogus'" in problem["reason"]


async def test_config_change_of_start_time_keys_is_reported(zones: Path) -> None:
    _, logs = await append_to_config(
        zones, "timeout: 1.5\n", lambda h: h.reloader.stats.successes == 1
    )
    [warning] = [e for e in logs if e["event"] == "config_change_needs_restart"]
    assert warning["keys"] == ["timeout"]


async def test_edit_between_initial_load_and_start_is_noticed(zones: Path) -> None:
    """The daemon fingerprints before its initial load; an edit made meanwhile reloads."""
    baseline = fingerprint(zones, None)
    harness = Harness(zones, lambda: load_zone_set(zones), None, baseline=baseline)
    (zones / "a.yaml").write_text(zone_text({"a.test": "10.0.0.2"}))
    async with running(harness) as h:
        await h.answer_becomes("a.test", ("10.0.0.2",))


def test_file_cache_reparses_only_changed_files(zones: Path) -> None:
    (zones / "b.yaml").write_text(zone_text({"b.test": "10.0.1.1"}))
    cache = ZoneFileCache()
    first = load_zone_set(zones, cache=cache)
    (zones / "b.yaml").write_text(zone_text({"b.test": "10.0.1.2"}))
    second = load_zone_set(zones, cache=cache)
    assert second.files[0] is first.files[0]  # a.yaml: same bytes, same parsed object
    assert second.files[1] is not first.files[1]
    assert addresses(second, "b.test") == ("10.0.1.2",)
    # Same definition of the hash with or without a cache.
    assert second.content_hash == load_zone_set(zones).content_hash != first.content_hash


def test_file_cache_rechecks_a_file_that_names_a_health_ca(zones: Path) -> None:
    """Such a file's validity also depends on the CA file: never served from the cache."""
    ca = make_ca(zones)
    (zones / "b.yaml").write_text(
        "records:\n  b.test:\n    A: 10.0.1.1\n"
        f"    health: {{https: 'https://b.test/', ca: '{ca.cert_file.name}'}}\n"
    )
    cache = ZoneFileCache()
    load_zone_set(zones, cache=cache)
    good = ca.cert_file.read_bytes()
    ca.cert_file.write_text("not a certificate\n")
    with pytest.raises(ZoneSetError) as error:
        load_zone_set(zones, cache=cache)
    assert [p.file for p in error.value.problems] == [str(zones / "b.yaml")]
    ca.cert_file.write_bytes(good)
    assert addresses(load_zone_set(zones, cache=cache), "b.test") == ("10.0.1.1",)


async def test_a_zone_file_turned_dangling_symlink_or_fifo_keeps_the_last_good_set(
    zones: Path, tmp_path: Path
) -> None:
    """`a.yaml` made a symlink to a file that is not there (a checkout moved), then a FIFO:
    the reload used to succeed without the file, dropping its names. Now each is a failed
    reload naming the file, the last good set stays, and the FIFO blocks nothing. Fails
    on the code before the fix."""
    with structlog.testing.capture_logs() as logs:
        async with reloading(zones) as h:
            before = h.live.current
            (zones / "a.yaml").unlink()
            (zones / "a.yaml").symlink_to(tmp_path / "moved" / "a.yaml")
            await h.until(lambda: h.reloader.stats.failures == 1)
            (zones / "a.yaml").unlink()
            os.mkfifo(zones / "a.yaml")
            await h.until(lambda: h.reloader.stats.failures == 2)
            assert h.live.current is before
            assert h.answer("a.test") == ("10.0.0.1",)
            (zones / "a.yaml").unlink()
            (zones / "a.yaml").write_text(zone_text({"a.test": "10.0.0.2"}))
            await h.answer_becomes("a.test", ("10.0.0.2",))
    problems = [e for e in logs if e["event"] == "zone_problem"]
    assert [problem["file"] for problem in problems] == [str(zones / "a.yaml")] * 2
    assert "No such file or directory" in problems[0]["reason"]
    assert "not a regular file" in problems[1]["reason"]
