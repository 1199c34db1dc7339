"""`workers: 3` over real sockets: three processes on one port (SO_REUSEPORT), one service.

Each query goes out from a fresh source port (dnspython), so the kernel spreads them over
the processes; the query log says which process answered (`worker`: 0 is the supervisor).
A zone edit after SIGHUP and a health flip must be answered by every worker within one
reload; a worker killed with SIGKILL is logged and replaced while queries keep being
answered; /metrics is one sum over the processes; systemd hears one READY, from the
supervisor, once every worker serves.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.rdatatype
import pytest

from tests.support.interpreters import python_output
from tests.support.metrics import scrape, total
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, events
from tests.support.ports import free_port
from tests.support.systemd import (
    ADDRESS,
    OVERRIDE,
    NotifySocket,
    ask,
    ask_until_answered,
    clean_env,
    listening_sockets,
    serve_command,
)
from tests.support.waits import poll

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKERS = 3
COOKIE = dns.edns.OptionType.COOKIE
NAME = "over.test"
GATED = "gated.test"
REAL = "192.0.2.44"  # what the upstream says for GATED
PYTHONPATH = os.environ.get("PYTHONPATH", "")  # the activator passes on only what -E names


def _config(metrics: int) -> str:
    return f"query_log: true\nmetrics: 127.0.0.1:{metrics}\n"


def _zone(address: str, health_port: int) -> str:
    check = {"tcp": health_port, "interval": 0.2, "timeout": 0.2, "fall": 2, "rise": 2}
    gated = {"A": "127.0.0.1", "ttl": 1, "health": check}
    return json.dumps({"records": {NAME: {"A": address, "ttl": 1}, GATED: gated}})


def _started(server: DnsPeer) -> None:
    """Until the supervisor logged `started` (after every worker said it serves; the
    supervisor itself answers from the moment it has bound, before)."""
    poll(lambda: bool(events(server, "started")), 60, "started", every=0.05)


def _address(server: DnsPeer, name: str) -> str:
    reply = server.query(name, timeout=2.0)
    (rrset,) = [rrset for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A]
    return str(rrset[0].address)


def _every_worker_answers(server: DnsPeer, name: str, expected: str) -> None:
    """300 queries from fresh ports all get `expected`, and the query log shows every
    process answering `name` among them."""
    seen = len(_queries(server.log))
    for _ in range(300):
        assert _address(server, name) == expected
    assert _answering(server.log, seen, 300, name) == set(range(WORKERS))


def _queries(log: Path, name: str | None = None) -> list[dict[str, object]]:
    """The query log's lines so far (of `name`, if given)."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if '"event": "query"' in line:
            record = json.loads(line)
            if name is None or record.get("name") == name:
                found.append(record)
    return found


def _answering(log: Path, since: int, count: int, name: str | None = None) -> set[object]:
    """The workers that answered the `count` queries logged after the first `since`
    (waiting for their lines: the processes write them after answering)."""
    poll(lambda: len(_queries(log)) >= since + count, 10, f"{count} query lines", every=0.05)
    logged = _queries(log)[since:]
    return {record.get("worker") for record in logged if name in (None, record.get("name"))}


def _dead(pid: int) -> bool:
    """Whether process `pid` has exited: every thread of it. A worker has several, and
    its sockets close with the last; its main thread alone can be a zombie before."""
    states = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                states.append((task / "stat").read_text().rpartition(")")[2].split()[0])
    except FileNotFoundError:
        return True  # reaped
    return all(state in {"Z", "X"} for state in states)


def _admin(port: int, target: str) -> dict[str, Any]:
    """The JSON document the admin listener answers `target` with."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=10) as reply:
        document: dict[str, Any] = json.loads(reply.read())
    return document


def _every_process_serves(port: int, content_hash: str) -> bool:
    """Whether /status says every process serves the routing with `content_hash`."""
    workers = _admin(port, "/status")["workers"]
    processes = workers["processes"]
    return len(processes) == WORKERS and all(
        p["serving"] and p["routing"] == content_hash for p in processes
    )


def test_zone_edit_and_health_flip_reach_every_worker(tmp_path: Path) -> None:
    target = socket.socket()
    target.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    target.bind(("127.0.0.1", 0))
    target.listen(64)
    health_port = target.getsockname()[1]
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(_zone("10.0.0.1", health_port))
    metrics = free_port()
    with (
        dnsmasq(tmp_path, "--local=/test/", f"--host-record={GATED},{REAL}") as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], config=_config(metrics), workers=WORKERS
        ) as server,
    ):
        _started(server)
        started = events(server, "worker_started")
        assert sorted(record["worker"] for record in started) == [1, 2]
        _every_worker_answers(server, NAME, "10.0.0.1")
        _every_worker_answers(server, GATED, "127.0.0.1")

        before = _admin(metrics, "/status")["zones"]["content_hash"]
        assert _every_process_serves(metrics, before)
        (zones / "z.yaml").write_text(_zone("10.0.0.2", health_port))
        server.process.send_signal(signal.SIGHUP)
        # /status says when every worker has loaded the new files (and answered with their
        # hash); from then on every process answers the new zone (each query from a fresh
        # port; the answer caches follow the reload).
        poll(lambda: _admin(metrics, "/status")["zones"]["content_hash"] != before, 10, "reload")
        after = _admin(metrics, "/status")["zones"]["content_hash"]
        poll(lambda: _every_process_serves(metrics, after), 10, "every worker reloaded")
        _every_worker_answers(server, NAME, "10.0.0.2")
        # /explain is the supervisor's, on the routing every process now serves.
        (step,) = _admin(metrics, f"/explain?name={NAME}")["steps"]
        assert step["records"] == ["10.0.0.2"] and step["file"].endswith("z.yaml")

        target.close()  # the health prober (one, in the supervisor) withdraws the override
        poll(lambda: _address(server, GATED) == REAL, 10, "the withdrawal", every=0.05)
        # Once any process answers REAL, the supervisor has sent every worker the verdict;
        # a worker answers /status's "counts" request only after the messages before it
        # on its pipe, so a /status with every process serving is past the withdrawal.
        assert _admin(metrics, "/status")["workers"]["serving"] == WORKERS
        _every_worker_answers(server, GATED, REAL)
        probes = events(server, "health_target_down") + events(server, "health_withdrawn")
        assert all(record.get("worker", 0) == 0 for record in probes)


def test_a_killed_worker_is_replaced_and_metrics_add_up(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(json.dumps({"records": {NAME: {"A": "10.0.0.1"}}}))
    metrics = free_port()
    with (
        dnsmasq(tmp_path) as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], config=_config(metrics), workers=WORKERS
        ) as server,
    ):
        _started(server)
        before = total(scrape(metrics), "dnsoverride_dns_queries_total")
        status_before = _admin(metrics, "/status")
        for _ in range(200):
            assert _address(server, NAME) == "10.0.0.1"
        samples = scrape(metrics)
        assert total(samples, "dnsoverride_dns_queries_total") - before == 200
        assert total(samples, "dnsoverride_dns_workers") == WORKERS
        # /status counts the whole service too: the sum over the three processes (the
        # supervisor alone answered about a third), and the answer cache's hits with it.
        status = _admin(metrics, "/status")
        assert status["queries"]["total"] - status_before["queries"]["total"] == 200
        hits = status["caches"]["answer"]["hits"] - status_before["caches"]["answer"]["hits"]
        assert hits >= 200 - WORKERS  # each process's first query may be a miss
        assert status["workers"]["serving"] == status["workers"]["configured"] == WORKERS
        answered = {r.get("worker") for r in events(server, "query")}
        assert answered == set(range(WORKERS))  # the sum is over all three

        (victim,) = [r for r in events(server, "worker_started") if r["worker"] == 1]
        os.kill(int(str(victim["pid"])), signal.SIGKILL)
        # Until it has died, a query the kernel hands its socket is lost with it.
        poll(lambda: _dead(int(str(victim["pid"]))), 10, "the worker died", every=0.01)
        answers = 0
        deadline = time.monotonic() + 15
        while len(events(server, "worker_started")) < 3:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            # Queries go on being answered meanwhile (the kernel stops routing to the
            # dead process's socket once it is closed).
            assert _address(server, NAME) == "10.0.0.1"
            answers += 1
        (exited,) = events(server, "worker_exited")
        assert exited["worker"] == 1 and exited["reason"] == "signal SIGKILL"
        assert exited["pid"] == victim["pid"]
        replacement = events(server, "worker_started")[-1]
        assert replacement["worker"] == 1 and replacement["pid"] != victim["pid"]
        for _ in range(100):
            assert _address(server, NAME) == "10.0.0.1"
        samples = scrape(metrics)
        assert total(samples, "dnsoverride_dns_worker_restarts_total") == 1
        assert total(samples, "dnsoverride_dns_workers") == WORKERS
        # The dead worker's counts up to the last scrape stay in the sum: it never falls.
        assert total(samples, "dnsoverride_dns_queries_total") - before >= 200 + 100
        workers = _admin(metrics, "/status")["workers"]
        assert workers["restarts"] == 1 and workers["serving"] == WORKERS
        pids = [p["pid"] for p in workers["processes"]]
        assert victim["pid"] not in pids and replacement["pid"] in pids
        shown = subprocess.run(
            [sys.executable, "-m", "dnsoverride", "status", "--admin", f"127.0.0.1:{metrics}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert f"workers       {WORKERS} of {WORKERS} serving, 1 restarted since start" in shown
        assert len(re.findall(r" serving +current\n", shown)) == WORKERS, shown


def test_one_ready_once_every_worker_serves(
    tmp_path: Path, systemd_notify: NotifySocket, dead_upstream: str
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(json.dumps({"records": {NAME: {"A": "10.0.0.1"}}}))
    port = free_port()
    log_path = tmp_path / "serve.log"
    config = tmp_path / "serve.yaml"
    config.write_text(f"workers: {WORKERS}\n")
    listen = f"127.0.0.1:{port}"
    command = serve_command(zones, dead_upstream, "--listen", listen, "--config", str(config))
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            env=clean_env(NOTIFY_SOCKET=str(systemd_notify.path)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ready = systemd_notify.next()
        assert ready.fields.get("READY") == "1" and ready.pid == process.pid
        # READY came after every worker said it serves.
        started = [line for line in log_path.read_text().splitlines() if "worker_started" in line]
        assert sorted(json.loads(line)["worker"] for line in started) == [1, 2]
        process.send_signal(signal.SIGHUP)
        assert systemd_notify.next_with("READY").pid == process.pid
        process.send_signal(signal.SIGTERM)
        assert systemd_notify.next_with("STOPPING").pid == process.pid
        assert process.wait(timeout=20) == 0
        # Nothing but the supervisor ever spoke to systemd: nothing else arrived.
        with pytest.raises(TimeoutError):
            systemd_notify.next(timeout=1.0)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_server_cookie_is_valid_on_every_worker(tmp_path: Path) -> None:
    """One cookie secret for all processes: the server cookie one process made is echoed
    unchanged by every other (with a secret per process, each would replace it)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(json.dumps({"records": {NAME: {"A": "10.0.0.1"}}}))
    with (
        dnsmasq(tmp_path) as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], config=_config(free_port()), workers=WORKERS
        ) as server,
    ):
        _started(server)
        client = dns.edns.GenericOption(COOKIE, b"client01")
        first = server.query(NAME, use_edns=0, options=[client])
        (issued,) = _cookies(first)
        seen = len(_queries(server.log))
        for _ in range(150):
            reply = server.query(NAME, use_edns=0, options=[dns.edns.GenericOption(COOKIE, issued)])
            assert _cookies(reply) == [issued]
        assert _answering(server.log, seen, 150) == set(range(WORKERS))


def _cookies(reply: dns.message.Message) -> list[bytes]:
    return [option.to_wire() for option in reply.options if option.otype == COOKIE]


def test_workers_share_the_sockets_systemd_passes(tmp_path: Path, dead_upstream: str) -> None:
    """Socket activation with `workers: 2`: nothing bound by anyone, the inherited UDP and
    TCP sockets served by both processes."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(json.dumps({"records": {OVERRIDE: {"A": ADDRESS}}}))
    config = tmp_path / "serve.yaml"
    config.write_text("workers: 2\nquery_log: true\n")
    port = free_port()
    address = f"127.0.0.1:{port}"
    command = [
        "systemd-socket-activate", "--datagram", "-l", address, "--",
        "systemd-socket-activate", "-l", address, "-E", f"PYTHONPATH={PYTHONPATH}",
        "--", *serve_command(zones, dead_upstream, "--config", str(config)),
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        assert ask_until_answered(port, deadline=time.monotonic() + 30) == ADDRESS
        poll(lambda: '"event": "started"' in log_path.read_text(), 60, "started", every=0.05)
        for _ in range(100):
            assert ask(port) == ADDRESS
        assert ask(port, tcp=True) == ADDRESS
        assert _answering(log_path, 0, 1 + 100 + 1) == {0, 1}
        # Neither process bound a socket of its own (the default 127.0.0.1:5353, say):
        # each holds systemd's two and nothing else that listens.
        (worker,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for pid in (process.pid, int(worker)):
            assert listening_sockets(pid) == {("udp", address), ("tcp", address)}, pid
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _processes_on(port: int, content_hash: str, count: int) -> bool:
    """Whether /status says `count` processes serve the routing with `content_hash`."""
    processes = _admin(port, "/status")["workers"]["processes"]
    return len(processes) == count and all(
        p["serving"] and p["routing"] == content_hash for p in processes
    )


def test_every_line_of_every_process_names_its_worker(tmp_path: Path) -> None:
    """`serve --workers 2` through a start, a zone edit, a config edit that needs a
    restart, a failed reload, SIGHUP, queries and a stop: every line of its log is a JSON
    event with `worker` (0 the supervisor, 1 the worker), whichever thread wrote it.
    Failed before the fix: `config_change_needs_restart`, which the supervisor logs from
    its reload thread, had no `worker` (a contextvar bound in the main thread is not in
    a thread's context)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(f"records:\n  {NAME}:\n    A: 10.0.0.1\n")
    metrics = free_port()
    with (
        dnsmasq(tmp_path) as upstream,
        dnsoverride_serve(
            tmp_path, zones, [upstream.address], config=_config(metrics), workers=2
        ) as server,
    ):
        _started(server)
        first = _admin(metrics, "/status")["zones"]["content_hash"]
        (zones / "z.yaml").write_text(f"records:\n  {NAME}:\n    A: 10.0.0.2\n")
        poll(lambda: _admin(metrics, "/status")["zones"]["content_hash"] != first, 10, "reload")
        edited = _admin(metrics, "/status")["zones"]["content_hash"]
        poll(lambda: _processes_on(metrics, edited, 2), 10, "the worker reloaded")
        config = tmp_path / f"dnsoverride-{server.port}.yaml"
        config.write_text(f"{_config(metrics)}tcp: {{idle_timeout: 3}}\n")
        poll(lambda: bool(events(server, "config_change_needs_restart")), 10, "the config")
        (zones / "broken.yaml").write_text("records: [broken\n")  # a failed reload's lines
        server.process.send_signal(signal.SIGHUP)
        poll(lambda: bool(events(server, "zones_reload_failed")), 10, "the failed reload")
        (zones / "broken.yaml").unlink()
        server.process.send_signal(signal.SIGHUP)
        poll(lambda: len(events(server, "zones_reloaded")) >= 2, 10, "SIGHUP's reload")
        for _ in range(20):
            assert _address(server, NAME) == "10.0.0.2"
    lines = server.log_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    unnamed = [record for record in records if "worker" not in record]
    assert unnamed == []
    assert {record["worker"] for record in records} == {0, 1}
    assert {record["event"] for record in records} >= {"zones_reloaded", "query", "stopped"}


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


def test_the_workers_run_with_the_supervisors_interpreter_flags(tmp_path: Path) -> None:
    """`python -E -X faulthandler -W error::ResourceWarning -m dnsoverride serve
    --workers 2` (from the checkout's root: -E ignores PYTHONPATH): the worker's command
    line has the same flags (and -P); it imports this checkout (our sys.path, which -E
    would not take from PYTHONPATH) and serves; and faulthandler is on in it: SIGSEGV
    makes it write the Python traceback (`Fatal Python error: Segmentation fault`), and
    its replacement has the flags too. Failed before the fix: the worker was `python -P
    -c ...`, and died of SIGSEGV without a word."""
    flags = ["-E", "-X", "faulthandler", "-W", "error::ResourceWarning"]
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "z.yaml").write_text(f"records:\n  {NAME}:\n    A: 10.0.0.1\n")
    root = Path(__file__).parents[2]
    with (
        dnsmasq(tmp_path) as upstream,
        dnsoverride_serve(
            tmp_path,
            zones,
            [upstream.address],
            workers=2,
            python_flags=flags,
            wrapper=["env", f"--chdir={root}"],
        ) as server,
    ):
        _started(server)
        (worker,) = events(server, "worker_started")
        command = _cmdline(worker["pid"])
        assert command[: command.index("-c")] == [
            sys.executable,
            "-E",
            "-Werror::ResourceWarning",
            "-X",
            "faulthandler",
            "-P",
        ]
        code = command[command.index("-c") + 1]
        assert code.startswith(f"import sys; sys.path[:] = [{str(root)!r}, ")  # ours, cwd first
        assert _address(server, NAME) == "10.0.0.1"
        os.kill(worker["pid"], signal.SIGSEGV)
        poll(lambda: len(events(server, "worker_started")) == 2, 30, "replaced", every=0.05)
        (exited,) = events(server, "worker_exited")
        assert (exited["pid"], exited["reason"]) == (worker["pid"], "signal SIGSEGV")
        assert "Fatal Python error: Segmentation fault" in server.log_text()
        replacement = events(server, "worker_started")[1]["pid"]
        assert "faulthandler" in _cmdline(replacement)


SETTINGS = (
    "import json, sys\nprint(json.dumps([list(sys.flags), sys.warnoptions, sys._xoptions]))\n"
)


@pytest.mark.parametrize(
    "flags",
    [
        ["-X", "int_max_str_digits=1000", "-X", "no_debug_ranges", "-X", "warn_default_encoding"],
        ["-X", "pycache_prefix=/nonexistent/it's\nhere", "-X", "faulthandler", "-O", "-s"],
        ["-I", "-X", "dev", "-W", "error::ResourceWarning", "-bb", "-X", "custom=a=b"],
    ],
)
def test_a_worker_interpreter_has_every_setting_of_the_supervisors(
    flags: list[str], tmp_path: Path
) -> None:
    """An interpreter started with `python` and a worker's flags (`interpreter_flags`,
    computed in an interpreter under `flags` and -P) has the same sys.flags,
    sys.warnoptions and sys._xoptions as that one. Failed before the fix: of -X only
    what subprocess._args_from_interpreter_flags names passed on (dev, faulthandler,
    tracemalloc, importtime, frozen_modules, showrefcount, utf8): int_max_str_digits (a
    limit an admin sets), pycache_prefix, no_debug_ranges ... were dropped."""
    parent = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
        "import subprocess\n"
        "from dnsoverride.common.interpreter import interpreter_flags\n"
        f"child = subprocess.run([sys.executable, *interpreter_flags(), '-c', {SETTINGS!r}],\n"
        "    capture_output=True, text=True, check=True)\n"
        f"exec({SETTINGS!r})\n"
        "print(child.stdout, end='')\n"
    )
    output = python_output(["-P", *flags], parent, tmp_path)
    supervisor, worker = (json.loads(line) for line in output.splitlines())
    assert worker == supervisor


def test_a_workers_sys_path_is_ours_whatever_its_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sys.path a worker's code sets is ours, entries with quotes, newlines and
    undecodable bytes (surrogate escapes) included; a pathlib.Path on it (which imports
    skip) is left out rather than written as `PosixPath(...)`, a NameError in every
    worker. Failed before the fix: NameError: name 'PosixPath' is not defined."""
    from types import SimpleNamespace

    from dnsoverride.dns.daemon import worker_main
    from dnsoverride.dns.workerpool import _command

    odd = '/srv/it\'s "here"\n\udcff; import os'
    monkeypatch.setattr(sys, "path", ["", Path("/srv/a path"), odd, "/usr/lib/python3"])
    code = _command(worker_main)[-1]
    assignment = code.removeprefix("import sys; ").partition("; import dnsoverride.cli;")[0]
    worker_sys = SimpleNamespace(path=["whatever the worker had"])
    exec(assignment, {"sys": worker_sys})  # the worker's own first statement
    assert worker_sys.path == [odd, "/usr/lib/python3"]
