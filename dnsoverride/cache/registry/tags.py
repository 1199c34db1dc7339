"""The registry's tag records: tag -> (digest, media type, last upstream check), one JSON
file each under the store's root, written like content (temp file, fsync, rename), so a
reader never sees half a record.

Layout: `tags/<upstream>/<name>/_tags/<tag>`; `_tags` cannot be a repository component
(components start with [a-z0-9]), so `library/alpine:3` and `library/alpine/3:x` never
clash. `records` lists them all (`dnsoverride cache ls`), `remove` drops one (`purge`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dnsoverride.cache.store import Store


@dataclass(frozen=True)
class TagRecord:
    digest: str
    media_type: str
    checked: float  # wall-clock time of the last successful upstream check


class Tags:
    """The tag records kept beside one store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _path(self, upstream: str, name: str, tag: str) -> Path:
        return self.store.root / "tags" / upstream / name / "_tags" / tag

    def read(self, upstream: str, name: str, tag: str) -> TagRecord | None:
        try:
            raw = json.loads(self._path(upstream, name, tag).read_bytes())
            return TagRecord(str(raw["digest"]), str(raw["media_type"]), float(raw["checked"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, upstream: str, name: str, tag: str, record: TagRecord) -> None:
        """Persist a tag record; raises StoreWriteError (nothing half-written) on failure."""
        path = self._path(upstream, name, tag)
        data = json.dumps(
            {"digest": record.digest, "media_type": record.media_type, "checked": record.checked}
        ).encode()
        what = f"tag {upstream}/{name}:{tag}"
        temp = self.store.write_temp(data, what)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, path)
        except OSError as error:
            self.store.discard(temp)
            raise self.store.write_failed(error, what, len(data)) from error

    def records(self) -> Iterator[tuple[str, str, str, TagRecord]]:
        """(upstream, repository, tag, record) of every readable tag record."""
        root = self.store.root / "tags"
        for path in sorted(root.glob("*/**/_tags/*")):
            parts = path.relative_to(root).parts
            upstream, name, tag = parts[0], "/".join(parts[1:-2]), parts[-1]
            record = self.read(upstream, name, tag)
            if record is not None:
                yield upstream, name, tag, record

    def remove(self, upstream: str, name: str, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(upstream, name, tag).unlink()
