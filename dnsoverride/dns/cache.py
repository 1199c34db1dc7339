"""The two caches of the resolver.

`ResponseCache` holds upstream answers by question (name, type, class, DO, CD): TTLs
clamped to the configured bounds, negative answers cached for the SOA's negative TTL
(RFC 2308), entries kept past expiry for serve-stale (RFC 8767), bounded by LRU.

Both are bounded in entries (`cache.size`) and in bytes of replies (`cache.max_bytes`,
the answer cache per view): an answer may take 64 KiB, and anyone who runs a domain
chooses how big its answers are.

`AnswerCache` is the hot path: finished reply bytes keyed by the view and the raw
question key from `wire.fast_key`. A hit costs a dict lookup and a few byte slices: the
client's ID and question (in its case) are spliced in, and forwarded answers have their
TTLs aged. Entries carry the zone generation they were built under, so swapping the zone
set invalidates them all without a scan.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import NamedTuple

from dnsoverride.dns import relay, wire
from dnsoverride.dns.config import CacheConfig
from dnsoverride.dns.constants import MAX_MESSAGE, NOERROR, NXDOMAIN, PLAIN_UDP_SIZE
from dnsoverride.dns.relay import Question

# The largest reply whose tail with a client's cookie is remembered (most answers): the
# copy is memory `cache.max_bytes` does not count, and for a bigger reply one
# concatenation is a small part of copying it out.
COOKIE_TAIL_REPLY = PLAIN_UDP_SIZE
# RFC 8767 section 4: stale records go out with a TTL above 0, recommended 30 seconds.
STALE_TTL = 30
# ... but the answer cache reuses a stale reply for only `cache.stale_reuse` seconds.


class _Response(NamedTuple):
    """A cached upstream reply (a tuple of atomic values: not tracked by the GC)."""

    reply: relay.Reply
    stored_at: float
    ttl: int


class ResponseCache:
    """Upstream answers by question, with TTL clamps, negative caching and serve-stale."""

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self._entries: OrderedDict[Question, _Response] = OrderedDict()
        self._bytes = 0  # of the replies kept
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def cache_ttl(self, reply: relay.Reply) -> int:
        """How long `reply` may be cached (0: not at all)."""
        rcode = reply.rcode
        if rcode == NXDOMAIN or (rcode == NOERROR and not reply.answers):
            if reply.negative_ttl is None:
                return 0  # RFC 2308 section 5: no SOA, no negative caching
            ttl = reply.negative_ttl
            return max(min(ttl, self.config.negative_max_ttl), self.config.min_ttl)
        if rcode != NOERROR or reply.min_ttl is None:
            return 0
        return max(min(reply.min_ttl, self.config.max_ttl), self.config.min_ttl)

    def put(self, key: Question, reply: relay.Reply, now: float) -> int:
        """Store an upstream reply; returns the TTL it was cached for (0: not cached)."""
        ttl = self.cache_ttl(reply)
        if ttl <= 0:
            return 0
        old = self._entries.get(key)
        if old is not None:
            self._bytes -= len(old.reply.wire)
        self._entries[key] = _Response(reply, now, ttl)
        self._entries.move_to_end(key)
        self._bytes += len(reply.wire)
        while len(self._entries) > self.config.size or self._bytes > self.config.max_bytes:
            self._bytes -= len(self._entries.popitem(last=False)[1].reply.wire)
        return ttl

    def get(self, key: Question, now: float) -> tuple[relay.Reply, int] | None:
        """A fresh cached reply with aged TTLs, and the seconds it stays fresh."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        age = int(now - entry.stored_at)
        if age >= entry.ttl:
            self.misses += 1
            if age >= entry.ttl + self.config.stale_ttl:
                del self._entries[key]
                self._bytes -= len(entry.reply.wire)
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry.reply.retimed(age, entry.ttl), entry.ttl - age

    def get_stale(self, key: Question, now: float) -> relay.Reply | None:
        """An expired reply still inside the serve-stale window, with TTLs of 30 s."""
        entry = self._entries.get(key)
        if entry is None or now - entry.stored_at >= entry.ttl + self.config.stale_ttl:
            return None
        return entry.reply.stale(STALE_TTL)


class _Answer:
    """A finished reply split around the question, so a hit only splices in the client's."""

    __slots__ = (
        "base",
        "cookie_rdata",
        "cookie_room",
        "cookie_tail",
        "counter",
        "expires",
        "generation",
        "head",
        "offsets",
        "open_tail",
        "qend",
        "rendered_age",
        "stored_at",
        "tail",
    )

    def __init__(
        self,
        reply: bytes,
        *,
        qend: int,
        generation: int,
        stored_at: float,
        expires: float,
        offsets: tuple[tuple[int, int], ...],
        counter: list[int],
        bare_opt: bool,
        limit: int,
    ) -> None:
        self.base = reply
        self.head = reply[2:12]
        self.tail = reply[qend:]
        # The tail without the OPT's RDLENGTH, for a hit that adds a COOKIE option, and
        # the longest OPT RDLENGTH and RDATA such a hit may add and stay within the key's
        # size `limit` (ageing TTLs never changes a reply's length); -1: no cookie hits.
        self.open_tail = self.tail[:-2] if bare_opt else b""
        self.cookie_room = limit - len(reply) + 2 if bare_opt else -1
        # The last COOKIE rdata a hit added and the tail with it: a client's cookie
        # verdict is one bytes object for as long as it holds, so while the same
        # client asks again (or only one does), a hit reuses the tail by identity.
        self.cookie_rdata: bytes | None = None
        self.cookie_tail = b""
        self.qend = qend
        self.generation = generation
        self.stored_at = stored_at
        self.expires = expires
        self.offsets = offsets
        self.rendered_age = 0
        self.counter = counter


class AnswerCache:
    """Finished UDP reply bytes by view and question key (`wire.fast_key`); the fast path.

    One dict per view, each bounded to `size` entries and `max_bytes` bytes of replies;
    the oldest insertion goes first
    (hits do not reorder: the fast path stays a plain dict lookup; `ResponseCache` is
    the LRU that keeps upstream data). The insertion order is kept in a deque beside
    the dict: `next(iter(dict))` after many deletions walks every deleted slot at the
    front (measured 28 us per eviction at 100,000 entries, growing with the size).
    """

    def __init__(
        self, size: int, views: int, udp_size: int, max_bytes: int = CacheConfig.max_bytes
    ) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self._bare_opts = wire.bare_opts(udp_size)
        self._views: list[dict[bytes, _Answer]] = [{} for _ in range(views)]
        self._order: list[deque[tuple[bytes, _Answer]]] = [deque() for _ in range(views)]
        self._bytes = [0] * views  # of the replies each view keeps
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._views)

    def grow(self, views: int) -> None:
        """Room for `views` views (a config reload added some). Never shrinks: a reply
        still being resolved may be stored under an index of the old view table; its
        generation is stale by then, so it is never served."""
        self._views.extend({} for _ in range(views - len(self._views)))
        self._order.extend(deque() for _ in range(views - len(self._order)))
        self._bytes.extend(0 for _ in range(views - len(self._bytes)))

    def lookup(
        self,
        view: int,
        key: bytes,
        data: bytes,
        generation: int,
        now: float,
        *,
        cookie: bytes | None = None,
    ) -> bytes | None:
        """The reply for query `data` (counted in its stats cell), or None on a miss.

        `cookie` is our OPT's RDLENGTH and RDATA for a query that sent a COOKIE option
        (cookies.Verdict.rdata): the reply carries it in place of its empty OPT, or it is
        None (a miss) when the cached reply does not end in our OPT without options or
        the option would take it over the key's size limit (its UDP size; 65535 bytes
        over TCP). The room for it is worked out when the reply is stored.
        """
        entry = self._views[view].get(key)
        if entry is None or entry.generation != generation or now >= entry.expires:
            self.misses += 1
            return None
        if entry.offsets:
            age = int(now - entry.stored_at)
            if age != entry.rendered_age:
                entry.tail = wire.aged(entry.base, entry.offsets, age)[entry.qend :]
                if entry.cookie_room >= 0:
                    entry.open_tail = entry.tail[:-2]
                entry.cookie_rdata = None  # its tail has the old TTLs
                entry.rendered_age = age
        if cookie is None:
            tail = entry.tail
        elif cookie is entry.cookie_rdata:
            tail = entry.cookie_tail
        elif len(cookie) <= entry.cookie_room:
            tail = entry.open_tail + cookie
            if len(entry.base) <= COOKIE_TAIL_REPLY:
                entry.cookie_rdata, entry.cookie_tail = cookie, tail
        else:
            self.misses += 1
            return None
        reply = data[:2] + entry.head + data[12 : entry.qend] + tail
        self.hits += 1
        entry.counter[0] += 1
        return reply

    def store(
        self,
        view: int,
        key: bytes,
        reply: bytes,
        *,
        generation: int,
        now: float,
        ttl: float,
        counter: list[int],
        age_ttls: bool,
        offsets: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """Keep `reply` for `ttl` seconds (math.inf for local answers: generations guard them).

        `counter` is the stats cell a hit increments (see `DnsStats.cell`); `offsets`, the
        TTL fields of `reply` when the caller knows them (else they are found here).
        """
        qend = wire.key_question_end(key)
        if ttl <= 0 or wire.question_end(reply) != qend:
            return
        if reply[12 : qend - 4].lower() + reply[qend - 4 : qend] != key[4:]:
            return  # not a reply to exactly this question: never splice it onto one
        if not age_ttls:
            offsets = ()
        elif offsets is None:
            offsets = wire.ttl_offsets(reply)
        entries = self._views[view]
        order = self._order[view]
        entry = _Answer(
            reply,
            qend=qend,
            generation=generation,
            stored_at=now,
            expires=now + ttl,
            offsets=offsets,
            counter=counter,
            bare_opt=reply.endswith(self._bare_opts),
            limit=MAX_MESSAGE if key[wire.KEY_FLAGS] & wire.KEY_TCP else wire.key_udp_size(key),
        )
        replaced = entries.get(key)
        if replaced is not None:
            self._bytes[view] -= len(replaced.base)
        entries[key] = entry
        order.append((key, entry))
        self._bytes[view] += len(reply)
        while len(entries) > self.size or self._bytes[view] > self.max_bytes:
            old_key, old = order.popleft()
            if entries.get(old_key) is old:
                del entries[old_key]
                self._bytes[view] -= len(old.base)
        if len(order) > 2 * self.size:
            # Keys stored again left their old places behind: keep the deque bounded.
            order.clear()
            order.extend(entries.items())
