"""The default `workers` is `auto`: with nothing said, `serve` runs one process per usable
CPU (at most 4), and a server limited to one CPU runs one process and starts no workers.
`dnsoverride check`, the `started` event, `/status` and `dnsoverride status` all say how
many and why.

Fails on main at 7ff8dae: the default was 1 (one process on any machine), and neither
`check` nor `status` said how many processes there were for one.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dnsoverride.common.cpus import usable_cpus
from dnsoverride.dns.config import AUTO_WORKERS_CAP
from tests.support.peers import DnsPeer, dnsoverride_serve, events
from tests.support.ports import free_port
from tests.support.waits import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NAME = "over.test"


def _zones(tmp_path: Path) -> Path:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(json.dumps({"records": {NAME: {"A": "10.0.0.1"}}}))
    return zones


def _started(server: DnsPeer) -> dict[str, Any]:
    poll(lambda: bool(events(server, "started")), 60, "started", every=0.05)
    (started,) = events(server, "started")
    return started


def _cli(*args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "dnsoverride", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as reply:
        workers: dict[str, Any] = json.loads(reply.read())["workers"]
    return workers


def _why(cpus: int) -> str:
    if cpus > AUTO_WORKERS_CAP:
        return f"{cpus} usable CPUs, at most {AUTO_WORKERS_CAP}"
    return f"{cpus} usable CPU{'s' if cpus > 1 else ''}"


def test_the_default_is_one_process_per_usable_cpu(tmp_path: Path, dead_upstream: str) -> None:
    cpus = usable_cpus()
    expected = min(cpus, AUTO_WORKERS_CAP)
    zones = _zones(tmp_path)
    admin = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text("upstreams: [192.0.2.53]\n")  # nothing about workers
    checked = _cli("check", "--config", str(config), "--zones", str(zones))
    assert checked.endswith(f", workers {expected} (auto: {_why(cpus)})\n"), checked
    with dnsoverride_serve(
        tmp_path, zones, [dead_upstream], f"--metrics=127.0.0.1:{admin}", workers=None
    ) as server:
        started = _started(server)
        assert (started["workers"], started["workers_auto"]) == (expected, _why(cpus))
        assert len(events(server, "worker_started")) == expected - 1
        workers = _status(admin)
        assert workers["configured"] == workers["serving"] == expected
        assert workers["auto"] == _why(cpus)
        assert len(workers["processes"]) == expected
        shown = _cli("status", "--admin", f"127.0.0.1:{admin}")
        line = "1 process" if expected == 1 else f"{expected} of {expected} serving"
        assert f"{line}" in shown and f"(auto: {_why(cpus)})" in shown, shown


def test_one_usable_cpu_is_one_process_and_no_workers(tmp_path: Path, dead_upstream: str) -> None:
    """Run on one CPU (`taskset`): auto is 1, the supervisor serves alone."""
    zones = _zones(tmp_path)
    admin = free_port()
    first = min(os.sched_getaffinity(0))
    with dnsoverride_serve(
        tmp_path,
        zones,
        [dead_upstream],
        f"--metrics=127.0.0.1:{admin}",
        wrapper=("taskset", "-c", str(first)),
        workers=None,
    ) as server:
        started = _started(server)
        assert (started["workers"], started["workers_auto"]) == (1, "1 usable CPU")
        assert events(server, "worker_started") == []
        workers = _status(admin)
        assert workers["configured"] == 1 and workers["auto"] == "1 usable CPU"
        assert [p["pid"] for p in workers["processes"]] == [server.process.pid]
        # Nothing but the supervisor: no child process at all.
        children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        assert children.read_text().split() == []
        shown = _cli("status", "--admin", f"127.0.0.1:{admin}")
        assert "1 process (auto: 1 usable CPU)" in shown, shown


def _loaded(server: DnsPeer, names: int) -> bool:
    return any(event["names"] == names for event in events(server, "zones_reloaded"))


def test_a_reload_past_a_step_of_auto_is_logged(tmp_path: Path, dead_upstream: str) -> None:
    """`auto` is fitted to the zones at start only: a reload to 300,001 names (one
    process at the next start) logs `workers_auto_differs` with both counts, once, while
    the running processes serve on. Failed before the fix: nothing said so."""
    cpus = min(usable_cpus(), AUTO_WORKERS_CAP)
    if cpus < 2:
        pytest.skip("auto is one process here: nothing to lower")
    zones = _zones(tmp_path)
    with dnsoverride_serve(tmp_path, zones, [dead_upstream], workers=None) as server:
        assert _started(server)["workers"] == cpus
        for names in (300_000, 300_001):  # past the step, then a little further
            records = {f"h{i}.big.test": {"A": "10.0.0.2"} for i in range(names)}
            records[NAME] = {"A": "10.0.0.1"}
            grown = zones / "z.yaml.new"
            grown.write_text(json.dumps({"records": records}))
            grown.rename(zones / "z.yaml")
            server.process.send_signal(signal.SIGHUP)
            loaded = functools.partial(_loaded, server, names + 1)
            poll(loaded, 90, f"{names + 1} names loaded", every=0.1)
        (differs,) = events(server, "workers_auto_differs")  # once, not at every reload
        assert (differs["workers"], differs["at_restart"], differs["names"]) == (cpus, 1, 300_001)
        assert differs["why"].startswith("300,001 zone names, a copy in each process")
        assert server.process.poll() is None
