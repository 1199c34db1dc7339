"""Manifests: immutable by digest, cached by tag with a TTL and HEAD revalidation.

By digest, a manifest is fetched once, verified against the digest and kept in the
store. A tag maps to a digest for `tag_ttl` seconds; after that one upstream HEAD
(which Docker Hub does not count as a pull) revalidates it, and the manifest is
re-fetched only if the digest changed. Concurrent requests for one tag share one
upstream request. When the upstream fails, times out or answers 429/5xx, the last
known manifest is served stale, provided the content it references is still stored.

A manifest is never served as complete when the content it references is gone (evicted)
and cannot come back: a stored manifest whose blobs were evicted is served only after the
upstream has answered for it (then the blobs are fetched again on demand, as on any miss);
with the upstream unreachable the client gets 503 UNAVAILABLE at the manifest, where
docker falls back to its next mirror or the registry itself, instead of failing mid-pull.

Nothing unverified is stored: an upstream manifest is read whole (bounded by 4 MiB) and
checked against the digest asked for, else the upstream's `Docker-Content-Digest`, else
parsed as JSON of a known manifest media type (schemaVersion, mediaType and structure
checked); anything else is a 502 with the reason. A manifest read back from disk is
re-hashed. A HEAD on a tag that is not cached costs one upstream HEAD, not a GET.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import structlog

from dnsoverride.cache.accesslog import note_cache
from dnsoverride.cache.registry.errors import RegistryError
from dnsoverride.cache.registry.links import Links
from dnsoverride.cache.registry.names import parse_digest
from dnsoverride.cache.registry.stats import Stats
from dnsoverride.cache.registry.tags import TagRecord, Tags
from dnsoverride.cache.registry.upstream import (
    ACCEPT_MANIFESTS,
    MANIFEST_TYPES,
    Upstream,
    UpstreamDeniedError,
    UpstreamUnavailableError,
    as_registry_error,
    read_body,
)
from dnsoverride.cache.store import Digest, Kind, Store, StoreWriteError

log = structlog.get_logger(__name__)

MAX_MANIFEST = 4 << 20  # the spec lets registries refuse manifests above 4 MiB
_MEMORY_ENTRIES = 1024
INDEX_TYPES = frozenset(MANIFEST_TYPES[0::2])  # OCI index, Docker manifest list
# A descriptor's digest per the OCI grammar (algorithm ":" encoded), registered or not.
_DESCRIPTOR_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_UPSTREAM_FAILURES = (UpstreamUnavailableError, UpstreamDeniedError, TimeoutError)
T = TypeVar("T")


@dataclass(frozen=True)
class Descriptor:
    """What an upstream HEAD tells of a manifest: enough to answer a client's HEAD."""

    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class Manifest:
    data: bytes
    digest: str
    media_type: str

    @cached_property
    def references(self) -> tuple[tuple[Kind, Digest], ...]:
        """(kind, digest) of the content a client needs next to pull this manifest.

        Empty when the document names nothing we can read (then nothing can be missing).
        """
        try:
            document = json.loads(self.data)
            if "manifests" in document:
                found = [("manifests", entry["digest"]) for entry in document["manifests"]]
            else:
                found = [("blobs", layer["digest"]) for layer in document.get("layers", [])]
                found += [("blobs", layer["blobSum"]) for layer in document.get("fsLayers", [])]
                if "config" in document:
                    found.append(("blobs", document["config"]["digest"]))
            return tuple(
                ("manifests" if kind == "manifests" else "blobs", parse_digest(digest))
                for kind, digest in found
            )
        except (ValueError, TypeError, KeyError, AttributeError, RegistryError):
            return ()


def _invalid(what: str, why: str) -> RegistryError:
    return RegistryError("MANIFEST_INVALID", f"upstream manifest {what}: {why}", 502)


def _digest_of(data: bytes, digest: Digest, what: str) -> None:
    if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
        raise RegistryError(
            "DIGEST_INVALID", f"upstream manifest {what} does not match {digest}", 502
        )


def check_document(data: bytes, content_type: str, what: str) -> str:
    """The media type of `data` if it is a manifest of a known type; else a 502 saying why.

    For manifests no digest vouches for: a captive portal's HTML 200, a truncated body,
    a JSON error page are refused here.
    """
    try:
        document = json.loads(data)
    except ValueError:
        why = f"not JSON ({content_type or 'no Content-Type'}, {len(data)} bytes)"
        raise _invalid(what, why) from None
    if not isinstance(document, dict) or document.get("schemaVersion") != 2:
        raise _invalid(what, "not a schemaVersion 2 manifest")
    declared = document.get("mediaType")
    if declared is not None and declared not in MANIFEST_TYPES:
        raise _invalid(what, f"unknown mediaType {str(declared)[:100]!r}")
    if content_type in MANIFEST_TYPES and declared not in (None, content_type):
        raise _invalid(what, f"mediaType {declared} but Content-Type {content_type}")
    media_type = declared or (content_type if content_type in MANIFEST_TYPES else None)
    is_index = "manifests" in document
    if media_type is None:
        media_type = MANIFEST_TYPES[0] if is_index else MANIFEST_TYPES[1]
    if (media_type in INDEX_TYPES) != is_index:
        raise _invalid(what, f"{media_type} with the wrong structure")
    if is_index:
        entries = document["manifests"]
    else:
        layers = document.get("layers", [])
        entries = [document.get("config"), *layers] if isinstance(layers, list) else None
    if not isinstance(entries, list) or not all(map(_is_descriptor, entries)):
        raise _invalid(what, "descriptors without a valid digest and size")
    return media_type


def _is_descriptor(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    digest, size = entry.get("digest"), entry.get("size")
    return (
        isinstance(digest, str)
        and _DESCRIPTOR_DIGEST.match(digest) is not None
        and type(size) is int
        and size >= 0
    )


def sniff_media_type(data: bytes) -> str:
    """The media type of a stored manifest, from its own content."""
    try:
        document = json.loads(data)
    except ValueError:
        return "application/octet-stream"
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(media_type, str):
        return media_type
    if isinstance(document, dict) and "manifests" in document:
        return "application/vnd.oci.image.index.v1+json"
    if isinstance(document, dict) and document.get("schemaVersion") == 1:
        return "application/vnd.docker.distribution.manifest.v1+prettyjws"
    return "application/vnd.oci.image.manifest.v1+json"


class Manifests:
    def __init__(self, store: Store, links: Links, stats: Stats, tag_ttl: float) -> None:
        self.store = store
        self.tags = Tags(store)
        self.links = links
        self.stats = stats
        self.tag_ttl = tag_ttl
        self._memory: OrderedDict[str, Manifest] = OrderedDict()
        self._tags: dict[tuple[str, str, str], TagRecord] = {}
        self._inflight: dict[object, asyncio.Future[Any]] = {}

    # -- lookups ------------------------------------------------------------------------
    def local(self, digest: Digest) -> Manifest | None:
        key = str(digest)
        manifest = self._memory.get(key)
        if manifest is not None:
            self._memory.move_to_end(key)
            # Keep the store's LRU order honest for manifests served from memory.
            if self.store.lookup("manifests", digest) is not None:
                return manifest
            del self._memory[key]
            return None
        path = self.store.lookup("manifests", digest)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError as error:
            self.store.remove_corrupt("manifests", digest, f"unreadable: {error.strerror}")
            return None
        if hashlib.new(digest.algorithm, data).hexdigest() != digest.hex:
            self.store.remove_corrupt("manifests", digest, "content does not match its digest")
            return None
        manifest = Manifest(data, key, sniff_media_type(data))
        self._remember(manifest)
        return manifest

    async def by_digest(self, upstream: Upstream, name: str, digest: Digest) -> Manifest:
        manifest = self.local(digest)
        if manifest is not None and self._missing(manifest) is None:
            self.stats.hits["manifest"] += 1
            note_cache("hit")
            return manifest
        self.stats.misses["manifest"] += 1
        if manifest is not None:
            known = manifest
            return await self._single_flight(
                ("confirm", str(digest)), lambda: self._confirm(upstream, name, known)
            )
        return await self._single_flight(
            ("digest", upstream.name, name, str(digest)),
            lambda: self._fetch(upstream, name, str(digest), digest),
        )

    async def peek_tag(self, upstream: Upstream, name: str, tag: str) -> Manifest | Descriptor:
        """For a HEAD: the cached manifest, else what one upstream HEAD says of the tag.

        Falls back to `by_tag` (a GET, or a stale answer) when the HEAD cannot tell.
        """
        manifest = self._fresh(upstream, name, tag)
        if manifest is not None:
            return manifest
        try:
            descriptor = await self._single_flight(
                ("head", upstream.name, name, tag), lambda: self._head(upstream, name, tag)
            )
        except _UPSTREAM_FAILURES:
            descriptor = None
        if descriptor is None:
            return await self.by_tag(upstream, name, tag)
        self.stats.misses["manifest"] += 1
        return self.local(parse_digest(descriptor.digest)) or descriptor

    async def _head(self, upstream: Upstream, name: str, tag: str) -> Descriptor | None:
        response = await upstream.request(
            "HEAD", name, f"manifests/{tag}", {"Accept": ACCEPT_MANIFESTS}
        )
        response.release()
        if response.status == 404:
            raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {name}:{tag}")
        claimed = response.headers.get("Docker-Content-Digest", "")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        size = response.content_length
        try:
            digest = parse_digest(claimed)
        except RegistryError:
            return None
        if media_type not in MANIFEST_TYPES or size is None:
            return None
        return Descriptor(str(digest), media_type, size)

    def _record(self, upstream: Upstream, name: str, tag: str) -> TagRecord | None:
        key = (upstream.name, name, tag)
        record = self._tags.get(key)
        if record is None:
            record = self.tags.read(*key)
            if record is not None:
                self._tags[key] = record
        return record

    def _fresh(self, upstream: Upstream, name: str, tag: str) -> Manifest | None:
        """The tag's manifest when its record is within the TTL and its content is stored."""
        record = self._record(upstream, name, tag)
        if record is None or time.time() - record.checked >= self.tag_ttl:
            return None
        manifest = self.local(parse_digest(record.digest))
        # Content evicted since: revalidate, which also shows whether the upstream is
        # there to fetch it again.
        if manifest is None or self._missing(manifest) is not None:
            return None
        self.stats.hits["manifest"] += 1
        note_cache("hit")
        return manifest

    async def by_tag(self, upstream: Upstream, name: str, tag: str) -> Manifest:
        fresh = self._fresh(upstream, name, tag)
        if fresh is not None:
            return fresh
        record = self._record(upstream, name, tag)
        self.stats.misses["manifest"] += 1
        manifest, stale = await self._single_flight(
            ("tag", upstream.name, name, tag),
            lambda: self._revalidate(upstream, name, tag, record),
        )
        if stale:
            note_cache("stale")
        return manifest

    async def resolve_tag(self, upstream: Upstream, name: str, tag: str) -> Manifest:
        """The tag's manifest as the upstream has it now, whatever the TTL (`cache warm`: a
        moved tag is fetched). RegistryError when the upstream cannot say: no stale answer
        here, a warm that did not reach the upstream failed."""
        self.stats.misses["manifest"] += 1
        record = self._record(upstream, name, tag)
        manifest, _ = await self._single_flight(
            ("resolve", upstream.name, name, tag),
            lambda: self._revalidate(upstream, name, tag, record, stale_ok=False),
        )
        return manifest

    def forget_tag(
        self, upstream: str, name: str, tag: str, planned: TagRecord | None = None
    ) -> bool:
        """Drop a tag's record (`cache purge`): its next pull asks the upstream. With
        `planned` (the record a purge plan read), only if no pull has rewritten it since
        (every write goes through `_record_tag`, so the one in memory is the newest);
        whether it was dropped."""
        key = (upstream, name, tag)
        current = self._tags.get(key)
        if planned is not None and current is not None and current != planned:
            return False
        self._tags.pop(key, None)
        self.tags.remove(upstream, name, tag)
        return True

    def stored(self, digest: Digest) -> Manifest | None:
        """A stored manifest read for `cache ls`/`purge` without counting as a use (no
        LRU touch, no re-hash: nothing is served from it); None when absent/unreadable."""
        if not self.store.has("manifests", digest):
            return None
        try:
            data = self.store.path("manifests", digest).read_bytes()
        except OSError:
            return None
        return Manifest(data, str(digest), sniff_media_type(data))

    # -- upstream -----------------------------------------------------------------------
    async def _single_flight(self, key: object, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` once for every concurrent caller with the same key.

        The work is a task of its own, so a caller that goes away does not cancel it for
        the others.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finish(key, done))
            note_cache("miss")
        else:
            self.stats.coalesced += 1
            note_cache("coalesced")
        return await asyncio.shield(task)

    def _finish(self, key: object, task: asyncio.Future[Any]) -> None:
        del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every caller went away

    async def _revalidate(
        self,
        upstream: Upstream,
        name: str,
        tag: str,
        record: TagRecord | None,
        *,
        stale_ok: bool = True,
    ) -> tuple[Manifest, bool]:
        """(the tag's manifest, whether it is served stale because the upstream failed;
        never with `stale_ok` False: the failure is raised)."""
        known = self.local(parse_digest(record.digest)) if record else None
        try:
            if known is not None:
                response = await upstream.request(
                    "HEAD", name, f"manifests/{tag}", {"Accept": ACCEPT_MANIFESTS}
                )
                response.release()
                if response.status == 200 and (
                    response.headers.get("Docker-Content-Digest") == known.digest
                ):
                    self._record_tag(upstream, name, tag, known)
                    return known, False
            manifest = await self._fetch(upstream, name, tag, None)
        except (*_UPSTREAM_FAILURES, RegistryError) as error:
            # An answer that fails verification (502: a portal's HTML, wrong bytes) is an
            # upstream failure too; a 404 or 401 is an answer, and stands.
            unanswered = not isinstance(error, RegistryError) or error.status == 502
            if known is None or not unanswered or not stale_ok:
                raise as_registry_error(error) from error
            self._check_complete(known)
            self.stats.stale_serves += 1
            log.warning(
                "manifest_stale", upstream=upstream.name, name=name, tag=tag, error=str(error)
            )
            return known, True
        self._record_tag(upstream, name, tag, manifest)
        return manifest, False

    async def _confirm(self, upstream: Upstream, name: str, manifest: Manifest) -> Manifest:
        """Serve a stored manifest whose content was evicted only if upstream can refill it."""
        try:
            response = await upstream.request(
                "HEAD", name, f"manifests/{manifest.digest}", {"Accept": ACCEPT_MANIFESTS}
            )
            response.release()
            reason = "" if response.status == 200 else f"upstream answered {response.status}"
        except _UPSTREAM_FAILURES as error:
            reason = str(error)
        if reason:
            log.warning("manifest_incomplete", upstream=upstream.name, name=name, error=reason)
            self._check_complete(manifest)  # unless a download completed it meanwhile
        return manifest

    async def _fetch(
        self, upstream: Upstream, name: str, reference: str, digest: Digest | None
    ) -> Manifest:
        """GET a manifest, read it whole and verify it (see `_verify`); store and link it."""
        what = f"{name}:{reference}"
        response = await upstream.request(
            "GET", name, f"manifests/{reference}", {"Accept": ACCEPT_MANIFESTS}
        )
        try:
            if response.status == 404:
                raise RegistryError("MANIFEST_UNKNOWN", f"manifest unknown: {what}")
            data = await read_body(response, MAX_MANIFEST, f"upstream manifest {what}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = response.headers.get("Docker-Content-Digest")
        finally:
            response.release()
        self.stats.upstream_bytes[upstream.name] += len(data)
        try:
            manifest = _verify(data, digest, claimed, content_type, what)
        except RegistryError as error:
            self.stats.verify_failures += 1
            # Its 200 counted as an answer; a portal's page or wrong bytes is a failure.
            self.stats.upstream(upstream.name).failed(f"{upstream.name}: {error.message}")
            raise
        try:
            self.store.put_bytes("manifests", parse_digest(manifest.digest), data)
        except StoreWriteError as error:
            # Verified, so this client still gets it; it is just not kept.
            log.error("store_write_failed", upstream=upstream.name, name=name, reason=error.message)
            return manifest
        self._remember(manifest)
        # Only the manifest itself: what it lists is the pusher's claim, not the upstream's
        # word that this repository holds it (a foreign layer may name any digest).
        self.links.add((upstream.name, name), [("manifests", parse_digest(manifest.digest))])
        return manifest

    # -- bookkeeping --------------------------------------------------------------------
    def _record_tag(self, upstream: Upstream, name: str, tag: str, manifest: Manifest) -> None:
        record = TagRecord(manifest.digest, manifest.media_type, time.time())
        self._tags[(upstream.name, name, tag)] = record
        try:
            self.tags.write(upstream.name, name, tag, record)
        except StoreWriteError as error:
            log.error("store_write_failed", upstream=upstream.name, name=name, reason=error.message)

    def _remember(self, manifest: Manifest) -> None:
        self._memory[manifest.digest] = manifest
        self._memory.move_to_end(manifest.digest)
        while len(self._memory) > _MEMORY_ENTRIES:
            self._memory.popitem(last=False)

    def _missing(self, manifest: Manifest) -> str | None:
        """What of the content `manifest` leads to is not stored; None when all of it is.

        An index passes when at least one of its platforms is complete: the others need
        not all have been pulled through this cache. Blobs are looked up in the store's
        index only (no file system access), so this is cheap enough for every hit.
        """
        children = [digest for kind, digest in manifest.references if kind == "manifests"]
        if children:
            for child in filter(None, map(self.local, children)):
                if self._missing(child) is None:
                    return None
            return "no platform of the index is cached"
        for kind, digest in manifest.references:
            if not self.store.has(kind, digest):
                return f"{digest} is not cached"
        return None

    def _check_complete(self, manifest: Manifest) -> None:
        """Refuse to serve a manifest whose content is gone while the upstream can't refill it."""
        missing = self._missing(manifest)
        if missing is not None:
            raise RegistryError("UNAVAILABLE", f"upstream unreachable and {missing}")

    def negotiate(self, manifest: Manifest, accept: list[str]) -> Digest | None:
        """The digest of the index entry to serve instead when the client can't take an index.

        None means serve `manifest` itself: the client can take it, or the index (which its
        digest vouches for, not its structure) names no usable linux/amd64 entry.
        """
        if acceptable(manifest.media_type, accept) or manifest.media_type not in INDEX_TYPES:
            return None
        try:
            entries = json.loads(manifest.data)["manifests"]
            for entry in entries:
                platform = entry.get("platform") or {}
                if (
                    platform.get("os") == "linux"
                    and platform.get("architecture") == "amd64"
                    and entry.get("mediaType") in accept
                ):
                    return parse_digest(entry["digest"])
        except (ValueError, TypeError, KeyError, AttributeError, RegistryError):
            return None
        return None


def acceptable(media_type: str, accept: list[str]) -> bool:
    """Whether a client sending `accept` takes `media_type` (no Accept takes anything)."""
    return not accept or media_type in accept or "*/*" in accept


def _verify(
    data: bytes, wanted: Digest | None, claimed: str | None, content_type: str, what: str
) -> Manifest:
    """A manifest from upstream bytes, verified against the digest asked for, else the
    upstream's digest header, else as a document of a known manifest type."""
    if wanted is not None:
        _digest_of(data, wanted, what)
        digest = wanted
    elif claimed:
        try:
            digest = parse_digest(claimed.strip())
        except RegistryError:
            raise _invalid(what, f"invalid Docker-Content-Digest {claimed[:100]!r}") from None
        _digest_of(data, digest, what)
    else:
        content_type = check_document(data, content_type, what)
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    if content_type not in MANIFEST_TYPES:
        content_type = sniff_media_type(data)
    return Manifest(data, str(digest), content_type)
