"""The idle cache imports what its configuration uses: no `cryptography` without TLS.

Seen from outside the real daemon (`python -m dnsoverride cache`): cryptography is a Rust
extension, and a loaded extension is a mapping of its shared object in /proc/PID/maps.
The same check on a cache with TLS configured finds it, so the check can fail.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.registry_peers import CacheProcess
from tests.support.transparent_certs import make_ca

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

UNUSED_UPSTREAM = "http://127.0.0.1:9"  # never asked: nothing is pulled


def _mapped(pid: int, package: str) -> list[str]:
    """The files of `package` (a directory in site-packages) mapped into process `pid`."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if f"/{package}/" in line})


async def test_a_cache_without_tls_does_not_load_cryptography(tmp_path: Path) -> None:
    """Before: the cache imported cryptography (for the names in TLS certificates) at
    start-up whatever its configuration, about 7 MB of its idle RSS (53.2 -> 46.5 MB)."""
    cache = CacheProcess(tmp_path / "store", UNUSED_UPSTREAM, command="cache").start()
    try:
        assert cache.proc is not None
        async with aiohttp.ClientSession() as session, session.get(f"{cache.url}/v2/") as r:
            assert r.status == 200
        assert _mapped(cache.proc.pid, "cryptography") == []
        assert _mapped(cache.proc.pid, "bcrypt") == []  # no htpasswd file either
    finally:
        cache.stop()


async def test_a_cache_with_tls_loads_cryptography(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    cert, key = ca.issue(tmp_path, "cache", "127.0.0.1")
    cache = CacheProcess(
        tmp_path / "store",
        UNUSED_UPSTREAM,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        command="cache",
    ).start()
    try:
        assert cache.proc is not None
        assert _mapped(cache.proc.pid, "cryptography") != []
    finally:
        cache.stop()
