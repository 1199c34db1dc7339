"""DNS cookies (RFC 7873), the server side: the COOKIE option of our replies.

A client that sends a client cookie gets it back with a server cookie in the layout of
RFC 9018 (version 1, reserved, timestamp, hash). The hash is a keyed BLAKE2b-64 rather
than RFC 9018's SipHash-2-4 (not in the standard library), which only matters for
anycast fleets sharing one secret; the secret here is random per process. A valid
server cookie younger than half an hour is echoed unchanged (RFC 9018 section 4.3),
anything else gets a fresh one. Cookies are never required: a query without one, or
with a wrong one, is answered normally (RFC 7873 5.2.3/5.2.4 allow that), so this
never breaks a client; malformed COOKIE options get FORMERR (the caller's job).
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import struct
import time
from collections.abc import Callable

from dnsoverride.dns import wire
from dnsoverride.dns.constants import CLIENT_COOKIE_SIZE, COOKIE

_VERSION_RESERVED = b"\x01\x00\x00\x00"
_FRESH = 1800  # seconds a server cookie is echoed before a new one is made
_FUTURE = 300  # seconds of clock skew a timestamp may be ahead


class Cookies:
    """Makes and checks server cookies with one secret."""

    def __init__(self, secret: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret or secrets.token_bytes(16)
        self._clock = clock

    def reply_option(self, option: bytes, host: str) -> bytes:
        """The COOKIE option data for our reply to a query that sent `option`."""
        if self.valid(option, host):
            return option
        client = option[:CLIENT_COOKIE_SIZE]
        head = _VERSION_RESERVED + struct.pack("!I", int(self._clock()) & 0xFFFFFFFF)
        return client + head + self._hash(client, head, host)

    def valid(self, option: bytes, host: str) -> bool:
        """Whether `option` (a query's COOKIE data) holds a server cookie we made for
        `host` within the last half hour: the client has proven its address."""
        if len(option) != CLIENT_COOKIE_SIZE + 16 or option[8:12] != _VERSION_RESERVED:
            return False
        (stamp,) = struct.unpack_from("!I", option, 12)
        age = (int(self._clock()) - stamp) % (1 << 32)  # serial arithmetic: the stamp wraps
        if not (age < _FRESH or (1 << 32) - age <= _FUTURE):
            return False
        return secrets.compare_digest(
            option[16:], self._hash(option[:CLIENT_COOKIE_SIZE], option[8:16], host)
        )

    def _hash(self, client: bytes, head: bytes, host: str) -> bytes:
        digest = hashlib.blake2b(client + head + _address(host), digest_size=8, key=self._secret)
        return digest.digest()

    def add_to_hit(
        self, reply: bytes, query: bytes, options_at: int, host: str, limit: int
    ) -> bytes | None:
        """A cached `reply` with our COOKIE option when `query` sent one; None when the
        result would not fit `limit` (the slow path then truncates properly)."""
        option = wire.find_option(query, options_at, COOKIE)
        if option is None:
            return reply
        if not wire.ends_with_bare_opt(reply):
            return None  # not ending in an OPT without options: let dnslib build it
        reply = wire.with_option(reply, COOKIE, self.reply_option(option, host))
        return reply if len(reply) <= limit else None


def _address(host: str) -> bytes:
    """The client address as bytes (RFC 9018 hashes the packed address)."""
    address = host.partition("%")[0]  # an IPv6 zone is not part of the address
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except OSError:
        return address.encode()
