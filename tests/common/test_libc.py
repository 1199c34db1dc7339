"""The C library reached without a subprocess (common/libc.py), and what its users do
where it lacks a function.

`ctypes.util.find_library("c")` ran ldconfig (a subprocess) and imported ctypes.util at
the import of common/heaptrim.py and dns/udpbatch.py, in every process of `serve`; the
library is in the process already, and `dlopen(NULL)` reaches it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dnsoverride.common import libc
from tests.support.peers import dnsmasq, dnsoverride_serve

ROOT = Path(__file__).parents[2]
EXAMPLE_ZONES = ROOT / "zones"
SPAWNS = ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.system")
# Runs the command line after it (`python -m dnsoverride ...`) in its own process, as
# `python -m` would, with an audit hook that writes every process start to the file
# named by its first argument.
AUDITED = f"""
import os, runpy, sys
log = open(sys.argv[1], "a")
def spawned(event, args):
    if event in {SPAWNS!r}:
        print(event, args[1] if event == "subprocess.Popen" else "", file=log, flush=True)
sys.addaudithook(spawned)
sys.argv = sys.argv[sys.argv.index("dnsoverride") :]
sys.path[0] = os.getcwd()
runpy.run_module("dnsoverride", run_name="__main__", alter_sys=True)
"""
e2e = pytest.mark.e2e  # a fresh interpreter each


def _python(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter (this checkout first on its path); it prints JSON."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("DNSOVERRIDE_UDP_BATCH", None)
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@e2e
def test_importing_the_libc_users_starts_no_subprocess() -> None:
    """An audit hook sees every process the imports start: none, and ctypes.util is not
    imported; malloc_trim and the batch calls are found all the same (glibc). Failed
    before the fix: `subprocess.Popen` (/sbin/ldconfig -p) at the import of heaptrim, and
    ctypes.util imported."""
    result = _python(
        "import json, sys\n"
        "started = []\n"
        f"spawns = {SPAWNS!r}\n"
        "sys.addaudithook(lambda event, args: event in spawns and started.append(event))\n"
        "from dnsoverride.common import heaptrim\n"
        "from dnsoverride.dns import udpbatch\n"
        "print(json.dumps({'started': started, 'ctypes.util': 'ctypes.util' in sys.modules,\n"
        "    'trim': heaptrim._TRIM is not None, 'batched': udpbatch.available()}))\n"
    )
    assert result == {"started": [], "ctypes.util": False, "trim": True, "batched": True}


def test_a_function_the_c_library_lacks_is_none() -> None:
    assert libc.function("malloc_trim") is not None  # glibc, as on every CI machine here
    assert libc.function("dnsoverride_no_such_function") is None


@e2e
def test_without_the_functions_nothing_is_trimmed_and_udp_is_not_batched() -> None:
    """A C library without malloc_trim, recvmmsg and sendmmsg (musl has no malloc_trim):
    `trim_heap` and the trimmer after a burst do nothing, and UDP listeners are not
    batched (they run on uvloop's transport: test_udp_batch.py's
    test_without_batching_the_uvloop_transport_serves)."""
    result = _python(
        "import asyncio, json\n"
        "from dnsoverride.common import libc\n"
        "class Lacking:  # a C library with none of them, as ctypes.CDLL says so\n"
        "    def __getitem__(self, name):\n"
        "        raise AttributeError(name)\n"
        "libc._PROCESS = Lacking()\n"
        "from dnsoverride.common import heaptrim\n"
        "from dnsoverride.dns import udpbatch\n"
        "heaptrim.trim_heap()\n"
        "async def burst():\n"
        "    trimmer = heaptrim.HeapTrimmer()\n"
        "    for count in range(1, 101):\n"
        "        trimmer.opened(count)\n"
        "    for count in range(99, -1, -1):\n"
        "        trimmer.closed(count)\n"
        "    return trimmer._scheduled is None and trimmer.trims == 0\n"
        "print(json.dumps({'trim': heaptrim._TRIM is None, 'idle': asyncio.run(burst()),\n"
        "    'batched': udpbatch.available()}))\n"
    )
    assert result == {"trim": True, "idle": True, "batched": False}


@e2e
def test_serve_starts_no_process_to_find_the_c_library(tmp_path: Path) -> None:
    """The real daemon (one process, the example zones) under an audit hook: it starts
    no process at all, from its start to its first answer. Failed before the fix: two
    `/sbin/ldconfig -p` (heaptrim's and udpbatch's `find_library("c")`)."""
    spawned = tmp_path / "spawned"
    spawned.touch()
    with (
        dnsmasq(tmp_path) as upstream,
        dnsoverride_serve(
            tmp_path,
            EXAMPLE_ZONES,
            [upstream.address],
            wrapper=[sys.executable, "-c", AUDITED, str(spawned)],
        ) as server,
    ):
        assert server.query("registry-1.docker.io").answer  # serving the example zones
        assert '"event": "started"' in server.log_text()
    assert spawned.read_text() == ""


def test_each_caller_gets_a_function_of_its_own() -> None:
    """What udpbatch sets on recvmmsg (argtypes, restype) is not set on another caller's
    recvmmsg. Failed before the fix: `getattr` on the CDLL returns one cached object."""
    first, second = libc.function("recvmmsg"), libc.function("recvmmsg")
    assert first is not None and second is not None and first is not second
    first.restype = None
    assert second.restype is not None


@e2e
def test_an_interpreter_that_cannot_dlopen_itself_serves_without_the_functions() -> None:
    """A statically linked interpreter (static musl: `dlopen` fails with "Dynamic
    loading not supported"): the imports go on, nothing is trimmed and UDP is not
    batched. Failed before the fix: `ctypes.CDLL(None)` raised OSError at the import of
    common/libc.py, and so of heaptrim and udpbatch: serve did not start."""
    result = _python(
        "import ctypes, json\n"
        "def static(name, *args, **kwargs):\n"
        "    raise OSError('Dynamic loading not supported')\n"
        "ctypes.CDLL = static\n"
        "from dnsoverride.common import heaptrim, libc\n"
        "from dnsoverride.dns import udpbatch\n"
        "heaptrim.trim_heap()\n"
        "print(json.dumps({'trim': heaptrim._TRIM is None, 'batched': udpbatch.available(),\n"
        "    'function': libc.function('malloc_trim')}))\n"
    )
    assert result == {"trim": True, "batched": False, "function": None}
