"""The query pipeline, declared in one place:

    ACL -> view -> answer cache (fast path) -> overrides -> response cache -> forwarder
                                                                  (serve-stale on failure)
    ... -> response rate limiting (UDP replies)

`fast` is the synchronous hot path: a hand-parsed question, one dict lookup, bytes out.
`resolve` is everything else. An ordinary query for a name no override answers (the
cold miss of a forwarding server) stays in bytes too (`_forward_plain`: relay.py builds
both our upstream query and the client's reply); anything else is parsed with dnslib
(FORMERR on garbage), answered locally or forwarded, packed (EDNS, truncation). Either
way the reply is counted and remembered for `fast`. Nothing a client sends reaches the
log as a traceback: a malformed query is FORMERR, an unexpected error SERVFAIL, each
counted in a metric and logged as one throttled line.
"""

from __future__ import annotations

import asyncio
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import dnslib
import structlog

from dnsoverride.dns import answer, ratelimit, relay, wire
from dnsoverride.dns.acl import Acl, client_address
from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.config import ServeConfig, View
from dnsoverride.dns.constants import (
    AD,
    ANY,
    AXFR,
    CD,
    CLASS_IN,
    COOKIE,
    DO,
    FLAGS,
    FORMERR,
    HEADER_SIZE,
    IXFR,
    MAX_MESSAGE,
    MAX_NAME,
    NOTIMP,
    PLAIN_UDP_SIZE,
    RD,
    REFUSED,
    SERVFAIL,
)
from dnsoverride.dns.cookies import Cookies
from dnsoverride.dns.forwarder import Forwarder, UpstreamFailedError
from dnsoverride.dns.logthrottle import ThrottledLog
from dnsoverride.dns.ratelimit import RateLimiter
from dnsoverride.dns.relay import Question
from dnsoverride.dns.stats import DnsStats, qtype_label, rcode_label
from dnsoverride.dns.views import Routing, ViewTable
from dnsoverride.dns.zones.live import LiveZones

log = structlog.get_logger(__name__)

NOT_ALLOWED = -1  # the "view" of a client outside `allow`: it gets REFUSED
MAX_CLIENTS_CACHED = 65536
ZONE_TRANSFERS = (IXFR, AXFR)
# Types the plain forwarding path leaves to the parsed one: answered here, never forwarded.
_NOT_PLAIN = frozenset((ANY, *ZONE_TRANSFERS))
# Refused clients are counted without their query type: the label set stays bounded.
_REFUSED_LABELS = ("", "", "REFUSED", "error")
_PARSE_ERRORS = (dnslib.DNSError, ValueError, struct.error, IndexError, UnicodeError)


@dataclass
class _Outcome:
    """An answer before packing: `render(options)` gives its bytes with those EDNS
    options in our OPT (the answer cache keeps the one without the client's cookie)."""

    render: Callable[[list[dnslib.EDNSOption]], bytes]
    rcode: int
    source: str
    cache_for: float  # seconds the finished reply may be served by the fast path
    ages: bool  # whether its TTLs count down (forwarded data) or are fixed (local)
    edns: answer.ClientEdns  # the client's, for its cookie
    ttl_offsets: tuple[tuple[int, int], ...] | None = None  # known where its TTLs are


class _Asked(NamedTuple):
    """What the client asked and how its reply must look, from either path."""

    query_id: bytes
    rd: int
    cd: bool
    ad: bool  # the client set AD
    question: bytes  # wire format, the client's letter case
    edns: answer.ClientEdns
    limit: int  # reply size limit: the client's UDP size, or 65,535 over TCP


# The EDNS of a query without an OPT record (most of them): made once.
_NO_EDNS = answer.ClientEdns(False, PLAIN_UDP_SIZE, False)
# A forwarded answer: (the upstream's reply, seconds it may be reused, source).
_Forwarded = tuple[relay.Reply, float, str]


class _Where(NamedTuple):
    """Who asked what, and under which routing: what an answer is counted and cached by."""

    tcp: bool
    host: str
    view_index: int
    view: View
    generation: int  # of the zones the answer was made from
    qname: bytes  # wire format, lowercase
    qtype: int


class _Miss(NamedTuple):
    """A UDP query `Resolver.miss` took: what its reply is made from and sent with."""

    data: bytes
    addr: Any
    send: Callable[[bytes, Any], object]
    known: wire.QueryKey
    asked: _Asked
    where: _Where


class Resolver:
    """Answers one query at a time; shared by the UDP and TCP listeners."""

    def __init__(
        self,
        config: ServeConfig,
        zones: LiveZones,
        forwarder: Forwarder,
        stats: DnsStats,
        *,
        cookie_secret: bytes | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`cookie_secret` signs server cookies (shared by every worker; a fresh one
        unless given). `clock` tells the caches', the cookies' and the rate limit's time,
        in seconds: the event loop's monotonic clock unless given (tests age cached
        answers with their own)."""
        self.zones = zones
        self.forwarder = forwarder
        self.stats = stats
        self.answers = AnswerCache(
            config.cache.size, len(config.views), config.edns_udp_size, config.cache.max_bytes
        )
        self.responses = ResponseCache(config.cache)
        self.ratelimit = RateLimiter(config.ratelimit, share=config.workers)
        self._acl = Acl(config.allow)
        self._views = ViewTable(config.views, config.default_view)
        self._udp_size = config.edns_udp_size
        self._query_log = config.query_log
        self._stale_reuse = config.cache.stale_reuse
        self._clients: dict[str, int] = {}
        self._unlimited: set[str] = set()  # clients the rate limit never applies to
        self._answering: dict[tuple[int, bytes], asyncio.Future[None]] = {}
        self._loop = asyncio.get_running_loop()
        self._now = clock or self._loop.time
        self.cookies = Cookies(cookie_secret)
        self._keys = wire.QueryKeys(self._udp_size)
        self._malformed_log = ThrottledLog("query_malformed", config.failure_log_interval)
        self._failed_log = ThrottledLog("query_failed", config.failure_log_interval)

    def route(self, routing: Routing) -> None:
        """Serve with a reloaded ACL, view table and rate limit. Call it in the same step (on
        the loop thread) as the swap of `routing.zone_set` into `zones`: that swap's new
        generation retires every cached answer, and the client -> view memo is started
        afresh."""
        self._acl, self._views, self._clients = routing.acl, routing.views, {}
        self.answers.grow(len(routing.views.views))
        if routing.ratelimit != self.ratelimit.config:
            self.ratelimit.configure(routing.ratelimit)
            self._unlimited = set()

    def _classify(self, host: str) -> int:
        """The client's view index, or NOT_ALLOWED (it gets REFUSED); remembered per address."""
        index = self._clients.get(host)
        if index is not None:
            return index
        try:
            address = client_address(host)
        except ValueError:
            return NOT_ALLOWED
        if not self._acl.allows(address):
            index = NOT_ALLOWED
        else:
            index = self._views.views.index(self._views.view_for(address))
        if len(self._clients) >= MAX_CLIENTS_CACHED:
            self._clients.clear()
        self._clients[host] = index
        return index

    def fast(self, data: bytes, host: str, tcp: bool = False) -> bytes | None:
        """The reply from the answer cache (or REFUSED), b"" to drop the query (rate
        limited), or None to take `resolve`."""
        # The key memo read here, not through a call (this runs per query); `_keys`
        # makes and remembers the keys of queries it has not seen.
        known = self._keys.known.get(data[FLAGS:])
        if known is None:
            known = self._keys(data)
            if known is None:
                return None
        index = self._clients.get(host)
        if index is None:
            index = self._classify(host)
        now = self._now()
        reply = self._hit(data, known, host, index, now, tcp=tcp)
        if reply is None or tcp or host in self._unlimited:
            return reply
        return self._rate_limited(reply, data, known, host, now)

    def _hit(
        self, data: bytes, known: wire.QueryKey, host: str, index: int, now: float, *, tcp: bool
    ) -> bytes | None:
        """The answer cache's reply (or REFUSED) to `data`, counted, or None."""
        key, tcp_key, cookie = known
        rdata = None
        if cookie is not None:
            # The cookie's remembered verdict, read here rather than through a call (this
            # runs per query): it must be this client's and hold now (host, since, until).
            verdict = self.cookies.verdicts.get(cookie)
            if verdict is not None and verdict[4] == host and verdict[2] <= now < verdict[3]:
                rdata = verdict[1]
            else:
                rdata = self.cookies.verdict(cookie, host, now).rdata
        reply: bytes | None
        if index == NOT_ALLOWED:
            reply = wire.refused(data, key, self._udp_size)
            if rdata is not None:  # fits any UDP size: a question, an OPT and a cookie
                reply = reply[:-2] + rdata  # it ends in our OPT without options
        else:
            generation = self.zones.state[1]
            cache_key = tcp_key if tcp else key
            # None also when our cookie would take the reply over the client's size: the
            # slow path truncates it properly (and counts it).
            reply = self.answers.lookup(index, cache_key, data, generation, now, cookie=rdata)
            if reply is None:
                return None
        if index == NOT_ALLOWED:
            self.stats.count(_REFUSED_LABELS)
        elif self._query_log:
            log.info(
                "query",
                client=host,
                view=self._views.views[index].name,
                name=_display(wire.key_name(key)),
                qtype=qtype_label(wire.key_qtype(key)),
                rcode=rcode_label(reply[3] & 0x0F),
                source="answer_cache",
            )
        return reply

    def _rate_limited(
        self, reply: bytes, data: bytes, known: wire.QueryKey | None, host: str, now: float
    ) -> bytes:
        """`reply`, an empty TC reply, or b"" (drop): response rate limiting of UDP."""
        verdict = self.ratelimit.check(host, now)
        if verdict == ratelimit.SEND:
            if self.ratelimit.never_limits(host) and len(self._unlimited) < MAX_CLIENTS_CACHED:
                self._unlimited.add(host)  # the fast path skips the limiter for it
            return reply
        cookie = None if known is None else known.cookie
        if cookie is not None and self.cookies.valid(cookie, host, now):
            return reply  # the client proved its address with our cookie
        if verdict == ratelimit.TRUNCATE and known is not None:
            self.ratelimit.truncated += 1
            return wire.truncated(data, known.udp, self._udp_size)
        self.ratelimit.dropped += 1
        return b""

    async def resolve(self, data: bytes, host: str, tcp: bool) -> bytes | None:
        """The reply to any query, or None when it must be dropped (not even a header, a
        response, or rate limited)."""
        known: wire.QueryKey | None = None
        try:
            known = self._keys(data)
            reply = await self._resolve(data, known, host, tcp)
        except Exception as error:  # a bug must cost one answer (and one log line a while)
            reply = self._internal_error(data, host, error)
        if reply is None or tcp:
            return reply
        return self._rate_limited(reply, data, known, host, self._now()) or None

    def _internal_error(self, data: bytes, host: str, error: Exception) -> bytes | None:
        self.stats.query_errors["internal"] += 1
        self._failed_log.emit(
            "internal", client=host, error=f"{type(error).__name__}: {str(error)[:200]}"
        )
        return wire.error_reply(data, SERVFAIL)

    def miss(self, data: bytes, addr: Any, send: Callable[[bytes, Any], object]) -> bool:
        """Begin answering a UDP query `fast` did not answer without a task: True when
        taken (`send(reply, addr)` follows, unless the reply is dropped), False to leave
        it to `resolve`. Taken: the cold miss of a forwarding server, an ordinary query
        for a name no override answers, not being answered already, while an upstream
        answers; `resolve` in a task costs some 15 us more of coroutines and futures."""
        known = self._keys(data)
        if known is None or not self.forwarder.answering():
            return False  # with every upstream down, `_forwarded` answers stale at once
        host = addr[0]
        index = self._classify(host)
        herd = (index, known.udp)
        if herd in self._answering:
            return False
        plain = self._plain(data, known, host, index, tcp=False)
        if plain is None:
            return False
        asked, question, where = plain
        miss = _Miss(data, addr, send, known, asked, where)
        cached = self.responses.get(question, self._now())
        if cached is not None:
            self._answer_miss(miss, (*cached, "cache"))
            return True
        pending = self.forwarder.ask(question)
        done = self._loop.create_future()
        self._answering[herd] = done

        def answered(future: asyncio.Future[relay.Reply]) -> None:
            forwarded: _Forwarded | Exception
            try:
                try:
                    forwarded = self._fresh(question, future.result())
                except UpstreamFailedError:
                    forwarded = self._stale(question)
            except Exception as error:  # a bug: as in `resolve`
                forwarded = error
            try:
                self._answer_miss(miss, forwarded)
            finally:
                if self._answering.get(herd) is done:
                    del self._answering[herd]
                done.set_result(None)

        pending.add_done_callback(answered)
        return True

    def _answer_miss(self, miss: _Miss, forwarded: _Forwarded | Exception) -> None:
        """Finish a query `miss` took, with `forwarded` (an exception: a bug, SERVFAIL),
        and send the reply."""
        data, addr, send, known, asked, where = miss
        reply: bytes | None
        try:
            if isinstance(forwarded, Exception):
                raise forwarded
            reply = self._finish(known, self._relayed(asked, *forwarded), where)
        except Exception as error:  # as in `resolve`
            reply = self._internal_error(data, where.host, error)
        if reply is not None and where.host not in self._unlimited:
            reply = self._rate_limited(reply, data, known, where.host, self._now())
        if reply:
            send(reply, addr)

    def in_flight(self) -> list[asyncio.Future[None]]:
        """One future per distinct query being answered, done when it is."""
        return list(self._answering.values())

    async def _resolve(
        self, data: bytes, known: wire.QueryKey | None, host: str, tcp: bool
    ) -> bytes | None:
        if known is None:
            return await self._resolve_parsed(data, host, tcp)
        # The same question arriving again while its first copy is being answered (a
        # burst of clients, or one pipelining it over TCP) waits for that answer and
        # takes it from the answer cache, rather than building it once per copy; so
        # does one queued behind the copy that was answered meanwhile.
        index = self._classify(host)
        herd = (index, known.tcp if tcp else known.udp)
        first = self._answering.get(herd)
        if first is not None:
            await asyncio.shield(first)
        reply = self._hit(data, known, host, index, self._now(), tcp=tcp)
        if reply is not None:
            return reply
        done = self._loop.create_future()
        self._answering[herd] = done
        try:
            reply = await self._forward_plain(data, known, host, tcp)
            if reply is None:
                reply = await self._resolve_parsed(data, host, tcp)
            return reply
        finally:
            if self._answering.get(herd) is done:
                del self._answering[herd]
            done.set_result(None)

    async def _forward_plain(
        self, data: bytes, known: wire.QueryKey, host: str, tcp: bool
    ) -> bytes | None:
        """The reply to an ordinary query for a name no override answers, without dnslib;
        None to leave the query to `_resolve_parsed`."""
        plain = self._plain(data, known, host, self._classify(host), tcp=tcp)
        if plain is None:
            return None
        asked, question, where = plain
        return self._finish(known, await self._forward(asked, question), where)

    def _plain(
        self, data: bytes, known: wire.QueryKey, host: str, index: int, *, tcp: bool
    ) -> tuple[_Asked, Question, _Where] | None:
        """What forwarding `data` as it is takes, from its key: None unless it is an
        ordinary IN query (not ANY or a transfer) of an allowed client for a name no
        override answers."""
        key = known.udp
        qtype = wire.key_qtype(key)
        if wire.key_qclass(key) != CLASS_IN or qtype in _NOT_PLAIN or index == NOT_ALLOWED:
            return None
        qname = wire.key_name(key)
        try:
            name = wire.name_text(qname)
        except ValueError:
            return None  # over 255 octets, say: FORMERR from the parsed path
        view = self._views.views[index]
        zone_set, generation = self.zones.snapshot()
        if zone_set.select(view.zones).lookup(name) is not None:
            return None
        flags, edns_byte = key[wire.KEY_FLAGS], key[wire.KEY_EDNS]
        do = bool(edns_byte & DO)
        if edns_byte:  # (a COOKIE comes in the OPT record)
            udp_size = wire.key_udp_size(key)
            edns = answer.ClientEdns(True, udp_size, do, 0, known.cookie or b"")
        else:
            udp_size, edns = PLAIN_UDP_SIZE, _NO_EDNS
        asked = _Asked(
            data[:2],  # the ID
            flags & RD,
            bool(flags & CD),
            bool(flags & AD),
            data[HEADER_SIZE : wire.key_question_end(key)],
            edns,
            MAX_MESSAGE if tcp else udp_size,
        )
        question = Question(qname, qtype, CLASS_IN, do, asked.cd)
        return asked, question, _Where(tcp, host, index, view, generation, qname, qtype)

    async def _resolve_parsed(self, data: bytes, host: str, tcp: bool) -> bytes | None:
        index = self._classify(host)
        qname = b"\x00"
        try:
            request = dnslib.DNSRecord.parse(data)
            for question in request.questions:
                qname = wire.encode_labels(question.qname.label).lower()
                if len(qname) > MAX_NAME:
                    raise ValueError("query name longer than 255 octets")
        except _PARSE_ERRORS as error:
            self.stats.count(("", "", "FORMERR", "error"))
            self.stats.query_errors["malformed"] += 1
            self._malformed_log.emit(
                "malformed", client=host, error=f"{type(error).__name__}: {str(error)[:200]}"
            )
            return wire.error_reply(data, FORMERR)
        if request.header.qr:
            return None
        edns = answer.client_edns(request)
        if edns is not None and edns.present and not wire.opt_options_ok(data):
            edns = None  # options dnslib dropped unread: FORMERR, as any malformed OPT
        options = self._cookie_option(edns, host)
        rcode = None
        if request.header.opcode != 0:
            rcode = NOTIMP
        elif len(request.questions) != 1 or edns is None:
            rcode = FORMERR
        elif index == NOT_ALLOWED or request.q.qclass != CLASS_IN:
            rcode = REFUSED
        elif request.q.qtype in ZONE_TRANSFERS:
            rcode = REFUSED  # there is no zone to transfer; never forwarded
        if rcode is not None or edns is None:
            reply = answer.new_reply(request, rcode=rcode or FORMERR)
            reply.questions = request.questions[:1]
            self.stats.count(("", "", rcode_label(reply.header.rcode), "error"))
            edns_out = edns or answer.ClientEdns(False, PLAIN_UDP_SIZE, False)
            return answer.pack(reply, edns_out, self._udp_size, MAX_MESSAGE, options)
        if edns.version > 0:
            # RFC 6891 6.1.3: BADVERS (16: 1 in the OPT's extended rcode), our version 0.
            reply = answer.new_reply(request)
            reply.add_ar(dnslib.EDNS0(ext_rcode=1, udp_len=self._udp_size, opts=options))
            return answer.pack(
                reply, answer.ClientEdns(False, PLAIN_UDP_SIZE, False), 0, MAX_MESSAGE
            )
        view = self._views.views[index]
        generation = self.zones.state[1]
        asked = _Asked(
            query_id=data[:2],
            rd=request.header.rd,
            cd=bool(request.header.cd),
            ad=bool(request.header.ad),
            question=wire.encode_labels(request.q.qname.label)
            + struct.pack("!HH", request.q.qtype, request.q.qclass),
            edns=edns,
            limit=MAX_MESSAGE if tcp else min(edns.udp_size, self._udp_size),
        )
        outcome = await self._answer(request, asked, view, qname)
        where = _Where(tcp, host, index, view, generation, qname, request.q.qtype)
        return self._finish(self._keys(data), outcome, where)

    def _finish(self, known: wire.QueryKey | None, outcome: _Outcome, where: _Where) -> bytes:
        """Count and log the answer, keep it for the fast path, and add the client's cookie."""
        tcp, host, index, view, generation, qname, qtype = where
        packed = outcome.render([])
        qtype_name = qtype_label(qtype)
        rcode_name = rcode_label(outcome.rcode)
        self.stats.count((view.name, qtype_name, rcode_name, outcome.source))
        if self._query_log:
            log.info(
                "query",
                client=host,
                view=view.name,
                name=_display(qname),
                qtype=qtype_name,
                rcode=rcode_name,
                source=outcome.source,
            )
        if known is not None and outcome.cache_for > 0:
            hit_source = "cache" if outcome.source == "upstream" else outcome.source
            self.answers.store(
                index,
                known.tcp if tcp else known.udp,
                packed,
                generation=generation,
                now=self._now(),
                ttl=outcome.cache_for,
                counter=self.stats.cell((view.name, qtype_name, rcode_name, hit_source)),
                age_ttls=outcome.ages,
                # A relayed reply has the upstream's layout, unless truncated (no records).
                offsets=None if packed[2] & 0x02 else outcome.ttl_offsets,
            )
        if outcome.edns.cookie:  # the cache keeps the reply without this client's cookie
            return outcome.render(self._cookie_option(outcome.edns, host))
        return packed

    def _cookie_option(self, edns: answer.ClientEdns | None, host: str) -> list[dnslib.EDNSOption]:
        """Our COOKIE option for the reply, when the client sent a (well-formed) cookie."""
        if edns is None or not edns.cookie:
            return []
        option = self.cookies.reply_option(edns.cookie, host, self._now())
        return [dnslib.EDNSOption(COOKIE, option)]

    async def _answer(
        self, request: dnslib.DNSRecord, asked: _Asked, view: View, qname: bytes
    ) -> _Outcome:
        zone_set, generation = self.zones.snapshot()
        overrides = zone_set.select(view.zones)
        name = wire.name_text(qname)
        qtype = request.q.qtype
        edns = asked.edns
        entry = overrides.lookup(name)
        withdrawn = self.zones.withdrawn
        if entry is not None and entry.health is not None and name in withdrawn:
            entry = None  # its health check failed: forward it like any other name
        if entry is not None:
            local = answer.local_answer(request, entry, overrides, generation, withdrawn)
            if local.forward is None:
                return self._local(local.reply, asked, "override", math.inf)
            target = wire.encode_name(local.forward)
            question = Question(target, qtype, CLASS_IN, edns.do, asked.cd)
            forwarded = await self._forwarded(question)
            if forwarded is _FAILED:
                local.reply.header.rcode = SERVFAIL
                return self._local(local.reply, asked, "error", 0)
            upstream, ttl, _source = forwarded
            local.reply.rr.extend(answer.chain_records(upstream.records().rr, local.forward))
            local.reply.header.rcode = upstream.rcode
            return self._local(local.reply, asked, "override", ttl, ages=True)
        if qtype == ANY:
            return self._local(answer.minimal_any(request), asked, "synthesized", math.inf)
        return await self._forward(asked, Question(qname, qtype, CLASS_IN, edns.do, asked.cd))

    def _local(
        self,
        reply: dnslib.DNSRecord,
        asked: _Asked,
        source: str,
        cache_for: float,
        *,
        ages: bool = False,
    ) -> _Outcome:
        udp_size = self._udp_size
        return _Outcome(
            lambda options: answer.pack(reply, asked.edns, udp_size, asked.limit, options),
            reply.header.rcode,
            source,
            cache_for,
            ages,
            asked.edns,
        )

    async def _forward(self, asked: _Asked, question: Question) -> _Outcome:
        """The forwarded answer to `asked` (cache, upstream or stale), or SERVFAIL."""
        return self._relayed(asked, *await self._forwarded(question))

    def _relayed(self, asked: _Asked, upstream: relay.Reply, ttl: float, source: str) -> _Outcome:
        """The outcome relaying `upstream` to the client who asked `asked`."""
        udp_size = self._udp_size
        edns = asked.edns

        def render(options: list[dnslib.EDNSOption]) -> bytes:
            opt = b""
            if edns.present:
                opt = wire.opt_record(udp_size, edns.do, wire.encode_options(options))
            return relay.to_client(
                upstream,
                asked.query_id,
                rd=asked.rd,
                cd=asked.cd,
                ad=edns.do or asked.ad,
                question=asked.question,
                opt=opt,
                limit=asked.limit,
            )

        return _Outcome(render, upstream.rcode, source, ttl, True, edns, upstream.ttls)

    async def _forwarded(self, question: Question) -> _Forwarded:
        """(upstream answer, seconds it may be reused, source) from cache, upstream or
        stale; `_FAILED` when there is none."""
        cached = self.responses.get(question, self._now())
        if cached is not None:
            return cached[0], cached[1], "cache"
        if not self.forwarder.answering():
            # Every upstream is known down: answer now, stale (RFC 8767) or SERVFAIL, rather
            # than after the whole timeout budget. The upstreams are still asked, in the
            # background (and probed), so answers come back as soon as one recovers.
            self.forwarder.refresh(question, self._store)
            return self._stale(question)
        try:
            reply = await self.forwarder.resolve(question)
        except UpstreamFailedError:  # logged by the forwarder, rate-limited per upstream
            return self._stale(question)
        return self._fresh(question, reply)

    def _stale(self, question: Question) -> _Forwarded:
        """After every upstream failed: the stale answer if there is one, else SERVFAIL."""
        stale = self.responses.get_stale(question, self._now())
        if stale is None:
            return _FAILED
        return stale, self._stale_reuse, "stale"

    def _fresh(self, question: Question, reply: relay.Reply) -> _Forwarded:
        """An upstream's answer, cached, as it is served."""
        ttl = self._store(question, reply)
        if ttl and reply.max_ttl > ttl:
            # As the response cache serves it (capped at what it is kept for, at most
            # cache.max_ttl): no client is told to keep it longer than we do.
            reply = reply.retimed(0, ttl)
        return reply, ttl, "upstream"

    def _store(self, question: Question, reply: relay.Reply) -> int:
        return self.responses.put(question, reply, self._now())


def _display(qname: bytes) -> str:
    """A query name for logs: text, "." for the root; never raises."""
    try:
        return wire.name_text(qname) or "."
    except ValueError:
        return repr(qname[:64])


# What a client gets when no upstream answered: SERVFAIL, no records, never cached.
_SERVFAIL = relay.Reply(
    bytes(HEADER_SIZE), SERVFAIL, False, False, 0, HEADER_SIZE, (), None, None, 0
)
_FAILED: _Forwarded = (_SERVFAIL, 0, "error")
