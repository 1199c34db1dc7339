"""A throw-away network namespace for the transparent-mode end-to-end test.

`Netns.create()` makes `dnso-<random>` with loopback up (the whole 127.0.0.0/8 is local
there, so 127.0.0.2..5 need no set-up) and `/etc/netns/<name>/resolv.conf`, which
`ip netns exec` bind-mounts over /etc/resolv.conf for the processes it starts. Processes
started with `popen` are tracked; `destroy()` stops them, deletes the namespace and its
/etc/netns directory, and is safe to call after any failure.

`call(fn)` runs a Python function in a thread that has joined the namespace (setns is
per thread), for the test's own probes: waiting for ports, DNS queries with dnspython.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def netns_unsupported() -> str | None:
    """Why this machine cannot run the namespace test, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"dnso-probe-{secrets.token_hex(3)}"
    result = subprocess.run(
        ["ip", "netns", "add", probe], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        return f"ip netns add is not supported here: {result.stderr.strip()}"
    try:
        # `exec` also needs a private mount namespace (for /etc/netns and /sys).
        result = subprocess.run(
            ["ip", "netns", "exec", probe, "true"], check=False, capture_output=True, text=True
        )
    finally:
        subprocess.run(["ip", "netns", "delete", probe], check=False, capture_output=True)
    if result.returncode != 0:
        return f"ip netns exec is not supported here: {result.stderr.strip()}"
    return None


def join_netns(name: str) -> None:
    """Move the calling thread into network namespace `name` (setns is per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
    finally:
        os.close(fd)


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name
        self.etc = Path("/etc/netns") / name
        self.processes: list[subprocess.Popen[bytes]] = []

    @classmethod
    def create(cls, nameserver: str = "127.0.0.1") -> Netns:
        netns = cls(f"dnso-{secrets.token_hex(4)}")
        subprocess.run(["ip", "netns", "add", netns.name], check=True)
        try:
            subprocess.run(["ip", "-n", netns.name, "link", "set", "lo", "up"], check=True)
            netns.etc.mkdir(parents=True)
            (netns.etc / "resolv.conf").write_text(f"nameserver {nameserver}\n")
        except BaseException:
            netns.destroy()
            raise
        return netns

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process in the namespace (ip netns exec replaces itself with it)."""
        with log.open("ab") as output:
            process = subprocess.Popen(
                self.argv(argv), stdout=output, stderr=subprocess.STDOUT, **kwargs
            )
        self.processes.append(process)
        return process

    def run(
        self, argv: Sequence[str], timeout: float = 120, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(argv), check=False, capture_output=True, text=True, timeout=timeout, **kwargs
        )

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in a thread inside the namespace and return its result."""
        outcome: dict[str, Any] = {}

        def inside() -> None:
            try:
                join_netns(self.name)
                outcome["value"] = fn(*args)
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=inside, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def wait_for_tcp(
        self, host: str, port: int, process: subprocess.Popen[bytes], timeout: float = 20
    ) -> None:
        """Poll with a deadline until `host:port` accepts inside the namespace."""

        def poll() -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection((host, port), timeout=0.2),
                ):
                    return
                time.sleep(0.05)
            raise TimeoutError(f"{host}:{port} did not start listening in {self.name}")

        self.call(poll)

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> int:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        return process.wait()

    def destroy(self) -> None:
        for process in self.processes:
            self.stop(process)
        subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)

    def exists(self) -> bool:
        listed = subprocess.run(
            ["ip", "netns", "list"], check=False, capture_output=True, text=True
        ).stdout
        return any(line.split()[0] == self.name for line in listed.splitlines() if line.strip())
