"""The idle cache imports what its configuration uses: no `cryptography` without TLS, no
Prometheus exposition before a scrape, no XML parser or decompressor before a
repository's metadata is read, no dnslib without `resolvers:`.

Seen from outside the real daemon (`python -m dnsoverride cache`): cryptography is a Rust
extension, xml.etree's parser (pyexpat) and zstandard are C extensions, and a loaded
extension is a mapping of its shared object in /proc/PID/maps; pure-Python modules are
read from the daemon's `sys.modules` by tests/support/modules_probe.py. The same checks
on a cache with TLS configured, or after a scrape, find what they look for, so they can
fail.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.modules_probe import imported_modules
from tests.support.ports import free_port
from tests.support.registry_peers import CacheProcess
from tests.support.transparent_certs import make_ca

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

UNUSED_UPSTREAM = "http://127.0.0.1:9"  # never asked: nothing is pulled
PROBE = Path(__file__).parents[1] / "support" / "modules_probe.py"


def _maps(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/maps").read_text().splitlines()


def _mapped(pid: int, package: str) -> list[str]:
    """The files of `package` (a directory in site-packages) mapped into process `pid`."""
    return sorted({line.split()[-1] for line in _maps(pid) if f"/{package}/" in line})


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


async def test_an_idle_cache_imports_neither_exposition_nor_parsers(tmp_path: Path) -> None:
    """Before (main at 7ff8dae): prometheus-client (its collectors were the counters),
    the admin client's http.client, xml.etree, zstandard and dnslib were imported at
    start-up: 47.3 MB idle, 42.9 without them. After a scrape prometheus-client is there."""
    probe = f"dnsoverride-modules-{secrets.token_hex(8)}"
    metrics = free_port()
    cache = CacheProcess(
        tmp_path / "store",
        UNUSED_UPSTREAM,
        "--metrics",
        f"127.0.0.1:{metrics}",
        command="cache",
        wrapper=[sys.executable, str(PROBE), probe],
    ).start()
    try:
        assert cache.proc is not None
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{cache.url}/v2/") as reply:
                assert reply.status == 200
            modules = imported_modules(probe)
            assert "prometheus_client" not in modules
            assert "dnslib" not in modules  # no `resolvers:`
            assert "xml.etree.ElementTree" not in modules
            assert _mapped(cache.proc.pid, "zstandard") == []
            assert not [line for line in _maps(cache.proc.pid) if "/pyexpat." in line]
            async with session.get(f"http://127.0.0.1:{metrics}/metrics") as reply:
                assert reply.status == 200
                assert "dnsoverride_registry_requests_total" in await reply.text()
        assert "prometheus_client" in imported_modules(probe)
    finally:
        cache.stop()
