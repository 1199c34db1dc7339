"""Response rate limiting (RRL) for UDP: how many replies a client network gets per second.

A UDP query's source address can be forged, so a server that answers everything
reflects whatever it is sent at whoever is named as the source, larger than it came in.
Like BIND's RRL and unbound's `ip-ratelimit`, replies to one client prefix (/24 for
IPv4, /56 for IPv6 by default) are limited to `rate` per second, with bursts up to one
second's worth (a token bucket). Over the limit every `slip`th reply is an empty one
with TC set — never larger than the query, and a real client retries over TCP, whose
handshake proves its address, so it is still answered — and the others are dropped.

Never limited: TCP, clients that return a valid server cookie (RFC 7873: their address
is proven), and the `exempt` networks (loopback by default: no outside host can forge a
loopback source). The resolver calls `check` for every UDP reply, on the fast path too,
so it is a dict lookup and a little arithmetic. Memory is bounded: at most `MAX_TRACKED`
prefixes and as many remembered client addresses.

With `workers: N` each process has its own limiter, enforcing `rate / N` (bursts of as
much, at least one reply): the kernel spreads datagrams over the processes by a hash of
source address and port, so a flood with forged sources from many ports reaches each
process about equally and the limit holds in aggregate. A client sending from a single
port reaches one process only, and gets `rate / N` replies a second before it is
limited.
"""

from __future__ import annotations

import ipaddress

from dnsoverride.dns.acl import client_address
from dnsoverride.dns.config import RateLimitConfig

SEND = 0
TRUNCATE = 1
DROP = 2
MAX_TRACKED = 65536


class _Bucket:
    __slots__ = ("limited", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.limited = 0  # replies over the limit so far, for the slip count


_UNKNOWN = _Bucket(0.0, 0.0)  # `_by_host` default: an address not classified yet


class RateLimiter:
    """Token buckets per client prefix; `check` says what to do with one reply. The
    caller counts what it did in `dropped` and `truncated` (a client may turn out to be
    exempt after all: a valid cookie)."""

    def __init__(self, config: RateLimitConfig, share: int = 1) -> None:
        """`share`: the number of processes the limit is shared by (`workers`)."""
        self.dropped = 0
        self.truncated = 0
        self._share = share
        self.configure(config)

    def configure(self, config: RateLimitConfig) -> None:
        """Apply a (reloaded) configuration; buckets start afresh."""
        self.config = config
        self._rate = config.rate / self._share
        self._burst = max(self._rate, 1.0)  # a bucket's capacity: at least one reply
        self._exempt = tuple(config.exempt)
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._by_host: dict[str, _Bucket | None] = {}

    def check(self, host: str, now: float) -> int:
        """SEND, TRUNCATE or DROP for one reply to `host` at loop time `now`."""
        bucket = self._by_host.get(host, _UNKNOWN)
        if bucket is _UNKNOWN:
            bucket = self._classify(host, now)
        if bucket is None:
            return SEND
        tokens = bucket.tokens + (now - bucket.stamp) * self._rate
        bucket.stamp = now
        if tokens >= 1.0:
            burst = self._burst
            bucket.tokens = (burst if tokens > burst else tokens) - 1.0
            return SEND
        bucket.tokens = tokens
        bucket.limited += 1
        slip = self.config.slip
        return TRUNCATE if slip and bucket.limited % slip == 0 else DROP

    def never_limits(self, host: str) -> bool:
        """Whether replies to `host` are never limited (exempt, or the limit is off), as
        far as `check` has classified it."""
        return self._by_host.get(host, _UNKNOWN) is None

    def _classify(self, host: str, now: float) -> _Bucket | None:
        """The bucket of `host`'s prefix (None: never limited), remembered per address."""
        if len(self._by_host) >= MAX_TRACKED:
            self._by_host.clear()
        try:
            address = client_address(host)
        except ValueError:
            address = None
        bucket: _Bucket | None = None
        if address is not None and self._rate > 0 and not self._exempted(address):
            bits = 32 if address.version == 4 else 128
            length = self.config.ipv4_prefix if address.version == 4 else self.config.ipv6_prefix
            prefix = (address.version, int(address) >> (bits - length))
            bucket = self._buckets.get(prefix)
            if bucket is None:
                if len(self._buckets) >= MAX_TRACKED:
                    self._forget_idle(now)
                bucket = self._buckets[prefix] = _Bucket(self._burst, now)
        self._by_host[host] = bucket
        return bucket

    def _exempted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self._exempt)

    def _forget_idle(self, now: float) -> None:
        """Drop the buckets that have refilled (as good as new); all of them if that
        frees nothing (a flood from more prefixes than we track: each gets a fresh one)."""
        full = [
            prefix
            for prefix, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.stamp) * self._rate >= self._burst
        ]
        for prefix in full:
            del self._buckets[prefix]
        if not full:
            self._buckets.clear()
        self._by_host.clear()  # addresses may point at buckets just dropped
