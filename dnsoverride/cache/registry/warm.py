"""Warming: fetching an image into the store before any client asks for it
(`dnsoverride cache warm`, and the config's `warm:` list on a schedule).

A warm resolves the image's tag with the upstream whatever the tag TTL (a moved tag gets
its new manifest: Manifests.resolve_tag), fetches every manifest an index lists (all
platforms, not only the one a client would pick) and every blob those manifests list,
through the same single-flight downloads clients use (Blobs.prefetch): a client pulling
meanwhile joins them, and afterwards gets hits only. A warm is a `WarmJob` whose progress
(blobs and bytes done of those listed) `dnsoverride cache warm` polls; a second request
for an image being warmed joins that job.

The `warm:` list: each image is warmed at start-up and then every `interval` after its
last warm ended, whatever the outcome; a failure is one log line (`warm_failed`, image
and reason) and is tried again at the next interval. A reload (SIGHUP) replaces the list
(`replace_schedule`): a new or changed entry is warmed at once, a removed one is no longer
scheduled (a warm of it in progress finishes), an unchanged one keeps its schedule. The
last warm of each image (when, result, reason) is in `/status` and /metrics. `clock`
(wall time) and `sleep` are injected: tests turn the schedule without waiting for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from dnsoverride.cache.registry.blobs import Blobs
from dnsoverride.cache.registry.config import RegistryConfig, WarmConfig, WarmImage
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.manifests import Manifest, Manifests
from dnsoverride.cache.registry.names import parse_digest
from dnsoverride.cache.registry.references import ImageRef, parse_image
from dnsoverride.cache.registry.upstream import (
    Upstream,
    UpstreamDeniedError,
    UpstreamUnavailableError,
    as_registry_error,
)
from dnsoverride.cache.registry.withheld import withheld
from dnsoverride.cache.store import Digest

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = structlog.get_logger(__name__)

# Blobs fetched at once by all warms together (the warm: list starts every image at
# once): a few streams fill a link; more only compete with the CI pulls warming is for.
PARALLEL_BLOBS = 4
UPSTREAM_FAILURES = (UpstreamUnavailableError, UpstreamDeniedError, TimeoutError)
KEPT_JOBS = 64  # finished jobs kept for `cache warm` to read their outcome


@dataclass
class WarmJob:
    """One warm of one image, as `dnsoverride cache warm` follows it."""

    id: int
    image: ImageRef
    started: float
    state: str = "running"  # then "done" or "failed"
    error: str | None = None
    finished: float | None = None
    digest: str | None = None
    platforms: int = 0
    manifests: int = 0
    blobs: int = 0
    blobs_done: int = 0
    blobs_fetched: int = 0  # of those done, how many came from the upstream now
    bytes: int = 0
    bytes_done: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def document(self) -> dict[str, object]:
        return {
            "job": self.id,
            "image": str(self.image),
            "state": self.state,
            "error": self.error,
            "started_unix": self.started,
            "finished_unix": self.finished,
            "digest": self.digest,
            "platforms": self.platforms,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "blobs_done": self.blobs_done,
            "blobs_fetched": self.blobs_fetched,
            "bytes": self.bytes,
            "bytes_done": self.bytes_done,
        }


@dataclass
class LastWarm:
    """The outcome of a `warm:` entry's last scheduled warm."""

    entry: WarmImage
    runs: int = 0
    failures: int = 0
    last_run: float | None = None
    last_success: float | None = None
    last_error: str | None = None
    next_run: float | None = None
    recorded_job: int | None = None  # the job last counted: one joined twice counts once


class Warmer:
    def __init__(
        self,
        registry: RegistryConfig,
        upstreams: dict[str, Upstream],
        manifests: Manifests,
        blobs: Blobs,
        warm: WarmConfig,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.registry = registry
        self.upstreams = upstreams
        self.manifests = manifests
        self.blobs = blobs
        self.clock = clock
        self.sleep = sleep
        self.schedule = {entry.image: LastWarm(entry) for entry in warm.images}
        self._timers: dict[str, asyncio.Future[None]] = {}  # image -> its schedule's task
        self._scheduling = False
        self._jobs: OrderedDict[int, WarmJob] = OrderedDict()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._turns = asyncio.Semaphore(PARALLEL_BLOBS)

    def parse(self, text: str) -> ImageRef:
        """The image `text` names; ValueError with the reason."""
        return parse_image(text, self.registry.upstreams, self.registry.default_upstream)

    # -- jobs -----------------------------------------------------------------------------
    def trigger(self, text: str) -> WarmJob:
        """Start warming the image `text` names (or join its warm in progress)."""
        image = self.parse(text)
        for job in self._jobs.values():
            if job.image == image and job.state == "running":
                return job
        job = WarmJob(next(self._ids), image, self.clock())
        self._jobs[job.id] = job
        while len(self._jobs) > KEPT_JOBS:
            oldest = next(iter(self._jobs.values()))
            if oldest.state == "running":
                break
            self._jobs.popitem(last=False)
        self._spawn(self._run(job))
        return job

    def job(self, number: int) -> WarmJob | None:
        return self._jobs.get(number)

    def jobs(self) -> list[WarmJob]:
        return list(self._jobs.values())

    def _spawn(self, work: Awaitable[None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _run(self, job: WarmJob) -> None:
        try:
            await self.warm(job)
        except (*UPSTREAM_FAILURES, RegistryError) as error:
            job.state, job.error = "failed", as_registry_error(error).message
        except Exception as error:  # a bug of ours: said once, the daemon serves on
            log.exception("warm_crashed", image=str(job.image))
            job.state, job.error = "failed", f"internal error: {error}"
        else:
            job.state = "done"
        job.finished = self.clock()
        if job.state == "failed":
            log.warning("warm_failed", image=str(job.image), reason=job.error)
        else:
            log.info(
                "warm_done",
                image=str(job.image),
                digest=job.digest,
                platforms=job.platforms,
                manifests=job.manifests,
                blobs=job.blobs,
                blobs_fetched=job.blobs_fetched,
                bytes=job.bytes,
                seconds=round(job.finished - job.started, 3),
            )
        job.done.set()

    async def warm(self, job: WarmJob) -> None:
        """Fetch everything of `job.image` that is not stored (see the module docstring)."""
        image = job.image
        upstream = self.upstreams[image.upstream]
        if image.digest is not None:
            top = await self.manifests.by_digest(upstream, image.name, image.digest)
        else:
            assert image.tag is not None
            top = await self.manifests.resolve_tag(upstream, image.name, image.tag)
        job.digest = top.digest
        manifests = [top]
        children = [digest for kind, digest in top.references if kind == "manifests"]
        job.platforms = len(children)
        for child in children:
            manifests.append(await self.manifests.by_digest(upstream, image.name, child))
        job.manifests = len(manifests)
        sizes: dict[Digest, int] = {}
        for manifest in manifests:
            sizes.update(_blob_sizes(manifest))
        job.blobs, job.bytes = len(sizes), sum(sizes.values())

        async def fetch(digest: Digest, size: int) -> None:
            async with self._turns:
                if await self.blobs.prefetch(upstream, image.name, digest):
                    job.blobs_fetched += 1
            job.blobs_done += 1
            job.bytes_done += size

        results = await asyncio.gather(
            *(fetch(digest, size) for digest, size in sizes.items()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- the `warm:` list -------------------------------------------------------------------
    def start_schedule(self) -> None:
        """Warm each listed image now and every `interval` after (until `close`)."""
        self._scheduling = True
        for last in self.schedule.values():
            self._start_timer(last)

    def _start_timer(self, last: LastWarm) -> None:
        self._timers[last.entry.image] = self._spawn(self._every(last))

    def replace_schedule(self, warm: WarmConfig) -> tuple[list[str], list[str]]:
        """Follow a new `warm:` list; (images added or changed, images removed)."""
        wanted = {entry.image: entry for entry in warm.images}
        stale = [image for image, last in self.schedule.items() if wanted.get(image) != last.entry]
        for image in stale:
            del self.schedule[image]
            timer = self._timers.pop(image, None)
            if timer is not None:
                timer.cancel()  # the schedule only: a warm in progress is its own task
        fresh = [image for image in wanted if image not in self.schedule]
        for image in fresh:
            last = self.schedule[image] = LastWarm(wanted[image])
            if self._scheduling:
                self._start_timer(last)
        self.schedule = {image: self.schedule[image] for image in wanted}  # the file's order
        return fresh, [image for image in stale if image not in wanted]

    async def _every(self, last: LastWarm) -> None:
        while True:
            await self.run_entry(last)
            last.next_run = self.clock() + last.entry.interval
            await self.sleep(last.entry.interval)

    async def run_entry(self, last: LastWarm) -> WarmJob:
        """One scheduled warm of `last.entry`, its outcome recorded."""
        job = self.trigger(last.entry.image)
        await job.done.wait()
        if last.recorded_job == job.id:  # the schedule and `--listed` joined one warm
            return job
        last.recorded_job = job.id
        last.runs += 1
        last.last_run = job.finished
        if job.state == "done":
            last.last_success, last.last_error = job.finished, None
        else:
            last.failures += 1
            last.last_error = job.error
        return job

    async def run_schedule_now(self) -> list[WarmJob]:
        """Warm every listed image now (the explicit trigger of `cache warm --listed`)."""
        return list(await asyncio.gather(*(self.run_entry(s) for s in self.schedule.values())))

    def status(self) -> list[dict[str, object]]:
        return [
            {
                "image": last.entry.image,
                "interval": last.entry.interval,
                "runs": last.runs,
                "failures": last.failures,
                "last_run_unix": last.last_run,
                "last_success_unix": last.last_success,
                "last_error": last.last_error,
                "next_run_unix": last.next_run,
            }
            for last in self.schedule.values()
        ]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _blob_sizes(manifest: Manifest) -> dict[Digest, int]:
    """Digest -> size of the blobs an image manifest lists (config and layers)."""
    try:
        document = json.loads(manifest.data)
        if "manifests" in document:
            return {}
        entries = [document.get("config"), *document.get("layers", [])]
        return {
            parse_digest(entry["digest"]): int(entry.get("size", 0))
            for entry in entries
            if isinstance(entry, dict) and "digest" in entry
        }
    except (ValueError, TypeError, AttributeError, KeyError, RegistryError):
        return {}


class WarmCollector:
    """The `warm:` list's outcomes as metrics, per listed image; with `names` False (an
    admin listener others reach) the `image` label is the entry's place in the list,
    `(withheld) N`, as `/status` shows it there."""

    def __init__(self, warmer: Warmer, *, names: bool = True) -> None:
        self.warmer = warmer
        self.names = names

    def collect(self) -> Iterator[Metric]:
        # prometheus-client on a scrape only (common/metrics.py)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        prefix = "dnsoverride_cache_warm"
        runs = CounterMetricFamily(f"{prefix}_runs", "Scheduled warms run.", labels=["image"])
        failures = CounterMetricFamily(
            f"{prefix}_failures", "Scheduled warms that failed.", labels=["image"]
        )
        success = GaugeMetricFamily(
            f"{prefix}_last_success_timestamp_seconds",
            "When the image's last successful warm ended.",
            labels=["image"],
        )
        for number, (image, last) in enumerate(self.warmer.schedule.items(), 1):
            label = image if self.names else withheld(number)
            runs.add_metric([label], last.runs)
            failures.add_metric([label], last.failures)
            if last.last_success is not None:
                success.add_metric([label], last.last_success)
        yield runs
        yield failures
        yield success
