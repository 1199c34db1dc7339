"""Test certificates made with dnsoverride.ca: a throw-away CA and server certificates it signs.

Used by the health-check, zone and registry TLS tests. tests/cli/test_ca.py verifies what
dnsoverride.ca builds on its own terms (cryptography's path validation, real handshakes),
so these tests rely on it rather than on a second certificate builder of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dnsoverride.ca import CA_CERT, CertificateAuthority, init_ca, issue, load_ca


@dataclass(frozen=True)
class CertAuthority:
    """A CA whose certificate is at `cert_file`; `issue` writes server cert/key pairs."""

    authority: CertificateAuthority
    cert_file: Path

    def issue(self, directory: Path, stem: str, *names: str) -> tuple[Path, Path]:
        """Write `<stem>.crt` / `<stem>.key` for `names` (DNS names or IP literals)."""
        return issue(self.authority, names, directory / stem)


def make_ca(directory: Path) -> CertAuthority:
    """A new CA in `directory` (`ca.crt`, `ca.key`); another CA needs another directory."""
    init_ca(directory)
    return CertAuthority(load_ca(directory), directory / CA_CERT)
