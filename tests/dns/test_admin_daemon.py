"""The DNS daemon's admin listener: /healthz and /readyz follow the real upstream."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import dns.exception
import pytest

from tests.support.peers import dnsmasq, dnsoverride_serve, http_status
from tests.support.ports import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq"),
]

FORWARDED = "forwarded.test"


def _wait_for_status(
    url: str, expected: int, poke: Callable[[], None], timeout: float = 15.0
) -> None:
    """Poll `url` until it answers `expected`, calling `poke()` before each look."""
    deadline = time.monotonic() + timeout
    while True:
        poke()
        status = http_status(url)
        if status == expected:
            return
        assert time.monotonic() < deadline, f"{url} stayed {status}, expected {expected}"
        time.sleep(0.1)


@pytest.mark.timeout(90)
def test_readyz_flips_when_the_upstream_stops(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text("records:\n  registry-1.docker.io:\n    A: 10.0.0.5\n")
    admin_port = free_port()
    admin = f"http://127.0.0.1:{admin_port}"
    with (
        dnsmasq(tmp_path, f"--address=/{FORWARDED}/192.0.2.1") as upstream,
        dnsoverride_serve(
            tmp_path,
            zones,
            [upstream.address],
            "--metrics",
            f"127.0.0.1:{admin_port}",
            # Nothing cached or served stale: every poke below really asks the upstream.
            config="cache:\n  max_ttl: 0\n  stale_ttl: 0\n",
        ) as server,
    ):

        def ask() -> None:
            # Only the upstream's fate matters here, not the answer (SERVFAIL once it is gone).
            with contextlib.suppress(dns.exception.DNSException, OSError):
                server.query(FORWARDED, timeout=3.0)

        assert http_status(f"{admin}/healthz") == 200
        _wait_for_status(f"{admin}/readyz", 200, ask)

        assert upstream.stop() == 0
        _wait_for_status(f"{admin}/readyz", 503, ask)
        # Liveness is not readiness: the process is fine, it is the upstream that is gone.
        assert http_status(f"{admin}/healthz") == 200
        # Overrides still answer while not ready.
        (rrset,) = server.query("registry-1.docker.io").answer
        assert str(rrset[0]) == "10.0.0.5"
