"""Image references as admins type them (`cache purge`, `cache warm`, the `warm:` list):
`[REGISTRY/]NAME[:TAG|@DIGEST]`, resolved against the configured upstreams.

A first component that names an upstream (its name or an alias, as in
`registry-1.docker.io/library/alpine:3` or `127.0.0.1:5000/team/app`) selects it; one that
looks like a registry's name (a dot, a port, `localhost`: docker's rule) but names none is
refused; anything else is a repository of the default upstream, whose `library/` rule applies
(`alpine:3` is `library/alpine:3` on Docker Hub). No tag and no digest means `latest`,
as docker and skopeo read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dnsoverride.cache.registry.config import UpstreamConfig
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.names import parse_digest, parse_name, parse_tag
from dnsoverride.cache.store import Digest


@dataclass(frozen=True)
class ImageRef:
    """An image in one upstream: a tag, or a digest (then `tag` is None)."""

    upstream: str
    name: str
    tag: str | None
    digest: Digest | None = None

    def __str__(self) -> str:
        reference = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.upstream}/{self.name}{reference}"


def parse_image(text: str, upstreams: Iterable[UpstreamConfig], default: str) -> ImageRef:
    """The image `text` names; ValueError with the reason for a bad reference."""
    by_host = {host.lower(): upstream for upstream in upstreams for host in upstream.hosts}
    rest = text.strip()
    first, slash, remainder = rest.partition("/")
    upstream = by_host.get(first.lower()) if slash else None
    if upstream is not None:
        rest = remainder
    elif slash and ("." in first or ":" in first or first == "localhost"):
        # A registry's name, as docker tells one from a repository's first component.
        raise ValueError(f"{text!r}: no upstream named {first!r} is configured")
    else:
        upstream = next(u for u in by_host.values() if u.name == default)
    digest = None
    tag: str | None = None
    try:
        if "@" in rest:
            rest, _, reference = rest.partition("@")
            digest = parse_digest(reference)
        else:
            # A colon after the last slash is a tag's (a host's port comes before a slash).
            head, colon, tail = rest.rpartition(":")
            if colon and "/" not in tail:
                rest, tag = head, parse_tag(tail)
            else:
                tag = "latest"
        name = parse_name(rest)
    except RegistryError as error:
        raise ValueError(error.message) from None
    if upstream.library_prefix and "/" not in name:
        name = f"library/{name}"
    return ImageRef(upstream.name, name, tag, digest)
