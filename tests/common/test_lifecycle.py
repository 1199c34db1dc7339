"""The one service lifecycle (common/lifecycle.py), driven with real signals and a real
notify socket around a service that records what it is asked to do.

Before it, each daemon had its own sequence: the registry had no try/finally (a failed
bind left its store open), and serve installed its signal handlers only after binding.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.registry import CollectorRegistry

from dnsoverride.common.errors import UserError
from dnsoverride.common.grammar import Endpoint
from dnsoverride.common.lifecycle import Admin, Started, run_service
from tests.support.ports import free_port


class Recorder:
    """A service that records its calls; `gate` holds `start` until set."""

    def __init__(self, admin: Admin | None = None, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.admin = admin
        self.fail = fail
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.admin_during_stop: int | None = None

    async def start(self, inherited: list[socket.socket]) -> Started:
        self.calls.append("start")
        self.entered.set()
        await self.gate.wait()
        if self.fail:
            raise UserError("cannot listen on 127.0.0.1:1: Address already in use")
        return Started("serving 3 things", self.admin)

    async def reload(self) -> str:
        self.calls.append("reload")
        return f"reloaded {self.calls.count('reload')}"

    async def stop(self) -> None:
        self.calls.append("stop")
        if self.admin is not None and self.admin.endpoint is not None:
            url = f"http://127.0.0.1:{self.admin.endpoint.port}/healthz"
            async with aiohttp.ClientSession() as http, http.get(url) as response:
                self.admin_during_stop = response.status


class Notifications:
    """systemd's notify socket, read on the event loop."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def next_with(self, key: str) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 5)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            if key in fields:
                return fields


@pytest.fixture
async def notifications(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Notifications]:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    for name in ("LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC"):
        monkeypatch.delenv(name, raising=False)
    notify = Notifications(tmp_path / "notify")
    yield notify
    notify.sock.close()


@pytest.mark.e2e
async def test_hup_reloads_between_reloading_and_ready_and_term_stops(
    notifications: Notifications,
) -> None:
    service = Recorder()
    running = asyncio.create_task(run_service(service))
    assert (await notifications.next_with("READY"))["STATUS"] == "serving 3 things"
    for number in (1, 2):
        os.kill(os.getpid(), signal.SIGHUP)
        reloading = await notifications.next_with("RELOADING")
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert (await notifications.next_with("READY"))["STATUS"] == f"reloaded {number}"
    os.kill(os.getpid(), signal.SIGTERM)
    assert (await notifications.next_with("STOPPING"))["STOPPING"] == "1"
    assert await asyncio.wait_for(running, 5) == 0
    assert service.calls == ["start", "reload", "reload", "stop"]


async def test_a_failed_start_still_stops_and_never_says_ready(
    notifications: Notifications,
) -> None:
    service = Recorder(fail=True)
    with pytest.raises(UserError, match="cannot listen"):
        await run_service(service)
    assert service.calls == ["start", "stop"]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(notifications.next_with("READY"), 0.3)


@pytest.mark.e2e
async def test_hup_during_start_waits_for_it(notifications: Notifications) -> None:
    """The handlers are in before anything binds, so an early SIGHUP does not kill the
    process; its reload runs once the service has started."""
    service = Recorder()
    service.gate.clear()
    running = asyncio.create_task(run_service(service))
    await service.entered.wait()
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.sleep(0.1)  # time for a reload that does not wait to happen (it must not)
    assert service.calls == ["start"]
    service.gate.set()
    assert (await notifications.next_with("READY"))["STATUS"] == "serving 3 things"
    assert (await notifications.next_with("READY"))["STATUS"] == "reloaded 1"
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(running, 5) == 0


@pytest.mark.e2e
async def test_the_admin_listener_outlives_the_drain(notifications: Notifications) -> None:
    port = free_port()
    admin = Admin(Endpoint("127.0.0.1", port), CollectorRegistry(), lambda: True)
    service = Recorder(admin)
    running = asyncio.create_task(run_service(service))
    await notifications.next_with("READY")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            assert response.status == 200
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(running, 5) == 0
        assert service.admin_during_stop == 200  # metrics stay up while the service drains
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/healthz")
