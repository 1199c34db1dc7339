"""`dnsoverride registry` in transparent mode, as a real process against real peers.

HTTPS beside plain HTTP with certificates chosen by SNI and reloaded on SIGHUP, the
upstream resolved through the configured `resolvers:` (a dnsmasq that alone knows the
upstream's name), and the start-up refusal of a forwarding loop.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from dnsoverride.common.resolve import UpstreamResolver
from tests.support.peers import dnsmasq
from tests.support.ports import free_port
from tests.support.registry_fixtures import Publish, StartCache
from tests.support.registry_peers import DistributionRegistry, pull, verify_dir, wait_for_port
from tests.support.transparent_certs import CertAuthority, make_ca

HUB = "registry-1.docker.io"

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def names(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    options = ["--host-record=origin.test,127.0.0.1", "--host-record=loop.test,127.0.0.1"]
    with dnsmasq(tmp_path_factory.mktemp("dnsmasq"), *options) as server:
        yield (server.host, server.port)


def run_registry(config: dict[str, object], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "dnsoverride", "registry", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def served_names(port: int, ca: CertAuthority, name: str) -> list[str]:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl.create_default_context(cafile=ca.cert_file), server_hostname=name
    )
    cert = writer.get_extra_info("peercert")
    writer.close()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def test_https_by_sni_beside_http_with_own_resolvers(
    tmp_path: Path,
    names: tuple[str, int],
    upstream: DistributionRegistry,
    publish: Publish,
    start_cache: StartCache,
) -> None:
    image = await publish("library/transparent:1.0", tag="1.0", platforms=("linux/amd64",))
    ca = make_ca(tmp_path)
    hub_pair = ca.issue(tmp_path, "hub", HUB)
    quay_pair = ca.issue(tmp_path, "quay", "quay.io")
    tls_port = free_port()
    config = {
        # origin.test exists only in the dnsmasq: the system resolver cannot find it.
        "upstreams": [{"name": HUB, "url": f"http://origin.test:{upstream.port}"}],
        "resolvers": [f"{names[0]}:{names[1]}"],
        "tls": {
            "listen": f"127.0.0.1:{tls_port}",
            "certificates": [
                {"cert": str(hub_pair[0]), "key": str(hub_pair[1])},
                {"cert": str(quay_pair[0]), "key": str(quay_pair[1])},
            ],
        },
    }
    cache = start_cache(config=config)
    assert cache.proc is not None
    wait_for_port("127.0.0.1", tls_port, proc=cache.proc)

    # Plain HTTP (mirror mode) still works, and fetches through the configured resolvers.
    code, output = await pull(f"{cache.address}/library/transparent:1.0", tmp_path / "out")
    assert code == 0, output + cache.logs()
    assert verify_dir(tmp_path / "out") == set(image.blobs)

    # HTTPS as a transparent-mode client sees it: the real name, the internal CA.
    client_tls = ssl.create_default_context(cafile=ca.cert_file)
    connector = aiohttp.TCPConnector(
        ssl=client_tls, resolver=UpstreamResolver(hosts={HUB: ["127.0.0.1"]})
    )
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"https://{HUB}:{tls_port}/v2/library/transparent/manifests/1.0"
        async with session.get(url, headers={"Accept": image_accept()}) as response:
            assert response.status == 200
            assert response.headers["Docker-Content-Digest"] == image.top_digest
        assert await served_names(tls_port, ca, "quay.io") == ["quay.io"]

        # Re-issue the Docker Hub certificate in place and SIGHUP: new handshakes get it
        # (that open connections survive a reload is tested in tests/cache/test_tls.py).
        ca.issue(tmp_path, "hub", HUB, "docker.io")
        cache.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:  # poll: the reload has no event the test can wait on
                if await served_names(tls_port, ca, HUB) == [HUB, "docker.io"]:
                    break
                await asyncio.sleep(0.05)
        async with session.get(url, headers={"Accept": image_accept()}) as response:
            assert response.status == 200
    assert cache.proc.poll() is None
    assert '"tls_reloaded"' in cache.logs()


def image_accept() -> str:
    return "application/vnd.oci.image.manifest.v1+json"


def test_upstream_that_resolves_to_ourselves_is_refused(
    tmp_path: Path, names: tuple[str, int]
) -> None:
    port = free_port()
    result = run_registry(
        {
            "listen": f"127.0.0.1:{port}",
            "storage": str(tmp_path / "store"),
            "upstreams": [{"name": HUB, "url": f"http://loop.test:{port}"}],
            "resolvers": [f"{names[0]}:{names[1]}"],
        },
        tmp_path / "registry.yaml",
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"dnsoverride: error: upstream loop.test:{port} resolves to 127.0.0.1, "
        "which is this registry's own listening address"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"resolvers": ["dns.example"]},
            "resolvers: 'dns.example' names a host: a DNS resolver is given by IP address",
        ),
        ({"resolvers": ["10.0.0.53:99999"]}, "resolvers: bad port in '10.0.0.53:99999'"),
        ({"tls": {"listen": "127.0.0.1:8443"}}, "tls: listen: needs a certificate"),
        ({"tls": {"certificates": [{"cert": "a.crt"}]}}, "certificates[0]: needs cert and key"),
        ({"tls": {"cert": "a.crt", "key": "a.key", "chain": "x"}}, "tls: unknown key 'chain'"),
        ({"tls": {"cert": "missing.crt", "key": "missing.key"}}, "cannot load TLS certificate"),
    ],
)
def test_bad_transparent_config_is_a_clear_error(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "storage": str(tmp_path / "s"),
        "upstreams": [{"url": "http://127.0.0.1:9"}],  # never resolved, never contacted
        **config,
    }
    result = run_registry(config, tmp_path / "registry.yaml")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_without_tls_does_not_stop_the_cache(start_cache: StartCache) -> None:
    cache = start_cache("http://127.0.0.1:9")
    assert cache.proc is not None
    cache.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while '"reload_ignored"' not in cache.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"reload_ignored"' in cache.logs()
    assert cache.proc.poll() is None
