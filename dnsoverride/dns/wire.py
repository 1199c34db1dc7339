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
from typing import Any, NamedTuple

from dnsoverride.dns.constants import (
    AD,
    ARCOUNT,
    CD,
    CLIENT_COOKIE_SIZE,
    COOKIE,
    COUNTS,
    DO,
    FLAGS,
    FLAGS2,
    HEADER_SIZE,
    MAX_LABEL,
    MAX_NAME,
    MAX_TTL,
    NOERROR,
    OPCODE_MASK,
    OPT,
    OPT_FLAGS,
    OPT_RDLENGTH,
    OPT_SIZE,
    OPT_TYPE,
    OPT_UDP_SIZE,
    OPT_VERSION,
    OPTION_HEADER,
    PLAIN_UDP_SIZE,
    QR,
    QUESTION_TAIL,
    RA,
    RD,
    REFUSED,
    RR_FIXED,
    RR_TTL,
    SERVER_COOKIE_SIZES,
    TC,
)

# The layout of a `fast_key` key: its first byte holds the query's RD, CD and AD bits
# (and KEY_TCP for a TCP key), the second 0x01 for EDNS with the DO bit, the next two
# the client's UDP size, and the question follows, from KEY_QUESTION: the question sits
# QUESTION_SHIFT bytes further on in the query than in its key.
KEY_FLAGS = 0
KEY_EDNS = 1
KEY_UDP_SIZE = 2
KEY_QUESTION = 4
KEY_TCP = 0x80
KEY_EDNS_PRESENT = 0x01
QUESTION_SHIFT = HEADER_SIZE - KEY_QUESTION
_TTL = struct.Struct("!I")
_POINTER = 0xC0  # a label length byte with both high bits set: a compression pointer
_RR_FIXED = struct.Struct("!HHIH")
# A query with QDCOUNT=1 and ANCOUNT=NSCOUNT=0.
_SIMPLE_COUNTS = b"\x00\x01\x00\x00\x00\x00"
_PLAIN_COUNTS = _SIMPLE_COUNTS + b"\x00\x00"
# RD | CD | AD as one byte: the reply's flags depend on all three (RD in bit 0x01, CD and
# AD at their FLAGS2 bits).
_FLAGS = [bytes((value,)) for value in range(0x40)]
_KEY_FLAG_BITS = CD | AD
_OPT_TYPE_BYTES = OPT.to_bytes(2, "big")
_PLAIN_PREFIX = [flag + b"\x00\x00\x00" for flag in _FLAGS]  # ... and "no EDNS"
_SHORTEST_QUERY = HEADER_SIZE + 1 + QUESTION_TAIL  # the root's name is one byte
_LONGEST_QUERY = HEADER_SIZE + MAX_NAME + QUESTION_TAIL  # longer: FORMERR (the parsed path)
_ALL_COUNTS = slice(COUNTS, HEADER_SIZE)
_NOT_RD = ~RD & 0xFF  # FLAGS of an ordinary query: a query (no QR), opcode 0, RD or not
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
    it. The question ends at `key_question_end(key)`. EDNS options are not part of the key (the
    caller adds our COOKIE option to a hit, see `options_start`). Anything unusual
    (opcode, flags, counts, EDNS version, options that do not tile the OPT data, a
    malformed COOKIE, a name over 255 octets) returns None and takes the dnslib path.
    """
    size = len(data)
    if size < _SHORTEST_QUERY or data[FLAGS] & _NOT_RD:
        return None
    flags = (data[FLAGS] & RD) | (data[FLAGS2] & _KEY_FLAG_BITS)
    if data[_ALL_COUNTS] == _PLAIN_COUNTS:
        # The common case (no EDNS): the question must run to the end of the packet.
        tail = size - QUESTION_TAIL
        if data[tail - 1] or size > _LONGEST_QUERY:
            return None
        return _PLAIN_PREFIX[flags] + data[HEADER_SIZE:tail].lower() + data[tail:]
    if data[COUNTS:ARCOUNT] != _SIMPLE_COUNTS:
        return None
    # The name's terminating zero, then QTYPE and QCLASS: the OPT record starts at `qend`.
    qend = data.find(0, HEADER_SIZE) + 1 + QUESTION_TAIL
    if qend < _SHORTEST_QUERY or qend > _LONGEST_QUERY:
        return None
    if data[ARCOUNT:HEADER_SIZE] != b"\x00\x01":
        return None
    # OPT: root owner, TYPE 41, CLASS = UDP size, TTL = ext-rcode/version/flags, RDLENGTH.
    options = qend + OPT_SIZE
    if (
        size < options
        or data[qend]
        or data[qend + OPT_TYPE : qend + OPT_UDP_SIZE] != _OPT_TYPE_BYTES
    ):
        return None
    rdlength = (data[qend + OPT_RDLENGTH] << 8) | data[qend + OPT_RDLENGTH + 1]
    if data[qend + OPT_VERSION] or options + rdlength != size:
        return None
    if size > options and not _options_ok(data, options):
        return None
    udp = (data[qend + OPT_UDP_SIZE] << 8) | data[qend + OPT_UDP_SIZE + 1]
    udp = min(max(udp, PLAIN_UDP_SIZE), max_udp)
    edns = bytes((KEY_EDNS_PRESENT | (data[qend + OPT_FLAGS] & DO), udp >> 8, udp & 0xFF))
    question = data[HEADER_SIZE : qend - QUESTION_TAIL].lower()
    return _FLAGS[flags] + edns + question + data[qend - QUESTION_TAIL : qend]


class QueryKey(NamedTuple):
    """What the fast path needs of an ordinary query, derived from its bytes after the ID."""

    udp: bytes  # its `fast_key` key
    tcp: bytes  # the same over TCP (`tcp_key`)
    cookie: bytes | None  # its COOKIE option's data, None without one


# How many queries `QueryKeys` remembers: a server's hot set of distinct query byte
# strings (a client cookie makes each client's its own); a flood of new ones only clears
# it now and then. Each costs about 350 bytes.
KEY_MEMO_SIZE = 8192


class QueryKeys:
    """`fast_key` and the COOKIE option of a query, remembered by its bytes after the ID.

    Both are pure functions of those bytes (and the fixed `max_udp`), so a query sent
    again (another ID, the same everything else: a stub's retries, every client of a CI
    farm asking the same name with the same EDNS options) costs one dict lookup instead
    of a walk of its EDNS options. The memo key is the exact bytes, so queries differing
    in any flag, letter, QTYPE/QCLASS byte or EDNS option never share an entry. Bounded:
    cleared when `size` entries are reached.
    """

    def __init__(self, max_udp: int, size: int = KEY_MEMO_SIZE) -> None:
        self._max_udp = max_udp
        self._size = size
        # By the query's bytes after the ID (FLAGS on); the fast path reads it directly.
        self.known: dict[bytes, QueryKey] = {}

    def __len__(self) -> int:
        return len(self.known)

    def __call__(self, data: bytes) -> QueryKey | None:
        """The `QueryKey` of `data`, None when `fast_key` has none."""
        body = data[FLAGS:]
        known = self.known.get(body)
        if known is not None:
            return known
        key = fast_key(data, self._max_udp)
        if key is None:
            return None
        start = options_start(key)
        cookie = find_option(data, start, COOKIE) if len(data) > start else None
        known = QueryKey(key, tcp_key(key), cookie)
        if len(self.known) >= self._size:
            self.known.clear()
        self.known[body] = known
        return known


def _options_ok(data: bytes, offset: int) -> bool:
    """Whether the EDNS options from `offset` fill the packet exactly, COOKIE well-formed."""
    size = len(data)
    cookies = 0
    while offset < size:
        if offset + OPTION_HEADER > size:
            return False
        code = (data[offset] << 8) | data[offset + 1]
        length = (data[offset + 2] << 8) | data[offset + 3]
        if code == COOKIE:
            cookies += 1
            if cookies > 1 or not cookie_length_ok(length):
                return False
        offset += OPTION_HEADER + length
    return offset == size


def opt_options_ok(message: bytes) -> bool:
    """Whether the options of the OPT record in `message` (which dnslib parsed) fill its
    RDATA exactly, with at most one COOKIE option, well-formed (True without an OPT).

    dnslib reads options only while more than 4 bytes are left and drops the rest: a
    last COOKIE option of length 0, an option header without its data, 1-3 stray bytes.
    Those are malformed (RFC 6891 6.1.2, RFC 7873 5.2.2: FORMERR), so the caller checks
    the wire. A message this walk cannot follow (a compression pointer forward) keeps
    dnslib's verdict.
    """
    try:
        counts = struct.unpack_from("!HHHH", message, COUNTS)
        offset = HEADER_SIZE
        for _ in range(counts[0]):
            offset = skip_name(message, offset) + QUESTION_TAIL
        for _ in range(counts[1] + counts[2] + counts[3]):
            offset = skip_name(message, offset)
            rtype, _rclass, _ttl, rdlength = _RR_FIXED.unpack_from(message, offset)
            offset += RR_FIXED
            if rtype == OPT:
                return _options_ok(message[offset : offset + rdlength], 0)
            offset += rdlength
    except (IndexError, ValueError, struct.error):
        return True
    return True


def cookie_length_ok(length: int) -> bool:
    """RFC 7873 5.2.2: a COOKIE option holds a client cookie, optionally a server one."""
    return length == CLIENT_COOKIE_SIZE or length - CLIENT_COOKIE_SIZE in SERVER_COOKIE_SIZES


def options_start(key: bytes) -> int:
    """Where the EDNS options begin in the query a `fast_key` key was made from.

    The query carries options exactly when it is longer than that.
    """
    return len(key) + QUESTION_SHIFT + OPT_SIZE


def find_option(data: bytes, offset: int, code: int) -> bytes | None:
    """The data of EDNS option `code` in options starting at `offset` (validated by
    `fast_key`), or None."""
    size = len(data)
    while offset < size:
        length = (data[offset + 2] << 8) | data[offset + 3]
        if (data[offset] << 8) | data[offset + 1] == code:
            start = offset + OPTION_HEADER
            return data[start : start + length]
        offset += OPTION_HEADER + length
    return None


def bare_opts(udp_size: int) -> tuple[bytes, bytes]:
    """Our OPT record without options (`opt_record`), without and with DO: how each of
    our replies to an EDNS query ends before a COOKIE option is added to it."""
    return opt_record(udp_size, False), opt_record(udp_size, True)


def tcp_key(key: bytes) -> bytes:
    """The answer cache key of the same query over TCP.

    A UDP reply may be truncated to the client's size, a TCP one never is, so they are
    cached apart: the first key byte only uses its low 6 bits (RD, CD, AD), KEY_TCP marks TCP.
    """
    return bytes((key[KEY_FLAGS] | KEY_TCP,)) + key[KEY_FLAGS + 1 :]


def key_question_end(key: bytes) -> int:
    """Where the question ends in the query a `fast_key` key was made from."""
    return len(key) + QUESTION_SHIFT


def refused(data: bytes, key: bytes, udp_size: int) -> bytes:
    """A REFUSED reply to a query `fast_key` made `key` from: header and question, plus
    our OPT (without options, DO echoed) when the query had one (RFC 6891 6.1.1)."""
    return _empty_reply(data, key, udp_size, QR, REFUSED)


def truncated(data: bytes, key: bytes, udp_size: int) -> bytes:
    """An empty NOERROR reply with TC set (the client retries over TCP) to a query
    `fast_key` made `key` from; never longer than the query itself."""
    return _empty_reply(data, key, udp_size, QR | TC, NOERROR)


def _empty_reply(data: bytes, key: bytes, udp_size: int, flags: int, rcode: int) -> bytes:
    qend = key_question_end(key)
    flag_bytes = (flags | (data[FLAGS] & RD), RA | rcode | (data[FLAGS2] & CD))
    head = data[:FLAGS] + bytes(flag_bytes)
    edns = key[KEY_EDNS]
    if not edns:
        return head + _PLAIN_COUNTS + data[HEADER_SIZE:qend]
    return (
        head
        + _SIMPLE_COUNTS
        + b"\x00\x01"
        + data[HEADER_SIZE:qend]
        + opt_record(udp_size, bool(edns & DO))
    )


def opt_record(udp_size: int, do: bool, options: bytes = b"") -> bytes:
    """Our OPT pseudo-record: root owner, `udp_size`, version 0, DO as given."""
    return (
        struct.pack("!BHHBBBBH", 0, OPT, udp_size, 0, 0, DO if do else 0, 0, len(options)) + options
    )


def key_name(key: bytes) -> bytes:
    """The query name (wire format, lowercase) of a `fast_key` key."""
    return key[KEY_QUESTION:-QUESTION_TAIL]


def key_qtype(key: bytes) -> int:
    """The QTYPE of a `fast_key` key."""
    return (key[-4] << 8) | key[-3]


def key_qclass(key: bytes) -> int:
    """The QCLASS of a `fast_key` key."""
    return (key[-2] << 8) | key[-1]


def key_udp_size(key: bytes) -> int:
    """The client's UDP size in a `fast_key` key (its EDNS size, clamped)."""
    return (key[KEY_UDP_SIZE] << 8) | key[KEY_UDP_SIZE + 1]


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


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """A header-only reply with `rcode` (FORMERR, SERVFAIL) keeping the query's ID,
    opcode and RD; None when there is not even a header to answer, or it is a reply."""
    if len(data) < HEADER_SIZE or data[FLAGS] & QR:
        return None
    flags = QR | (data[FLAGS] & (OPCODE_MASK | RD))
    return data[:FLAGS] + bytes((flags, rcode)) + bytes(HEADER_SIZE - COUNTS)


def skip_name(message: bytes, offset: int) -> int:
    """Offset just past the name at `offset` (not following compression).

    ValueError for a label type other than plain or pointer and for a pointer that does
    not point before this name (the start of a loop); IndexError past the end.
    """
    start = offset
    while True:
        length = message[offset]
        if length >= _POINTER:
            if (((length & ~_POINTER & 0xFF) << 8) | message[offset + 1]) >= start:
                raise ValueError("compression pointer does not point back")
            return offset + 2
        if length > MAX_LABEL:
            raise ValueError(f"bad label type {length:#x}")
        if length == 0:
            return offset + 1
        offset += length + 1


def question_end(message: bytes) -> int:
    """Offset just past the (first) question of a message."""
    return skip_name(message, HEADER_SIZE) + QUESTION_TAIL


def ttl_offsets(message: bytes) -> tuple[tuple[int, int], ...]:
    """(offset, TTL) of every resource record's TTL field, OPT excluded.

    Used to age a cached reply's TTLs in place of re-encoding it. `message` is a reply
    this process built, so it is well-formed.
    """
    counts = struct.unpack_from("!HHHH", message, COUNTS)
    offset = HEADER_SIZE
    for _ in range(counts[0]):
        offset = skip_name(message, offset) + QUESTION_TAIL
    found = []
    for _ in range(counts[1] + counts[2] + counts[3]):
        offset = skip_name(message, offset)
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(message, offset)
        if rtype != OPT:
            found.append((offset + RR_TTL, ttl))
        offset += RR_FIXED + rdlength
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
