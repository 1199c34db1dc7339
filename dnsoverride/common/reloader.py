"""Hot reload of what a daemon serves from files: notice a change, load the whole thing
off the loop, swap it in.

Owns *when* and *how* the served object is replaced, not what its files mean (the daemon
gives the loader: for `dnsoverride serve`, dns/reload.py, the zones with the reloadable
part of the config, validated as `dnsoverride check` validates them). Three things ask
for a reload:

- file events (watchdog/inotify) on the watched directory, on its parent (so a swapped
  symlink or a replaced directory is seen, as in a Kubernetes ConfigMap `..data` swap)
  and on the directory of each single watched file (editors and tools save by renaming);
- SIGHUP, which the service lifecycle routes to `Reloader.reload_now()` (`systemctl
  reload`; the lifecycle tells systemd, RELOADING=1 and READY=1, around it);
- a periodic check, for file systems whose events never arrive (NFS, some bind mounts).

Every request takes one path: wait until the files have been quiet for a debounce period
and no writer still has one open, take a content fingerprint, load and validate the whole
thing in a worker thread, take the fingerprint again (a file that changed under the reader
means the read may be torn: start over), and only then swap it in on the event loop
thread. A load that fails is logged problem by problem and the last good one keeps being
served, in full. Events for names the loader would not read are ignored, and an
unchanged fingerprint skips the load, so a stray event costs one hash of the files. (The
log events and metrics are named after the zones, the one thing reloaded today.)
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, Protocol, Self, TypeVar

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from dnsoverride.common.errors import ConfigError, Problem, UserError
from dnsoverride.common.heaptrim import trim_heap
from dnsoverride.common.metrics import Collectors
from dnsoverride.common.readfile import FS_BYTES, read_regular_file
from dnsoverride.common.yamlsource import brief

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = structlog.get_logger(__name__)

Trigger = Literal["event", "sighup", "periodic", "startup"]
# When several arrive together, the event is logged as the most deliberate one.
_TRIGGER_PRIORITY: tuple[Trigger, ...] = ("sighup", "event", "periodic", "startup")

DEFAULT_DEBOUNCE = 0.15
# A writer that keeps a file open longer than this does not hold reloads back forever.
DEFAULT_SETTLE_MAX = 2.0
# Files still changing after this many back-to-back reads: give up until the next event.
MAX_TORN_READS = 5
# How many names per category a reload event lists (the counts are always complete).
SUMMARY_SAMPLE = 10
# `zone_problem` events per failed reload: a mistaken edit of a big file (every address
# replaced) must not write a log line per name each time; `dnsoverride check` lists all.
MAX_LOGGED_PROBLEMS = 100


class Loaded(Protocol):
    """What the reloader needs from what it loads: an identity, its size, and what changed."""

    @property
    def content_hash(self) -> str: ...

    def name_count(self) -> int: ...

    def changes_from(self, old: Self) -> tuple[list[str], list[str], list[str]]: ...


S = TypeVar("S", bound=Loaded)
R = TypeVar("R")


@dataclass
class ReloadStats:
    """Outcome counters of reload attempts, read by the metrics collector and by tests."""

    successes: int = 0
    failures: int = 0
    last_success_unix: float | None = None
    last_duration_seconds: float | None = None
    last_failure_unix: float | None = None
    # The last failed reload's problems (the first SUMMARY_SAMPLE), for `dnsoverride status`.
    last_problems: tuple[str, ...] = ()

    def succeeded(self, seconds: float) -> None:
        """Count a successful load that took `seconds`."""
        self.successes += 1
        self.last_success_unix = time.time()
        self.last_duration_seconds = seconds

    def failed(self, problems: Sequence[Problem]) -> None:
        """Count a failed load and keep what it said."""
        self.failures += 1
        self.last_failure_unix = time.time()
        self.last_problems = tuple(str(p) for p in problems[:SUMMARY_SAMPLE])

    def summary(self) -> dict[str, object]:
        """The outcome of the last reload, for a status report: when, which result, and
        the problems of the last failure (a failure older than the last success is past)."""
        failed_last = self.last_failure_unix is not None and (
            self.last_success_unix is None or self.last_failure_unix > self.last_success_unix
        )
        return {
            "successes": self.successes,
            "failures": self.failures,
            "last_result": "failure" if failed_last else "success",
            "last_success_unix": self.last_success_unix,
            "last_failure_unix": self.last_failure_unix,
            "last_duration_seconds": self.last_duration_seconds,
            "last_problems": list(self.last_problems),
        }


class ReloadCollector:
    """Exposes `ReloadStats` as `dnsoverride_zone_reload*` metrics at scrape time."""

    def __init__(self, stats: ReloadStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        # prometheus-client on a scrape only (common/metrics.py)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        reloads = CounterMetricFamily(
            "dnsoverride_zone_reloads",
            "Zone set reload attempts by result (a failure keeps the last good set).",
            labels=["result"],
        )
        reloads.add_metric(["success"], self._stats.successes)
        reloads.add_metric(["failure"], self._stats.failures)
        yield reloads
        if self._stats.last_success_unix is not None:
            yield GaugeMetricFamily(
                "dnsoverride_zone_reload_last_success_timestamp_seconds",
                "Unix time of the last successful zone set reload.",
                value=self._stats.last_success_unix,
            )
        if self._stats.last_duration_seconds is not None:
            yield GaugeMetricFamily(
                "dnsoverride_zone_reload_duration_seconds",
                "Load + validate + swap time of the last successful reload.",
                value=self._stats.last_duration_seconds,
            )


@dataclass(frozen=True)
class ChangeSummary:
    """How many names a reload added, removed and changed, and the first few of each
    (in name order): a full rewrite of a big set is counted, not listed."""

    added: int
    removed: int
    changed: int
    added_names: tuple[str, ...] = ()
    removed_names: tuple[str, ...] = ()
    changed_names: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: S, new: S) -> ChangeSummary:
        added, removed, changed = new.changes_from(old)

        def first(names: list[str]) -> tuple[str, ...]:
            return tuple(heapq.nsmallest(SUMMARY_SAMPLE, names))

        return cls(
            len(added),
            len(removed),
            len(changed),
            first(added),
            first(removed),
            first(changed),
        )

    def log_fields(self) -> dict[str, object]:
        return {
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "added_names": list(self.added_names),
            "removed_names": list(self.removed_names),
            "changed_names": list(self.changed_names),
        }


NO_CHANGES = ChangeSummary(0, 0, 0)


@dataclass(frozen=True)
class _Failed:
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Sources:
    """The files a load reads: the entries of `directory` that `wanted` names (all of
    them listed by `listing(directory)`), and single `files` (a config file)."""

    directory: Path
    wanted: Callable[[str], bool]
    listing: Callable[[Path], list[Path]]
    files: tuple[Path, ...] = ()


def fingerprint(sources: Sources) -> str:
    """A hash of the name and bytes of every file a reload would read.

    Content, not mtime/size/inode: an in-place rewrite of the same length within one
    timestamp tick must still count as a change, and the files are small next to the
    cost of the parse this saves.
    """
    digest = hashlib.blake2b(digest_size=16)
    try:
        paths = sources.listing(sources.directory)
    except OSError as error:
        paths = []
        digest.update(f"directory unreadable: {error}".encode(errors=FS_BYTES))
    paths.extend(sources.files)
    for path in paths:
        try:
            data = read_regular_file(path)
        except OSError as error:
            data = f"unreadable: {error}".encode(errors=FS_BYTES)
        # A file name that is not UTF-8 is hashed as its own bytes.
        digest.update(f"{path}\0{len(data)}\0".encode(errors=FS_BYTES))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Watch:
    """One watched directory and which of its entries matter (`names`, else `wanted`).

    `inode` makes a directory replaced under the same path (`mv zones.new zones`) a
    different watch, so the observer is moved off the old, now unreachable, directory.
    """

    directory: str
    names: frozenset[str] | None
    inode: tuple[int, int] | None
    wanted: Callable[[str], bool] | None = None

    def wants(self, path: str) -> bool:
        parent, name = os.path.split(path)
        if parent != self.directory:
            return False
        # ConfigMap mounts swap a `..data` symlink beside the files they hold. Editor
        # scratch files (`.x.swp`, `x~`, `4913`, `.#x.yaml`) and temporaries renamed into
        # place (whose rename names the real file) are not names a load reads.
        if name.startswith(".."):
            return True
        if self.names is not None:
            return name in self.names
        return self.wanted is not None and self.wanted(name)


def watch_plan(sources: Sources) -> frozenset[_Watch]:
    """The directories to watch, with symlinks resolved as they are right now.

    The directory itself (the entries `sources.wanted` names), its parent (only the entry
    that is the directory, so a replaced or re-pointed directory is seen), and the
    directory of each single file and of whatever its symlink points at.
    """
    plan = {_watch(sources.directory.resolve(), None, sources.wanted)}
    absolute = sources.directory.absolute()
    plan.add(_watch(absolute.parent.resolve(), absolute.name))
    for path in sources.files:
        absolute = path.absolute()
        plan.add(_watch(absolute.parent.resolve(), absolute.name))
        resolved = absolute.resolve()
        if resolved != absolute:
            plan.add(_watch(resolved.parent, resolved.name))
    return frozenset(plan)


def _watch(
    directory: Path, name: str | None, wanted: Callable[[str], bool] | None = None
) -> _Watch:
    try:
        stat = directory.stat()
    except OSError:
        inode = None
    else:
        inode = (stat.st_dev, stat.st_ino)
    names = None if name is None else frozenset({name})
    return _Watch(str(directory), names, inode, wanted)


class _EventHandler(FileSystemEventHandler):
    """Runs on the watchdog thread: filters events and hands the rest to the loop."""

    # Our own reads open and close the files; only changes matter.
    _IGNORED = frozenset({"opened", "closed_no_write"})

    def __init__(
        self, on_change: Callable[[str, str], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._on_change = on_change
        self._loop = loop
        self.plan: frozenset[_Watch] = frozenset()

    def on_any_event(self, event: FileSystemEvent) -> None:
        # A directory's "modified" is watchdog's summary of changes to its entries, and
        # those arrive (and are filtered) one by one.
        if event.event_type in self._IGNORED or (
            event.is_directory and event.event_type == "modified"
        ):
            return
        paths = [os.fsdecode(event.src_path)]
        if event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        wanted = [p for p in paths if any(w.wants(p) for w in self.plan)]
        if wanted:
            self._loop.call_soon_threadsafe(self._on_change, event.event_type, wanted[-1])


@dataclass
class _Pending:
    """What has been asked for since the last reload cycle started (loop thread only)."""

    triggers: set[Trigger] = field(default_factory=set)
    last_event: float = 0.0
    writing: set[str] = field(default_factory=set)
    # Callers of `reload_now`, told when the cycle that took their request is over.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Reloader(Generic[S]):
    """Keeps the served object in step with its files; see the module docstring.

    `load` must build and validate a complete set (raising ConfigError, or UserError for
    a bad config); it runs in a worker thread. `swap` installs a set and runs on the
    event loop thread. `current` is the set being served when the reloader starts.
    `interval` is the periodic check's period in seconds (0: none). `stats` may already
    count the first load.
    """

    def __init__(
        self,
        *,
        load: Callable[[], S],
        swap: Callable[[S], object],
        current: S,
        sources: Sources,
        interval: float,
        debounce: float = DEFAULT_DEBOUNCE,
        settle_max: float = DEFAULT_SETTLE_MAX,
        registry: Collectors | None = None,
        baseline: str | None = None,
        stats: ReloadStats | None = None,
    ) -> None:
        self._load = load
        self._swap = swap
        self._current = current
        self._sources = sources
        self._interval = interval
        self._debounce = debounce
        self._settle_max = settle_max
        self.stats = stats or ReloadStats()
        if registry is not None:
            registry.register(ReloadCollector(self.stats))
        self._pending = _Pending()
        self._wake = asyncio.Event()
        # The fingerprint of the files `current` was loaded from, when the caller took one
        # before loading; otherwise taken at start(), blind to edits made in between.
        self._seen = baseline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zone-reload")
        self._observer: BaseObserver | None = None
        self._handler: _EventHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def current(self) -> S:
        """The set most recently swapped in (or the one given at start)."""
        return self._current

    async def start(self) -> None:
        """Take the starting fingerprint, start watching, and start the periodic check."""
        loop = asyncio.get_running_loop()
        now = await self._in_thread(fingerprint, self._sources)
        if self._seen is None:
            self._seen = now
        elif now != self._seen:
            self.request("startup")
        self._observer = Observer()
        self._observer.daemon = True
        self._handler = _EventHandler(self._file_changed, loop)
        await self._in_thread(self._rewatch)
        self._observer.start()
        self._tasks.append(asyncio.create_task(self._worker(), name="zone-reload"))
        if self._interval > 0:
            self._tasks.append(asyncio.create_task(self._periodic(), name="zone-reload-periodic"))
        log.info(
            "zone_reload_watching",
            directory=str(self._sources.directory),
            files=[str(path) for path in self._sources.files],
            interval=self._interval,
        )

    async def stop(self) -> None:
        """Stop watching and cancel pending work; a reload in progress is abandoned."""
        for waiter in self._pending.waiters:
            waiter.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._observer is not None:
            self._observer.stop()
            await self._in_thread(self._observer.join)
            self._observer = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def reload_now(self) -> None:
        """Reload even if nothing seems changed (SIGHUP, `systemctl reload`); returns when
        that reload is over, swapped in or failed (and logged)."""
        done = asyncio.get_running_loop().create_future()
        self._pending.waiters.append(done)
        self.request("sighup")
        await done

    def request(self, trigger: Trigger) -> None:
        """Ask for a reload (loop thread). `sighup` reloads even if nothing seems changed."""
        self._pending.triggers.add(trigger)
        self._wake.set()

    def _file_changed(self, kind: str, path: str) -> None:
        pending = self._pending
        pending.last_event = time.monotonic()
        if kind == "modified":
            pending.writing.add(path)
        elif kind in ("closed", "deleted", "moved"):
            pending.writing.discard(path)
        self.request("event")

    async def _in_thread(self, func: Callable[..., R], *args: object) -> R:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def _rewatch(self) -> bool:
        """(Re)schedule the observer when symlinks now resolve elsewhere (worker thread);
        True when the watches moved."""
        assert self._observer is not None and self._handler is not None
        plan = watch_plan(self._sources)
        if plan == self._handler.plan:
            return False
        self._observer.unschedule_all()
        for directory in sorted({watch.directory for watch in plan}):
            try:
                self._observer.schedule(self._handler, directory, recursive=False)
            except OSError as error:
                # Missing for now; the parent watch or the periodic check will bring it back.
                log.warning("zone_watch_failed", directory=directory, error=str(error))
        self._handler.plan = plan
        return True

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.request("periodic")

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            if self._pending.triggers == {"event"}:
                await self._settle()
            self._wake.clear()
            triggers, self._pending.triggers = self._pending.triggers, set()
            waiters, self._pending.waiters = self._pending.waiters, []
            self._pending.writing.clear()
            trigger = next(t for t in _TRIGGER_PRIORITY if t in triggers)
            try:
                await self._reload(trigger)
            except Exception:
                # A bug here must not end reloading for the life of the daemon.
                log.exception("zone_reload_crashed", trigger=trigger)
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            if await self._in_thread(self._rewatch):
                # An edit made in the new directory before it was watched had no event.
                self.request("event")

    async def _settle(self) -> None:
        """Wait until events stopped for `debounce` and no file is mid-write, at most
        `settle_max` (a file rewritten non-stop must not starve reloads: the torn-read
        check still keeps a half-written set out)."""
        deadline = time.monotonic() + self._settle_max
        while True:
            now = time.monotonic()
            quiet = now - self._pending.last_event
            if now >= deadline or (quiet >= self._debounce and not self._pending.writing):
                return
            await asyncio.sleep(max(self._debounce - quiet, 0.02))

    async def _reload(self, trigger: Trigger) -> None:
        outcome: S | _Failed | None = None
        cpu = 0.0
        for _ in range(MAX_TORN_READS):
            before = await self._in_thread(fingerprint, self._sources)
            if before == self._seen and trigger != "sighup":
                log.debug("zones_unchanged", trigger=trigger)
                return
            started = time.perf_counter()
            outcome, cpu = await self._in_thread(self._load_set)
            loaded_in = time.perf_counter() - started
            after = await self._in_thread(fingerprint, self._sources)
            if after == before and isinstance(outcome, _Failed) and trigger == "event":
                # A save seen halfway (truncate, then write) fails to parse; if the files
                # move again within one more debounce period, it was that, not a bad file.
                await asyncio.sleep(self._debounce)
                after = await self._in_thread(fingerprint, self._sources)
            if after == before:
                break
            log.debug("zones_changed_while_reading", trigger=trigger)
        else:
            self._record_failure(
                trigger,
                (Problem(str(self._sources.directory), 0, "files kept changing while being read"),),
            )
            return
        self._seen = before
        if isinstance(outcome, _Failed):
            self._record_failure(trigger, outcome.problems)
        elif outcome is not None:
            await self._install(trigger, outcome, loaded_in, cpu)

    def _load_set(self) -> tuple[S | _Failed, float]:
        """Run the loader (worker thread), turning the errors it may raise into problems;
        also the CPU seconds it took, its parse worker processes included (wall time alone
        mostly tells how busy the host is)."""
        started, workers = time.thread_time(), _children_cpu()
        outcome = self._try_load()
        cpu = time.thread_time() - started + _children_cpu() - workers
        trim_heap()  # what the load built and dropped (file bytes, worker replies)
        return outcome, cpu

    def _try_load(self) -> S | _Failed:
        try:
            return self._load()
        except ConfigError as error:  # a ZoneSetError too
            return _Failed(error.problems)
        except UserError as error:
            return _Failed((Problem(self._where(), 0, str(error)),))
        except Exception as error:
            # Our bug, or memory exhausted: a failure like any other, so that its files'
            # fingerprint is recorded and the periodic check does not load the same bytes
            # again every interval (only a new save or SIGHUP does). The traceback is
            # logged once, here.
            log.exception("zone_reload_crashed", error=brief(str(error)))
            reason = f"internal error while loading: {type(error).__name__}: {brief(str(error))}"
            return _Failed((Problem(self._where(), 0, reason),))

    def _where(self) -> str:
        """What a problem that is not in one file is reported against."""
        return str(self._sources.files[0] if self._sources.files else self._sources.directory)

    async def _install(self, trigger: Trigger, new: S, loaded_in: float, cpu: float) -> None:
        """Swap `new` in unless it is identical, then log what changed (diffed after the swap,
        so the summary never delays serving the new set)."""
        old = self._current
        swapped = new.content_hash != old.content_hash
        changes = NO_CHANGES
        if swapped:
            self._swap(new)
            self._current = new
            # The worker thread takes the last reference to the old set: freeing a big
            # one (0.3 s for 1,000,000 names) is not time for the event loop to spend.
            retired = [old]
            del old
            changes = await self._in_thread(_summarize_and_retire, retired, new)
        log.info(
            "zones_reloaded",
            trigger=trigger,
            content_hash=new.content_hash,
            swapped=swapped,
            names=new.name_count(),
            seconds=round(loaded_in, 4),
            cpu_seconds=round(cpu, 4),
            **changes.log_fields(),
        )
        self.stats.succeeded(loaded_in)

    def _record_failure(self, trigger: Trigger, problems: Iterable[Problem]) -> None:
        problems = tuple(problems)
        self.stats.failed(problems)
        for problem in problems[:MAX_LOGGED_PROBLEMS]:
            log.error("zone_problem", file=problem.file, line=problem.line, reason=problem.reason)
        log.error(
            "zones_reload_failed",
            trigger=trigger,
            problems=len(problems),
            problems_logged=min(len(problems), MAX_LOGGED_PROBLEMS),
            reasons=[str(p) for p in problems[:SUMMARY_SAMPLE]],
            kept_content_hash=self._current.content_hash,
        )


def _summarize_and_retire(retired: list[S], new: S) -> ChangeSummary:
    """What changed from the set in `retired` (its only reference) to `new`; then the old
    set is freed, here, and the memory it held handed back to the system."""
    old = retired.pop()
    changes = ChangeSummary.between(old, new)
    del old
    trim_heap()
    return changes


def _children_cpu() -> float:
    """CPU seconds of the child processes that have ended (the zone parse workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
