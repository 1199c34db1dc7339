"""What the registry side of the store holds, image by image, and removing it on an
admin's request: `dnsoverride cache ls` and `cache purge` (cache/contents.py serves them).

An image is a tag record (registry/tags.py): upstream, repository, tag -> the digest of a
manifest or an index. Its content is that manifest, for an index every platform's
manifest that is stored, and every stored blob those manifests list. Its bytes count what
is stored of that; the part also reached from another image is reported as shared, and
its last use is the latest use of any of it (Store.last_use). Manifests and blobs no tag
reaches (pulled by digest only) are reported as loose.

A purge removes the chosen tag records, then every manifest and blob they reach that no
kept content reaches: a kept tag's manifests and blobs, and every other stored manifest
and what it lists (a manifest pulled by digest still serves). Pinned content (being sent
or downloaded, Store.is_pinned) is never removed: it is reported as skipped, with why.
The plan is made in a thread while the cache serves on; what a client used after the plan
was begun (a store lookup or commit since) is skipped when the plan is applied, and so is
a tag whose manifest was used or whose record was rewritten meanwhile.
Nothing is read from the upstream and nothing counts as a use of what it reads.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnsoverride.cache.fetch import Fetcher
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.manifests import INDEX_TYPES, Manifest, Manifests
from dnsoverride.cache.registry.names import parse_digest
from dnsoverride.cache.registry.references import ImageRef
from dnsoverride.cache.registry.tags import TagRecord
from dnsoverride.cache.store import Digest, Kind, Store

Item = tuple[Kind, Digest]
REGISTRY_KINDS: tuple[Kind, ...] = ("manifests", "blobs")
USED_SINCE_PLANNED = "used since the purge was planned"
REMOVE_BATCH = 256  # files removed between two turns of the event loop


@dataclass(frozen=True)
class Image:
    """One tag record and the stored content it reaches."""

    upstream: str
    name: str
    tag: str
    record: TagRecord
    # The platforms an index lists ("linux/arm64/v8"), with whether each one's manifest
    # and blobs are all stored; empty for a single manifest.
    platforms: tuple[tuple[str, bool], ...]
    items: frozenset[Item]

    @property
    def reference(self) -> str:
        return f"{self.upstream}/{self.name}:{self.tag}"


@dataclass
class PurgePlan:
    """What a purge removes (or, dry, would remove) and what it leaves, and why."""

    tags: list[tuple[str, str, str]] = field(default_factory=list)  # (upstream, name, tag)
    # Each tag's record as the plan read it: a record rewritten since is not forgotten.
    records: dict[tuple[str, str, str], TagRecord] = field(default_factory=dict)
    # Wall-clock start of planning: content used since then stays (`apply`).
    planned_at: float = field(default_factory=time.time)
    removed: list[tuple[Kind, Digest, int]] = field(default_factory=list)
    skipped: list[tuple[Kind, Digest, str]] = field(default_factory=list)

    def document(self, dry_run: bool) -> dict[str, object]:
        return {
            "dry_run": dry_run,
            "tags": [f"{upstream}/{name}:{tag}" for upstream, name, tag in self.tags],
            "removed": [
                {"kind": kind, "digest": str(digest), "bytes": size}
                for kind, digest, size in self.removed
            ],
            "removed_bytes": sum(size for _, _, size in self.removed),
            "skipped": [
                {"kind": kind, "digest": str(digest), "reason": reason}
                for kind, digest, reason in self.skipped
            ],
        }


class _Walk:
    """One listing's or purge plan's reads of the stored manifests, each read and parsed
    once however many images reach it (a thousand 10-platform images are 11000 manifests,
    and shared ones are reached again and again)."""

    def __init__(self, store: Store, manifests: Manifests) -> None:
        self.store = store
        self.manifests = manifests
        self._read: dict[Digest, Manifest | None] = {}
        self._reach: dict[Digest, frozenset[Item]] = {}

    def manifest(self, digest: Digest) -> Manifest | None:
        if digest not in self._read:
            self._read[digest] = self.manifests.stored(digest)
        return self._read[digest]

    def reach(self, digest: Digest) -> frozenset[Item]:
        """The stored manifests and blobs a manifest (or index) leads to, itself included."""
        found = self._reach.get(digest)
        if found is not None:
            return found
        self._reach[digest] = frozenset()  # a manifest listing itself ends here
        manifest = self.manifest(digest)
        items: set[Item] = set()
        if manifest is not None:
            items.add(("manifests", digest))
            for kind, child in manifest.references:
                if kind == "manifests":
                    items |= self.reach(child)
                elif self.store.has(kind, child):
                    items.add((kind, child))
        found = self._reach[digest] = frozenset(items)
        return found


class RegistryContents:
    """Reads run off the event loop (`asyncio.to_thread`): they only read files and look
    the store's index up; removing (`apply`) runs on the loop, in batches."""

    def __init__(self, store: Store, manifests: Manifests, fetcher: Fetcher) -> None:
        self.store = store
        self.manifests = manifests
        self.fetcher = fetcher

    # -- reading --------------------------------------------------------------------------
    def images(self, walk: _Walk) -> list[Image]:
        """Every tag record, with what it reaches."""
        images = []
        for upstream, name, tag, record in self.manifests.tags.records():
            try:
                top = parse_digest(record.digest)
            except RegistryError:
                continue
            manifest = walk.manifest(top)
            platforms = self._platforms(walk, manifest) if manifest is not None else ()
            images.append(Image(upstream, name, tag, record, platforms, walk.reach(top)))
        return images

    def _platforms(self, walk: _Walk, index: Manifest) -> tuple[tuple[str, bool], ...]:
        if index.media_type not in INDEX_TYPES:
            return ()
        try:
            entries = json.loads(index.data)["manifests"]
        except (ValueError, KeyError, TypeError):
            return ()
        platforms = []
        for entry in entries:
            try:
                platform = entry.get("platform") or {}
                parts = [platform.get("os"), platform.get("architecture"), platform.get("variant")]
                label = "/".join(str(part) for part in parts if part) or "unknown"
                digest = parse_digest(str(entry["digest"]))
            except (AttributeError, KeyError, ValueError, RegistryError):
                continue
            manifest = walk.manifest(digest)
            complete = manifest is not None and all(
                self.store.has(kind, child)
                for kind, child in manifest.references
                if kind == "blobs"
            )
            platforms.append((label, complete))
        return tuple(platforms)

    def size(self, items: Iterable[Item]) -> int:
        return sum(self.store.size_of(kind, digest) or 0 for kind, digest in items)

    def last_use(self, items: Iterable[Item]) -> float | None:
        times = [self.store.last_use(kind, digest) for kind, digest in items]
        return max((t for t in times if t is not None), default=None)

    def listing(self, repository: str | None) -> dict[str, object]:
        """The `images` and `loose` parts of `/contents` (images whose repository matches
        the `repository` pattern, as `name` or `upstream/name`)."""
        everything = self.images(_Walk(self.store, self.manifests))
        shown = [
            image
            for image in everything
            if not repository
            or fnmatch.fnmatchcase(image.name, repository)
            or fnmatch.fnmatchcase(f"{image.upstream}/{image.name}", repository)
        ]
        reached: dict[Item, int] = {}
        for image in everything:
            for item in image.items:
                reached[item] = reached.get(item, 0) + 1
        images = []
        for image in shown:
            shared = [item for item in image.items if reached[item] > 1]
            images.append(
                {
                    "image": image.reference,
                    "upstream": image.upstream,
                    "repository": image.name,
                    "tag": image.tag,
                    "digest": image.record.digest,
                    "media_type": image.record.media_type,
                    "platforms": [
                        {"platform": label, "cached": cached} for label, cached in image.platforms
                    ],
                    "manifests": sum(kind == "manifests" for kind, _ in image.items),
                    "blobs": sum(kind == "blobs" for kind, _ in image.items),
                    "bytes": self.size(image.items),
                    "shared_bytes": self.size(shared),
                    "last_use_unix": self.last_use(image.items),
                    "checked_unix": image.record.checked,
                }
            )
        loose: list[Item] = [
            (kind, digest)
            for kind in REGISTRY_KINDS
            for digest, _ in self.store.items(kind)
            if (kind, digest) not in reached
        ]
        return {
            "images": images,
            "loose": {"items": len(loose), "bytes": self.size(loose)},
        }

    # -- purging --------------------------------------------------------------------------
    def plan(
        self,
        image: ImageRef | None = None,
        digest: Digest | None = None,
        older_than: float | None = None,
    ) -> PurgePlan:
        """What purging `image`, `digest` (a manifest's: with what only it reaches; a blob's:
        that blob) or everything last used before the wall-clock time `older_than` removes.
        ValueError when an image or digest asked for is not stored."""
        planned_at = time.time()
        walk = _Walk(self.store, self.manifests)
        images = self.images(walk)
        chosen, targets = self._chosen(walk, images, image, digest, older_than)
        candidates = set(targets)
        for chosen_image in chosen:
            candidates |= chosen_image.items
        if older_than is not None:
            for kind in REGISTRY_KINDS:
                for stored, _ in self.store.items(kind):
                    if (self.store.last_use(kind, stored) or 0) < older_than:
                        candidates.add((kind, stored))
        kept = self._kept(walk, images, chosen, candidates)
        # A blob asked for by its digest goes even when a kept manifest lists it (that
        # manifest's next pull fetches it again).
        asked = image.digest if image is not None and image.digest else digest
        if asked is not None:
            kept.discard(("blobs", asked))
        plan = PurgePlan(
            tags=sorted((i.upstream, i.name, i.tag) for i in chosen),
            records={(i.upstream, i.name, i.tag): i.record for i in chosen},
            planned_at=planned_at,
        )
        for kind, stored in sorted(candidates - kept, key=str):
            reason = self.busy(kind, stored)
            if reason:
                plan.skipped.append((kind, stored, reason))
            else:
                plan.removed.append((kind, stored, self.store.size_of(kind, stored) or 0))
        # A manifest asked for by digest that another image or manifest lists: said so.
        if asked is not None and ("manifests", asked) in kept:
            reason = "still listed by a kept image or manifest (purge that one first)"
            plan.skipped.append(("manifests", asked, reason))
        # Content of a chosen image still on its way in lands after the purge: said so.
        owners = {(i.upstream, i.name) for i in chosen}
        for download in self.fetcher.downloads():
            if download.owner in owners:
                reason = "a download of it is in flight: stored when it ends"
                plan.skipped.append((download.kind, download.digest, reason))
        return plan

    def _chosen(
        self,
        walk: _Walk,
        images: list[Image],
        image: ImageRef | None,
        digest: Digest | None,
        older_than: float | None,
    ) -> tuple[list[Image], set[Item]]:
        """The images whose tag records go, and the items asked for by digest."""
        chosen: list[Image] = []
        targets: set[Item] = set()
        if image is not None:
            chosen = [
                i
                for i in images
                if (i.upstream, i.name, i.tag) == (image.upstream, image.name, image.tag)
            ]
            if not chosen and image.digest is None:
                raise ValueError(f"no cached image {image}")
            digest = image.digest or digest
        if digest is not None:
            kinds = [k for k in REGISTRY_KINDS if self.store.has(k, digest)]
            if not kinds:
                raise ValueError(f"{digest} is not stored in the cache")
            for kind in kinds:
                targets |= walk.reach(digest) if kind == "manifests" else {(kind, digest)}
            # Its tags: every repository's for a bare digest, the named one's for NAME@DIGEST
            # (another repository's tag keeps the content it shares).
            chosen += [
                i
                for i in images
                if i.record.digest == str(digest)
                and i not in chosen
                and (image is None or (i.upstream, i.name) == (image.upstream, image.name))
            ]
        if older_than is not None:
            chosen += [
                i for i in images if i not in chosen and (self.last_use(i.items) or 0) < older_than
            ]
        return chosen, targets

    def _kept(
        self, walk: _Walk, images: list[Image], chosen: list[Image], candidates: set[Item]
    ) -> set[Item]:
        """What stays reaches: the other images, and every manifest that is not going (one
        pulled by digest still serves) with what it lists."""
        chosen_keys = {(i.upstream, i.name, i.tag) for i in chosen}
        kept: set[Item] = set()
        for other in images:
            if (other.upstream, other.name, other.tag) not in chosen_keys:
                kept |= other.items
        for root, _ in self.store.items("manifests"):
            if ("manifests", root) not in candidates:
                kept |= walk.reach(root)
        return kept

    def busy(self, kind: Kind, digest: Digest) -> str | None:
        """Why stored `digest` must stay now; None when it may go."""
        if self.fetcher.in_flight(kind, digest) is not None:
            return "a download of it is in flight"
        if self.store.is_pinned(kind, digest):
            return "in use: being sent to a client"
        return None

    async def apply(self, plan: PurgePlan) -> None:
        """Remove what `plan` says (the tag records first: no tag points at a removed
        manifest). Content pinned or used since the plan was begun moves to `skipped`, and
        a tag whose manifest was used or whose record was rewritten meanwhile stays. The
        loop serves between batches of removals (each a file unlinked: tens of thousands in
        a large purge); each item is checked just before it goes."""

        def used(kind: Kind, digest: Digest) -> bool:
            return (self.store.last_use(kind, digest) or 0) >= plan.planned_at

        forgotten = []
        for key in plan.tags:
            record = plan.records.get(key)
            if record is not None and used("manifests", parse_digest(record.digest)):
                continue
            if self.manifests.forget_tag(*key, planned=record):
                forgotten.append(key)
        plan.tags = forgotten
        removed = []
        for number, (kind, digest, size) in enumerate(plan.removed, 1):
            if used(kind, digest):
                plan.skipped.append((kind, digest, USED_SINCE_PLANNED))
            elif not self.store.has(kind, digest):
                pass  # evicted meanwhile: not this purge's bytes
            elif self.store.remove(kind, digest):
                removed.append((kind, digest, size))
            else:
                plan.skipped.append((kind, digest, "in use: being sent to a client"))
            if number % REMOVE_BATCH == 0:
                await asyncio.sleep(0)
        plan.removed = removed
