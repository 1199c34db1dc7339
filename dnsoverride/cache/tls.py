"""TLS for the registry's HTTPS listener: certificate pairs chosen by SNI, reloaded on SIGHUP.

In transparent mode one cache answers for several overridden names (`registry-1.docker.io`,
`quay.io`, ...), each covered by a certificate from the internal CA. The listener keeps
one server SSLContext for its whole life; its SNI callback moves every new handshake onto
the context of the pair whose certificate names the requested host (the first pair when
none does, or when the client sends no SNI). A reload builds new per-pair contexts and
swaps the name map in one assignment: handshakes after it see the new certificates, and
connections already open are not touched. TLS 1.2 is the minimum everywhere.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog

from dnsoverride.common.errors import UserError

log = structlog.get_logger(__name__)

CertificatePair = tuple[Path, Path]


def _context(pair: CertificatePair) -> ssl.SSLContext:
    cert, key = pair
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise UserError(f"cannot load TLS certificate {cert} with key {key}: {error}") from None
    return context


def _names(cert_file: Path) -> tuple[str, ...]:
    """The DNS names a certificate is for: its SANs, else its common name."""
    # Imported here: only a cache with TLS configured pays for cryptography (~7 MB of RSS).
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read TLS certificate {cert_file}: {error}") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(attribute.value)
            for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return tuple(name.lower().rstrip(".") for name in names)


def _load(pairs: Sequence[CertificatePair]) -> tuple[Mapping[str, ssl.SSLContext], ssl.SSLContext]:
    """Name -> context for every name of every pair (first pair wins a name), and the default."""
    if not pairs:
        raise UserError("TLS needs at least one certificate/key pair")
    by_name: dict[str, ssl.SSLContext] = {}
    contexts = []
    for pair in pairs:
        context = _context(pair)
        contexts.append(context)
        for name in _names(pair[0]):
            by_name.setdefault(name, context)
    return by_name, contexts[0]


class CertificateSet:
    """The certificates of one HTTPS listener; `reload()` re-reads the files."""

    def __init__(self, pairs: Sequence[CertificatePair]) -> None:
        self._pairs = tuple(pairs)
        self._state = _load(self._pairs)
        self._server = _context(self._pairs[0])
        self._server.sni_callback = self._select

    def server_context(self) -> ssl.SSLContext:
        """The context to listen with; it stays valid across reloads."""
        return self._server

    def names(self) -> frozenset[str]:
        """Every name (or `*.wildcard`) some current certificate is for."""
        return frozenset(self._state[0])

    def reload(self) -> bool:
        """Re-read every pair; on any error keep the current certificates and log why."""
        try:
            state = _load(self._pairs)
        except UserError as error:
            log.error("tls_reload_failed", reason=str(error))
            return False
        self._state = state
        log.info("tls_reloaded", names=sorted(state[0]), pairs=len(self._pairs))
        return True

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        by_name, default = self._state
        context = default
        if server_name:
            name = server_name.lower().rstrip(".")
            _, _, parent = name.partition(".")
            context = by_name.get(name) or by_name.get(f"*.{parent}") or default
        connection.context = context
