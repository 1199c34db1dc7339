"""`workers: N`: the DNS server in N processes on one port, one service to the admin.

The process `serve` starts (the supervisor) answers queries like every worker and also
runs what must exist once: the reloader that watches the files, the health prober, the
admin listener, READY. It starts N-1 worker processes, each a fresh interpreter
(`python -P -c`, started by fork+exec: nothing of the supervisor's running event loop and
threads is copied, and no multiprocessing fork server or resource tracker sits beside
them) with the supervisor's interpreter flags and sys.path, handed one end of a control
link (`ControlLink`) and, under socket activation, systemd's sockets as inherited file
descriptors. Each binds the supervisor's UDP and TCP ports with SO_REUSEPORT, so the
kernel spreads clients over the processes by address and port; under socket activation
they all serve the inherited sockets instead.

The link carries the control messages (`Message`): to the worker, first "start" (its
`WorkerSpec` and index), then "reload" after every routing the supervisor installed (the
worker loads the same files with the same validation and answers "reloaded" with its
routing's content hash), "withdrawn" (the health prober's verdict), "metrics" (it answers
with its registry's exposition text, merged into the supervisor's `/metrics`:
`MergedMetrics`), "counts" (it answers with what it has counted, summed into the
supervisor's `/status`), "ping" (it answers "pong": a worker silent for `UNRESPONSIVE`
seconds is killed and replaced) and "stop"; from the worker, "ready" once it serves (one
that has not within `READY_FLOOR` + `READY_FACTOR` times the supervisor's own zone load
is killed: `worker_start_timeout`). A worker that fails (`worker_exited`, with its exit
code or the signal and when it is started again) is logged and replaced: at least
`RESTART_DELAY` seconds after its last start, twice as long after each further failure
within `RESTART_DELAY_MAX` seconds of its start, up to that (a worker that cannot load
the files crash-loops slowly: its log does not flood). One that exits cleanly or by
SIGTERM was stopped (SIGTERM to the whole control group, during start-up too) and is not
replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dnsoverride.common.interpreter import python_command
from dnsoverride.common.log import LogOptions
from dnsoverride.common.metrics import Collectors, exposition
from dnsoverride.dns.config import ServeConfig, ServeFlags
from dnsoverride.dns.controllink import ControlLink

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = structlog.get_logger(__name__)

# A worker that has not said it serves within READY_FLOOR + READY_FACTOR times the time
# the supervisor itself took to load the zones (scaled to what they are now) is killed:
# the floor is the imports and binds of a fresh interpreter on a busy machine (0.3 s on
# an idle one); the factor, the worker loading while N-1 others and the supervisor's
# serving share the CPUs.
READY_FLOOR = 10.0
READY_FACTOR = 5.0
REPLY_TIMEOUT = 5.0  # seconds for a worker's answer to "reload" or "metrics"
RESTART_DELAY = 1.0  # at least this long between two starts of one worker ...
RESTART_DELAY_MAX = 60.0  # ... doubled for each failure in a row, up to this
# A serving worker is asked "ping" every HEARTBEAT seconds; one that has said nothing for
# UNRESPONSIVE seconds since (stopped, its event loop stuck) is killed and replaced: the
# kernel goes on handing it its share of the clients, who would get no answer.
HEARTBEAT = 5.0
UNRESPONSIVE = 30.0
STOP_GRACE = 3.0  # seconds a worker has to drain after "stop"


@dataclass(frozen=True)
class Message:
    """One control message: `kind` and what it carries."""

    kind: str
    value: Any = None


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled to it over its link; `config.listen`
    holds the supervisor's bound ports, which the worker binds again with SO_REUSEPORT)."""

    config: ServeConfig
    loaded: ServeConfig  # as `load_config` read it: what the worker's reloads compare with
    path: Path | None
    flags: ServeFlags
    logging: LogOptions
    cookie_secret: bytes  # the supervisor's: a server cookie is valid on every process
    # systemd's sockets, served by every process: their file descriptors, which each
    # worker inherits under the same numbers
    inherited: tuple[int, ...] = ()


@dataclass
class _Worker:
    """One worker process as the supervisor sees it."""

    index: int
    process: subprocess.Popen[bytes]
    exited: int  # a pidfd of `process`, readable once it has exited; -1 once closed
    conn: ControlLink
    started_at: float
    ready: asyncio.Future[None]
    reloaded: str | None = None  # content hash of its routing after the last "reload"
    routing: str | None = None  # content hash of the routing it serves (ready, reloaded)
    asked: dict[str, asyncio.Future[Any]] = field(default_factory=dict)  # by message kind
    pinged: float | None = None  # when it was sent a "ping" it has not answered since
    within: float = 0.0  # seconds it has from its start to say it serves
    start_timeout: asyncio.TimerHandle | None = None  # cancelled once it serves or exits
    acks: list[asyncio.Future[None]] = field(default_factory=list)


# Exit codes of a worker that was stopped, not failed (Popen's: -N for signal N).
_STOPPED = (0, -signal.SIGTERM)

WorkerMain = Callable[[WorkerSpec, int, ControlLink], None]

# The variables a worker must not take from the supervisor: systemd's notify socket and
# watchdog are the supervisor's alone (systemd hears one READY), and so are its sockets.
_SUPERVISOR_ONLY = (
    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
)  # fmt: skip


class WorkerPool:
    """The supervisor's side: starts, feeds, watches and restarts the workers."""

    def __init__(
        self, spec: WorkerSpec, count: int, main: WorkerMain, load_seconds: Callable[[], float]
    ) -> None:
        """`load_seconds`: how long loading the zones served now takes, as the supervisor
        measured it (what a worker's start is given time for)."""
        self._spec = spec
        self._count = count
        self._load_seconds = load_seconds
        self._command = _command(main)
        self._environment = _environment()
        self._workers: dict[int, _Worker] = {}
        self._loop = asyncio.get_running_loop()
        self._withdrawn: frozenset[str] = frozenset()
        self._routing_hash = ""
        self._stopping = False
        self._heartbeat: asyncio.Task[None] | None = None
        self.restarts = 0
        # Failures in a row of each worker (index) that exited within RESTART_DELAY_MAX
        # seconds of its start: its next start waits twice as long for each.
        self._failures: dict[int, int] = {}
        self._last_metrics: dict[int, str] = {}  # per worker, from the last scrape
        # The last metrics of workers that exited: their counters stay in the sums, so a
        # restart does not make the merged counters fall (a reset to Prometheus).
        self.retired_metrics: list[str] = []

    async def start(self, routing_hash: str) -> None:
        """Start every worker and wait until each serves (RuntimeError if one does not)."""
        self._routing_hash = routing_hash
        for index in range(1, self._count + 1):
            try:
                self._spawn(index)
            except OSError as error:
                raise RuntimeError(f"worker {index} could not be started: {error}") from None
        await asyncio.gather(*(worker.ready for worker in self._workers.values()))
        self._heartbeat = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Ping the serving workers; kill one that stays silent (`UNRESPONSIVE`)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            now = time.monotonic()
            for worker in list(self._workers.values()):
                if not _serves(worker):
                    continue
                if worker.pinged is None:
                    if self._send(worker, Message("ping")):
                        worker.pinged = now
                elif now - worker.pinged >= UNRESPONSIVE:
                    log.error(
                        "worker_unresponsive",
                        worker=worker.index,
                        pid=worker.process.pid,
                        seconds=round(now - worker.pinged, 1),
                    )
                    worker.pinged = None
                    worker.process.kill()  # `_exited` logs and replaces it

    def _spawn(self, index: int) -> _Worker:
        """Start worker `index` (OSError if it cannot be: a task limit, a sandbox)."""
        ours, theirs = ControlLink.pair()
        try:
            # fork+exec (vfork where it can): the child runs nothing of ours before exec.
            process = subprocess.Popen(
                [*self._command, str(theirs.fileno())],
                env=self._environment,
                pass_fds=(theirs.fileno(), *self._spec.inherited),
                stdin=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            exited = os.pidfd_open(process.pid)  # Linux 5.3 and later
        except OSError:
            process.kill()
            process.wait()
            ours.close()
            raise
        worker = _Worker(index, process, exited, ours, time.monotonic(), self._loop.create_future())
        self._workers[index] = worker
        load = self._load_seconds()
        worker.within = READY_FLOOR + READY_FACTOR * load
        worker.start_timeout = self._loop.call_later(
            worker.within, self._start_timed_out, worker, load
        )
        self._send(worker, Message("start", (self._spec, index)))
        self._loop.add_reader(ours.fileno(), self._receive, worker)
        self._loop.add_reader(exited, self._exited, worker)
        return worker

    def _start_timed_out(self, worker: _Worker, load: float) -> None:
        """`worker` has not said it serves within its time (`load`: the supervisor's zone
        load it was given time for): killed (`_exited` starts another; during `start`,
        the start fails)."""
        if worker.ready.done() or worker.process.poll() is not None:
            return
        log.error(
            "worker_start_timeout",
            worker=worker.index,
            pid=worker.process.pid,
            within=round(worker.within, 1),
            zone_load_seconds=round(load, 3),
        )
        worker.ready.set_exception(
            RuntimeError(
                f"worker {worker.index} did not serve within {worker.within:.1f} s"
                f" ({READY_FLOOR:g} s + {READY_FACTOR:g} x the zones' load, {load:.2f} s)"
            )
        )
        worker.ready.exception()  # `start` re-raises it; a replacement's is logged above
        worker.process.kill()

    def _receive(self, worker: _Worker) -> None:
        try:
            message: Message = worker.conn.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(worker.conn.fileno())  # it exited: `_exited` follows
            return
        worker.pinged = None  # it spoke: alive
        if message.kind == "ready":
            if worker.ready.done():
                return  # too late: it is being killed
            if worker.start_timeout is not None:
                worker.start_timeout.cancel()
            worker.routing = message.value
            log.info(
                "worker_started",
                worker=worker.index,
                pid=worker.process.pid,
                seconds=round(time.monotonic() - worker.started_at, 2),
                within=round(worker.within, 1),
            )
            if self._withdrawn:
                self._send(worker, Message("withdrawn", self._withdrawn))
            if self._routing_hash and message.value != self._routing_hash:
                self._send(worker, Message("reload"))  # the files changed as it started
            worker.ready.set_result(None)
        elif message.kind == "reloaded":
            worker.reloaded = worker.routing = message.value
            for ack in worker.acks:
                if not ack.done():
                    ack.set_result(None)
            worker.acks.clear()
        elif message.kind in worker.asked:
            answer = worker.asked.pop(message.kind)
            if not answer.done():
                answer.set_result(message.value)

    def _exited(self, worker: _Worker) -> None:
        _close_pidfd(self._loop, worker)
        if worker.start_timeout is not None:
            worker.start_timeout.cancel()
        with contextlib.suppress(OSError, ValueError):  # closed already
            self._loop.remove_reader(worker.conn.fileno())
        code = worker.process.wait()  # it has exited: this reaps it at once
        worker.conn.close()
        if not worker.ready.done() and code in _STOPPED:
            worker.ready.set_result(None)  # stopped as it started: `start` goes on without it
        elif not worker.ready.done():
            worker.ready.set_exception(RuntimeError(f"worker {worker.index} exited ({code})"))
            worker.ready.exception()  # `start` re-raises it; a replacement's is logged below
        for ack in worker.acks:
            if not ack.done():
                ack.set_result(None)  # nothing to wait for: its replacement loads afresh
        for answer in worker.asked.values():
            answer.cancel()  # the scrape or status request goes on without it
        worker.asked.clear()
        if self._stopping:
            return
        if code in _STOPPED:
            # Only "stop" or SIGTERM end a worker cleanly: systemd stopping the whole
            # control group (during start-up, before a worker handles SIGTERM, it dies
            # of it), the supervisor's own SIGTERM on its way.
            log.info("worker_stopped", worker=worker.index, pid=worker.process.pid)
            return
        last = self._last_metrics.pop(worker.index, None)
        if last is not None:
            self.retired_metrics.append(last)
        now = time.monotonic()
        failures = 1
        if now - worker.started_at < RESTART_DELAY_MAX:
            failures += self._failures.get(worker.index, 0)
        self._failures[worker.index] = failures
        wait = min(RESTART_DELAY * 2 ** (failures - 1), RESTART_DELAY_MAX)
        delay = max(0.0, worker.started_at + wait - now)
        reason = f"signal {signal.Signals(-code).name}" if code and code < 0 else f"exit {code}"
        log.warning(
            "worker_exited",
            worker=worker.index,
            pid=worker.process.pid,
            reason=reason,
            restart_in=round(delay, 1),
        )
        self.restarts += 1
        self._loop.call_later(delay, self._restart, worker.index)

    def _restart(self, index: int) -> None:
        if self._stopping:
            return
        try:
            self._spawn(index)
        except OSError as error:
            log.error("worker_start_failed", worker=index, error=str(error))
            self._loop.call_later(RESTART_DELAY, self._restart, index)

    def _send(self, worker: _Worker, message: Message) -> bool:
        try:
            worker.conn.send(message)
        except (OSError, ValueError):  # it exited: `_exited` replaces it
            return False
        return True

    def serving(self) -> int:
        """Workers that have said they serve and are still running."""
        return sum(1 for worker in self._workers.values() if _serves(worker))

    def reload(self, routing_hash: str) -> list[asyncio.Future[None]]:
        """Tell every worker to load the routing with `routing_hash` (the supervisor's
        new one); the futures resolve as each answers."""
        self._routing_hash = routing_hash
        acks = []
        for worker in self._workers.values():
            ack = self._loop.create_future()
            if self._send(worker, Message("reload")):
                worker.acks.append(ack)
                acks.append(ack)
        return acks

    async def reloaded(self, acks: list[asyncio.Future[None]]) -> None:
        """Wait (bounded) for `acks`; log a worker whose routing differs from ours."""
        if acks:
            await asyncio.wait(acks, timeout=REPLY_TIMEOUT)
        for worker in self._workers.values():
            if worker.reloaded is not None and worker.reloaded != self._routing_hash:
                log.warning("worker_routing_differs", worker=worker.index)

    def withdraw(self, names: frozenset[str]) -> None:
        """Pass the health prober's verdict to every worker."""
        self._withdrawn = names
        for worker in self._workers.values():
            self._send(worker, Message("withdrawn", names))

    async def ask_each(self, kind: str) -> dict[int, Any]:
        """Every serving worker's answer to a `kind` message ("metrics", "counts"), by
        worker; a worker that does not answer within `REPLY_TIMEOUT` is left out. A worker
        still asked from an earlier request is not asked again: both wait for its answer."""
        asked = {}
        for worker in self._workers.values():
            pending = worker.asked.get(kind)
            if pending is not None and not pending.done():
                asked[worker.index] = pending
            elif worker.ready.done() and self._send(worker, Message(kind)):
                worker.asked[kind] = asked[worker.index] = self._loop.create_future()
        if asked:
            await asyncio.wait(asked.values(), timeout=REPLY_TIMEOUT)
        return {
            index: answer.result()
            for index, answer in asked.items()
            if answer.done() and not answer.cancelled()
        }

    async def gather_metrics(self) -> list[str]:
        """Every serving worker's exposition text: its answer now, or else (it was slow)
        the last one it gave."""
        self._last_metrics.update(await self.ask_each("metrics"))
        serving = {worker.index for worker in self._workers.values() if _serves(worker)}
        return [text for index, text in sorted(self._last_metrics.items()) if index in serving]

    def describe(self) -> list[dict[str, object]]:
        """Each worker process for `/status`: its index, PID, whether it serves, and the
        content hash of the routing it serves."""
        return [
            {
                "worker": worker.index,
                "pid": worker.process.pid,
                "serving": _serves(worker),
                "routing": worker.routing,
            }
            for worker in self._workers.values()
        ]

    async def stop(self) -> None:
        """Stop every worker: "stop", `STOP_GRACE` seconds to drain, then SIGKILL."""
        self._stopping = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for worker in self._workers.values():
            if worker.start_timeout is not None:
                worker.start_timeout.cancel()
            self._send(worker, Message("stop"))
        deadline = time.monotonic() + STOP_GRACE
        for worker in self._workers.values():
            try:
                await asyncio.to_thread(worker.process.wait, max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
            _close_pidfd(self._loop, worker)
            with contextlib.suppress(OSError, ValueError):  # closed already
                self._loop.remove_reader(worker.conn.fileno())
            worker.conn.close()


def _close_pidfd(loop: asyncio.AbstractEventLoop, worker: _Worker) -> None:
    """Stop watching `worker`'s pidfd and close it, once (its number may be reused)."""
    if worker.exited >= 0:
        loop.remove_reader(worker.exited)
        os.close(worker.exited)
        worker.exited = -1


def _serves(worker: _Worker) -> bool:
    """Whether `worker` said it serves and is still running."""
    return worker.ready.done() and not worker.ready.exception() and worker.process.poll() is None


# Gauges that are not amounts: merged by maximum (an upstream is up if any worker finds
# it answering) or by mean (a ratio); every other sample is summed over the processes.
_MAX_SUFFIX = "_up"
_MEAN_SUFFIX = "_ratio"
RETIRED_KEPT = 16  # exited workers' texts kept apart before they are folded into one


def merge_metrics(texts: list[str], *, counts_from: int) -> Iterator[Metric]:
    """The metric families of several processes' exposition `texts`, merged sample by
    sample; from the `counts_from`th text on (exited workers), gauges are left out."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], list[float]]] = {}
    for number, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            if number >= counts_from and family.type == "gauge":
                continue  # an exited worker's state is gone; its counts are not
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[family.name].setdefault(key, []).append(sample.value)
    for name, family in merged.items():
        for (sample_name, labels), seen in values[name].items():
            if family.type == "gauge" and name.endswith(_MAX_SUFFIX):
                value = max(seen)
            elif family.type == "gauge" and name.endswith(_MEAN_SUFFIX):
                value = sum(seen) / len(seen)
            else:
                value = sum(seen)
            family.add_sample(sample_name, dict(labels), value)
        yield family


class _Families:
    """Fixed metric families, to render them as exposition text."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class MergedMetrics:
    """The supervisor's `/metrics`: its own registry and its workers' texts, merged."""

    def __init__(self, own: Collectors, pool: WorkerPool) -> None:
        self._own = own
        self._pool = pool
        self._texts: list[str] = []

    async def refresh(self) -> None:
        """Ask every worker for its metrics (before a scrape)."""
        self._texts = await self._pool.gather_metrics()

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        retired = self._pool.retired_metrics
        if len(retired) > RETIRED_KEPT:
            # Folded into one text: a worker crashing in a loop must not grow the supervisor.
            folded = _Families(list(merge_metrics(retired, counts_from=0)))
            retired[:] = [exposition(folded).decode()]
        live = [exposition(self._own).decode(), *self._texts]
        yield from merge_metrics([*live, *retired], counts_from=len(live))
        workers = GaugeMetricFamily(
            "dnsoverride_dns_workers", "Processes answering queries (the supervisor included)"
        )
        workers.add_metric([], 1 + self._pool.serving())
        yield workers
        restarts = CounterMetricFamily(
            "dnsoverride_dns_worker_restarts", "Worker processes that exited and were replaced"
        )
        restarts.add_metric([], self._pool.restarts)
        yield restarts


def _command(main: WorkerMain) -> list[str]:
    """How a worker is started: a fresh interpreter with our interpreter flags and our
    sys.path that runs `main` through `worker_process` (the control link's descriptor is
    appended)."""
    return python_command(
        # The CLI module first, as `dnsoverride` imports it: it keeps structlog from
        # importing rich (5.5 MB of each process).
        "import dnsoverride.cli; "
        f"from {__name__} import worker_process; "
        f"from {main.__module__} import {main.__name__} as main; worker_process(main)"
    )


def _environment() -> dict[str, str]:
    """A worker's environment: ours, less what is the supervisor's alone."""
    return {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}


def worker_process(main: WorkerMain) -> None:
    """A worker's first steps (see `_command`): take the control link whose descriptor
    is the last argument, read its "start" message and run `main` with what it says."""
    link = ControlLink.inherited(int(sys.argv[-1]))
    try:
        start: Message = link.recv()
    except EOFError:  # the supervisor died before it said how (nor how to log): no one to serve
        raise SystemExit(0) from None
    spec, index = start.value
    main(spec, index, link)
