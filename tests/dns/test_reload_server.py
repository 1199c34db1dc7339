"""Hot reload seen from a DNS client: `dnsoverride serve` as a process, a real dnsmasq
upstream, dnspython queries over UDP, zone files edited the ways people edit them.

Every wait is a poll with a deadline; "within 1 s" is measured from the moment the save
finished to the first answer that shows the change.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.support.edits import BROKEN, configmap, write_unseen, zone_text
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, events
from tests.support.ports import free_port
from tests.support.waits import RELOAD_DEADLINE, poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    # Anything else under .test is NXDOMAIN upstream: a name that is no longer overridden.
    with dnsmasq(tmp_path, "--address=/forwarded.test/192.0.2.1", "--address=/test/") as peer:
        yield peer


def a_records(server: DnsPeer, name: str) -> tuple[str, ...]:
    """The sorted addresses answered, or the rcode's name when it is not NOERROR."""
    response = server.query(name)
    if response.rcode() != dns.rcode.NOERROR:
        return (dns.rcode.to_text(response.rcode()),)
    return tuple(sorted(r.address for rrset in response.answer for r in rrset))


def answer_becomes(server: DnsPeer, name: str, expected: tuple[str, ...]) -> float:
    return poll(
        lambda: a_records(server, name) == expected,
        RELOAD_DEADLINE,
        f"{name} -> {expected} (now {a_records(server, name)})",
    )


def test_a_record_change_is_answered_within_a_second(tmp_path: Path, upstream: DnsPeer) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(zone_text({"registry.test": "10.0.0.1"}))
    with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
        assert a_records(server, "registry.test") == ("10.0.0.1",)
        (zones / "ci.yaml").write_text(zone_text({"registry.test": "10.0.0.2"}))
        answer_becomes(server, "registry.test", ("10.0.0.2",))
        poll(lambda: bool(events(server, "zones_reloaded")), 2, "reload event")
        [event] = events(server, "zones_reloaded")
        assert event["trigger"] == "event"
        assert event["changed_names"] == ["registry.test"]
        assert len(event["content_hash"]) == 64
        assert a_records(server, "www.forwarded.test") == ("192.0.2.1",)


def vim_rename(path: Path, old: str, new: str) -> None:
    subprocess.run(
        [
            *("vim", "-Es", "-u", "NONE", "-c", "set backupcopy=no backupskip="),
            *("-c", f"%s/{old}/{new}/", "-c", "wq", str(path)),
        ],
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )


def test_every_save_style_over_dns(tmp_path: Path, upstream: DnsPeer) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    path = zones / "ci.yaml"
    path.write_text(zone_text({"a.test": "10.0.0.1"}))
    with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
        # In place: truncate and write the same inode.
        with path.open("w") as file:
            file.write(zone_text({"a.test": "10.0.0.2"}))
        answer_becomes(server, "a.test", ("10.0.0.2",))
        # vim with a backup: rename the original away, write a new file.
        vim_rename(path, "10.0.0.2", "10.0.0.3")
        answer_becomes(server, "a.test", ("10.0.0.3",))
        # sed -i: a temp file in the same directory renamed over the original.
        subprocess.run(["sed", "-i", "s/10.0.0.3/10.0.0.4/", str(path)], check=True)
        answer_becomes(server, "a.test", ("10.0.0.4",))
        # Ansible-style hidden temporary + rename.
        temp = zones / ".ansible_tmpXYZci.yaml"
        temp.write_text(zone_text({"a.test": "10.0.0.5"}))
        os.replace(temp, path)
        answer_becomes(server, "a.test", ("10.0.0.5",))
        # A new file, then deleting one.
        (zones / "more.yml").write_text(zone_text({"b.test": "10.0.1.1"}))
        answer_becomes(server, "b.test", ("10.0.1.1",))
        (zones / "more.yml").unlink()
        answer_becomes(server, "b.test", ("NXDOMAIN",))  # forwarded again
        assert a_records(server, "a.test") == ("10.0.0.5",)
        assert not events(server, "zones_reload_failed")
        assert server.process.poll() is None


def test_configmap_symlink_swap_over_dns(tmp_path: Path, upstream: DnsPeer) -> None:
    root = tmp_path / "configmap"
    root.mkdir()
    configmap(root, "2026_11_28_18_00_00.1", {"ci.yaml": zone_text({"a.test": "10.0.0.1"})})
    with dnsoverride_serve(tmp_path, root, [upstream.address]) as server:
        assert a_records(server, "a.test") == ("10.0.0.1",)
        configmap(root, "2026_11_28_18_05_00.2", {"ci.yaml": zone_text({"a.test": "10.0.0.2"})})
        answer_becomes(server, "a.test", ("10.0.0.2",))


def test_broken_files_change_nothing_and_fixing_reloads(tmp_path: Path, upstream: DnsPeer) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    good = zone_text({"a.test": "10.0.0.1", "c.test": "10.0.0.3"})
    (zones / "a.yaml").write_text(good)
    (zones / "b.yaml").write_text(zone_text({"b.test": "10.0.1.1"}))
    expected = {"a.test": ("10.0.0.1",), "b.test": ("10.0.1.1",), "c.test": ("10.0.0.3",)}
    metrics = f"127.0.0.1:{free_port()}"
    check_config = tmp_path / "check.yaml"
    check_config.write_text(f"zones: {zones.name}\nupstreams: [{upstream.address}]\n")
    with dnsoverride_serve(tmp_path, zones, [upstream.address], "--metrics", metrics) as server:
        # The first load counts: a fresh daemon's dashboards are not empty.
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
            fresh = response.read().decode()
        assert 'dnsoverride_zone_reloads_total{result="success"} 1.0' in fresh
        assert "dnsoverride_zone_reload_last_success_timestamp_seconds " in fresh
        assert "dnsoverride_zone_reload_duration_seconds " in fresh
        for count, (case, (text, line, reason)) in enumerate(sorted(BROKEN.items()), 1):
            (zones / "a.yaml").write_text(text)
            poll(
                lambda n=count: len(events(server, "zones_reload_failed")) == n,  # type: ignore[misc]
                2,
                f"reload failure for {case}",
            )
            problem = events(server, "zone_problem")[-1]
            assert problem["file"] == str(zones / "a.yaml"), case
            assert problem["line"] == line, case
            assert reason in problem["reason"], case
            assert problem["level"] == "error"
            # `dnsoverride check` says exactly the same: one validator for both.
            check = subprocess.run(
                [sys.executable, "-m", "dnsoverride", "check", f"--config={check_config}"],
                capture_output=True,
                text=True,
                check=False,
            )
            assert check.returncode == 1, check.stderr
            assert check.stderr == f"{problem['file']}:{problem['line']}: {problem['reason']}\n"
            for name, addresses in expected.items():
                assert a_records(server, name) == addresses, (case, name)
            assert server.process.poll() is None
        (zones / "a.yaml").write_text(good.replace("10.0.0.1", "10.0.0.9"))
        answer_becomes(server, "a.test", ("10.0.0.9",))
        assert a_records(server, "b.test") == ("10.0.1.1",)
        poll(lambda: bool(events(server, "zones_reloaded")), 2, "reload event")
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
            exposition = response.read().decode()
        assert 'dnsoverride_zone_reloads_total{result="success"} 2.0' in exposition
        failures = f'dnsoverride_zone_reloads_total{{result="failure"}} {len(BROKEN)}.0'
        assert failures in exposition
        assert "dnsoverride_zone_reload_last_success_timestamp_seconds " in exposition


@pytest.mark.parametrize("trigger", ["sighup", "periodic"])
def test_change_without_file_event_is_reloaded_by(
    tmp_path: Path, upstream: DnsPeer, trigger: str
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(zone_text({"a.test": "10.0.0.1"}))
    # For SIGHUP, an hour-long periodic interval: nothing else can pick the change up.
    interval = 3600 if trigger == "sighup" else 0.3
    with dnsoverride_serve(
        tmp_path, zones, [upstream.address], config=f"reload_interval: {interval}\n"
    ) as server:
        write_unseen(zones, tmp_path / "elsewhere", "ci.yaml", zone_text({"a.test": "10.0.0.2"}))
        assert a_records(server, "a.test") == ("10.0.0.1",)
        if trigger == "sighup":
            server.process.send_signal(signal.SIGHUP)
        poll(
            lambda: a_records(server, "a.test") == ("10.0.0.2",),
            RELOAD_DEADLINE + interval if trigger == "periodic" else RELOAD_DEADLINE,
            f"reload by {trigger}",
        )
        poll(lambda: bool(events(server, "zones_reloaded")), 2, "reload event")
        assert [e["trigger"] for e in events(server, "zones_reloaded")] == [trigger]


def versioned_set(version: int) -> dict[str, str]:
    """Two files whose data only makes sense together: the alias in one file points at a
    name that exists only in the same version of the other file."""
    front = (
        "records:\n"
        "  www.app.test:\n"
        f"    CNAME: v{version}.back.test.\n"
        "  multi.app.test:\n"
        f"    A: [{', '.join(f'10.{version}.0.{i}' for i in range(1, 5))}]\n"
        "    TXT: " + f'"version={version}"\n'
    )
    back = f"records:\n  v{version}.back.test:\n    A: 10.{version}.9.9\n"
    return {"front.yaml": front, "back.yaml": back}


@dataclass
class Observed:
    answers: int = 0
    versions: set[int] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)


def check_answer(response: dns.message.Message, observed: Observed) -> None:
    rcode = dns.rcode.to_text(response.rcode())
    if response.rcode() != dns.rcode.NOERROR:
        observed.bad.append(f"rcode {rcode}")
        return
    records = [(rrset.name.to_text(), rrset.rdtype, r) for rrset in response.answer for r in rrset]
    versions = set()
    for owner, rdtype, rdata in records:
        if rdtype == dns.rdatatype.CNAME:
            versions.add(int(rdata.target.to_text().split(".")[0][1:]))
        elif rdtype == dns.rdatatype.A:
            versions.add(int(rdata.address.split(".")[1]))
        elif rdtype == dns.rdatatype.TXT:
            versions.add(int(b"".join(rdata.strings).decode().split("=")[1]))
        else:
            observed.bad.append(f"unexpected {owner} {rdtype}")
    kinds = sorted({rdtype for _, rdtype, _ in records})
    complete = kinds in ([dns.rdatatype.A, dns.rdatatype.CNAME],) or (
        kinds == [dns.rdatatype.A] and len(records) == 4
    )
    if len(versions) != 1 or not complete:
        observed.bad.append(f"mixed or partial answer: {records}")
        return
    observed.versions |= versions
    observed.answers += 1


def query_continuously(server: DnsPeer, stop: threading.Event, observed: Observed) -> None:
    while not stop.is_set():
        for name in ("www.app.test", "multi.app.test"):
            try:
                response = server.query(name, timeout=2)
            except dns.exception.Timeout:
                observed.bad.append(f"timeout for {name}")
                continue
            check_answer(response, observed)


@pytest.mark.timeout(120)
def test_queries_during_50_reloads_see_only_complete_sets(
    tmp_path: Path, upstream: DnsPeer
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    for name, text in versioned_set(1).items():
        (zones / name).write_text(text)
    with dnsoverride_serve(tmp_path, zones, [upstream.address]) as server:
        stop = threading.Event()
        observed = Observed()
        thread = threading.Thread(target=query_continuously, args=(server, stop, observed))
        thread.start()
        try:
            for reload in range(1, 51):
                version = 1 + reload % 2
                for name, text in versioned_set(version).items():
                    if reload % 2:
                        # Half the reloads rewrite in place, half replace by rename.
                        with (zones / name).open("w") as file:
                            file.write(text)
                    else:
                        temp = zones / f".{name}.tmp"
                        temp.write_text(text)
                        os.replace(temp, zones / name)
                poll(
                    lambda v=version: (
                        a_records(server, "multi.app.test")  # type: ignore[misc]
                        == tuple(f"10.{v}.0.{i}" for i in range(1, 5))
                    ),
                    2,
                    f"reload {reload} to version {version}",
                )
        finally:
            stop.set()
            thread.join()
        assert observed.bad == []
        assert observed.versions == {1, 2}
        assert observed.answers > 100
        poll(lambda: len(events(server, "zones_reloaded")) >= 50, 5, "50 reload events")
        assert not events(server, "zones_reload_failed")
        assert server.process.poll() is None
