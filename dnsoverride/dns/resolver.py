"""The query pipeline, declared in one place:

    ACL -> view -> answer cache (fast path) -> overrides -> response cache -> forwarder
                                                                  (serve-stale on failure)

`fast` is the synchronous hot path: a hand-parsed question, one dict lookup, bytes out.
`resolve` is everything else, with dnslib: parse (FORMERR on garbage), answer locally
or forward, pack (EDNS, truncation), count, and remember the reply for `fast`.
"""

from __future__ import annotations

import asyncio
import math
import struct
from dataclasses import dataclass

import dnslib
import structlog

from dnsoverride.config import ServeConfig, View
from dnsoverride.dns import answer, wire
from dnsoverride.dns.acl import Acl, client_address
from dnsoverride.dns.cache import AnswerCache, ResponseCache
from dnsoverride.dns.cookies import Cookies
from dnsoverride.dns.forwarder import Forwarder, Question, UpstreamFailedError
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.views import Routing, ViewTable
from dnsoverride.zones import LiveZones, normalize_name

log = structlog.get_logger(__name__)

REFUSED = -1
MAX_CLIENTS_CACHED = 65536
TCP_LIMIT = 65535
QCLASS_IN = 1
ZONE_TRANSFERS = (251, 252)  # IXFR, AXFR


@dataclass
class _Outcome:
    reply: dnslib.DNSRecord
    source: str
    cache_for: float  # seconds the finished reply may be served by the fast path
    ages: bool  # whether its TTLs count down (forwarded data) or are fixed (local)


class Resolver:
    """Answers one query at a time; shared by the UDP and TCP listeners."""

    def __init__(
        self, config: ServeConfig, zones: LiveZones, forwarder: Forwarder, stats: DnsStats
    ) -> None:
        self.zones = zones
        self.forwarder = forwarder
        self.stats = stats
        self.answers = AnswerCache(config.cache.size, len(config.views))
        self.responses = ResponseCache(config.cache)
        self._acl = Acl(config.allow)
        self._views = ViewTable(config.views, config.default_view)
        self._udp_size = config.edns_udp_size
        self._query_log = config.query_log
        self._stale_reuse = config.cache.stale_reuse
        self._clients: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self.cookies = Cookies()

    def route(self, routing: Routing) -> None:
        """Serve with a reloaded ACL and view table. Call it in the same step (on the loop
        thread) as the swap of `routing.zone_set` into `zones`: that swap's new generation
        retires every cached answer, and the client -> view memo is started afresh."""
        self._acl, self._views, self._clients = routing.acl, routing.views, {}
        self.answers.grow(len(routing.views.views))

    def _classify(self, host: str) -> int:
        """The client's view index, or REFUSED; remembered per address."""
        index = self._clients.get(host)
        if index is not None:
            return index
        try:
            address = client_address(host)
        except ValueError:
            return REFUSED
        if not self._acl.allows(address):
            index = REFUSED
        else:
            index = self._views.views.index(self._views.view_for(address))
        if len(self._clients) >= MAX_CLIENTS_CACHED:
            self._clients.clear()
        self._clients[host] = index
        return index

    def fast(self, data: bytes, host: str, tcp: bool = False) -> bytes | None:
        """The reply from the answer cache (or REFUSED), or None to take `resolve`."""
        key = wire.fast_key(data, self._udp_size)
        if key is None:
            return None
        if tcp:
            key = wire.tcp_key(key)
        index = self._clients.get(host)
        if index is None:
            index = self._classify(host)
        reply: bytes | None
        if index == REFUSED:
            reply = wire.refused(data, key, self._udp_size)
        else:
            reply = self.answers.lookup(index, key, data, self.zones.state[1], self._loop.time())
        if reply is not None and len(data) > len(key) + 19:  # EDNS options: wire.options_start
            limit = TCP_LIMIT if tcp else (key[2] << 8) | key[3]
            reply = self.cookies.add_to_hit(reply, data, wire.options_start(key), host, limit)
        if index == REFUSED:
            if reply is not None:  # else the slow path answers (and counts) it
                qtype = _qtype_name(data, wire.key_question_end(key))
                self.stats.count(("", qtype, "REFUSED", "error"))
            return reply
        if reply is not None and self._query_log:
            qend = wire.key_question_end(key)
            log.info(
                "query",
                client=host,
                view=self._views.views[index].name,
                name=str(dnslib.DNSRecord.parse(data).q.qname),
                qtype=_qtype_name(data, qend),
                rcode=dnslib.RCODE.get(reply[3] & 0x0F),
                source="answer_cache",
            )
        return reply

    async def resolve(self, data: bytes, host: str, tcp: bool) -> bytes | None:
        """The reply to any query, or None when it must be dropped (not even a header)."""
        try:
            return await self._resolve(data, host, tcp)
        except Exception:  # a bug must cost one answer, never the server
            log.exception("query_failed", client=host)
            reply = wire.format_error(data)
            return reply[:3] + b"\x02" + reply[4:] if reply else None

    async def _resolve(self, data: bytes, host: str, tcp: bool) -> bytes | None:
        index = self._classify(host)
        try:
            request = dnslib.DNSRecord.parse(data)
        except (dnslib.DNSError, ValueError, struct.error, IndexError, UnicodeError):
            self.stats.count(("", "", "FORMERR", "error"))
            return wire.format_error(data)
        if request.header.qr:
            return None
        edns = answer.client_edns(request)
        options = self._cookie_option(edns, host)
        rcode = None
        if request.header.opcode != 0:
            rcode = dnslib.RCODE.NOTIMP
        elif len(request.questions) != 1 or edns is None:
            rcode = dnslib.RCODE.FORMERR
        elif index == REFUSED or request.q.qclass != QCLASS_IN:
            rcode = dnslib.RCODE.REFUSED
        elif request.q.qtype in ZONE_TRANSFERS:
            rcode = dnslib.RCODE.REFUSED  # there is no zone to transfer; never forwarded
        if rcode is not None or edns is None:
            reply = answer.new_reply(request, rcode=rcode or dnslib.RCODE.FORMERR)
            reply.questions = request.questions[:1]
            self.stats.count(("", "", dnslib.RCODE.get(reply.header.rcode), "error"))
            edns_out = edns or answer.ClientEdns(False, 512, False)
            return answer.pack(reply, edns_out, self._udp_size, TCP_LIMIT, options)
        if edns.version > 0:
            # RFC 6891 6.1.3: BADVERS (16: 1 in the OPT's extended rcode), our version 0.
            reply = answer.new_reply(request)
            reply.add_ar(dnslib.EDNS0(ext_rcode=1, udp_len=self._udp_size, opts=options))
            return answer.pack(reply, answer.ClientEdns(False, 512, False), 0, TCP_LIMIT)
        view = self._views.views[index]
        generation = self.zones.state[1]
        outcome = await self._answer(request, edns, view)
        limit = TCP_LIMIT if tcp else min(edns.udp_size, self._udp_size)
        packed = answer.pack(outcome.reply, edns, self._udp_size, limit)
        qtype = dnslib.QTYPE.get(request.q.qtype)
        rcode_name = dnslib.RCODE.get(outcome.reply.header.rcode)
        self.stats.count((view.name, qtype, rcode_name, outcome.source))
        if self._query_log:
            log.info(
                "query",
                client=host,
                view=view.name,
                name=str(request.q.qname),
                qtype=qtype,
                rcode=rcode_name,
                source=outcome.source,
            )
        key = wire.fast_key(data, self._udp_size)
        if key is not None and tcp:
            key = wire.tcp_key(key)
        if key is not None and outcome.cache_for > 0:
            hit_source = "cache" if outcome.source == "upstream" else outcome.source
            self.answers.store(
                index,
                key,
                packed,
                generation=generation,
                now=self._loop.time(),
                ttl=outcome.cache_for,
                counter=self.stats.cell((view.name, qtype, rcode_name, hit_source)),
                age_ttls=outcome.ages,
            )
        if options:  # the cache keeps the reply without this client's cookie
            return answer.pack(outcome.reply, edns, self._udp_size, limit, options)
        return packed

    def _cookie_option(self, edns: answer.ClientEdns | None, host: str) -> list[dnslib.EDNSOption]:
        """Our COOKIE option for the reply, when the client sent a (well-formed) cookie."""
        if edns is None or not edns.cookie:
            return []
        return [dnslib.EDNSOption(wire.COOKIE, self.cookies.reply_option(edns.cookie, host))]

    async def _answer(
        self, request: dnslib.DNSRecord, edns: answer.ClientEdns, view: View
    ) -> _Outcome:
        zone_set, generation = self.zones.snapshot()
        overrides = zone_set.select(view.zones)
        name = normalize_name(str(request.q.qname))
        qtype = request.q.qtype
        entry = overrides.lookup(name)
        withdrawn = self.zones.withdrawn
        if entry is not None and entry.health is not None and name in withdrawn:
            entry = None  # its health check failed: forward it like any other name
        if entry is not None:
            local = answer.local_answer(request, entry, overrides, generation, withdrawn)
            if local.forward is None:
                return _Outcome(local.reply, "override", math.inf, ages=False)
            question = (local.forward, qtype, QCLASS_IN, edns.do, bool(request.header.cd))
            try:
                upstream, ttl, _source = await self._forwarded(question)
            except UpstreamFailedError:
                local.reply.header.rcode = dnslib.RCODE.SERVFAIL
                return _Outcome(local.reply, "error", 0, ages=False)
            local.reply.rr.extend(upstream.rr)
            local.reply.header.rcode = upstream.header.rcode
            return _Outcome(local.reply, "override", ttl, ages=True)
        if qtype == answer.QTYPE_ANY:
            return _Outcome(answer.minimal_any(request), "synthesized", math.inf, ages=False)
        question = (name, qtype, QCLASS_IN, edns.do, bool(request.header.cd))
        try:
            upstream, ttl, source = await self._forwarded(question)
        except UpstreamFailedError:
            reply = answer.new_reply(request, rcode=dnslib.RCODE.SERVFAIL)
            return _Outcome(reply, "error", 0, ages=False)
        return _Outcome(answer.from_upstream(request, upstream, edns), source, ttl, ages=True)

    async def _forwarded(self, question: Question) -> tuple[dnslib.DNSRecord, float, str]:
        """(upstream answer, seconds it may be reused, source) from cache, upstream or stale."""
        cached = self.responses.get(question, self._loop.time())
        if cached is not None:
            return cached[0], cached[1], "cache"
        if not self.forwarder.answering():
            # Every upstream is known down: answer now, stale (RFC 8767) or SERVFAIL, rather
            # than after the whole timeout budget. The upstreams are still asked, in the
            # background (and probed), so answers come back as soon as one recovers.
            self.forwarder.refresh(question, self._store)
            stale = self.responses.get_stale(question, self._loop.time())
            if stale is None:
                raise UpstreamFailedError(question[0])
            return stale, self._stale_reuse, "stale"
        try:
            reply = await self.forwarder.resolve(question)
        except UpstreamFailedError:
            stale = self.responses.get_stale(question, self._loop.time())
            if stale is None:
                raise  # logged by the forwarder, rate-limited per upstream
            return stale, self._stale_reuse, "stale"
        ttl = self._store(question, reply)
        return reply, ttl, "upstream"

    def _store(self, question: Question, reply: dnslib.DNSRecord) -> int:
        return self.responses.put(question, reply, self._loop.time())


def _qtype_name(data: bytes, qend: int) -> str:
    qtype: str = dnslib.QTYPE.get((data[qend - 4] << 8) | data[qend - 3])
    return qtype
