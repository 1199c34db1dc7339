"""Domain names as zone files hold them: the form they are compared in (lowercase, no
trailing dot) and what makes one valid (RFC 1035 lengths; letters, digits, `-`, `_`;
`*` only as a whole first label of an owner)."""

from __future__ import annotations

import re

from dnsoverride.common.yamlsource import brief
from dnsoverride.dns.constants import MAX_LABEL, MAX_NAME_TEXT

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
# Every label valid at once: the common case, one regex call instead of one per label.
_LABELS = r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
VALID_NAME = re.compile(_LABELS)
VALID_OWNER = re.compile(r"(?:\*\.)?" + _LABELS)


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot: the form names are compared in."""
    return name.rstrip(".").lower() if name != "." else ""


def name_problem(name: str, wildcard_ok: bool) -> str | None:
    """Why `name` is not a valid domain name (None when it is)."""
    text = normalize_name(name)
    if not text:
        return "empty name"
    if len(text) > MAX_NAME_TEXT:
        return f"name {brief(name)} is longer than {MAX_NAME_TEXT} characters"
    if (VALID_OWNER if wildcard_ok else VALID_NAME).fullmatch(text):
        return None
    labels = text.split(".")
    for index, label in enumerate(labels):
        if label == "*" and index == 0 and wildcard_ok and len(labels) > 1:
            continue
        if label == "*" or "*" in label:
            return f"name {brief(name)}: '*' is only allowed as the whole first label of an owner"
        if not label:
            return f"name {brief(name)} has an empty label"
        if len(label) > MAX_LABEL:
            return f"name {brief(name)} has a label longer than {MAX_LABEL} characters"
        if not _LABEL.match(label):
            return (
                f"name {brief(name)}: label {brief(label)} may only hold letters, digits, "
                "'-' and '_' and may not start or end with '-'"
            )
    return None
