"""Forwarding to upstream resolvers, honestly.

Every upstream query gets a fresh random ID and a fresh socket (so a fresh random source
port); a reply is accepted only from the upstream's address (a connected UDP socket),
with the same ID and the same question (letter for letter with `case_randomization`,
the 0x20 bit of each letter of the name chosen at random, like unbound's
`use-caps-for-id`). Any other datagram on that socket is an unwanted reply: counted, and
after `UNWANTED_LIMIT` of them the socket is abandoned and the question asked again from
a fresh port with a fresh ID (at most `SOCKETS_PER_ATTEMPT` sockets per attempt), so an
attacker spraying forged replies at a port he has learnt gets a handful of guesses at a
16-bit ID, not 65,536. TC -> the same question again over TCP. Timeout, SERVFAIL,
REFUSED or garbage -> the next upstream. The whole attempt is bounded by the timeout
budget; when every upstream fails the caller gets `UpstreamFailedError` in time to
answer SERVFAIL (or stale). Identical questions in flight share one upstream query.

Upstream health is judged from evidence across questions, never from one slow name: a
client question that times out (or errors) with nothing else answered meanwhile only
makes the upstream suspect and starts a probe at once; the upstream is marked down when
that probe fails too (two different questions failed in a row, and one of them is the
probe's known-good `<probe.name> NS`). A name an upstream cannot resolve in time (a
black-holed zone) costs only its own question a SERVFAIL. Upstreams are tried healthy
first, in configured order, except that one which let `DEMOTE_AFTER` client questions in
a row time out that another upstream then answered is tried after the others for
`DEMOTION` seconds (or until it answers one): a resolver whose own uplink is gone still
answers the probe from its cache, and would otherwise cost every uncached query its
attempt timeout. Off the hot path, `probe` asks `<probe.name> NS` (default
`. NS`) of every upstream that is down or has answered nothing for `probe.interval`
seconds: any well-formed reply, whatever its rcode, means the upstream is answering.
That keeps readiness ("at least one upstream answering") true to the upstreams with no
client traffic, and brings a recovered upstream back within seconds. While every
upstream is down the resolver does not wait for them: it answers at once (stale or
SERVFAIL) and asks in the background with `refresh` (see resolver.py).

Failures are counted every time (stats) but logged as `upstream_failed` at most once per
upstream per `failure_log_interval` seconds, with the number of failures suppressed
since the last event: a dead upstream under load must not flood the journal.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Callable, Coroutine, Iterable

import dnslib
import structlog

from dnsoverride.common.dnsexchange import exchange_tcp
from dnsoverride.common.grammar import Endpoint
from dnsoverride.dns import relay, wire
from dnsoverride.dns.config import ForwardConfig, ProbeConfig, ServeConfig
from dnsoverride.dns.constants import CLASS_IN, REFUSED, SERVFAIL
from dnsoverride.dns.logthrottle import ThrottledLog
from dnsoverride.dns.relay import Question
from dnsoverride.dns.stats import DnsStats
from dnsoverride.dns.udpexchange import AbandonedError, SocketWatcher, UdpExchange

log = structlog.get_logger(__name__)

MAX_INFLIGHT = 512
UNWANTED_LIMIT = 3  # unwanted datagrams on one query's socket before it is abandoned
SOCKETS_PER_ATTEMPT = 3  # fresh ports (and IDs) one attempt may use before it gives up
DEMOTE_AFTER = 3  # client questions in a row an upstream let time out that another answered
DEMOTION = 30.0  # seconds it is then tried after the others; then one question tries it again
_RETRY = {SERVFAIL: "servfail", REFUSED: "refused"}
# Reasons that say nothing about the question: the upstream did not reply at all.
_SILENT = ("timeout", "error")


# A question's first exchange, made before any task: (upstream, our query, its outcome).
_Exchanged = tuple["_Upstream", bytes, "relay.Reply | Exception"]


class UpstreamFailedError(Exception):
    """No upstream produced an acceptable answer within the budget."""


def question_text(question: Question) -> str:
    """The question's name as text for logs ("." for the root)."""
    try:
        return wire.name_text(question[0]) or "."
    except ValueError:
        return repr(question[0])


class _Upstream:
    """One upstream resolver and what the forwarder knows of it."""

    __slots__ = (
        "address",
        "confirming",
        "demoted_until",
        "last_answer",
        "name",
        "passed_over",
        "unwanted",
        "up",
    )

    def __init__(self, endpoint: Endpoint, stats: DnsStats) -> None:
        self.address = (endpoint.host, endpoint.port)
        self.name = str(endpoint)
        self.unwanted = functools.partial(stats.unwanted_reply, self.name)
        self.up = True  # until shown otherwise: the first probe runs at start
        self.last_answer = -math.inf  # loop time of its last well-formed reply
        self.confirming = False  # a probe started by a failed client question is running
        self.passed_over = 0  # client questions in a row it let time out, another answered
        self.demoted_until = -math.inf  # loop time until which it is tried last


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
        forward: ForwardConfig | None = None,
    ) -> None:
        self._upstreams = tuple(_Upstream(endpoint, stats) for endpoint in upstreams)
        self._order = list(self._upstreams)  # healthy first, each group in configured order
        self._any_up = True  # whether any upstream is up: asked once per query
        self._demotions_end = -math.inf  # the last `demoted_until` of any upstream
        stats.upstream_up.update((upstream.name, True) for upstream in self._upstreams)
        self._budget = budget
        self._attempt_timeout = attempt_timeout
        self._opts = (wire.opt_record(edns_udp_size, False), wire.opt_record(edns_udp_size, True))
        self._case_randomization = (forward or ForwardConfig()).case_randomization
        self._stats = stats
        self._inflight: dict[Question, asyncio.Future[relay.Reply]] = {}
        self._failure_log = ThrottledLog("upstream_failed", failure_log_interval)
        self._spoof_log = ThrottledLog("upstream_replies_unwanted", failure_log_interval)
        # A bug every question meets (an upstream can steer all of them onto the path
        # that has it) must not cost a line per question.
        self._bug_log = ThrottledLog("forward_failed", failure_log_interval)
        self._probe_interval = probe.interval
        self._probe_question = Question(
            wire.encode_name(probe.name), dnslib.QTYPE.NS, CLASS_IN, do=False, cd=False
        )
        self._background: set[asyncio.Task[None]] = set()  # referenced until done
        # Made on the loop, once: asyncio.get_running_loop() is a getpid() call each time
        # on Python 3.11, five times a forwarded query.
        self._loop = asyncio.get_running_loop()
        self._watcher = SocketWatcher(self._loop, failure_log_interval)
        self._ids = QueryIds()

    @classmethod
    def for_config(cls, config: ServeConfig, stats: DnsStats) -> Forwarder:
        """The forwarder `serve` runs with `config`'s upstreams, timeouts and probing."""
        return cls(
            config.upstreams,
            config.timeout,
            config.attempt_timeout,
            config.edns_udp_size,
            stats,
            probe=config.probe,
            failure_log_interval=config.failure_log_interval,
            forward=config.forward,
        )

    def answering(self) -> bool:
        """Whether at least one upstream is answering (readiness)."""
        return self._any_up

    def start_probing(self) -> asyncio.Task[None]:
        """Run `probe` every `probe.interval` seconds until the returned task is cancelled."""
        return self._loop.create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._probe_interval)

    async def probe(self) -> None:
        """Ask the probe question of every upstream that is down or has been quiet."""
        now = self._loop.time()
        due = [
            upstream
            for upstream in self._upstreams
            if not upstream.up or now - upstream.last_answer >= self._probe_interval
        ]
        await asyncio.gather(*(self._probe_one(upstream) for upstream in due))

    async def _probe_one(self, upstream: _Upstream) -> None:
        started = self._loop.time()
        question = self._probe_question
        try:
            await self._ask(upstream, question, started + self._attempt_timeout)
        except TimeoutError:
            self._failed(upstream, "timeout", question, started, probe=True)
        except AbandonedError:
            # Forgeries sprayed at the probe's ports say nothing about the upstream.
            self._failed(upstream, "unwanted", question, started, probe=True)
        except (OSError, ValueError, EOFError) as error:
            self._failed(upstream, "error", question, started, error, probe=True)
        else:
            self._answered(upstream)

    def _background_task(self, coroutine: Coroutine[object, object, None]) -> None:
        task = self._loop.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def resolve(self, question: Question) -> relay.Reply:
        """The upstream answer to `question`, shared with identical concurrent callers."""
        return await asyncio.shield(self.ask(question))

    def ask(self, question: Question) -> asyncio.Future[relay.Reply]:
        """The answer to `question` to come (or `UpstreamFailedError`), shared with the
        identical questions in flight. Begun without a task: the first upstream's first
        exchange calls back here, and a plain answer (the common case) settles the future
        at once; only what that cannot settle (a timeout, forgeries, TC, a SERVFAIL or
        REFUSED, the next upstream) goes on in a task, `_ask_all` from where it stands."""
        pending = self._inflight.get(question)
        if pending is not None:
            return pending
        future: asyncio.Future[relay.Reply] = self._loop.create_future()
        if len(self._inflight) >= MAX_INFLIGHT:
            # A flood of distinct names must not take every file descriptor (one socket
            # per upstream query): beyond this many, fail fast (SERVFAIL or stale).
            self._stats.upstream_failed("*", "busy")
            self._failure_log.emit("*", upstream="*", reason="busy", name=question_text(question))
            future.set_exception(UpstreamFailedError(question_text(question)))
            future.exception()  # retrieved: there may be no waiters
            return future
        self._inflight[question] = future
        started = self._loop.time()
        upstream = self._ordered(started)[0]
        packet = self._packet(question)
        try:
            UdpExchange(
                self._watcher,
                upstream.address,
                packet,
                deadline=started + min(self._attempt_timeout, self._budget),
                exact_case=self._case_randomization,
                unwanted=upstream.unwanted,
                unwanted_limit=UNWANTED_LIMIT,
                done=functools.partial(
                    self._first, future, question, upstream, started=started, packet=packet
                ),
            )
        except OSError as error:  # no socket (out of descriptors): an upstream failure
            self._first(future, question, upstream, error, started=started, packet=packet)
        return future

    def _first(
        self,
        future: asyncio.Future[relay.Reply],
        question: Question,
        upstream: _Upstream,
        outcome: relay.Reply | Exception,
        *,
        started: float,
        packet: bytes,
    ) -> None:
        """The outcome of a question's first exchange: a plain answer settles it here."""
        if isinstance(outcome, relay.Reply) and not outcome.tc and outcome.rcode not in _RETRY:
            del self._inflight[question]
            self._accepted(upstream, started, ())
            future.set_result(outcome)
            return
        first = (upstream, packet, outcome)
        self._background_task(self._settle(future, question, started, first))

    async def _settle(
        self,
        future: asyncio.Future[relay.Reply],
        question: Question,
        started: float,
        first: _Exchanged,
    ) -> None:
        """Go on with `question` after its first exchange, and settle `future`."""
        try:
            answer = await self._ask_all(question, started, first)
        except BaseException as error:
            # Waiters must never hang: even a cancelled lookup (shutdown) fails them.
            failure = error if isinstance(error, UpstreamFailedError) else None
            future.set_exception(failure or UpstreamFailedError(question_text(question)))
            future.exception()  # retrieved: there may be no waiters
            if not isinstance(error, Exception):
                raise
            if failure is None:  # a bug: its waiters get SERVFAIL (or stale), and a line here
                kind = type(error).__name__
                self._bug_log.emit(
                    kind, name=question_text(question), error=f"{kind}: {str(error)[:200]}"
                )
        else:
            future.set_result(answer)
        finally:
            del self._inflight[question]

    def refresh(self, question: Question, store: Callable[[Question, relay.Reply], object]) -> None:
        """Ask for `question` in the background; `store(question, answer)` if it comes."""
        if question not in self._inflight:
            self._background_task(self._refresh(question, store))

    async def _refresh(
        self, question: Question, store: Callable[[Question, relay.Reply], object]
    ) -> None:
        try:
            answer = await self.resolve(question)
        except UpstreamFailedError:
            return  # counted and logged; the caller keeps serving stale
        store(question, answer)

    def _ordered(self, now: float) -> list[_Upstream]:
        """The upstreams in the order a question asks them: healthy first, the demoted
        after the others."""
        if now < self._demotions_end:
            return sorted(self._order, key=lambda upstream: upstream.demoted_until > now)
        return self._order

    async def _ask_all(self, question: Question, started: float, first: _Exchanged) -> relay.Reply:
        """Ask the upstreams in turn, within the budget from `started`: first the one
        already asked once (`first`: that exchange, its socket closed), then the others
        in `_ordered` order."""
        loop = self._loop
        deadline = started + self._budget
        replied = False
        asked_first = first[0]
        order = [asked_first, *(up for up in self._ordered(started) if up is not asked_first)]
        pending: _Exchanged | None = first  # for the first attempt only
        silent: list[_Upstream] = []  # let this question time out
        for upstream in order:
            attempt_started = started if pending is not None else loop.time()
            remaining = deadline - attempt_started
            if remaining <= 0.01 or (replied and not upstream.up):
                # Upstreams marked down are a last resort for when no upstream replied at
                # all: a SERVFAIL from a live one is not worth a dead one's timeout.
                break
            attempt_deadline = attempt_started + min(self._attempt_timeout, remaining)
            try:
                answer = await self._ask(upstream, question, attempt_deadline, pending)
            except TimeoutError:
                self._failed(upstream, "timeout", question, attempt_started)
                silent.append(upstream)
                continue
            except AbandonedError:
                self._failed(upstream, "unwanted", question, attempt_started)
                continue
            except (OSError, ValueError, EOFError) as error:
                self._failed(upstream, "error", question, attempt_started, error)
                continue
            finally:
                pending = None
            replied = True
            reason = _RETRY.get(answer.rcode)
            if reason is not None:
                self._answered(upstream)
                self._undemote(upstream)
                self._failed(upstream, reason, question, attempt_started)
                continue
            self._accepted(upstream, attempt_started, silent)
            return answer
        raise UpstreamFailedError(question_text(question))

    def _accepted(self, upstream: _Upstream, started: float, silent: Iterable[_Upstream]) -> None:
        """`upstream` answered a question asked at `started`, that the upstreams in
        `silent` let time out."""
        self._answered(upstream)
        self._undemote(upstream)
        for passed in silent:
            self._passed_over(passed)
        self._stats.upstream_answered(upstream.name, self._loop.time() - started)

    def _answered(self, upstream: _Upstream) -> None:
        upstream.last_answer = self._loop.time()
        if not upstream.up:
            upstream.up = True
            self._reorder()
            log.info("upstream_up", upstream=upstream.name)

    def _passed_over(self, upstream: _Upstream) -> None:
        """`upstream` let a client question time out that another upstream answered."""
        upstream.passed_over += 1
        if upstream.passed_over < DEMOTE_AFTER:
            return
        now = self._loop.time()
        if upstream.demoted_until <= now:
            log.warning(
                "upstream_demoted",
                upstream=upstream.name,
                questions=upstream.passed_over,
                seconds=DEMOTION,
            )
        upstream.demoted_until = now + DEMOTION
        self._demotions_end = max(self._demotions_end, upstream.demoted_until)
        self._stats.upstream_demoted_until[upstream.name] = upstream.demoted_until

    def _undemote(self, upstream: _Upstream) -> None:
        """`upstream` replied to a question: it is back in its place in the order."""
        upstream.passed_over = 0
        upstream.demoted_until = -math.inf
        self._stats.upstream_demoted_until.pop(upstream.name, None)

    def _failed(
        self,
        upstream: _Upstream,
        reason: str,
        question: Question,
        started: float,
        error: Exception | None = None,
        *,
        probe: bool = False,
    ) -> None:
        name = upstream.name
        self._stats.upstream_failed(name, reason)
        fields: dict[str, object] = {
            "name": question_text(question),
            "qtype": dnslib.QTYPE.get(question[1]),
        }
        if error is not None:
            fields["error"] = str(error) or repr(error)
        self._failure_log.emit(name, upstream=name, reason=reason, **fields)
        if reason not in _SILENT or not upstream.up or upstream.last_answer >= started:
            return  # it replied (SERVFAIL, REFUSED), or answered something meanwhile
        if probe:
            upstream.up = False
            self._reorder()
            log.warning("upstream_down", upstream=name, reason=reason)
        elif not upstream.confirming:
            # One question is no evidence (a black-holed zone times out on a healthy
            # upstream): the known-good probe question decides, now.
            upstream.confirming = True
            self._background_task(self._confirm(upstream))

    async def _confirm(self, upstream: _Upstream) -> None:
        try:
            await self._probe_one(upstream)
        finally:
            upstream.confirming = False

    def _reorder(self) -> None:
        for upstream in self._upstreams:
            self._stats.upstream_up[upstream.name] = upstream.up
        self._any_up = any(upstream.up for upstream in self._upstreams)
        self._order = sorted(self._upstreams, key=lambda upstream: not upstream.up)

    async def _ask(
        self,
        upstream: _Upstream,
        question: Question,
        deadline: float,
        first: _Exchanged | None = None,
    ) -> relay.Reply:
        """One attempt: UDP from up to `SOCKETS_PER_ATTEMPT` fresh ports (the first of them
        `first`, when made already), TCP after TC; TimeoutError at `deadline`."""
        for _ in range(SOCKETS_PER_ATTEMPT):
            if first is None:
                packet, outcome = await self._exchange(upstream, question, deadline)
            else:
                _, packet, outcome = first
                first = None
            if isinstance(outcome, AbandonedError):
                self._spoof_log.emit(
                    upstream.name,
                    upstream=upstream.name,
                    name=question_text(question),
                    unwanted=UNWANTED_LIMIT,
                )
                continue
            if isinstance(outcome, Exception):
                raise outcome
            if outcome.tc:
                async with asyncio.timeout_at(deadline):
                    return await self._tcp(upstream, packet)
            return outcome
        raise AbandonedError()

    async def _exchange(
        self, upstream: _Upstream, question: Question, deadline: float
    ) -> tuple[bytes, relay.Reply | Exception]:
        """Our query for `question` from a fresh port, and its outcome."""
        outcome: asyncio.Future[relay.Reply | Exception] = self._loop.create_future()
        packet = self._packet(question)
        exchange = UdpExchange(
            self._watcher,
            upstream.address,
            packet,
            deadline=deadline,
            exact_case=self._case_randomization,
            unwanted=upstream.unwanted,
            unwanted_limit=UNWANTED_LIMIT,
            done=functools.partial(_set_unless_cancelled, outcome),
        )
        try:
            return packet, await outcome
        finally:
            exchange.close()  # cancelled: the exchange must not call back

    def _packet(self, question: Question) -> bytes:
        """Our query for `question`, with a fresh random ID (and letter case, with 0x20)."""
        name, qtype, qclass, do, cd = question
        sent = _mixed_case(name) if self._case_randomization else name
        return relay.query(self._ids(), sent, qtype, qclass, cd=cd, opt=self._opts[do])

    async def _tcp(self, upstream: _Upstream, packet: bytes) -> relay.Reply:
        data = await exchange_tcp(upstream.address, packet)
        if not relay.answers_query(packet, data, exact_case=self._case_randomization):
            raise ValueError("TCP reply does not match the query")
        return relay.scan(data)


def _set_unless_cancelled(
    future: asyncio.Future[relay.Reply | Exception], outcome: relay.Reply | Exception
) -> None:
    """An exchange's outcome for the task awaiting it, unless that task was cancelled
    (its future is then cancelled, and the exchange not yet closed)."""
    if not future.done():
        future.set_result(outcome)


class QueryIds:
    """Random 16-bit query IDs from the kernel's CSPRNG (what `secrets` reads), fetched
    `POOL` IDs at a time: one getrandom() call per 1,024 queries instead of one each
    (0.6 us a query in `secrets.randbits`). Every ID is fresh random bits, used once;
    nothing about one tells anything about the next, as with one call per ID."""

    POOL = 1024

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def __call__(self) -> int:
        at = self._next
        if at >= len(self._pool):
            self._pool = os.urandom(2 * self.POOL)
            at = 0
        self._next = at + 2
        return (self._pool[at] << 8) | self._pool[at + 1]


def _mixed_case(name: bytes) -> bytes:
    """`name` (lowercase wire format) with each letter's case chosen at random (0x20)."""
    # What `secrets.randbits` reads, without importing `secrets` (and `random`) for it.
    bits = int.from_bytes(os.urandom((len(name) + 7) // 8))
    return bytes(
        byte ^ 0x20 if 0x61 <= byte <= 0x7A and (bits >> index) & 1 else byte
        for index, byte in enumerate(name)
    )
