"""DNS protocol numbers, each named once: the message layout and its flag bits (RFC 1035
4.1), the record types and codes the server uses, EDNS and its COOKIE option (RFC 6891,
7873), and the wire limits. Every module of `dns/` takes them from here (the zone
loader too: it is the one module a subpackage of `dns/` may import from above).
Imports nothing.
"""

from __future__ import annotations

# The header (RFC 1035 4.1.1): ID, two bytes of flags, four 16-bit counts.
HEADER_SIZE = 12
FLAGS = 2  # QR | OPCODE (4 bits) | AA | TC | RD
FLAGS2 = 3  # RA | Z | AD | CD | RCODE (4 bits)
COUNTS = 4  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT from here, two bytes each
ARCOUNT = 10
# Bits of FLAGS.
QR = 0x80
OPCODE_MASK = 0x78
AA = 0x04
TC = 0x02
RD = 0x01
# Bits of FLAGS2 (AD and CD: RFC 4035 3.2).
RA = 0x80
AD = 0x20
CD = 0x10
RCODE_MASK = 0x0F

# A question is a name and QUESTION_TAIL bytes (QTYPE, QCLASS); a resource record a name
# and RR_FIXED bytes (TYPE, CLASS, TTL at RR_TTL, RDLENGTH), then its data.
QUESTION_TAIL = 4
RR_FIXED = 10
RR_TTL = 4
# A record in an answer whose owner is compressed to a pointer at a name already there.
POINTER_SIZE = 2
ANSWER_RR_OVERHEAD = POINTER_SIZE + RR_FIXED
# An SOA's data: two names (at least the root's byte each) and five 32-bit numbers, the
# last of them MINIMUM (RFC 2308 4: with the SOA's TTL, the negative-caching TTL).
SOA_MIN_RDATA = 22
SOA_MINIMUM_FROM_END = 4

# Response codes.
NOERROR = 0
FORMERR = 1
SERVFAIL = 2
NXDOMAIN = 3
NOTIMP = 4
REFUSED = 5

# Record types and the class the server answers.
NS = 2
CNAME = 5
SOA = 6
PTR = 12
HINFO = 13
MX = 15
SRV = 33
DNAME = 39
OPT = 41
IXFR = 251
AXFR = 252
ANY = 255
CLASS_IN = 1

# The OPT pseudo-record (RFC 6891 6.1.2), offsets from its first byte: the root owner,
# TYPE, CLASS = the sender's UDP size, TTL = extended RCODE, version and flags (DO), and
# RDLENGTH; its options follow.
OPT_TYPE = 1
OPT_UDP_SIZE = 3
OPT_EXTENDED_RCODE = 5
OPT_VERSION = 6
OPT_FLAGS = 7
OPT_RDLENGTH = 9
OPT_SIZE = 11  # without options
DO = 0x80  # in the byte at OPT_FLAGS
# EDNS option codes, and the COOKIE option's lengths (RFC 7873 4): an 8-byte client
# cookie, optionally followed by an 8 to 32-byte server cookie.
COOKIE = 10
CLIENT_COOKIE_SIZE = 8
SERVER_COOKIE_SIZES = range(8, 33)
OPTION_HEADER = 4  # an option's code and length, before its data
MAX_COOKIE_OPTION = OPTION_HEADER + CLIENT_COOKIE_SIZE + SERVER_COOKIE_SIZES[-1]

# Limits (RFC 1035 2.3.4, 4.2.2; RFC 2181 8).
MAX_NAME = 255  # octets of a name on the wire
MAX_LABEL = 63
MAX_NAME_TEXT = 253  # characters of a name as text, without the trailing dot
MAX_MESSAGE = 65535  # a message over TCP (its two-byte length), and a record's data
MAX_RDATA = 65535
PLAIN_UDP_SIZE = 512  # a UDP reply to a client without EDNS
MAX_TTL = 2**31 - 1
MAX_CHARACTER_STRING = 255  # a TXT record's text is a sequence of these, each with its length

# How many names the server visits for one answer following CNAMEs (dns/answer.py): the
# queried name and the targets of up to 7 more CNAMEs (8 CNAMEs when the last target is
# resolved upstream). Not the protocol's, the server's; zones are checked against it.
MAX_CNAME_CHAIN = 8
