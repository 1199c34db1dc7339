"""`dnsoverride ca`: the internal CA and the server certificates for overridden names.

Owns the CA directory layout (`ca.key` mode 0600, `ca.crt`), the certificate profiles
(an EC P-256 root with pathlen 0 and optional DNS name constraints; leaves with SANs
and serverAuth), and picking the names to certify from the zones. Every file is written
to a temporary file and renamed, so a reissue never leaves a half-written key or
certificate where the registry could read it.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dnsoverride.common.errors import ConfigError, UserError
from dnsoverride.dns.constants import MAX_CNAME_CHAIN
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.dns.zones.model import NameEntry, Overrides, ZoneSetError
from dnsoverride.dns.zones.names import name_problem, normalize_name

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_DAYS = 3650
# CA/Browser Forum limit for server certificates; clients such as Apple's enforce it.
MAX_LEAF_DAYS = 397
LEAF_DAYS = 365
# Clocks on CI nodes drift; a certificate that starts "now" is rejected by a node behind.
BACKDATE = datetime.timedelta(hours=1)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CertificateAuthority:
    """A loaded CA: its key and certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def run(args: argparse.Namespace) -> int:
    """Entry point for `dnsoverride ca init|issue`."""
    directory = Path(args.dir)
    if args.ca_command == "init":
        cert = init_ca(
            directory,
            days=args.days,
            name_constraints=args.name_constraint or (),
            force=args.force,
        )
        print(f"wrote {directory / CA_CERT} and {directory / CA_KEY} (mode 0600)")
        print(f"CA {cert.subject.rfc4514_string()} valid until {cert.not_valid_after_utc:%Y-%m-%d}")
        print(f"trust {directory / CA_CERT} on the CI nodes")
        print("(README, 'The internal CA and trusting it')")
        return 0
    names = list(args.names)
    if args.from_zones:
        if not args.cache_address:
            raise UserError("--from-zones needs --cache-address ADDR (the cache's address)")
        addresses = [_parse_address(text) for text in args.cache_address]
        names.extend(names_from_zones(Path(args.from_zones), addresses))
    if not names:
        raise UserError("no names to certify: give NAME... or --from-zones DIR")
    ca = load_ca(directory)
    out = Path(args.out) if args.out else directory / _file_stem(names[0])
    cert_path, key_path = issue(ca, names, out, days=args.days, group=args.group)
    leaf = x509.load_pem_x509_certificate(cert_path.read_bytes())
    mode = f"mode 0640, group {args.group}" if args.group else "mode 0600"
    print(f"wrote {cert_path} and {key_path} ({mode})")
    print(f"names: {' '.join(_unique_names(names))}")
    print(f"valid until {leaf.not_valid_after_utc:%Y-%m-%d}; reissue with the same command")
    return 0


def init_ca(
    directory: Path,
    *,
    days: int = CA_DAYS,
    name_constraints: Iterable[str] = (),
    force: bool = False,
) -> x509.Certificate:
    """Create `ca.key` and `ca.crt` in `directory`; refuse to replace a CA unless `force`.

    `name_constraints` limits the CA to those DNS subtrees (RFC 5280 4.2.1.10), so a
    leaked CA key cannot impersonate any other name to the nodes that trust it.
    """
    if days <= 0:
        raise UserError(f"--days must be positive, not {days}")
    if (directory / CA_KEY).exists() and not force:
        raise UserError(
            f"{directory / CA_KEY} already exists; every node trusts that CA, so replacing it "
            "breaks them all. Use --force if that is what you want."
        )
    constraints = [_checked_name(name, wildcard_ok=False) for name in name_constraints]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dnsoverride"),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"dnsoverride internal CA {socket.gethostname()}"[:64]
            ),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if constraints:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(name) for name in constraints],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    cert = builder.sign(key, hashes.SHA256())
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_files(
        [
            (directory / CA_KEY, _key_pem(key), 0o600),
            (directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ]
    )
    return cert


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA in `directory`, or a UserError saying how to create it."""
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    try:
        key_data, cert_data = key_path.read_bytes(), cert_path.read_bytes()
    except FileNotFoundError as error:
        raise UserError(
            f"{error.filename}: not found; "
            f"create the CA with `dnsoverride ca init --dir {directory}`"
        ) from error
    except OSError as error:
        raise UserError(f"{error.filename}: {error.strerror}") from error
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as error:
        raise UserError(f"{key_path}: not an unencrypted PEM private key ({error})") from error
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
    except ValueError as error:
        raise UserError(f"{cert_path}: not a PEM certificate ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UserError(f"{key_path} is not the key of {cert_path}")
    return CertificateAuthority(key, cert)


def issue(
    ca: CertificateAuthority,
    names: Sequence[str],
    out: Path,
    *,
    days: int = LEAF_DAYS,
    group: str | None = None,
) -> tuple[Path, Path]:
    """Issue a server certificate for `names` (DNS names or IP addresses).

    Writes `<out>.crt` and `<out>.key` (0600, or 0640 owned by `group` so that a daemon
    running as that group can read it), replacing earlier ones atomically, and returns
    their paths. The leaf never outlives the CA.
    """
    if not 0 < days <= MAX_LEAF_DAYS:
        raise UserError(f"--days must be from 1 to {MAX_LEAF_DAYS} for a server certificate")
    gid = _group_id(group) if group else None
    unique = _unique_names(names)
    sans = [_san(name) for name in unique]
    _check_constraints(ca.cert, sans)
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), ca.cert.not_valid_after_utc)
    key = ec.generate_private_key(ec.SECP256R1())
    # The SANs are what clients check; the CN is only for humans reading the cert.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, unique[0])] if len(unique[0]) <= 64 else []
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # RFC 5280: the SAN extension is critical when the subject is empty.
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_path = out.with_name(out.name + ".crt")
    key_path = out.with_name(out.name + ".key")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Key first: a reader that sees the new certificate also finds its key.
    _write_files(
        [
            (key_path, _key_pem(key), 0o600 if gid is None else 0o640),
            (cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        ],
        gid=gid,
    )
    return cert_path, key_path


def names_from_zones(zones: Path, cache_addresses: Sequence[IPAddress]) -> list[str]:
    """Every zone name whose A/AAAA records (directly or through in-zone CNAMEs) include
    one of `cache_addresses`: the names the cache must present a certificate for."""
    try:
        zone_set = load_zone_set(zones)
    except ZoneSetError as error:
        raise ConfigError(error.problems, f"zones in {zones} are not valid") from None
    merged = zone_set.select(None)
    wanted = set(cache_addresses)
    names = {
        name
        for zone in zone_set.files
        for name, entry in zone.entries.items()
        if _addresses(entry, merged) & wanted
    }
    if not names:
        shown = ", ".join(str(address) for address in cache_addresses)
        raise UserError(f"no name in {zones} points at {shown}")
    return sorted(names)


def _addresses(entry: NameEntry, merged: Overrides) -> set[IPAddress]:
    """The addresses a client resolving `entry` ends up with, following in-zone CNAMEs."""
    for _ in range(MAX_CNAME_CHAIN):
        target = entry.cname
        if target is None:
            break
        next_entry = merged.lookup(target)
        if next_entry is None:
            return set()  # the alias leaves the zones: the cache is not the target
        entry = next_entry
    found: set[IPAddress] = set()
    for rrset in entry.rrsets.values():
        for text in rrset.texts:
            try:
                found.add(ipaddress.ip_address(text))
            except ValueError:
                continue  # not an address record
    return found


def _parse_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError as error:
        raise UserError(f"--cache-address {text!r} is not an IP address") from error


def _checked_name(name: str, *, wildcard_ok: bool) -> str:
    reason = name_problem(name, wildcard_ok=wildcard_ok)
    if reason:
        raise UserError(reason)
    return normalize_name(name)


def _unique_names(names: Iterable[str]) -> list[str]:
    unique: dict[str, None] = {}
    for name in names:
        try:
            unique[str(ipaddress.ip_address(name))] = None
        except ValueError:
            unique[_checked_name(name, wildcard_ok=True)] = None
    return list(unique)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _check_constraints(ca_cert: x509.Certificate, sans: Sequence[x509.GeneralName]) -> None:
    """Refuse names the CA's name constraints forbid: clients would reject them anyway,
    with an error far from here."""
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    permitted = [
        subtree.value.lower()
        for subtree in constraints.permitted_subtrees or ()
        if isinstance(subtree, x509.DNSName)
    ]
    for san in sans:
        if not isinstance(san, x509.DNSName):
            continue
        name = san.value.removeprefix("*.")
        if not any(name == base or name.endswith("." + base) for base in permitted):
            raise UserError(
                f"{san.value} is outside the CA's name constraints ({', '.join(permitted)})"
            )


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UserError(f"--group {group}: no such group") from None


def _file_stem(name: str) -> str:
    return name.replace("*", "wildcard")


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs only its handshakes (ECDSA keys
    encipher nothing)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_files(files: Sequence[tuple[Path, bytes, int]], gid: int | None = None) -> None:
    """Write every file to a temporary sibling, fsync, then rename them all into place.

    Temporary files are created 0600 and get their final mode and group before any data
    is written, so a key is never readable by others, not even briefly.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data, mode in files:
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            staged.append((temporary, path))
            with os.fdopen(fd, "wb") as handle:
                if gid is not None:
                    os.fchown(handle.fileno(), -1, gid)
                os.fchmod(handle.fileno(), mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for temporary, path in staged:
            os.replace(temporary, path)
        staged.clear()
        for directory in {path.parent for path, _, _ in files}:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as error:
        raise UserError(
            f"cannot write {error.filename or files[0][0]}: {error.strerror}"
        ) from error
    finally:
        for temporary, _ in staged:
            Path(temporary).unlink(missing_ok=True)
