"""The few DNS wire-format reads the hot path does by hand, without dnslib.

dnslib builds Python objects for every label and record; at tens of thousands of
queries a second that parse costs more than answering. The fast path only needs to
recognise an ordinary query and derive its cache key, patch an ID, and age TTLs in a
cached reply, which are simple byte offsets. Everything else is parsed by dnslib.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from typing import Any

HEADER_SIZE = 12
MAX_NAME = 255  # octets of a name on the wire (RFC 1035 3.1)
MAX_LABEL = 63
MAX_TTL = 0x7FFFFFFF
OPT = 41
COOKIE = 10  # EDNS option code (RFC 7873)
_TTL = struct.Struct("!I")
_RR_FIXED = struct.Struct("!HHIH")
# A query with QDCOUNT=1 and ANCOUNT=NSCOUNT=0.
_SIMPLE_COUNTS = b"\x00\x01\x00\x00\x00\x00"
_PLAIN_COUNTS = _SIMPLE_COUNTS + b"\x00\x00"
# RD (0x01) | CD (0x10) | AD (0x20) as one byte: the reply's flags depend on all three.
_FLAGS = [bytes((value,)) for value in range(0x40)]
_PLAIN_PREFIX = [flag + b"\x00\x00\x00" for flag in _FLAGS]  # ... and "no EDNS"
_LONGEST_QUERY = HEADER_SIZE + MAX_NAME + 4  # a longer name is FORMERR (the parsed path)
_PLAIN_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_PLAIN_NAME = re.compile(rb"[A-Za-z0-9_.-]*")
_ESCAPE = re.compile(r"\\(\d{3})")


def fast_key(data: bytes, max_udp: int) -> bytes | None:
    """The answer cache key of an ordinary query; None for anything else.

    The key holds the RD, CD and AD bits, the client's EDNS presence, DO bit and UDP size
    (clamped to `max_udp`), and the question with its name lowercased (label length
    bytes are below 0x40, so `bytes.lower()` only touches the letters) and its QTYPE and
    QCLASS bytes exact: 65 (HTTPS) and 97 differ only in bit 0x20, so lowercasing them
    would answer one type with the other's records. The question is taken to end at
    the last byte (no EDNS) or the first zero byte (before an OPT record) without
    walking the labels: the key is then still the exact bytes of the packet, less ID
    and letter case, and `AnswerCache.store` only keeps a reply whose question matches
    it. The question ends at `len(key) + 8`. EDNS options are not part of the key (the
    caller adds our COOKIE option to a hit, see `options_start`). Anything unusual
    (opcode, flags, counts, EDNS version, options that do not tile the OPT data, a
    malformed COOKIE, a name over 255 octets) returns None and takes the dnslib path.
    """
    size = len(data)
    if size < 17 or data[2] & 0xFE:
        return None
    flags = (data[2] & 0x01) | (data[3] & 0x30)
    if data[4:12] == _PLAIN_COUNTS:
        # The common case (no EDNS): the question must run to the end of the packet.
        if data[size - 5] or size > _LONGEST_QUERY:
            return None
        return _PLAIN_PREFIX[flags] + data[HEADER_SIZE : size - 4].lower() + data[size - 4 :]
    if data[4:10] != _SIMPLE_COUNTS:
        return None
    qend = data.find(0, HEADER_SIZE) + 5
    if qend < 17 or qend > _LONGEST_QUERY:
        return None
    if data[10:12] == b"\x00\x01":
        # OPT: root owner, TYPE 41, CLASS = UDP size, TTL = ext-rcode/version/flags, RDLEN.
        if size < qend + 11 or data[qend] or data[qend + 1 : qend + 3] != b"\x00\x29":
            return None
        if data[qend + 6] or qend + 11 + ((data[qend + 9] << 8) | data[qend + 10]) != size:
            return None
        if size > qend + 11 and not _options_ok(data, qend + 11):
            return None
        udp = min(max((data[qend + 3] << 8) | data[qend + 4], 512), max_udp)
        edns = bytes((0x01 | (data[qend + 7] & 0x80), udp >> 8, udp & 0xFF))
    else:
        return None
    return _FLAGS[flags] + edns + data[HEADER_SIZE : qend - 4].lower() + data[qend - 4 : qend]


def _options_ok(data: bytes, offset: int) -> bool:
    """Whether the EDNS options from `offset` fill the packet exactly, COOKIE well-formed."""
    size = len(data)
    cookies = 0
    while offset < size:
        if offset + 4 > size:
            return False
        code = (data[offset] << 8) | data[offset + 1]
        length = (data[offset + 2] << 8) | data[offset + 3]
        if code == COOKIE:
            # RFC 7873 5.2.2: 8 bytes of client cookie, optionally 8..32 of server cookie.
            cookies += 1
            if cookies > 1 or not (length == 8 or 16 <= length <= 40):
                return False
        offset += 4 + length
    return offset == size


def options_start(key: bytes) -> int:
    """Where the EDNS options begin in the query a `fast_key` key was made from.

    The query carries options exactly when it is longer than that.
    """
    return len(key) + 19


def find_option(data: bytes, offset: int, code: int) -> bytes | None:
    """The data of EDNS option `code` in options starting at `offset` (validated by
    `fast_key`), or None."""
    size = len(data)
    while offset < size:
        length = (data[offset + 2] << 8) | data[offset + 3]
        if (data[offset] << 8) | data[offset + 1] == code:
            return data[offset + 4 : offset + 4 + length]
        offset += 4 + length
    return None


def with_option(reply: bytes, code: int, value: bytes) -> bytes:
    """`reply`, whose last record is an OPT without options, with one option added."""
    option = struct.pack("!HH", code, len(value)) + value
    return reply[:-2] + struct.pack("!H", len(option)) + option


def tcp_key(key: bytes) -> bytes:
    """The answer cache key of the same query over TCP.

    A UDP reply may be truncated to the client's size, a TCP one never is, so they are
    cached apart: the first key byte only uses its low 6 bits (RD, CD, AD), 0x80 marks TCP.
    """
    return bytes((key[0] | 0x80,)) + key[1:]


def key_question_end(key: bytes) -> int:
    """Where the question ends in the query a `fast_key` key was made from."""
    return len(key) + 8


def refused(data: bytes, key: bytes, udp_size: int) -> bytes:
    """A REFUSED reply to a query `fast_key` made `key` from: header and question, plus
    our OPT (without options, DO echoed) when the query had one (RFC 6891 6.1.1)."""
    return _empty_reply(data, key, udp_size, 0x80, 0x05)


def truncated(data: bytes, key: bytes, udp_size: int) -> bytes:
    """An empty NOERROR reply with TC set (the client retries over TCP) to a query
    `fast_key` made `key` from; never longer than the query itself."""
    return _empty_reply(data, key, udp_size, 0x82, 0x00)


def _empty_reply(data: bytes, key: bytes, udp_size: int, flags: int, rcode: int) -> bytes:
    qend = key_question_end(key)
    head = data[:2] + bytes((flags | (data[2] & 0x01), 0x80 | rcode | (data[3] & 0x10)))
    if not key[1]:
        return head + _PLAIN_COUNTS + data[HEADER_SIZE:qend]
    return (
        head
        + _SIMPLE_COUNTS
        + b"\x00\x01"
        + data[HEADER_SIZE:qend]
        + opt_record(udp_size, bool(key[1] & 0x80))
    )


def opt_record(udp_size: int, do: bool, options: bytes = b"") -> bytes:
    """Our OPT pseudo-record: root owner, `udp_size`, version 0, DO as given."""
    return (
        struct.pack("!BHHBBBBH", 0, OPT, udp_size, 0, 0, 0x80 if do else 0, 0, len(options))
        + options
    )


def key_name(key: bytes) -> bytes:
    """The query name (wire format, lowercase) of a `fast_key` key."""
    return key[4:-4]


def key_qtype(key: bytes) -> int:
    """The QTYPE of a `fast_key` key."""
    return (key[-4] << 8) | key[-3]


def key_qclass(key: bytes) -> int:
    """The QCLASS of a `fast_key` key."""
    return (key[-2] << 8) | key[-1]


def name_text(name: bytes) -> str:
    """A wire-format name (no compression) as text: labels joined by dots, no trailing
    dot, the root as "". Bytes other than letters, digits, '-' and '_' are written as
    `\\DDD` (a dot inside a label too), so the text splits into the name's labels and
    names only a zone could hold look the same as in the zone. ValueError when the
    labels do not end exactly at the end of `name` or the name exceeds 255 octets."""
    size = len(name)
    if size > MAX_NAME:
        raise ValueError("name longer than 255 octets")
    labels = []
    offset = 0
    while True:
        length = name[offset]
        if not length:
            break
        if length > MAX_LABEL:
            raise ValueError("compressed or malformed name")
        labels.append(name[offset + 1 : offset + 1 + length])
        offset += length + 1
        if offset >= size:
            raise ValueError("name runs past its end")
    if offset != size - 1:
        raise ValueError("bytes after the name")
    text = b".".join(labels)
    if _PLAIN_NAME.fullmatch(text) and len(labels) == text.count(b".") + 1:
        return text.decode()
    return ".".join(map(_escaped_label, labels))


def _escaped_label(label: bytes) -> str:
    return "".join(chr(byte) if byte in _PLAIN_BYTES else f"\\{byte:03d}" for byte in label)


def encode_labels(labels: tuple[bytes, ...]) -> bytes:
    """The wire form of a name given as its labels (no length checks)."""
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def encode_options(options: Iterable[Any]) -> bytes:
    """EDNS options (objects with `code` and `data`, like dnslib's) as OPT RDATA."""
    return b"".join(
        struct.pack("!HH", option.code, len(option.data)) + option.data for option in options
    )


def encode_name(text: str) -> bytes:
    """The wire form (no compression) of a name in `name_text`'s form; ValueError when
    it is not one (an empty label, a label over 63 octets, over 255 in all)."""
    if not text:
        return b"\x00"
    encoded = bytearray()
    for label in text.split("."):
        raw = _ESCAPE.sub(lambda match: chr(int(match.group(1))), label).encode("latin-1")
        if not 0 < len(raw) <= MAX_LABEL:
            raise ValueError(f"bad label in {text!r}")
        encoded.append(len(raw))
        encoded += raw
    encoded.append(0)
    if len(encoded) > MAX_NAME:
        raise ValueError(f"name {text!r} is longer than 255 octets")
    return bytes(encoded)


def format_error(data: bytes) -> bytes | None:
    """A header-only FORMERR reply, or None when there is not even a header to answer."""
    if len(data) < HEADER_SIZE or data[2] & 0x80:
        return None
    return data[:2] + bytes((0x80 | (data[2] & 0x79), 0x01)) + bytes(8)


def skip_name(message: bytes, offset: int) -> int:
    """Offset just past the name at `offset` (not following compression).

    ValueError for a label type other than plain or pointer and for a pointer that does
    not point before this name (the start of a loop); IndexError past the end.
    """
    start = offset
    while True:
        length = message[offset]
        if length >= 0xC0:
            if (((length & 0x3F) << 8) | message[offset + 1]) >= start:
                raise ValueError("compression pointer does not point back")
            return offset + 2
        if length > MAX_LABEL:
            raise ValueError(f"bad label type {length:#x}")
        if length == 0:
            return offset + 1
        offset += length + 1


def question_end(message: bytes) -> int:
    """Offset just past the (first) question of a message."""
    return skip_name(message, HEADER_SIZE) + 4


def ttl_offsets(message: bytes) -> tuple[tuple[int, int], ...]:
    """(offset, TTL) of every resource record's TTL field, OPT excluded.

    Used to age a cached reply's TTLs in place of re-encoding it. `message` is a reply
    this process built, so it is well-formed.
    """
    counts = struct.unpack_from("!HHHH", message, 4)
    offset = HEADER_SIZE
    for _ in range(counts[0]):
        offset = skip_name(message, offset) + 4
    found = []
    for _ in range(counts[1] + counts[2] + counts[3]):
        offset = skip_name(message, offset)
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(message, offset)
        if rtype != OPT:
            found.append((offset + 4, ttl))
        offset += 10 + rdlength
    return tuple(found)


def aged(
    message: bytes, offsets: tuple[tuple[int, int], ...], age: int, cap: int = MAX_TTL
) -> bytes:
    """`message` with every TTL at `offsets` capped at `cap`, then lowered by `age`
    seconds (not below 0)."""
    buffer = bytearray(message)
    for offset, ttl in offsets:
        _TTL.pack_into(buffer, offset, max(min(ttl, cap) - age, 0))
    return bytes(buffer)


def with_ttl(message: bytes, offsets: tuple[tuple[int, int], ...], ttl: int) -> bytes:
    """`message` with every TTL at `offsets` set to `ttl`."""
    buffer = bytearray(message)
    for offset, _ in offsets:
        _TTL.pack_into(buffer, offset, ttl)
    return bytes(buffer)
