"""Repository-name, tag and digest grammar of the OCI distribution spec.

Every name, reference and digest taken from a request passes through here before it
is used to build a path or an upstream URL; nothing unvalidated reaches the file system.
"""

from __future__ import annotations

import re

from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.store import Digest

# distribution/reference grammar: path components separated by "/", each made of
# lowercase alphanumerics joined by ".", "_", "__" or runs of "-".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
# Only algorithms we can verify are accepted; the hex length is fixed per algorithm.
_DIGEST = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
MAX_NAME = 255


def parse_name(text: str) -> str:
    if len(text) > MAX_NAME or not _NAME.match(text):
        raise RegistryError("NAME_INVALID", f"invalid repository name {text[:300]!r}")
    return text


def parse_digest(text: str) -> Digest:
    if not _DIGEST.match(text):
        raise RegistryError("DIGEST_INVALID", f"invalid or unsupported digest {text[:200]!r}")
    algorithm, _, hex_part = text.partition(":")
    return Digest(algorithm, hex_part)


def is_digest(reference: str) -> bool:
    return ":" in reference


def parse_tag(text: str) -> str:
    if not _TAG.match(text):
        raise RegistryError("TAG_INVALID", f"invalid tag {text[:200]!r}")
    return text
