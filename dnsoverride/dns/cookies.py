"""DNS cookies (RFC 7873), the server side: the COOKIE option of our replies.

A client that sends a client cookie gets it back with a server cookie in the layout of
RFC 9018 (version 1, reserved, timestamp, hash). The hash is a keyed BLAKE2b-64 rather
than RFC 9018's SipHash-2-4 (not in the standard library), which only matters for
anycast fleets sharing one secret; the secret here is random per `serve` (its worker
processes get the supervisor's). A server cookie is valid for an hour after its
timestamp (and up to 5 minutes before it: clock skew); one younger than half an hour is
echoed unchanged, an older valid one is replaced by a fresh one though it still counts
as valid (RFC 9018 section 4.3), and anything else gets a fresh one.
Cookies are never required: a query without one, or with a wrong one, is answered
normally (RFC 7873 5.2.3/5.2.4 allow that), so this never breaks a client; malformed
COOKIE options get FORMERR (the caller's job).

A stub resolver sends the same cookie with every query for as long as it stays valid,
so the verdict on a (client address, COOKIE option) pair is remembered until the
cookie's validity ends: the keyed hash then runs once per client and cookie, not once
per query. The memo is keyed by the option's bytes alone (the very bytes object the
query-key memo keeps, its hash computed once), and a verdict names the address it was
made for: another address sending the same bytes never gets it (it gets its own
verdict, which takes the slot; a client cookie is random per client, so only a replay
shares one). The memo is bounded (cleared when full, like the resolver's other memos).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from dnsoverride.dns.constants import CLIENT_COOKIE_SIZE, COOKIE, OPTION_HEADER

_VERSION_RESERVED = b"\x01\x00\x00\x00"
_FRESH = 1800  # seconds a server cookie is echoed before a new one is made ...
_VALID = 3600  # ... and valid (RFC 9018 4.3: the client may not have switched yet)
_FUTURE = 300  # seconds of clock skew a timestamp may be ahead
# How long a fresh server cookie made for a (client, option) pair is handed out again
# to the same pair: well inside its validity, so a client echoing it is never refused.
_REISSUE = 60
MEMO_SIZE = 16384  # verdicts, one per COOKIE option; each about 300 bytes
_SERVER_COOKIE = CLIENT_COOKIE_SIZE + 16  # RFC 9018: client cookie + 16-byte server cookie
_STAMP = struct.Struct("!I")
_OPTION_HEAD = struct.Struct("!HHH")  # OPT RDLENGTH, then the option's code and length


class Verdict(NamedTuple):
    """What a query's COOKIE option earns, from `since` to `until` (the caller's
    monotonic clock, the event loop's)."""

    valid: bool  # a server cookie we made for this client, still fresh
    rdata: bytes  # our reply's OPT RDLENGTH and RDATA: the COOKIE option to send back
    since: float
    until: float
    host: str  # the client it holds for


class Cookies:
    """Makes and checks server cookies with one secret; remembers its verdicts.

    Timestamps in cookies are wall-clock seconds (`clock`, RFC 9018); the memo runs on
    the monotonic time each caller passes as `now` (a wall-clock step never stretches a
    verdict past the cookie's validity).
    """

    def __init__(
        self,
        secret: bytes | None = None,
        clock: Callable[[], float] = time.time,
        memo_size: int = MEMO_SIZE,
    ) -> None:
        self._secret = secret or os.urandom(16)
        self._clock = clock
        # The memo, by COOKIE option bytes. The fast path reads it directly (a verdict
        # holds for `host` from `since` until `until`); only `verdict` writes it.
        self.verdicts: dict[bytes, Verdict] = {}
        self._memo_size = memo_size

    def __len__(self) -> int:
        return len(self.verdicts)  # verdicts remembered

    def verdict(self, option: bytes, host: str, now: float) -> Verdict:
        """The verdict on `option` (a query's COOKIE data) from `host`, remembered."""
        known = self.verdicts.get(option)
        if known is not None and known.host == host and known.since <= now < known.until:
            return known
        stamp = int(self._clock())
        age = self._age(option, stamp)
        if age is not None and not self._hash_ok(option, host):
            age = None
        if age is not None and age < _FRESH:
            reply, lasts = option, _FRESH - age
        else:
            client = option[:CLIENT_COOKIE_SIZE]
            head = _VERSION_RESERVED + _STAMP.pack(stamp & 0xFFFFFFFF)
            reply = client + head + self._hash(client, head, host)
            # A valid cookie past its half hour stays valid (the client has not seen the
            # fresh one yet) only as long as the old one would.
            lasts = _REISSUE if age is None else min(_REISSUE, _VALID - age)
        rdata = _OPTION_HEAD.pack(OPTION_HEADER + len(reply), COOKIE, len(reply)) + reply
        # One second less: `stamp` was rounded down, the clocks are read apart.
        verdict = Verdict(age is not None, rdata, now, now + lasts - 1, host)
        if len(self.verdicts) >= self._memo_size:
            self.verdicts.clear()
        self.verdicts[option] = verdict
        return verdict

    def reply_option(self, option: bytes, host: str, now: float) -> bytes:
        """The COOKIE option data for our reply to a query that sent `option`."""
        return self.verdict(option, host, now).rdata[_OPTION_HEAD.size :]

    def valid(self, option: bytes, host: str, now: float) -> bool:
        """Whether `option` (a query's COOKIE data) holds a server cookie we made for
        `host` within the last hour: the client has proven its address."""
        return self.verdict(option, host, now).valid

    def _age(self, option: bytes, now: int) -> int | None:
        """The age in seconds of the server cookie in `option` when it has our layout and
        is within its validity (a timestamp up to `_FUTURE` seconds ahead counts as age 0);
        else None."""
        if len(option) != _SERVER_COOKIE or option[8:12] != _VERSION_RESERVED:
            return None
        stamp = int.from_bytes(option[12:16], "big")
        age = (now - stamp) % (1 << 32)  # serial arithmetic: the stamp wraps
        if age < _VALID:
            return age
        if (1 << 32) - age <= _FUTURE:
            return 0
        return None

    def _hash_ok(self, option: bytes, host: str) -> bool:
        expected = self._hash(option[:CLIENT_COOKIE_SIZE], option[8:16], host)
        return hmac.compare_digest(option[16:], expected)

    def _hash(self, client: bytes, head: bytes, host: str) -> bytes:
        digest = hashlib.blake2b(client + head + _address(host), digest_size=8, key=self._secret)
        return digest.digest()


def _address(host: str) -> bytes:
    """The client address as bytes (RFC 9018 hashes the packed address)."""
    address = host.partition("%")[0]  # an IPv6 zone is not part of the address
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except OSError:
        return address.encode()
