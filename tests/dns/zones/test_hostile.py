"""Hostile YAML in the files an admin edits (issue 10, items 1 and 2): absurd nesting and
alias bombs in zone files and in the config's `allow`, through `dnsoverride check`,
`serve` at start and a running server's reload, each as a real process.

On the code before the fix these reproduce: `check` and `serve` dying with SIGSEGV on a
flow sequence nested 100,000 deep behind an anchor (PyYAML 6.0.3's C composer, which
the loader fell back to for anchors); a traceback from `check` at 1,000 deep without an
anchor; billion laughs taking `check` to ~15 s, 1.25 GB and 312 MB of output at 8
levels (a MemoryError at 9), and a running server to 1.27 GB with lost queries, re-tried
every `reload_interval`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import pytest

from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, memory_mb
from tests.support.ports import free_port
from tests.support.yaml_bombs import laughs_through_redefined_anchors

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def deep(levels: int, *, anchor: bool) -> str:
    """A zone file whose TXT value is a flow sequence nested `levels` deep (line 3)."""
    return (
        "records:\n  deep.test:\n    TXT: "
        + ("&deep " if anchor else "")
        + "[" * levels
        + "]" * levels
        + "\n"
    )


def laughs_items(levels: int, leaf: str, indent: str) -> str:
    """Billion laughs as the items of a YAML list, one level per line."""
    items = [f"{indent}- &l0 [" + ", ".join([leaf] * 9) + "]"]
    for level in range(1, levels + 1):
        items.append(f"{indent}- &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(items) + "\n"


def laughs_zone(levels: int) -> str:
    """A zone file whose TXT values are billion laughs (levels on lines 4..)."""
    return "records:\n  bomb.test:\n    TXT:\n" + laughs_items(levels, "lol", "      ")


def laughs_allow(levels: int) -> str:
    """A config whose `allow` list is billion laughs (levels on lines 3..)."""
    items = laughs_items(levels, "10.0.0.0/8", "  ")
    return f"upstreams: [127.0.0.1:1]\nallow:\n{items}zones: zones\n"


@dataclass
class Finished:
    """A finished process: exit status (negative: the signal), output, cost."""

    returncode: int
    stdout: str
    stderr: str
    stderr_bytes: int
    seconds: float
    max_rss_mb: float


# A forked child's ru_maxrss counts the resident pages it shared with its parent at the
# fork (measured: `python -c pass` forked from a 300 MB process reports 313 MB), so a
# child forked from pytest would carry pytest's size, which grows with the suite. A small
# launcher (python -S, ~10 MB) forks it instead and hands over wait4's figures.
LAUNCHER = (
    "import os, subprocess, sys\n"
    "child = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(child.pid, 0)\n"
    "with open(sys.argv[1], 'w') as out:\n"
    "    out.write(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}')\n"
)


def run_measured(tmp_path: Path, *argv: str, timeout: float = 60) -> Finished:
    """Run `python -m dnsoverride ARGV` with output to files; its own peak RSS from wait4."""
    out, err, usage = tmp_path / "out.txt", tmp_path / "err.txt", tmp_path / "usage.txt"
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, str(usage),
             sys.executable, "-m", "dnsoverride", *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"{argv} still running after {timeout}s") from None
    returncode, max_rss = (int(field) for field in usage.read_text().split())
    return Finished(
        returncode=returncode,
        stdout=out.read_text(errors="replace"),
        stderr=err.read_text(errors="replace")[:10_000],
        stderr_bytes=err.stat().st_size,
        seconds=time.monotonic() - started,
        max_rss_mb=max_rss / 1024,
    )


def assert_too_deep(stderr: str, path: Path) -> None:
    """Our limit says so; with PyYAML >= 6.0.4 its libyaml scanner may say so first (its
    own limit, 1,000 flow levels, found while it looks ahead for a mapping key)."""
    assert stderr in (
        f"{path}:3: YAML nested deeper than 64 levels\n",
        f"{path}:3: YAML syntax error: exceeded maximum nesting depth\n",
    ), stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "zones").mkdir()
    (tmp_path / "zones" / "good.yaml").write_text("records:\n  good.test: {A: 10.0.0.1}\n")
    (tmp_path / "dnsoverride.yaml").write_text("upstreams: [127.0.0.1:1]\nzones: zones\n")
    return tmp_path


def check(workdir: Path) -> Finished:
    return run_measured(workdir, "check", "--config", str(workdir / "dnsoverride.yaml"))


def test_check_reports_deep_nesting_behind_an_anchor_instead_of_dying(workdir: Path) -> None:
    """The 200 KB segfault file: SIGSEGV (returncode -11) from `check` before the fix."""
    path = workdir / "zones" / "deep.yaml"
    path.write_text(deep(100_000, anchor=True))
    assert path.stat().st_size > 190_000
    result = check(workdir)
    assert result.returncode == 1, result
    assert_too_deep(result.stderr, path)
    assert result.seconds < 10


def test_check_reports_deep_nesting_without_an_anchor(workdir: Path) -> None:
    """1,000 deep, no anchor: a RecursionError traceback from `check` before the fix."""
    path = workdir / "zones" / "deep.yaml"
    path.write_text(deep(1_000, anchor=False))
    result = check(workdir)
    assert result.returncode == 1, result
    assert_too_deep(result.stderr, path)


def test_serve_with_the_segfault_file_exits_with_the_problem(workdir: Path) -> None:
    """`serve` with the file present: SIGSEGV at every start before the fix (a systemd
    restart loop with nothing logged); now exit status 2 and the file:line reason."""
    path = workdir / "zones" / "deep.yaml"
    path.write_text(deep(100_000, anchor=True))
    result = run_measured(
        workdir,
        "serve",
        *("--config", str(workdir / "dnsoverride.yaml")),
        *("--listen", f"127.0.0.1:{free_port()}", "--log-format", "json"),
    )
    assert result.returncode == 2, result
    last = result.stderr.splitlines()[-1].removeprefix("dnsoverride: error: ")
    assert_too_deep(last + "\n", path)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("levels", [8, 9])
@pytest.mark.parametrize("where", ["zone file", "config allow"])
def test_check_stops_billion_laughs(workdir: Path, where: str, levels: int) -> None:
    """In a zone file: 8 levels took 14.5 s, 1.25 GB and printed 312 MB before the fix;
    9 levels, a MemoryError. As the config's `allow` list: each item's repr expanded."""
    if where == "zone file":
        path, text, line = workdir / "zones" / "bomb.yaml", laughs_zone(levels), 8
    else:
        path, text, line = workdir / "dnsoverride.yaml", laughs_allow(levels), 7
    path.write_text(text)
    assert path.stat().st_size < 4096
    result = check(workdir)
    assert result.returncode == 1, result
    # Level 4 (at `line`) is the first whose aliases cross the budget.
    assert result.stderr.startswith(f"{path}:{line}: YAML aliases stand for more than 10,000")
    assert result.stderr.count("\n") == 1
    assert result.stderr_bytes < 300
    assert result.seconds < 10
    assert result.max_rss_mb < 150


def test_billion_laughs_within_the_alias_budget_is_reported_briefly(workdir: Path) -> None:
    """2 levels (729 nodes) pass the YAML budget; the zone check then names the bad
    value without printing all of it (the repr of the expanded list, before the fix)."""
    path = workdir / "zones" / "bomb.yaml"
    path.write_text(laughs_zone(2))
    result = check(workdir)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert [line.split(": bad TXT value ")[0] for line in lines] == [
        f"{path}:{n}: bomb.test" for n in (4, 5, 6)
    ]
    assert lines[2].split(": bad TXT value ")[1].startswith("[[[")
    assert all(len(line) < len(str(path)) + 150 for line in lines), lines


class Prober:
    """Asks the server for an overridden name back to back; counts what is lost."""

    def __init__(self, server: DnsPeer) -> None:
        self.server = server
        self.answered = self.lost = 0
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self.server.query("good.test", timeout=1)
                assert response.answer[0][0].address == "10.0.0.1"
                self.answered += 1
            except (dns.exception.Timeout, OSError, AssertionError, IndexError):
                self.lost += 1
            self.worst = max(self.worst, time.monotonic() - started)
            time.sleep(0.01)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    with dnsmasq(tmp_path, "--address=/test/") as peer:
        yield peer


def log_events(server: DnsPeer, name: str) -> list[dict[str, object]]:
    found = []
    for line in server.log_text().splitlines():
        if f'"{name}"' in line:
            found.append(json.loads(line))
    return found


# What is saved (into a new zone file, or over the running config) and the line blamed.
HOSTILE: dict[str, tuple[str, Callable[[], str], int]] = {
    "deep": ("zone", lambda: deep(100_000, anchor=True), 3),
    "laughs": ("zone", lambda: laughs_zone(9), 8),
    "laughs in allow": ("config", lambda: "reload_interval: 0.3\n" + laughs_allow(9), 8),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_running_server_rejects_the_file_keeps_answering_and_does_not_retry(
    workdir: Path, upstream: DnsPeer, case: str
) -> None:
    """Before the fix the server died 2.3 s after the deep file was saved (logging
    nothing), and the 9-level bomb (in a zone file, or as the config's `allow`) took it
    to a MemoryError after ~170 s unresponsive, re-tried every `reload_interval` (a
    reload that raised recorded nothing)."""
    where, make, line = HOSTILE[case]
    zones = workdir / "zones"
    config = "reload_interval: 0.3\n"
    with dnsoverride_serve(
        workdir, zones, [upstream.address], "--log-level", "debug", config=config
    ) as server:
        # Saved by rename, like most tools do.
        if where == "zone":
            path = zones / "bomb.yaml"
        else:
            path = workdir / f"dnsoverride-{server.port}.yaml"
        with Prober(server) as prober:
            temp = path.with_name(".bomb.tmp")
            temp.write_text(make())
            temp.replace(path)
            deadline = time.monotonic() + 20
            while not log_events(server, "zones_reload_failed"):
                assert time.monotonic() < deadline, f"{case}: no reload failure logged"
                assert server.process.poll() is None, server.log_text()[-2000:]
                time.sleep(0.05)
            # The periodic check comes round again and again, and finds nothing new.
            while len(periodic_unchanged(server)) < 3:
                assert time.monotonic() < deadline, f"{case}: no periodic checks"
                time.sleep(0.05)
        assert server.process.poll() is None
        [problem] = log_events(server, "zone_problem")
        assert (problem["file"], problem["line"]) == (str(path), line)
        assert len(log_events(server, "zones_reload_failed")) == 1
        assert not log_events(server, "zone_reload_crashed")
        assert prober.lost == 0, (prober.lost, prober.answered)
        assert prober.answered > 10
        assert server.log.stat().st_size < 100_000
        assert memory_mb(server.process.pid)["VmHWM"] < 200
        # SIGHUP still forces the load again (and fails the same way, once more).
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while len(log_events(server, "zones_reload_failed")) < 2:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)


def periodic_unchanged(server: DnsPeer) -> list[dict[str, object]]:
    return [e for e in log_events(server, "zones_unchanged") if e.get("trigger") == "periodic"]


HEALTH = "records:\n  bomb.test:\n    A: 10.0.0.1\n    health:\n      tcp: 443\n"


def test_check_stops_laughs_hidden_behind_redefined_anchors(workdir: Path) -> None:
    """Billion laughs whose levels reuse the ids of freed, redefined anchors slipped past
    the alias budget (see test_zones_yaml), and a health check's `interval` turned the
    value into text: 6 levels (10.9 million nodes) cost `check` seconds and hundreds of
    MB, 9 levels (7.9 billion) all memory. Fails on the code before the fix (6 levels:
    the problem named the interval, not the aliases)."""
    laughs = laughs_through_redefined_anchors(6).replace("last: ", "      interval: ")
    path = workdir / "zones" / "bomb.yaml"
    path.write_text(laughs.replace("      interval: ", HEALTH + "      interval: "))
    result = check(workdir)
    assert result.returncode == 1, result
    assert "YAML aliases stand for more than 10,000 nodes" in result.stderr, result.stderr
    assert result.seconds < 10 and result.max_rss_mb < 200, result
