"""What `dnsoverride check --registry-config` validates of the registry cache: its config
and the TLS certificate/key pairs it names, as `registry` would load them."""

from __future__ import annotations

from pathlib import Path

from dnsoverride.cache.registry.config import RegistryFlags, load
from dnsoverride.cache.registry.tls import CertificateSet


def check(path: Path) -> str:
    """A one-line summary of a valid config; ConfigError (every problem of the file) or
    UserError (an unusable certificate) otherwise."""
    config = load(path, RegistryFlags())
    if config.tls_pairs:
        CertificateSet(config.tls_pairs)
    budget = f"budget {config.budget.max_size:,} bytes" if config.budget else "no budget"
    return (
        f"listen {config.listen}, {len(config.upstreams)} upstreams "
        f"(default {config.default_upstream}), {budget}, storage {config.storage}"
    )
