"""`dnsoverride ca`: certificates checked with cryptography, a real TLS handshake and openssl."""

from __future__ import annotations

import asyncio
import datetime
import grp
import os
import shutil
import ssl
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from dnsoverride.cli import main

NAMES = ["registry-1.docker.io", "quay.io"]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(directory)]) == 0
    return directory


@pytest.fixture
def leaf(ca_dir: Path) -> tuple[Path, Path]:
    out = ca_dir.parent / "tls" / "registry"
    assert main(["ca", "issue", "--dir", str(ca_dir), *NAMES, "--out", str(out)]) == 0
    return out.with_suffix(".crt"), out.with_suffix(".key")


def test_init_creates_a_root_ca_with_a_private_key(ca_dir: Path) -> None:
    assert _mode(ca_dir) == 0o700
    assert _mode(ca_dir / "ca.key") == 0o600
    ca = _cert(ca_dir / "ca.crt")
    ca.verify_directly_issued_by(ca)  # self-signed
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.public_key())
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    assert key.public_key() == ca.public_key()
    with pytest.raises(x509.ExtensionNotFound):
        ca.extensions.get_extension_for_class(x509.NameConstraints)


def test_issue_signs_a_server_certificate_for_the_names(
    ca_dir: Path, leaf: tuple[Path, Path]
) -> None:
    cert_path, key_path = leaf
    ca, cert = _cert(ca_dir / "ca.crt"), _cert(cert_path)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == NAMES
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_cert_sign or usage.value.crl_sign)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NAMES[0]
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 397
    assert _mode(key_path) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()
    # The full RFC 5280 path validation as a TLS client does it, name check included.
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("quay.io"))
    verifier.verify(cert, [])
    other = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("ghcr.io"))
    with pytest.raises(VerificationError):
        other.verify(cert, [])


async def _handshake(cert: Path, key: Path, ca: Path, server_hostname: str) -> bytes:
    """TLS-connect to a loopback server presenting cert/key, trusting only `ca`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello over tls")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        client_ctx = ssl.create_default_context(cafile=str(ca))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname
        )
        data = await reader.read()
        writer.close()
        return data
    finally:
        server.close()


@pytest.mark.parametrize("name", NAMES)
async def test_tls_handshake_succeeds_for_issued_names(
    ca_dir: Path, leaf: tuple[Path, Path], name: str
) -> None:
    assert await _handshake(*leaf, ca_dir / "ca.crt", name) == b"hello over tls"


async def test_tls_handshake_fails_for_other_names(ca_dir: Path, leaf: tuple[Path, Path]) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await _handshake(*leaf, ca_dir / "ca.crt", "ghcr.io")


async def test_tls_handshake_fails_with_another_ca(tmp_path: Path, leaf: tuple[Path, Path]) -> None:
    assert main(["ca", "init", "--dir", str(tmp_path / "other")]) == 0
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        await _handshake(*leaf, tmp_path / "other" / "ca.crt", NAMES[0])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
@pytest.mark.e2e
def test_openssl_verifies_the_chain(ca_dir: Path, leaf: tuple[Path, Path]) -> None:
    cert_path, _ = leaf
    base = ["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt"), "-purpose", "sslserver"]
    good = subprocess.run([*base, "-verify_hostname", "quay.io", str(cert_path)], check=False)
    assert good.returncode == 0
    bad = subprocess.run(
        [*base, "-verify_hostname", "ghcr.io", str(cert_path)], capture_output=True, check=False
    )
    assert bad.returncode != 0


def test_reissue_replaces_both_files_atomically(ca_dir: Path, leaf: tuple[Path, Path]) -> None:
    cert_path, key_path = leaf
    old_serial, old_key = _cert(cert_path).serial_number, key_path.read_bytes()
    out = str(cert_path.with_suffix(""))
    assert main(["ca", "issue", "--dir", str(ca_dir), *NAMES, "ghcr.io", "--out", out]) == 0
    cert = _cert(cert_path)
    assert cert.serial_number != old_serial
    assert key_path.read_bytes() != old_key
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [*NAMES, "ghcr.io"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key()
    assert _mode(key_path) == 0o600
    # No temporary files left beside them.
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["registry.crt", "registry.key"]


def test_default_output_is_named_after_the_first_name(ca_dir: Path) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), "*.apps.ci.example", "10.0.0.5"]) == 0
    cert = _cert(ca_dir / "wildcard.apps.ci.example.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["*.apps.ci.example"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


def test_init_refuses_to_replace_a_ca_without_force(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (ca_dir / "ca.key").read_bytes() == before
    assert main(["ca", "init", "--dir", str(ca_dir), "--force"]) == 0
    assert (ca_dir / "ca.key").read_bytes() != before


def _constrained_ca(tmp_path: Path) -> Path:
    directory = tmp_path / "constrained"
    command = ["ca", "init", "--dir", str(directory)]
    assert main([*command, "--name-constraint", "docker.io", "--name-constraint", "quay.io"]) == 0
    return directory


def test_name_constraints_are_written_and_enforced_by_issue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _constrained_ca(tmp_path)
    constraints = _cert(directory / "ca.crt").extensions.get_extension_for_class(
        x509.NameConstraints
    )
    assert constraints.critical
    assert [s.value for s in constraints.value.permitted_subtrees or ()] == ["docker.io", "quay.io"]
    command = ["ca", "issue", "--dir", str(directory)]
    assert main([*command, "registry-1.docker.io", "quay.io", "--out", str(tmp_path / "ok")]) == 0
    assert main([*command, "ghcr.io", "--out", str(tmp_path / "bad")]) == 2
    assert "ghcr.io is outside the CA's name constraints" in capsys.readouterr().err
    assert not (tmp_path / "bad.crt").exists()


async def test_tls_clients_enforce_the_name_constraints(tmp_path: Path) -> None:
    """A certificate the CA key signs for a name outside the constraints (as a thief of
    the key would) is rejected by the client: the constraint protects the nodes."""
    directory = _constrained_ca(tmp_path)
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca = _cert(directory / "ca.crt")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ghcr.io")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ghcr.io")]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "forged.crt", tmp_path / "forged.key"
    cert_path.write_bytes(forged.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="permitted subtree violation"):
        await _handshake(cert_path, key_path, directory / "ca.crt", "ghcr.io")


def _write_zone(directory: Path) -> Path:
    zones = directory / "zones"
    zones.mkdir()
    (zones / "registries.yaml").write_text(
        textwrap.dedent(
            """
            records:
              registry-1.docker.io:
                A: 127.0.0.2
              quay.io:
                AAAA: "fd00::2"
              docker.example:
                CNAME: registry-1.docker.io.
              unrelated.example:
                A: 10.9.9.9
              outside-alias.example:
                CNAME: www.example.org.
            """
        )
    )
    (zones / "more.yml").write_text("records:\n  '*.mirror.ci':\n    A: [10.1.1.1, 127.0.0.2]\n")
    return zones


def test_issue_from_zones_takes_the_names_pointing_at_the_cache(
    ca_dir: Path, tmp_path: Path
) -> None:
    zones = _write_zone(tmp_path)
    out = str(tmp_path / "fromzones")
    command = ["ca", "issue", "--dir", str(ca_dir), "--from-zones", str(zones), "--out", out]
    assert main([*command, "--cache-address", "127.0.0.2", "--cache-address", "fd00::2"]) == 0
    cert = _cert(tmp_path / "fromzones.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == [
        "*.mirror.ci",
        "docker.example",
        "quay.io",
        "registry-1.docker.io",
    ]


@pytest.mark.parametrize(
    ("zones", "address"),
    [("zones", "127.0.0.1"), ("packaging/config/zones", "10.0.0.5")],
    ids=["zones-example", "packaged-sample"],
)
def test_issue_from_the_shipped_zones_covers_the_package_hosts(
    ca_dir: Path, tmp_path: Path, zones: str, address: str
) -> None:
    """The shipped example zones point Docker Hub and every package host (the mirrorlist
    and metalink hosts, the repositories they name) at the cache: one `ca issue
    --from-zones` certificate then covers the HTTPS ones dnf asks (mirrors.centos.org,
    mirror.stream.centos.org, ...). Fails on the zones before issue 12 (two names)."""
    out = str(tmp_path / "cache")
    root = Path(__file__).resolve().parents[2]
    command = ["ca", "issue", "--dir", str(ca_dir), "--from-zones", str(root / zones)]
    assert main([*command, "--out", out, "--cache-address", address]) == 0
    cert = _cert(tmp_path / "cache.crt")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == [
        "dl.fedoraproject.org",
        "mirror.stream.centos.org",
        "mirrorlist.centos.org",
        "mirrors.centos.org",
        "mirrors.fedoraproject.org",
        "registry-1.docker.io",
        "vault.centos.org",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--from-zones needs --cache-address"),
        (["--cache-address", "cache.local"], "is not an IP address"),
        (["--cache-address", "192.0.2.1"], "no name in"),
    ],
)
def test_issue_from_zones_errors(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    zones = _write_zone(tmp_path)
    assert main(["ca", "issue", "--dir", str(ca_dir), "--from-zones", str(zones), *extra]) == 2
    assert message in capsys.readouterr().err


def test_issue_from_broken_zones_names_file_and_line(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "bad.yaml").write_text("records:\n  registry-1.docker.io:\n    A: not-an-ip\n")
    command = ["ca", "issue", "--dir", str(ca_dir), "--from-zones", str(zones)]
    assert main([*command, "--cache-address", "127.0.0.2"]) == 2
    assert f"{zones / 'bad.yaml'}:3:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--days", "400", "quay.io"], "--days must be from 1 to 397"),
        (["bad name!"], "may only hold letters"),
        ([], "no names to certify"),
    ],
)
def test_issue_rejects_bad_input(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_issue_without_a_ca_says_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ca", "issue", "--dir", str(tmp_path / "none"), "quay.io"]) == 2
    assert "dnsoverride ca init --dir" in capsys.readouterr().err


def test_group_makes_the_key_readable_by_that_group_only(ca_dir: Path, tmp_path: Path) -> None:
    # As root, a group other than our own proves the chown; otherwise only our own is allowed.
    others = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    chosen = others[0] if os.geteuid() == 0 and others else grp.getgrgid(os.getgid())
    group = chosen.gr_name
    out = tmp_path / "grouped"
    assert (
        main(["ca", "issue", "--dir", str(ca_dir), "quay.io", "--out", str(out), "--group", group])
        == 0
    )
    key = tmp_path / "grouped.key"
    assert _mode(key) == 0o640
    assert key.stat().st_gid == chosen.gr_gid


def test_unknown_group_is_a_user_error(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "issue", "--dir", str(ca_dir), "quay.io", "--group", "no-such-group-x"]) == 2
    assert "no such group" in capsys.readouterr().err


def test_a_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    directory = tmp_path / "short"
    assert main(["ca", "init", "--dir", str(directory), "--days", "30"]) == 0
    out = tmp_path / "leaf"
    assert main(["ca", "issue", "--dir", str(directory), "quay.io", "--out", str(out)]) == 0
    ca, leaf = _cert(directory / "ca.crt"), _cert(tmp_path / "leaf.crt")
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc
