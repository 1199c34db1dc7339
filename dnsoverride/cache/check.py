"""What `dnsoverride check --cache-config` validates of the cache: its config and the TLS
certificate/key pairs it names, as `cache` would load them."""

from __future__ import annotations

from pathlib import Path

from dnsoverride.cache.config import CacheFlags, load
from dnsoverride.cache.tls import CertificateSet


def check(path: Path) -> str:
    """A one-line summary of a valid config; ConfigError (every problem of the file) or
    UserError (an unusable certificate) otherwise."""
    config = load(path, CacheFlags())
    if config.tls_pairs:
        CertificateSet(config.tls_pairs)
    budget = f"budget {config.budget.max_size:,} bytes" if config.budget else "no budget"
    registry = config.registry
    return (
        f"listen {config.listen}, {len(registry.upstreams)} registry upstreams "
        f"(default {registry.default_upstream}), {budget}, storage {config.storage}"
    )
