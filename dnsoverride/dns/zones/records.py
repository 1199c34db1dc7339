"""Record types a zone may define, the canonical text of their values, and the wire
sizes those take: what keeps every answer the server gives within a DNS message."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import dnslib

from dnsoverride.dns.constants import (
    ANSWER_RR_OVERHEAD,
    HEADER_SIZE,
    MAX_CHARACTER_STRING,
    MAX_COOKIE_OPTION,
    MAX_MESSAGE,
    MAX_NAME,
    MAX_RDATA,
    OPT_SIZE,
    QUESTION_TAIL,
)
from dnsoverride.dns.zones.names import name_problem, normalize_name

RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT", "MX", "SRV", "PTR", "NS")


QTYPES = {rtype: int(getattr(dnslib.QTYPE, rtype)) for rtype in RECORD_TYPES}
QTYPE_A, QTYPE_AAAA, QTYPE_CNAME = QTYPES["A"], QTYPES["AAAA"], QTYPES["CNAME"]
QTYPE_TXT = QTYPES["TXT"]


# What an answer's records may take of a message: the header, the question (a name of up
# to 255 bytes, type and class) and our EDNS OPT record with a DNS cookie (RFC 7873) take
# the rest.
ANSWER_ROOM = MAX_MESSAGE - (HEADER_SIZE + MAX_NAME + QUESTION_TAIL + OPT_SIZE + MAX_COOKIE_OPTION)


# From this many records on an RRset of fixed-size records may not fit a message (A:
# ~4,000, names: ~230), so only such RRsets (and TXT) are measured.
BIG_RRSET = 200


# RRSet and NameEntry are NamedTuples rather than frozen dataclasses: as immutable, and
# built 3x faster and smaller.
class RRSet(NamedTuple):
    """The records of one type at one name, as canonical texts (validated when loaded)."""

    rtype: int
    ttl: int
    texts: tuple[str, ...]

    @property
    def rdatas(self) -> tuple[Any, ...]:
        """The records as dnslib RDATA objects. Built on use, not kept: a local answer is
        packed once and then served from the answer cache, while keeping them costs
        memory and load time for every name of a large set."""
        build = _RDATA_FROM_TEXT[self.rtype]
        return tuple(build(text) for text in self.texts)


class RRSets(Mapping[int, RRSet]):
    """A name's RRSets by type: an immutable mapping over a tuple, a quarter of a dict's
    size (most names have one or two types; a scan of those is as fast as hashing)."""

    __slots__ = ("_rrsets",)

    def __init__(self, rrsets: Iterable[RRSet]) -> None:
        self._rrsets = tuple(rrsets)

    def __getitem__(self, rtype: int) -> RRSet:
        for rrset in self._rrsets:
            if rrset.rtype == rtype:
                return rrset
        raise KeyError(rtype)

    def __iter__(self) -> Iterator[int]:
        return (rrset.rtype for rrset in self._rrsets)

    def __len__(self) -> int:
        return len(self._rrsets)

    def __repr__(self) -> str:
        return f"RRSets({self._rrsets!r})"


def rdata_text(rtype: str, value: Any) -> tuple[str, str | None]:
    """(canonical text, None) for one valid value, or ("", why the value is bad).

    The canonical text is what `RRSet.rdatas` builds the record from."""
    if rtype == "TXT":
        return _txt_text(value)
    if not isinstance(value, str):
        return "", "expected a string (quote it)"
    return _TEXT_OF[rtype](value.strip())


def _txt_text(value: Any) -> tuple[str, str | None]:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return "", "expected a string"
    text = str(value)
    if not text.isascii() and any("\ud800" <= char <= "\udfff" for char in text):
        # Only PyYAML's pure-Python parser makes these (libyaml refuses the escape).
        return "", "not valid Unicode (half of a UTF-16 surrogate pair)"
    size = _txt_bytes(text)
    if size > MAX_RDATA:
        return "", (
            f"{size:,} bytes as a record, more than the {MAX_RDATA:,} a record holds "
            f"(the text is sent as strings of up to {MAX_CHARACTER_STRING} bytes, each "
            "with a length byte)"
        )
    return '"' + text.replace('"', '\\"') + '"', None


def _a_text(text: str) -> tuple[str, str | None]:
    # inet_pton is as strict as ipaddress (no leading zeros, four parts) and 5x faster.
    try:
        socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):
        return "", "not an IPv4 address"
    return text, None


def _aaaa_text(text: str) -> tuple[str, str | None]:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return "", "not an IPv6 address"
    return address.compressed, None


def _name_text(text: str) -> tuple[str, str | None]:
    """A CNAME, PTR or NS target."""
    reason = name_problem(text, wildcard_ok=False)
    if reason:
        return "", reason
    return normalize_name(text) + ".", None


def _mx_text(text: str) -> tuple[str, str | None]:
    fields = text.split()
    if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) > _MAX_U16:
        return "", "expected 'PREFERENCE HOST', e.g. '10 mail.example.'"
    reason = name_problem(fields[1], wildcard_ok=False)
    if reason:
        return "", reason
    return f"{int(fields[0])} {normalize_name(fields[1])}.", None


def _srv_text(text: str) -> tuple[str, str | None]:
    fields = text.split()
    if len(fields) != 4 or not all(f.isdigit() and int(f) <= _MAX_U16 for f in fields[:3]):
        return "", "expected 'PRIORITY WEIGHT PORT TARGET', e.g. '10 5 443 host.example.'"
    reason = name_problem(fields[3], wildcard_ok=False) if fields[3] != "." else None
    if reason:
        return "", reason
    priority, weight, port = (int(f) for f in fields[:3])
    return f"{priority} {weight} {port} {normalize_name(fields[3])}.", None


# A value's text (stripped) -> its canonical text, per record type (TXT: `_txt_text`).
_TEXT_OF: dict[str, Callable[[str], tuple[str, str | None]]] = {
    "A": _a_text,
    "AAAA": _aaaa_text,
    "CNAME": _name_text,
    "PTR": _name_text,
    "NS": _name_text,
    "MX": _mx_text,
    "SRV": _srv_text,
}


def _txt_bytes(text: str) -> int:
    """Record data bytes of a TXT text: its UTF-8 bytes as character-strings of at most
    255 bytes, each after a length byte (RFC 1035 3.3.14); an empty text is one empty
    string."""
    size = len(text.encode())
    return size + max(1, -(-size // MAX_CHARACTER_STRING))


def rrset_bytes(rrset: RRSet) -> int:
    """An upper bound of the bytes an RRset's records take in an answer: each record's
    owner (a 2-byte pointer to a name already in the message), type, class, TTL and
    length (10 bytes), and its data with any name in it uncompressed."""
    rtype = rrset.rtype
    fixed = _FIXED_RDATA.get(rtype)
    if fixed is not None:
        return len(rrset.texts) * (ANSWER_RR_OVERHEAD + fixed)
    total = 0
    for text in rrset.texts:
        if rtype == QTYPE_TXT:
            total += ANSWER_RR_OVERHEAD + _txt_bytes(text[1:-1].replace('\\"', '"'))
        else:  # a name (CNAME, PTR, NS) after MX's 2 or SRV's 6 bytes of numbers
            target = text.rsplit(" ", 1)[-1]
            total += ANSWER_RR_OVERHEAD + _NAME_RDATA_PREFIX[rtype] + len(target) + 1
    return total


def _txt(text: str) -> Any:
    value = text[1:-1].replace('\\"', '"').encode()
    step = MAX_CHARACTER_STRING
    return dnslib.TXT([value[i : i + step] for i in range(0, len(value), step)] or [b""])


def _mx(text: str) -> Any:
    preference, target = text.split()
    return dnslib.MX(target, int(preference))


def _srv(text: str) -> Any:
    priority, weight, port, target = text.split()
    return dnslib.SRV(int(priority), int(weight), int(port), target)


# Canonical text (as `_rdata` makes it) -> dnslib RDATA.
_RDATA_FROM_TEXT: dict[int, Callable[[str], Any]] = {
    QTYPES["A"]: dnslib.A,
    QTYPES["AAAA"]: dnslib.AAAA,
    QTYPES["CNAME"]: dnslib.CNAME,
    QTYPES["PTR"]: dnslib.PTR,
    QTYPES["NS"]: dnslib.NS,
    QTYPES["TXT"]: _txt,
    QTYPES["MX"]: _mx,
    QTYPES["SRV"]: _srv,
}
TYPE_NAMES = {number: rtype for rtype, number in QTYPES.items()}
_MAX_U16 = 65535  # MX preference, SRV priority, weight and port
_FIXED_RDATA = {QTYPES["A"]: 4, QTYPES["AAAA"]: 16}
_NAME_RDATA_PREFIX = {
    QTYPES["CNAME"]: 0,
    QTYPES["PTR"]: 0,
    QTYPES["NS"]: 0,
    QTYPES["MX"]: 2,
    QTYPES["SRV"]: 6,
}
