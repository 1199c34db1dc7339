"""The cache's contents on its admin listener and control socket: what `dnsoverride cache
ls`, `cache purge` and `cache warm` ask.

- `GET /contents[?repo=PATTERN]`: the images (registry/contents.py) and the package
  repositories (packages/contents.py) in the store, and the store's use.
- `POST /purge?image=REF | digest=DIGEST | older_than=DURATION [&dry_run=1]`: removes
  exactly that (registry/contents.py says what an image's content is); a package file or
  repository-metadata digest is removed alone; `older_than` also takes package files and
  metadata not used for that long. Pinned content (being sent, downloaded, or listed by a
  repository snapshot being served) is skipped and said so. One log line per purge.
- `POST /warm?image=REF` starts (or joins) a warm and answers its job at once;
  `POST /warm?listed=1` warms the `warm:` list now and answers when it is done;
  `GET /warm/jobs[?job=N]` is the progress `cache warm` polls.

The POSTs are actions and the GETs local reads (common/admin.py): answered on the control
socket or a loopback admin listener only (a listing names private repositories too).
Listing and planning a purge read every stored manifest: that runs in a thread, so the
cache serves on meanwhile; the removal runs on the loop in batches, the loop serving
between them (what became pinned or was used in between is skipped then).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from dnsoverride.cache.packages import contents as package_contents
from dnsoverride.cache.packages.repos import RepositoryCache
from dnsoverride.cache.registry.contents import PurgePlan, RegistryContents
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.names import parse_digest
from dnsoverride.cache.registry.warm import Warmer
from dnsoverride.cache.store import Digest, Kind, Store
from dnsoverride.common.admin import Action, JsonEndpoint
from dnsoverride.common.grammar import parse_duration

log = structlog.get_logger(__name__)

PACKAGE_KINDS: tuple[Kind, ...] = ("packages", "repodata")


class CacheContents:
    def __init__(
        self,
        store: Store,
        registry: RegistryContents,
        repositories: RepositoryCache,
        warmer: Warmer,
    ) -> None:
        self.store = store
        self.registry = registry
        self.repositories = repositories
        self.warmer = warmer

    def local_reads(self) -> dict[str, JsonEndpoint]:
        return {"/contents": self.contents, "/warm/jobs": self.jobs}

    def actions(self) -> dict[str, Action]:
        return {"/purge": self.purge, "/warm": self.warm}

    async def contents(self, query: Mapping[str, str]) -> dict[str, object]:
        repository = query.get("repo") or None
        budget = self.store.budget
        return {
            "store": {
                "root": str(self.store.root),
                "bytes": self.store.stats.size,
                "entries": self.store.stats.entries,
                "budget_bytes": budget.max_size if budget else None,
            },
            # Thousands of manifests read and parsed: off the loop, which serves meanwhile.
            **await asyncio.to_thread(self.registry.listing, repository),
            "repositories": await package_contents.listing(self.repositories, repository),
        }

    async def purge(self, query: Mapping[str, str]) -> dict[str, object]:
        given = [key for key in ("image", "digest", "older_than") if query.get(key)]
        if len(given) != 1:
            raise ValueError("purge one of: image=REF, digest=DIGEST, older_than=DURATION")
        dry_run = query.get("dry_run", "") not in ("", "0", "false")
        older_than = None
        if "older_than" in given:
            older_than = self.warmer.clock() - parse_duration(query["older_than"])
        image = self.warmer.parse(query["image"]) if "image" in given else None
        digest = _digest(query["digest"]) if "digest" in given else None
        package_kinds = [k for k in PACKAGE_KINDS if digest and self.store.has(k, digest)]
        if package_kinds and digest is not None:
            plan = PurgePlan()
            self._packages(plan, [(kind, digest) for kind in package_kinds])
        else:
            plan = await asyncio.to_thread(self.registry.plan, image, digest, older_than)
            if older_than is not None:
                old = [
                    (kind, stored)
                    for kind in PACKAGE_KINDS
                    for stored, _ in self.store.items(kind)
                    if (self.store.last_use(kind, stored) or 0) < older_than
                ]
                self._packages(plan, old)
        if not dry_run:
            await self.registry.apply(plan)
        document = plan.document(dry_run)
        log.info(
            "cache_purged" if not dry_run else "cache_purge_planned",
            asked=", ".join(f"{key}={query[key]}" for key in given),
            tags=len(plan.tags),
            removed=len(plan.removed),
            removed_bytes=document["removed_bytes"],
            skipped=len(plan.skipped),
        )
        return document

    def _packages(self, plan: PurgePlan, items: list[tuple[Kind, Digest]]) -> None:
        for kind, digest in items:
            if self.store.is_pinned(kind, digest):
                reason = "in use: listed by a served repository snapshot, or being sent"
                plan.skipped.append((kind, digest, reason))
            else:
                plan.removed.append((kind, digest, self.store.size_of(kind, digest) or 0))

    async def warm(self, query: Mapping[str, str]) -> dict[str, object]:
        if query.get("listed"):
            if not self.warmer.schedule:
                raise ValueError("the cache's config has no warm: list (nothing to warm)")
            jobs = await self.warmer.run_schedule_now()
            return {"jobs": [job.document() for job in jobs]}
        text = query.get("image")
        if not text:
            raise ValueError("warm needs image=REF (or listed=1: the warm: list)")
        return self.warmer.trigger(text).document()

    async def jobs(self, query: Mapping[str, str]) -> dict[str, object]:
        if query.get("job"):
            try:
                job = self.warmer.job(int(query["job"]))
            except ValueError:
                job = None
            if job is None:
                raise ValueError(f"no warm job {query['job'][:20]!r}")
            return job.document()
        return {"jobs": [job.document() for job in self.warmer.jobs()]}


def _digest(text: str) -> Digest:
    """A digest as `purge` takes it: `sha256:HEX` (registry and packages)."""
    try:
        return parse_digest(text.strip())
    except RegistryError:
        raise ValueError(f"{text[:100]!r} is not a digest (sha256:<64 hex digits>)") from None
