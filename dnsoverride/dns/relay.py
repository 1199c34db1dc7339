"""Forwarded answers as bytes: the query we send upstream, checking an upstream reply,
and the client's reply made from it, all without dnslib.

Profiled on a cold miss (every query a new name), dnslib's parse of the client's query,
build of ours, parse of the upstream reply and two packs cost more than the sockets and
everything else together. None of it is needed to forward: the upstream's records are
relayed as they came, behind a header rebuilt for the client and the client's own
question (same length as ours, so the upstream's compression pointers stay valid), with
the upstream's OPT record replaced by ours and the TTLs rewritten in place. An upstream
reply is walked once (`scan`) to check its framing and find what caching needs, and every
name a client will decompress (owners, and the names in NS, CNAME, PTR, DNAME, MX, SRV and
SOA data) is read as the client will read it: relayed bytes must parse at the client.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import dnslib

from dnsoverride.dns import wire
from dnsoverride.dns.constants import (
    AD,
    ARCOUNT,
    CD,
    CNAME,
    COUNTS,
    DNAME,
    FLAGS,
    HEADER_SIZE,
    MAX_LABEL,
    MAX_NAME,
    MAX_TTL,
    MX,
    NS,
    OPT,
    OPT_SIZE,
    PTR,
    QR,
    QUESTION_TAIL,
    RA,
    RCODE_MASK,
    RD,
    RR_FIXED,
    RR_TTL,
    SOA,
    SOA_MIN_RDATA,
    SOA_MINIMUM_FROM_END,
    SRV,
    TC,
)

_HEADER = struct.Struct("!HBBHHHH")
_COUNTS = struct.Struct("!HHHH")
_RR_FIXED = struct.Struct("!HHIH")
_QUESTION_TAIL = struct.Struct("!HH")
# Record types whose data holds names a client decompresses: (octets before the first
# name, names, octets after the last). The rest is relayed unread.
_RDATA_NAMES = {
    NS: (0, 1, 0),
    CNAME: (0, 1, 0),
    SOA: (0, 2, 20),  # MNAME, RNAME, five 32-bit numbers
    PTR: (0, 1, 0),
    MX: (2, 1, 0),  # the preference first
    SRV: (6, 1, 0),  # priority, weight and port first
    DNAME: (0, 1, 0),
}


class Question(NamedTuple):
    """What is asked upstream, and what the response cache keeps answers by: the name
    (wire format, lowercase), type, class, and the client's DO and CD bits (the answer
    depends on both)."""

    name: bytes
    qtype: int
    qclass: int
    do: bool
    cd: bool


class Reply(NamedTuple):
    """An upstream reply, checked: its bytes without the upstream's OPT record, and what
    the caches and the client's reply need from it. A tuple: cheap to make, and of
    atomic values only, so the garbage collector stops tracking cached ones."""

    wire: bytes
    rcode: int
    tc: bool
    ad: bool
    answers: int
    qend: int  # where its question ends
    ttls: tuple[tuple[int, int], ...]  # (offset, TTL) of every record
    min_ttl: int | None  # over every record; None when there are none
    negative_ttl: int | None  # min(TTL, MINIMUM) of the first authority SOA
    max_ttl: int  # over every record; 0 when there are none

    def retimed(self, age: int, cap: int) -> Reply:
        """The same reply with every TTL capped at `cap` and then lowered by `age`."""
        return self._with_wire(wire.aged(self.wire, self.ttls, age, cap))

    def stale(self, ttl: int) -> Reply:
        """The same reply with every TTL set to `ttl` (served stale, RFC 8767)."""
        return self._with_wire(wire.with_ttl(self.wire, self.ttls, ttl))

    def _with_wire(self, message: bytes) -> Reply:
        ttls = tuple((offset, _ttl_at(message, offset)) for offset, _ in self.ttls)
        return self._replace(wire=message, ttls=ttls, max_ttl=max((t for _, t in ttls), default=0))

    def records(self) -> dnslib.DNSRecord:
        """The reply parsed by dnslib (for answers that mix in local records)."""
        return dnslib.DNSRecord.parse(self.wire)


def _ttl_at(message: bytes, offset: int) -> int:
    value: int = struct.unpack_from("!I", message, offset)[0]
    return value


def query(query_id: int, name: bytes, qtype: int, qclass: int, *, cd: bool, opt: bytes) -> bytes:
    """Our query to an upstream: RD set, CD as the client's, and `opt`, our OPT record
    (`wire.opt_record`: our buffer size and the client's DO bit)."""
    header = _HEADER.pack(query_id, RD, CD if cd else 0, 1, 0, 0, 1)
    return header + name + _QUESTION_TAIL.pack(qtype, qclass) + opt


def answers_query(query_packet: bytes, data: bytes, *, exact_case: bool) -> bool:
    """Whether `data` is a reply to `query_packet`: same ID, QR set, one question, the same
    question (its name letter for letter when `exact_case`, for 0x20 randomisation)."""
    qend = question_end(query_packet)
    name_end = qend - QUESTION_TAIL
    if len(data) < qend or data[:FLAGS] != query_packet[:FLAGS] or not data[FLAGS] & QR:
        return False
    if (
        data[COUNTS : COUNTS + 2] != b"\x00\x01"
        or data[name_end:qend] != query_packet[name_end:qend]
    ):
        return False
    if exact_case:
        return data[HEADER_SIZE:name_end] == query_packet[HEADER_SIZE:name_end]
    return data[HEADER_SIZE:name_end].lower() == query_packet[HEADER_SIZE:name_end].lower()


def question_end(query_packet: bytes) -> int:
    """Where the question of our upstream query ends: it ends with our OPT record,
    without options."""
    return len(query_packet) - OPT_SIZE


def scan(data: bytes, qend: int = 0) -> Reply:
    """Check the framing of an upstream reply (one question, every record within the
    message, compression pointers pointing back) and collect what the caches need.
    `qend`: where its question ends, when `answers_query` has checked it. ValueError
    when it is malformed. An OPT record is taken out."""
    try:
        return _scan(data, qend)
    except (IndexError, struct.error) as error:
        raise ValueError(f"truncated reply ({error})") from None
    except (dnslib.DNSError, dnslib.DNSLabelError) as error:  # the OPT-not-last path
        raise ValueError(f"malformed reply ({error})") from None


def _scan(data: bytes, qend: int = 0) -> Reply:
    _id, flags, low, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if qdcount != 1:
        raise ValueError(f"{qdcount} questions")
    names: dict[int, int] = {}  # see _name_end
    if qend:  # checked by answers_query: our query's name, plain labels
        names[HEADER_SIZE] = qend - QUESTION_TAIL - HEADER_SIZE
    else:
        qend = _name_end(data, HEADER_SIZE, names) + QUESTION_TAIL
    offset = qend
    ttls = []
    min_ttl: int | None = None
    max_ttl = 0
    negative_ttl: int | None = None
    opt: tuple[int, int] | None = None
    zeroed = []  # TTL fields with the high bit set
    size = len(data)
    for index in range(ancount + nscount + arcount):
        start = offset
        offset = _name_end(data, offset, names)
        rtype, _rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, offset)
        end = offset + RR_FIXED + rdlength
        if end > size:
            raise ValueError("record runs past the end")
        _check_rdata_names(data, rtype, offset + RR_FIXED, end, names)
        if rtype == OPT:
            if index < ancount + nscount or opt is not None:
                raise ValueError("OPT outside the additional section or twice")
            opt = (start, end)
        else:
            if ttl > MAX_TTL:  # RFC 2181 section 8: as if it were 0
                ttl = 0
                zeroed.append(offset + RR_TTL)
            ttls.append((offset + RR_TTL, ttl))
            min_ttl = ttl if min_ttl is None or ttl < min_ttl else min_ttl
            max_ttl = ttl if ttl > max_ttl else max_ttl
            if rtype == SOA and negative_ttl is None and ancount <= index < ancount + nscount:
                negative_ttl = _negative_ttl(data, ttl, rdlength, end)
        offset = end
    message = _zero_ttls(data[:offset], zeroed)
    if opt is not None:
        if opt[1] != offset:
            # Legal but rare (OPT is last in practice): let dnslib re-encode without it.
            parsed = dnslib.DNSRecord.parse(message)
            parsed.ar = [rr for rr in parsed.ar if rr.rtype != OPT]
            return _scan(parsed.pack())
        message = message[: opt[0]]
        message = message[:ARCOUNT] + struct.pack("!H", arcount - 1) + message[HEADER_SIZE:]
    return Reply(
        message,
        low & RCODE_MASK,
        bool(flags & TC),
        bool(low & AD),
        ancount,
        qend,
        tuple(ttls),
        min_ttl,
        negative_ttl,
        max_ttl,
    )


def _negative_ttl(data: bytes, ttl: int, rdlength: int, end: int) -> int:
    """How long a negative answer is cached by the SOA record whose TTL is `ttl` and whose
    data ends at `end` (RFC 2308 5: the lesser of its TTL and its MINIMUM)."""
    if rdlength < SOA_MIN_RDATA:
        raise ValueError("short SOA")
    return min(ttl, _ttl_at(data, end - SOA_MINIMUM_FROM_END))


def _zero_ttls(message: bytes, offsets: list[int]) -> bytes:
    """`message` with the TTL fields at `offsets` set to 0."""
    if not offsets:
        return message
    patched = bytearray(message)
    for at in offsets:
        struct.pack_into("!I", patched, at, 0)
    return bytes(patched)


def _check_rdata_names(
    data: bytes, rtype: int, start: int, end: int, names: dict[int, int]
) -> None:
    """Read the names in the data of a record of type `rtype` (from `start` to `end`) as
    a client will, if the type holds any (`_RDATA_NAMES`); the data must end where they
    and the octets after them do."""
    layout = _RDATA_NAMES.get(rtype)
    if layout is None:
        return
    before, count, after = layout
    at = start + before
    for _ in range(count):
        at = _name_end(data, at, names)
    if at + after != end:
        raise ValueError(f"TYPE{rtype} data does not fill its length")


def _name_end(data: bytes, offset: int, names: dict[int, int]) -> int:
    """Offset just past the name at `offset`, read as a client decompresses it. Like
    dnspython, each compression pointer must point below the previous one (below the name
    itself, first), so a name always ends; and into the records, not the header, which
    `to_client` rebuilds. At most 255 octets in all. `names` maps the offsets where a
    name read so far (or the rest of one) starts to its length: a pointer there ends the
    walk. ValueError for anything else; IndexError past the end."""
    end = 0
    length = 0
    below = offset
    labels = []
    while True:
        byte = data[offset]
        if byte >= 0xC0:
            target = ((byte & 0x3F) << 8) | data[offset + 1]
            if not end:
                end = offset + 2
            if not HEADER_SIZE <= target < below:
                raise ValueError("compression pointer not back into the records")
            below = target
            known = names.get(target)
            if known is not None:
                length += known
                break
            offset = target
            continue
        if byte > MAX_LABEL:
            raise ValueError(f"bad label type {byte:#x}")
        labels.append((offset, length))
        length += byte + 1
        if not byte:
            if not end:
                end = offset + 1
            break
        offset += byte + 1
    if length > MAX_NAME:
        raise ValueError("name longer than 255 octets")
    for start, before in labels:
        names[start] = length - before
    return end


def to_client(
    reply: Reply,
    query_id: bytes,
    *,
    rd: int,
    cd: int,
    ad: bool,
    question: bytes,
    opt: bytes,
    limit: int,
) -> bytes:
    """The client's reply carrying `reply`: the client's ID (`query_id`, two bytes), RD and
    CD echoed, RA set, AD only when `ad` (RFC 6840 5.8: the client asked for DNSSEC data)
    and the upstream set it, the client's `question` (its letter case), the upstream's
    records, and `opt` (our OPT record, b"" for a client without EDNS). Over `limit`
    bytes: TC and no records, so the client retries over TCP."""
    message = reply.wire
    flags = QR | rd
    low = RA | (AD if ad and reply.ad else 0) | (CD if cd else 0) | reply.rcode
    extra = 1 if opt else 0
    head = query_id + bytes((flags, low))
    additional = ((message[ARCOUNT] << 8) | message[ARCOUNT + 1]) + extra
    counts = message[COUNTS + 2 : ARCOUNT] + struct.pack("!H", additional)
    out = head + b"\x00\x01" + counts + question + message[reply.qend :] + opt
    if len(out) <= limit:
        return out
    head = query_id + bytes((flags | TC, low))
    return head + _COUNTS.pack(1, 0, 0, extra) + question + opt
