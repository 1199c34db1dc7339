"""Building replies with dnslib: local answers from the zone set, errors, and the final
packing step every reply goes through (flags, EDNS OPT, UDP truncation).

An override owns its whole name: defined types get their records, every other type gets
NOERROR/NODATA with a synthesized SOA, so no AAAA or HTTPS record from upstream can lead
a client around the override. A CNAME is followed through local data; when it leaves
local data, the caller resolves the remaining target upstream and appends it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import dnslib

from dnsoverride.dns import wire
from dnsoverride.dns.constants import (
    ANSWER_RR_OVERHEAD,
    ANY,
    CNAME,
    COOKIE,
    DO,
    HINFO,
    MAX_CNAME_CHAIN,
    OPT,
    PLAIN_UDP_SIZE,
)
from dnsoverride.dns.zones.model import NameEntry, Overrides
from dnsoverride.dns.zones.records import RRSet

SOA_MNAME = "ns.dnsoverride.invalid."
SOA_RNAME = "hostmaster.dnsoverride.invalid."
# dnslib gives an OPT record's TTL as one number: extended RCODE, version, flags.
_VERSION_SHIFT = 16
_DO_IN_TTL = DO << 8


class ClientEdns(NamedTuple):
    """What the client said with its OPT record (`present=False` when it sent none)."""

    present: bool
    udp_size: int
    do: bool
    version: int = 0
    cookie: bytes = b""  # the COOKIE option's data (RFC 7873), b"" when none was sent


@dataclass
class LocalAnswer:
    """A local answer; `forward` is the CNAME target still to resolve upstream, if any."""

    reply: dnslib.DNSRecord
    forward: str | None


def client_edns(request: dnslib.DNSRecord) -> ClientEdns | None:
    """The request's EDNS parameters; None (FORMERR) for more than one OPT or a malformed
    COOKIE option (RFC 7873 5.2.2: 8 bytes of client cookie, optionally 8-32 of server's)."""
    opts = [rr for rr in request.ar if rr.rtype == OPT]
    if not opts:
        return ClientEdns(False, PLAIN_UDP_SIZE, False)
    if len(opts) > 1:
        return None
    opt = opts[0]
    cookies = [option.data for option in opt.rdata if option.code == COOKIE]
    if len(cookies) > 1 or (cookies and not wire.cookie_length_ok(len(cookies[0]))):
        return None
    version = (opt.ttl >> _VERSION_SHIFT) & 0xFF
    cookie = cookies[0] if cookies else b""
    udp_size = max(opt.rclass, PLAIN_UDP_SIZE)
    return ClientEdns(True, udp_size, bool(opt.ttl & _DO_IN_TTL), version, cookie)


def new_reply(request: dnslib.DNSRecord, rcode: int = 0, aa: bool = False) -> dnslib.DNSRecord:
    """An empty reply to `request` with its ID, question (in its case), RD and CD echoed."""
    header = dnslib.DNSHeader(
        id=request.header.id,
        qr=1,
        aa=int(aa),
        rd=request.header.rd,
        ra=1,
        cd=request.header.cd,
        rcode=rcode,
    )
    return dnslib.DNSRecord(header, q=request.q)


def soa_record(owner: dnslib.DNSLabel, minimum: int, serial: int) -> dnslib.RR:
    """The synthesized SOA for NODATA answers; its TTL and MINIMUM are the name's TTL."""
    soa = dnslib.SOA(SOA_MNAME, SOA_RNAME, (serial, 3600, 600, 86400, minimum))
    return dnslib.RR(owner, dnslib.QTYPE.SOA, rdata=soa, ttl=minimum)


def local_answer(
    request: dnslib.DNSRecord,
    entry: NameEntry,
    overrides: Overrides,
    serial: int,
    withdrawn: frozenset[str] = frozenset(),
) -> LocalAnswer:
    """The authoritative answer for an overridden name, following CNAMEs locally.

    A CNAME target whose health-gated override is `withdrawn` counts as not local.
    """
    reply = new_reply(request, aa=True)
    qtype = request.q.qtype
    owner = request.q.qname
    current = entry
    for _ in range(MAX_CNAME_CHAIN):
        if qtype == ANY:
            # RFC 8482: answer ANY with one RRset, never everything, and the smallest one,
            # so ANY is no way to get a name's largest answer for the smallest query.
            _add(reply, owner, min(current.rrsets.values(), key=_wire_size))
            return LocalAnswer(reply, None)
        rrset = current.rrsets.get(qtype)
        if rrset is not None:
            _add(reply, owner, rrset)
            return LocalAnswer(reply, None)
        cname = current.rrsets.get(dnslib.QTYPE.CNAME)
        if cname is None:
            reply.add_auth(soa_record(owner, current.ttl, serial))
            return LocalAnswer(reply, None)
        _add(reply, owner, cname)
        target = current.cname or ""
        owner = dnslib.DNSLabel(target + ".")
        following = overrides.lookup(target)
        if following is None or (following.health is not None and target in withdrawn):
            return LocalAnswer(reply, target)
        current = following
    reply.header.rcode = dnslib.RCODE.SERVFAIL  # a CNAME loop in the zones
    return LocalAnswer(reply, None)


def chain_records(records: Sequence[dnslib.RR], target: str) -> list[dnslib.RR]:
    """The records of an upstream answer for `target` (lowercase, no trailing dot) that
    continue a local CNAME: those owned by `target` or by a name a kept CNAME leads to.
    Records for other names are left out: appended to our authoritative answer they would
    vouch for them (an upstream's `registry-1.docker.io A` beside an override of it). One
    pass per CNAME out of order, at most as many as the server follows locally."""
    names = {target}
    kept: list[dnslib.RR] = []
    left = list(records)
    for _ in range(MAX_CNAME_CHAIN + 1):
        others = []
        for rr in left:
            if str(rr.rname).rstrip(".").lower() not in names:
                others.append(rr)
                continue
            kept.append(rr)
            if rr.rtype == CNAME:
                names.add(str(rr.rdata.label).rstrip(".").lower())
        if len(others) == len(left):
            break
        left = others
    return kept


def _wire_size(rrset: RRSet) -> int:
    """The RDATA octets of `rrset` (its records' fixed parts depend only on their count)."""
    size = 0
    for rdata in rrset.rdatas:
        buffer = dnslib.DNSBuffer()
        rdata.pack(buffer)
        size += len(buffer.data) + ANSWER_RR_OVERHEAD
    return size


def _add(reply: dnslib.DNSRecord, owner: dnslib.DNSLabel, rrset: RRSet) -> None:
    for rdata in rrset.rdatas:
        reply.add_answer(dnslib.RR(owner, rrset.rtype, rdata=rdata, ttl=rrset.ttl))


def minimal_any(request: dnslib.DNSRecord) -> dnslib.DNSRecord:
    """RFC 8482 section 4.2: ANY for a forwarded name gets a synthesized HINFO, not a lookup."""
    reply = new_reply(request)
    hinfo = dnslib.RD(b"\x07RFC8482\x00")
    reply.add_answer(dnslib.RR(request.q.qname, HINFO, rdata=hinfo, ttl=3600))
    return reply


def pack(
    reply: dnslib.DNSRecord,
    edns: ClientEdns,
    our_udp_size: int,
    limit: int,
    options: Sequence[dnslib.EDNSOption] = (),
) -> bytes:
    """Wire bytes with our OPT (and `options`) when the client sent one; over `limit`
    bytes -> TC, no records.

    `limit` is the client's UDP size for UDP and 65535 for TCP.
    """
    if edns.present:
        reply.ar = [rr for rr in reply.ar if rr.rtype != OPT]
        flags = "do" if edns.do else ""
        reply.add_ar(dnslib.EDNS0(udp_len=our_udp_size, flags=flags, opts=list(options)))
    packed: bytes = reply.pack()
    if len(packed) <= limit:
        return packed
    reply.header.tc = 1
    reply.rr = []
    reply.auth = []
    reply.ar = [rr for rr in reply.ar if rr.rtype == OPT]
    truncated: bytes = reply.pack()
    return truncated
