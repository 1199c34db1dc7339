"""Transparent mode end to end: a real client, real DNS, real TLS, in a network namespace.

Inside a fresh namespace (its /etc/resolv.conf says `nameserver 127.0.0.1`):

    127.0.0.1:53   dnsoverride serve: registry-1.docker.io -> 127.0.0.2, health-gated
    127.0.0.2:443  dnsoverride registry, certificate from `dnsoverride ca`, upstream
                   registry-1.docker.io = http://upstream.test:5000, resolved through
                   its own `resolvers:` (the dnsmasq below), not the system resolver
    127.0.0.3:5000 distribution registry: the cache's upstream, holding the test image
    127.0.0.4:443  distribution registry over TLS (same CA): "the public registry"
    127.0.0.5:53   dnsmasq: the upstream DNS, registry-1.docker.io -> 127.0.0.4

skopeo pulls docker://registry-1.docker.io/... trusting only the test CA and must get the
image from the cache; then the cache stops, the health check withdraws the override
within its window, the name resolves to 127.0.0.4 through the forwarder, and the same pull
still succeeds; when the cache returns, so does the override.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.support.registry_peers import Image, build_image, verify_dir
from tests.support.transparent_netns import Netns, netns_unsupported

NAME = "registry-1.docker.io"
REPOSITORY = "library/transparent-test"
TAG = "1.0"
DNS, CACHE, ORIGIN, PUBLIC, UPSTREAM_DNS = (
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.5",
)
INTERVAL, TIMEOUT, FALL, RISE = 0.5, 0.5, 2, 1
# Withdrawal needs FALL failed rounds; each round is at most TIMEOUT + INTERVAL apart.
WITHDRAW_WINDOW = FALL * (INTERVAL + TIMEOUT) + 1.0
DNSOVERRIDE = [sys.executable, "-m", "dnsoverride"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
def netns() -> Iterator[Netns]:
    reason = netns_unsupported()
    if reason:
        pytest.skip(reason)
    namespace = Netns.create(nameserver=DNS)
    try:
        yield namespace
    finally:
        namespace.destroy()
        assert not namespace.exists()
        assert not namespace.etc.exists()


def dnsoverride(*args: str) -> None:
    result = subprocess.run(
        [*DNSOVERRIDE, *args], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """`dnsoverride ca init` + `issue`: (ca.crt, server cert, server key)."""
    dnsoverride("ca", "init", "--dir", str(directory / "ca"))
    dnsoverride(
        "ca", "issue", "--dir", str(directory / "ca"), NAME, "--out", str(directory / "tls")
    )
    return directory / "ca" / "ca.crt", directory / "tls.crt", directory / "tls.key"


def distribution(
    netns: Netns, root: Path, address: str, port: int, tls: tuple[Path, Path] | None = None
) -> subprocess.Popen[bytes]:
    http: dict[str, object] = {"addr": f"{address}:{port}", "secret": "e2e"}
    if tls is not None:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": http,
    }
    root.mkdir(parents=True)
    (root / "config.yml").write_text(json.dumps(config))
    process = netns.popen(["docker-registry", "serve", str(root / "config.yml")], root / "log")
    netns.wait_for_tcp(address, port, process)
    return process


def push(netns: Netns, image: Image, address: str) -> None:
    result = netns.run(
        [
            "skopeo", "copy", "-q", "--preserve-digests", "--dest-tls-verify=false",
            f"oci:{image.layout}:{image.tag}", f"docker://{address}/{REPOSITORY}:{TAG}",
        ]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def pull(netns: Netns, trust: Path | None, out: Path) -> subprocess.CompletedProcess[str]:
    """skopeo pull of the image by its public name; trusts only the CA in `trust`, if any."""
    empty = out.parent / "no-system-roots"
    empty.mkdir(exist_ok=True)
    # Go's system pool comes from SSL_CERT_FILE/SSL_CERT_DIR: point both at nothing, so the
    # only trusted root is the test CA handed over with --src-cert-dir.
    env = dict(os.environ, SSL_CERT_FILE=str(empty / "none.pem"), SSL_CERT_DIR=str(empty))
    argv = ["skopeo", "copy", "-q"]
    if trust is not None:
        argv += ["--src-cert-dir", str(trust)]
    return netns.run([*argv, f"docker://{NAME}/{REPOSITORY}:{TAG}", f"dir:{out}"], env=env)


def resolve(netns: Netns) -> list[str]:
    def query() -> list[str]:
        reply = dns.query.udp(dns.message.make_query(NAME, "A"), DNS, timeout=1.0)
        return sorted(
            item.address
            for rrset in reply.answer
            if rrset.rdtype == dns.rdatatype.A
            for item in rrset
        )

    return netns.call(query)


def wait_for_answer(netns: Netns, expected: list[str], within: float) -> float:
    """Poll the DNS server until it answers `expected`; returns the seconds it took."""
    start = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - start < within:
        try:
            seen = resolve(netns)
        except dns.exception.Timeout:
            seen = ["(timeout)"]
        if seen == expected:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{NAME} still resolves to {seen}, not {expected}, after {within}s")


def stored_blobs(storage: Path) -> set[str]:
    return {f"sha256:{path.name}" for path in (storage / "blobs" / "sha256").glob("*/*")}


def test_pull_through_the_cache_then_fall_back_when_it_dies(netns: Netns, tmp_path: Path) -> None:
    ca_cert, server_cert, server_key = make_ca(tmp_path)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "ca.crt").write_bytes(ca_cert.read_bytes())
    image = build_image(tmp_path / "image", tag=TAG, platforms=("linux/amd64",))

    # The world outside the cache: upstream DNS, the cache's upstream, the "public" registry.
    netns.popen(
        [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", f"--listen-address={UPSTREAM_DNS}", "--bind-interfaces", "--port=53",
            f"--local=/{NAME}/", f"--host-record={NAME},{PUBLIC}",
            "--local=/test/", f"--host-record=upstream.test,{ORIGIN}",
        ],
        tmp_path / "dnsmasq.log",
    )  # fmt: skip
    distribution(netns, tmp_path / "origin", ORIGIN, 5000)
    distribution(netns, tmp_path / "public", PUBLIC, 443, tls=(server_cert, server_key))
    push(netns, image, f"{ORIGIN}:5000")
    push(netns, image, f"{PUBLIC}:443")

    # The cache, resolving its upstream through its own resolvers.
    storage = tmp_path / "store"
    cache_config = tmp_path / "registry.yaml"
    cache_config.write_text(
        json.dumps(
            {
                "listen": f"{CACHE}:443",
                "storage": str(storage),
                "tls": {"cert": str(server_cert), "key": str(server_key)},
                "upstreams": [{"name": NAME, "url": "http://upstream.test:5000"}],
                "resolvers": [UPSTREAM_DNS],
            }
        )
    )
    cache_argv = [*DNSOVERRIDE, "registry", "--config", str(cache_config), "--log-format", "json"]
    cache = netns.popen(cache_argv, tmp_path / "cache.log")
    netns.wait_for_tcp(CACHE, 443, cache)

    # The override, health-gated on the cache answering /v2/ with the certificate for NAME.
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(
        json.dumps(
            {
                "records": {
                    NAME: {
                        "A": CACHE,
                        "ttl": 1,
                        "health": {
                            "https": f"https://{NAME}/v2/",
                            "expect": [200, 401],
                            "ca": str(ca_cert),
                            "interval": INTERVAL,
                            "timeout": TIMEOUT,
                            "fall": FALL,
                            "rise": RISE,
                        },
                    }
                }
            }
        )
    )
    serve = netns.popen(
        [
            *DNSOVERRIDE, "serve", "--zones", str(zones), "--listen", f"{DNS}:53",
            "--upstream", f"{UPSTREAM_DNS}:53", "--log-format", "json",
        ],
        tmp_path / "serve.log",
    )  # fmt: skip
    netns.wait_for_tcp(DNS, 53, serve)
    wait_for_answer(netns, [CACHE], within=10)

    # A cache that would resolve its upstream through the override refuses to start.
    looping = netns.run(
        [
            *DNSOVERRIDE, "registry", "--listen", f"{CACHE}:443", "--storage",
            str(tmp_path / "loop-store"), "--upstream", f"https://{NAME}",
            "--tls-cert", str(server_cert), "--tls-key", str(server_key),
        ],
        timeout=30,
    )  # fmt: skip
    assert looping.returncode == 2
    assert f"upstream {NAME}:443 resolves to {CACHE}" in looping.stderr
    assert "Traceback" not in looping.stderr

    # Without the CA the interception is refused; with it the pull comes from the cache.
    untrusted = pull(netns, None, tmp_path / "untrusted")
    assert untrusted.returncode != 0
    assert "certificate signed by unknown authority" in untrusted.stderr
    first = pull(netns, trust, tmp_path / "through-cache")
    assert first.returncode == 0, first.stderr
    pulled = verify_dir(tmp_path / "through-cache")
    assert pulled == set(image.blobs)
    assert set(image.blobs) <= stored_blobs(storage)

    # The cache dies: within the health-check window the name is forwarded upstream.
    assert Netns.stop(cache) == 0
    took = wait_for_answer(netns, [PUBLIC], within=WITHDRAW_WINDOW + 5)
    assert took <= WITHDRAW_WINDOW, f"withdrawn after {took:.1f}s, window {WITHDRAW_WINDOW}s"
    second = pull(netns, trust, tmp_path / "from-public")
    assert second.returncode == 0, second.stderr
    assert verify_dir(tmp_path / "from-public") == set(image.blobs)

    # The cache comes back: so does the override.
    cache = netns.popen(cache_argv, tmp_path / "cache.log")
    netns.wait_for_tcp(CACHE, 443, cache)
    wait_for_answer(netns, [CACHE], within=RISE * (INTERVAL + TIMEOUT) + 5)

    events = [
        json.loads(line)["event"]
        for line in (tmp_path / "serve.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert events.count("override_withdrawn") == 1
    assert events.count("override_restored") == 1
