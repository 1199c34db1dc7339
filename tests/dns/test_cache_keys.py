"""Answer-cache keys: the name is compared case-insensitively, the type and class exactly.

Reproduces issue 10 item 4: `wire.fast_key` lowercased the QTYPE/QCLASS bytes with the
name, so QTYPEs 65-90 collided with 97-122 (HTTPS with TYPE97, SPF 99 with 67): after a
TYPE97 query, HTTPS queries for that name got the TYPE97 answer, from everyone. Both
tests fail on the code before the fix.
"""

from __future__ import annotations

import struct
from pathlib import Path

import dns.rdatatype
import pytest

from dnsoverride.dns import wire
from tests.support.peers import dnsmasq, dnsoverride_serve

NAME = b"\x03www\x07Example\x04test\x00"


def _query(qtype: int, qclass: int = 1, *, edns: bool = False) -> bytes:
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 1 if edns else 0)
    opt = b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00" if edns else b""
    return header + NAME + struct.pack("!HH", qtype, qclass) + opt


def test_every_qtype_pair_differing_in_bit_0x20_has_its_own_key() -> None:
    for edns in (False, True):
        keys = {}
        for qtype in range(65536):
            key = wire.fast_key(_query(qtype, edns=edns), 1232)
            assert key is not None
            keys[qtype] = key
        for qtype in range(65536):
            for bit in (0x0020, 0x2000):  # bit 0x20 of the low and of the high byte
                assert keys[qtype] != keys[qtype ^ bit], (qtype, qtype ^ bit, edns)
        assert len(set(keys.values())) == 65536
    # The class bytes are exact too (CH is 3, 0x23 is not CH).
    assert wire.fast_key(_query(1, 0x0003), 1232) != wire.fast_key(_query(1, 0x0023), 1232)
    # ... while the name still matches in any case.
    upper = _query(1).replace(b"Example", b"EXAMPLE")
    assert wire.fast_key(upper, 1232) == wire.fast_key(_query(1), 1232)


@pytest.mark.e2e
def test_a_type97_answer_is_never_served_for_https(tmp_path: Path) -> None:
    """The attack: ask TYPE97 first, then every client asking HTTPS got TYPE97's answer."""
    zones = tmp_path / "zones"
    zones.mkdir()
    records = {
        65: "000100",  # HTTPS: priority 1, target ".", no parameters
        97: "c0ffee",
        67: "0a0b0c",
        99: "0474657374",  # SPF "test"
    }
    options = [f"--dns-rr=www.example.test,{rtype},{data}" for rtype, data in records.items()]
    with (
        dnsmasq(tmp_path, *options, "--local-ttl=300") as upstream,
        dnsoverride_serve(tmp_path, zones, [upstream.address]) as server,
    ):
        for first, second in ((97, 65), (67, 99)):
            for tcp in (False, True):
                for rtype in (first, second):  # cached under its own key, asked again
                    for _ in range(2):
                        reply = server.query(
                            "WWW.example.test",
                            dns.rdatatype.to_text(dns.rdatatype.RdataType(rtype)),
                            tcp=tcp,
                        )
                        (rrset,) = reply.answer
                        assert rrset.rdtype == rtype, (rtype, rrset)
                        direct = upstream.query(
                            "www.example.test",
                            dns.rdatatype.to_text(dns.rdatatype.RdataType(rtype)),
                        )
                        assert rrset == direct.answer[0]
