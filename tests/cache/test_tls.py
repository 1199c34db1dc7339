"""dnsoverride.cache.tls: certificates chosen by SNI, TLS 1.2+, reload without dropping.

A real aiohttp HTTPS server on loopback with the CertificateSet's context, and real TLS
clients that trust only the test CA.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog
from aiohttp import web

from dnsoverride.cache.tls import CertificateSet
from dnsoverride.common.errors import UserError
from tests.support.transparent_certs import CertAuthority, make_ca


@pytest.fixture
def ca(tmp_path: Path) -> CertAuthority:
    return make_ca(tmp_path)


@pytest.fixture
def pairs(tmp_path: Path, ca: CertAuthority) -> list[tuple[Path, Path]]:
    return [
        ca.issue(tmp_path, "hub", "registry-1.docker.io", "docker.io"),
        ca.issue(tmp_path, "quay", "quay.io"),
        ca.issue(tmp_path, "wild", "*.apps.test"),
    ]


@pytest.fixture
async def https(pairs: list[tuple[Path, Path]]) -> AsyncIterator[tuple[CertificateSet, int]]:
    certificates = CertificateSet(pairs)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=certificates.server_context()).start()
    try:
        yield certificates, int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def client_context(ca: CertAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca.cert_file)


async def served_names(port: int, ca: CertAuthority, name: str) -> list[str]:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(ca), server_hostname=name
    )
    cert = writer.get_extra_info("peercert")
    writer.close()
    return [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def test_sni_picks_the_matching_certificate(
    https: tuple[CertificateSet, int], ca: CertAuthority
) -> None:
    certificates, port = https
    assert certificates.names() == {"registry-1.docker.io", "docker.io", "quay.io", "*.apps.test"}
    assert await served_names(port, ca, "quay.io") == ["quay.io"]
    assert await served_names(port, ca, "REGISTRY-1.docker.io") == [
        "registry-1.docker.io",
        "docker.io",
    ]
    assert await served_names(port, ca, "ci.apps.test") == ["*.apps.test"]


async def test_unknown_name_gets_the_default_and_fails_verification(
    https: tuple[CertificateSet, int], ca: CertAuthority
) -> None:
    _, port = https
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await served_names(port, ca, "ghcr.io")
    context = client_context(ca)
    context.check_hostname = False  # no SNI at all: the first pair answers
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    assert writer.get_extra_info("peercert")["subject"] == (
        (("commonName", "registry-1.docker.io"),),
    )
    writer.close()


def tls_1_1_client(ca: CertAuthority) -> ssl.SSLContext:
    old = client_context(ca)
    old.minimum_version = ssl.TLSVersion.TLSv1  # deprecated, which is the point
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    return old


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls_below_1_2_is_refused(
    https: tuple[CertificateSet, int], ca: CertAuthority, pairs: list[tuple[Path, Path]]
) -> None:
    _, port = https
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls_1_1_client(ca), server_hostname="quay.io"
        )
    # Control: this client does speak TLS 1.1 to a server that allows it.
    lax = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    lax.minimum_version = ssl.TLSVersion.TLSv1
    lax.set_ciphers("ALL:@SECLEVEL=0")
    lax.load_cert_chain(*pairs[1])
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=lax)
    try:
        lax_port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", lax_port, ssl=tls_1_1_client(ca), server_hostname="quay.io"
        )
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.1"
        writer.close()
    finally:
        server.close()


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> bytes:
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head.split(b"\r\n")[0] + b" " + await reader.readexactly(length)


async def test_reload_serves_new_certificates_without_dropping_connections(
    tmp_path: Path, https: tuple[CertificateSet, int], ca: CertAuthority
) -> None:
    certificates, port = https
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(ca), server_hostname="quay.io"
    )
    before = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert await http_get(reader, writer, "quay.io") == b"HTTP/1.1 200 OK ok"

    ca.issue(tmp_path, "quay", "quay.io", "quay.example")  # re-issued in place
    with structlog.testing.capture_logs() as logs:
        assert certificates.reload()
    assert logs[-1]["event"] == "tls_reloaded"

    # The open connection keeps working on its old session...
    assert await http_get(reader, writer, "quay.io") == b"HTTP/1.1 200 OK ok"
    writer.close()
    # ...and a new handshake gets the new certificate.
    assert await served_names(port, ca, "quay.io") == ["quay.io", "quay.example"]
    _, fresh = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(ca), server_hostname="quay.io"
    )
    assert fresh.get_extra_info("ssl_object").getpeercert(binary_form=True) != before
    fresh.close()


async def test_broken_reload_keeps_the_current_certificates(
    tmp_path: Path, https: tuple[CertificateSet, int], ca: CertAuthority
) -> None:
    certificates, port = https
    (tmp_path / "quay.key").write_text("not a key\n")
    with structlog.testing.capture_logs() as logs:
        assert not certificates.reload()
    assert logs[-1]["event"] == "tls_reload_failed"
    assert "quay.crt" in logs[-1]["reason"]
    assert await served_names(port, ca, "quay.io") == ["quay.io"]


def test_bad_pairs_are_user_errors(tmp_path: Path, pairs: list[tuple[Path, Path]]) -> None:
    with pytest.raises(UserError, match="at least one"):
        CertificateSet([])
    with pytest.raises(UserError, match="cannot load TLS certificate"):
        CertificateSet([(pairs[0][0], pairs[1][1])])  # key of another certificate
    with pytest.raises(UserError, match="cannot load TLS certificate"):
        CertificateSet([(tmp_path / "missing.crt", pairs[0][1])])
