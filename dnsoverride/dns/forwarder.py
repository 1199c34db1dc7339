"""Forwarding to upstream resolvers, honestly.

Every upstream query gets a fresh random ID and a fresh socket (so a fresh random source
port); a reply is accepted only from the upstream's address (a connected UDP socket),
with the same ID and the same question. TC -> the same question again over TCP.
Timeout, SERVFAIL, REFUSED or garbage -> the next upstream. The whole attempt is bounded
by the timeout budget; when every upstream fails the caller gets `UpstreamFailedError` in
time to answer SERVFAIL (or stale). Identical questions in flight share one upstream
query.

Upstream health: an upstream that timed out (or refused the connection) without having
answered anything since the failed query was sent is marked down, and upstreams are
tried healthy first, in configured order, so one dead resolver does not cost every
query an attempt timeout. Off the hot path, `probe` asks `<probe.name> NS` (default
`. NS`) of every upstream that is down or has answered nothing for `probe.interval`
seconds (no traffic, or traffic going elsewhere): any well-formed reply, whatever its
rcode, means the upstream is answering. That keeps readiness ("at least one upstream
answering") true to the upstreams with no client traffic, and brings a recovered
upstream back within seconds. While every upstream is down the resolver does not wait
for them: it answers at once (stale or SERVFAIL) and asks in the background with
`refresh` (see resolver.py).

Failures are counted every time (stats) but logged as `upstream_failed` at most once per
upstream per `failure_log_interval` seconds, with the number of failures suppressed
since the last event: a dead upstream under load must not flood the journal.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import socket
import struct
import time
from collections.abc import Callable

import dnslib
import structlog

from dnsoverride.config import Endpoint, ProbeConfig
from dnsoverride.dns import wire
from dnsoverride.dns.stats import DnsStats
from dnsoverride.resolve import exchange_tcp

log = structlog.get_logger(__name__)

Question = tuple[str, int, int, bool, bool]  # name (lowercase), type, class, DO, CD
MAX_INFLIGHT = 512
_RETRY_RCODES = {dnslib.RCODE.SERVFAIL: "servfail", dnslib.RCODE.REFUSED: "refused"}


class UpstreamFailedError(Exception):
    """No upstream produced an acceptable answer within the budget."""


class FailureLog:
    """`upstream_failed` events, at most one per upstream per `interval` seconds."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def failed(self, upstream: str, reason: str, **fields: object) -> bool:
        """Log the failure, or count it as suppressed; True when it was logged."""
        now = self._clock()
        if now < self._quiet_until.get(upstream, -math.inf):
            self._suppressed[upstream] = self._suppressed.get(upstream, 0) + 1
            return False
        self._quiet_until[upstream] = now + self._interval
        suppressed = self._suppressed.pop(upstream, 0)
        log.warning(
            "upstream_failed", upstream=upstream, reason=reason, suppressed=suppressed, **fields
        )
        return True


class _Health:
    """What the forwarder knows of one upstream."""

    __slots__ = ("last_answer", "up")

    def __init__(self) -> None:
        self.up = True  # until shown otherwise: the first probe runs at start
        self.last_answer = -math.inf  # loop time of its last well-formed reply


class Forwarder:
    """Sends questions to the upstreams; `resolve` is the entry point, `probe` runs beside it."""

    def __init__(
        self,
        upstreams: tuple[Endpoint, ...],
        budget: float,
        attempt_timeout: float,
        edns_udp_size: int,
        stats: DnsStats,
        *,
        probe: ProbeConfig,
        failure_log_interval: float,
    ) -> None:
        self._upstreams = upstreams
        self._health = {upstream: _Health() for upstream in upstreams}
        self._order = list(upstreams)  # healthy first, each group in configured order
        stats.upstream_up.update((str(upstream), True) for upstream in upstreams)
        self._budget = budget
        self._attempt_timeout = attempt_timeout
        self._edns_udp_size = edns_udp_size
        self._stats = stats
        self._inflight: dict[Question, asyncio.Future[dnslib.DNSRecord]] = {}
        self._failure_log = FailureLog(failure_log_interval)
        self._probe_interval = probe.interval
        self._probe_question: Question = (probe.name, dnslib.QTYPE.NS, 1, False, False)
        self._refreshing: set[asyncio.Task[None]] = set()  # referenced until done

    def answering(self) -> bool:
        """Whether at least one upstream is answering (readiness)."""
        return any(health.up for health in self._health.values())

    def start_probing(self) -> asyncio.Task[None]:
        """Run `probe` every `probe.interval` seconds until the returned task is cancelled."""
        return asyncio.get_running_loop().create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._probe_interval)

    async def probe(self) -> None:
        """Ask the probe question of every upstream that is down or has been quiet."""
        now = asyncio.get_running_loop().time()
        due = [
            upstream
            for upstream, health in self._health.items()
            if not health.up or now - health.last_answer >= self._probe_interval
        ]
        await asyncio.gather(*(self._probe_one(upstream) for upstream in due))

    async def _probe_one(self, upstream: Endpoint) -> None:
        started = asyncio.get_running_loop().time()
        question = self._probe_question
        try:
            await asyncio.wait_for(self._ask(upstream, question), self._attempt_timeout)
        except TimeoutError:
            self._failed(upstream, "timeout", question, started)
        except (OSError, dnslib.DNSError, ValueError, struct.error, EOFError) as error:
            self._failed(upstream, "error", question, started, error)
        else:
            self._answered(upstream)

    async def resolve(self, question: Question) -> dnslib.DNSRecord:
        """The upstream answer to `question`, shared with identical concurrent callers."""
        pending = self._inflight.get(question)
        if pending is not None:
            return await asyncio.shield(pending)
        if len(self._inflight) >= MAX_INFLIGHT:
            # A flood of distinct names must not take every file descriptor (one socket
            # per upstream query): beyond this many, fail fast (SERVFAIL or stale).
            self._stats.upstream_failed("*", "busy")
            self._failure_log.failed("*", "busy", name=question[0])
            raise UpstreamFailedError(question[0])
        future: asyncio.Future[dnslib.DNSRecord] = asyncio.get_running_loop().create_future()
        self._inflight[question] = future
        try:
            answer = await self._ask_all(question)
        except BaseException as error:
            # Waiters must never hang: even a cancelled lookup (shutdown) fails them.
            failure = error if isinstance(error, UpstreamFailedError) else None
            future.set_exception(failure or UpstreamFailedError(question[0]))
            future.exception()  # retrieved: there may be no waiters
            raise
        else:
            future.set_result(answer)
            return answer
        finally:
            del self._inflight[question]

    def refresh(
        self, question: Question, store: Callable[[Question, dnslib.DNSRecord], object]
    ) -> None:
        """Ask for `question` in the background; `store(question, answer)` if it comes."""
        if question in self._inflight:
            return
        task = asyncio.get_running_loop().create_task(self._refresh(question, store))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh(
        self, question: Question, store: Callable[[Question, dnslib.DNSRecord], object]
    ) -> None:
        try:
            answer = await self.resolve(question)
        except UpstreamFailedError:
            return  # counted and logged; the caller keeps serving stale
        store(question, answer)

    async def _ask_all(self, question: Question) -> dnslib.DNSRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._budget
        replied = False
        for upstream in list(self._order):
            remaining = deadline - loop.time()
            if remaining <= 0.01 or (replied and not self._health[upstream].up):
                # Upstreams marked down are a last resort for when no upstream replied at
                # all: a SERVFAIL from a live one is not worth a dead one's timeout.
                break
            started = loop.time()
            try:
                answer = await asyncio.wait_for(
                    self._ask(upstream, question), min(self._attempt_timeout, remaining)
                )
            except TimeoutError:
                self._failed(upstream, "timeout", question, started)
                continue
            except (OSError, dnslib.DNSError, ValueError, struct.error, EOFError) as error:
                self._failed(upstream, "error", question, started, error)
                continue
            self._answered(upstream)
            replied = True
            reason = _RETRY_RCODES.get(answer.header.rcode)
            if reason is not None:
                self._failed(upstream, reason, question, started)
                continue
            self._stats.upstream_answered(str(upstream), loop.time() - started)
            return answer
        raise UpstreamFailedError(question[0])

    def _answered(self, upstream: Endpoint) -> None:
        health = self._health[upstream]
        health.last_answer = asyncio.get_running_loop().time()
        if not health.up:
            health.up = True
            self._reorder()
            log.info("upstream_up", upstream=str(upstream))

    def _failed(
        self,
        upstream: Endpoint,
        reason: str,
        question: Question,
        started: float,
        error: Exception | None = None,
    ) -> None:
        name = str(upstream)
        self._stats.upstream_failed(name, reason)
        fields: dict[str, object] = {
            "name": question[0] or ".",
            "qtype": dnslib.QTYPE.get(question[1]),
        }
        if error is not None:
            fields["error"] = str(error) or repr(error)
        self._failure_log.failed(name, reason, **fields)
        health = self._health[upstream]
        # One slow name is no dead upstream: down only if nothing came back since `started`,
        # and an upstream that replied (SERVFAIL, REFUSED) is not down at all.
        if reason in ("timeout", "error") and health.up and health.last_answer < started:
            health.up = False
            self._reorder()
            log.warning("upstream_down", upstream=str(upstream), reason=reason)

    def _reorder(self) -> None:
        for upstream, health in self._health.items():
            self._stats.upstream_up[str(upstream)] = health.up
        self._order = sorted(self._upstreams, key=lambda upstream: not self._health[upstream].up)

    async def _ask(self, upstream: Endpoint, question: Question) -> dnslib.DNSRecord:
        name, qtype, qclass, do, cd = question
        query = dnslib.DNSRecord(
            dnslib.DNSHeader(id=secrets.randbits(16), rd=1, cd=int(cd)),
            q=dnslib.DNSQuestion(name + ".", qtype, qclass),
        )
        query.add_ar(dnslib.EDNS0(udp_len=self._edns_udp_size, flags="do" if do else ""))
        packet = query.pack()
        answer = await self._udp(upstream, packet)
        if answer.header.tc:
            answer = await self._tcp(upstream, packet)
        return answer

    async def _udp(self, upstream: Endpoint, packet: bytes) -> dnslib.DNSRecord:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in upstream.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # connect() picks a random ephemeral port and makes the kernel drop
            # datagrams from any other address.
            sock.connect((upstream.host, upstream.port))
            await loop.sock_sendall(sock, packet)
            while True:
                data = await loop.sock_recv(sock, 65535)
                answer = _matching(packet, data)
                if answer is not None:
                    return answer
                self._stats.upstream_failed(str(upstream), "mismatch")

    async def _tcp(self, upstream: Endpoint, packet: bytes) -> dnslib.DNSRecord:
        data = await exchange_tcp((upstream.host, upstream.port), packet)
        answer = _matching(packet, data)
        if answer is None:
            raise ValueError("TCP reply does not match the query")
        return answer


def _matching(query: bytes, data: bytes) -> dnslib.DNSRecord | None:
    """The parsed reply when it answers `query` (same ID, QR set, same question)."""
    qend = wire.question_end(query)
    if len(data) < qend or data[:2] != query[:2] or not data[2] & 0x80:
        return None
    if data[4:6] != b"\x00\x01" or data[12:qend].lower() != query[12:qend].lower():
        return None
    try:
        return dnslib.DNSRecord.parse(data)
    except (dnslib.DNSError, ValueError, struct.error, IndexError):
        return None
