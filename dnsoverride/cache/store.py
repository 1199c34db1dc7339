"""The cache's one content-addressed on-disk store and its one size budget, for every
kind of content the cache serves (registry blobs and manifests, package-repository files).

Layout under the storage root::

    blobs/sha256/ab/abcd...        verified blob bytes
    manifests/sha256/ab/abcd...    verified manifest bytes (exact upstream bytes)
    packages/sha256/ab/abcd...     verified package files (.rpm), by their checksum
    repodata/sha256/ab/abcd...     verified repository metadata files, by their checksum
    tmp/                           downloads in progress (removed at start-up)

(and `tags/`, the registry's tag records: registry/tags.py, written through `write_temp`).

Content is written to `tmp/`, fsynced, then renamed into place, so a reader never sees
a half-written file. Every write checks its byte count (`os.write` may write less) and the
file's length is checked against the expected size before the rename; a failed or short
write removes the temp file and raises `StoreWriteError`, leaving no entry. The size is
recorded at commit and compared with the file's on every lookup. Content indexed at
start-up is known only by its file's size until it has been re-hashed once (`checked`):
a file damaged while the cache was stopped must not be served as the blob. A write that fails for
lack of space makes the store report itself not ready (`not_ready()`, with the free space)
until such a write would fit again.

The store tracks access order itself (not filesystem atime) and evicts
least-recently-used content down to the low watermark when the budget's high watermark is
passed, skipping anything pinned (being served). It keeps each item's last use (wall clock;
its file's mtime across restarts) for `dnsoverride cache ls` and `purge --older-than`, and
removes an item on an admin's request (`remove`) unless it is pinned. It knows nothing of
HTTP.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

Kind = Literal["blobs", "manifests", "packages", "repodata"]
KINDS: tuple[Kind, ...] = ("blobs", "manifests", "packages", "repodata")
# Algorithms content may be addressed by (hashlib names); the hex length is fixed by each.
ALGORITHMS = {"sha1": 40, "sha224": 56, "sha256": 64, "sha384": 96, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Digest:
    """A content address, `algorithm:hex` (a hashlib algorithm name, lower-case hex).

    Callers validate what they take from a request or a file (registry/names.py,
    the repository metadata parser) before building one: it becomes a path.
    """

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Budget:
    """Store size cap: evict least-recently-used content from `high` down to `low` bytes."""

    max_size: int
    high_watermark: float = 0.95
    low_watermark: float = 0.85

    @property
    def high(self) -> int:
        return int(self.max_size * self.high_watermark)

    @property
    def low(self) -> int:
        return int(self.max_size * self.low_watermark)


class StoreWriteError(Exception):
    """Content could not be written to the store (disk full, I/O error, short write)."""

    def __init__(self, message: str, no_space: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.no_space = no_space


@dataclass
class StoreStats:
    entries: int = 0
    size: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    temp_removed: int = 0
    write_failures: int = 0
    corrupt_removed: int = 0


class Store:
    def __init__(self, root: Path, budget: Budget | None = None) -> None:
        self.root = root
        self.budget = budget
        self.tmp_dir = root / "tmp"
        # key "kind/algo:hex" -> size; order = least recently used first.
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._touched: set[str] = set()
        # key -> wall-clock time of its last use (commit or lookup): `cache ls`, `purge
        # --older-than`; the file's mtime at start-up (see flush_access).
        self._used: dict[str, float] = {}
        # Keys whose content this process verified: committed here, or re-hashed.
        self._checked: set[str] = set()
        self.stats = StoreStats()
        # Bytes a write needed when it last failed for lack of space; None when writes work.
        self._needed: int | None = None
        self._largest_warned = False

    # -- start-up -----------------------------------------------------------------------
    def open(self) -> None:
        """Create the layout, remove leftover temp files, and index what is stored."""
        for sub in (*KINDS, "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
                self.stats.temp_removed += 1
        found: list[tuple[float, str, int]] = []
        for kind in KINDS:
            for path in (self.root / kind).glob("*/*/*"):
                algorithm = path.parent.parent.name
                try:
                    info = path.stat()
                except OSError:
                    continue
                found.append((info.st_mtime, f"{kind}/{algorithm}:{path.name}", info.st_size))
        # The mtime of stored files is the cache's own record of last access (see flush).
        for mtime, key, size in sorted(found):
            self._entries[key] = size
            self._used[key] = mtime
            self.stats.size += size
        self.stats.entries = len(self._entries)
        log.info(
            "store_opened",
            root=str(self.root),
            entries=self.stats.entries,
            size=self.stats.size,
            temp_removed=self.stats.temp_removed,
        )

    def free_bytes(self) -> int:
        info = os.statvfs(self.tmp_dir)
        return info.f_bavail * info.f_frsize

    def not_ready(self) -> str | None:
        """Why new content cannot be stored now (the daemon's readiness); None when it can.

        After a write failed for lack of space the store stays not ready until that write
        would fit: then the next write is given its chance.
        """
        if not os.access(self.tmp_dir, os.W_OK | os.X_OK):
            return f"store {self.root}: {self.tmp_dir} is not writable"
        if self._needed is None:
            return None
        free = self.free_bytes()
        if free > self._needed:
            self._needed = None
            return None
        return (
            f"store {self.root}: writes fail for lack of space "
            f"({free} bytes free, the last failed write needed {self._needed})"
        )

    def writable(self) -> bool:
        return self.not_ready() is None

    # -- content ------------------------------------------------------------------------
    def path(self, kind: Kind, digest: Digest) -> Path:
        return self.root / kind / digest.algorithm / digest.hex[:2] / digest.hex

    def _key_path(self, key: str) -> Path:
        """`path()` of an index key ("kind/algo:hex")."""
        kind, _, digest = key.partition("/")
        algorithm, _, hex_part = digest.partition(":")
        return self.root / kind / algorithm / hex_part[:2] / hex_part

    def lookup(self, kind: Kind, digest: Digest) -> Path | None:
        """The stored file for `digest`, marking it recently used; None when absent."""
        key = f"{kind}/{digest}"
        if key not in self._entries:
            return None
        path = self.path(kind, digest)
        try:
            size = path.stat().st_size
        except OSError:  # removed behind our back: forget it
            self._forget(key)
            return None
        if size != self._entries[key]:
            self.remove_corrupt(kind, digest, f"{size} bytes on disk, {self._entries[key]} stored")
            return None
        self._entries.move_to_end(key)
        self._touched.add(key)
        self._used[key] = time.time()
        return path

    def checked(self, kind: Kind, digest: Digest) -> bool:
        """Whether this process has verified the stored content of `digest`."""
        return f"{kind}/{digest}" in self._checked

    def mark_checked(self, kind: Kind, digest: Digest) -> None:
        key = f"{kind}/{digest}"
        if key in self._entries:
            self._checked.add(key)

    def has(self, kind: Kind, digest: Digest) -> bool:
        """Whether `digest` is stored, from the index alone (no stat, no LRU touch)."""
        return f"{kind}/{digest}" in self._entries

    def remove_corrupt(self, kind: Kind, digest: Digest, why: str) -> None:
        """Drop a stored file that no longer is what was committed (size or digest)."""
        key = f"{kind}/{digest}"
        log.error("store_corrupt_removed", key=key, reason=why)
        with contextlib.suppress(OSError):
            self.path(kind, digest).unlink()
        if key in self._entries:
            self._forget(key)
        self.stats.corrupt_removed += 1

    def new_temp(self) -> tuple[int, Path]:
        try:
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix="dl-")
        except OSError as error:
            raise self.write_failed(error, "creating a temp file", 0) from error
        return fd, Path(name)

    @staticmethod
    def write_all(fd: int, data: bytes) -> None:
        """Write all of `data`: `os.write` may write less than asked (a full disk, a signal)."""
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]

    def write_failed(self, error: OSError, what: str, needed: int) -> StoreWriteError:
        """The StoreWriteError for `error`, remembering a lack of space for readiness."""
        self.stats.write_failures += 1
        no_space = error.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = f"store write failed {what}: {error.strerror or error}"
        if no_space:
            free = self.free_bytes()
            self._needed = max(needed, self._needed or 0, 1)
            reason += f" ({free} bytes free in {self.root})"
        return StoreWriteError(reason, no_space)

    def check_fits(self, size: int) -> None:
        """Warn once when one item is larger than the budget's high watermark allows."""
        if self.budget is None or size <= self.budget.high or self._largest_warned:
            return
        self._largest_warned = True
        log.warning(
            "store_budget_too_small",
            max_size=self.budget.max_size,
            high_watermark_bytes=self.budget.high,
            item_size=size,
            reason="max_size is smaller than a blob: it evicts everything else when stored",
        )

    @staticmethod
    def sync_close(fd: int) -> None:
        """fsync and close a finished temp file (blocking: run it in a thread)."""
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, kind: Kind, digest: Digest, temp: Path, size: int) -> Path:
        """Rename a verified, synced temp file of `size` bytes into place and account for it.

        Raises StoreWriteError (and removes the temp file) when the file is not `size`
        bytes long or cannot be renamed.
        """
        target = self.path(kind, digest)
        try:
            on_disk = temp.stat().st_size
            if on_disk != size:
                raise OSError(errno.EIO, f"short write: {on_disk} of {size} bytes on disk")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
        except OSError as error:
            self.discard(temp)
            raise self.write_failed(error, f"committing {kind} {digest}", size) from error
        self._needed = None
        self.check_fits(size)
        key = f"{kind}/{digest}"
        if key in self._entries:
            self.stats.size -= self._entries[key]
        self._entries[key] = size
        self._entries.move_to_end(key)
        self._checked.add(key)
        self._used[key] = time.time()
        self.stats.size += size
        self.stats.entries = len(self._entries)
        # What was just written is about to be served: never its own eviction victim.
        self.evict(keep=key)
        return target

    def put_bytes(self, kind: Kind, digest: Digest, data: bytes) -> Path:
        """Store small verified content (manifests) synchronously."""
        temp = self.write_temp(data, f"{kind} {digest}")
        return self.commit(kind, digest, temp, len(data))

    def write_temp(self, data: bytes, what: str) -> Path:
        """A synced temp file holding exactly `data`, for the caller to rename into place;
        StoreWriteError leaves none behind."""
        fd, temp = self.new_temp()
        try:
            try:
                self.write_all(fd, data)
            finally:
                self.sync_close(fd)
        except OSError as error:
            self.discard(temp)
            raise self.write_failed(error, f"writing {what}", len(data)) from error
        return temp

    @staticmethod
    def discard(temp: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()

    def pin(self, kind: Kind, digest: Digest) -> None:
        """Keep `digest` from eviction until as many `unpin` calls (pins count; content
        not stored yet may be pinned ahead of its commit)."""
        self._pins[f"{kind}/{digest}"] += 1

    def unpin(self, kind: Kind, digest: Digest) -> None:
        key = f"{kind}/{digest}"
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    @contextlib.contextmanager
    def pinned(self, kind: Kind, digest: Digest) -> Iterator[None]:
        """Keep `digest` from eviction while it is being served."""
        self.pin(kind, digest)
        try:
            yield
        finally:
            self.unpin(kind, digest)

    def evict(self, keep: str = "") -> None:
        """Evict least-recently-used unpinned content from the high to the low watermark."""
        if self.budget is None or self.stats.size <= self.budget.high:
            return
        before = self.stats.size
        for key in list(self._entries):
            if self.stats.size <= self.budget.low:
                break
            if self._pins.get(key) or key == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                self._key_path(key).unlink()
            self.stats.evictions += 1
            self._forget(key)
        self.stats.evicted_bytes += before - self.stats.size
        log.info("store_evicted", freed=before - self.stats.size, size=self.stats.size)

    def _forget(self, key: str) -> None:
        self.stats.size -= self._entries.pop(key)
        self.stats.entries = len(self._entries)
        self._touched.discard(key)
        self._checked.discard(key)
        self._used.pop(key, None)

    # -- contents (`dnsoverride cache ls` / `purge`) ------------------------------------
    def size_of(self, kind: Kind, digest: Digest) -> int | None:
        """The stored size of `digest`, from the index alone; None when absent."""
        return self._entries.get(f"{kind}/{digest}")

    def last_use(self, kind: Kind, digest: Digest) -> float | None:
        """Wall-clock time `digest` was last stored or served; None when absent."""
        return self._used.get(f"{kind}/{digest}")

    def items(self, kind: Kind) -> Iterator[tuple[Digest, int]]:
        """(digest, size) of everything stored of `kind`."""
        prefix = f"{kind}/"
        for key, size in list(self._entries.items()):
            if key.startswith(prefix):
                algorithm, _, hex_part = key[len(prefix) :].partition(":")
                yield Digest(algorithm, hex_part), size

    def is_pinned(self, kind: Kind, digest: Digest) -> bool:
        """Whether `digest` is being served or downloaded, or held by a served snapshot."""
        return bool(self._pins.get(f"{kind}/{digest}"))

    def remove(self, kind: Kind, digest: Digest) -> bool:
        """Delete stored `digest` on an admin's request; False (nothing done) when it is
        pinned. Whether stored or not, it is not afterwards."""
        key = f"{kind}/{digest}"
        if self._pins.get(key):
            return False
        with contextlib.suppress(FileNotFoundError):
            self._key_path(key).unlink()
        if key in self._entries:
            self._forget(key)
        return True

    def flush_access(self) -> None:
        """Persist access order as file mtimes so LRU survives a restart."""
        now = time.time()
        for key in self._touched:
            used = self._used.get(key, now)
            with contextlib.suppress(OSError):
                os.utime(self._key_path(key), (used, used))
        self._touched.clear()
