"""Where stored content came from: each stored digest -> the (upstream, repository) pairs
it was fetched for or that upstream confirmed it holds. Not the digests a manifest lists:
they are its pusher's claim (a foreign layer may name any digest), not the upstream's.

The store is content-addressed and shared; this is what keeps private content private
inside it. A stored digest is served for (upstream, repository) only when it is linked to
that pair, or when one of its links is public (see access.py); otherwise the request goes
to that upstream, which decides. Links are persisted per repository as
`tags/<upstream>/<name>/_links` (one `kind/algorithm:hex` a line, appended) and read back
at start-up. A link that cannot be written is kept in memory and logged; a torn last line
after a crash is skipped.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import structlog

from dnsoverride.cache.store import Digest, Kind

log = structlog.get_logger(__name__)

Owner = tuple[str, str]  # (upstream name, repository)
_FILE = "_links"
_KINDS = ("blobs/", "manifests/")


class Links:
    def __init__(self, root: Path) -> None:
        self.root = root / "tags"
        self._owners: dict[str, set[Owner]] = {}

    def open(self) -> None:
        for path in self.root.glob(f"*/**/{_FILE}"):
            parts = path.relative_to(self.root).parts
            owner = (parts[0], "/".join(parts[1:-1]))
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith(_KINDS) and len(line.partition(":")[2]) in (64, 128):
                        self._owners.setdefault(line, set()).add(owner)
        log.info("links_loaded", digests=len(self._owners))

    def owners(self, kind: Kind, digest: Digest) -> frozenset[Owner]:
        return frozenset(self._owners.get(f"{kind}/{digest}", ()))

    def linked(self, kind: Kind, digest: Digest, owner: Owner) -> bool:
        return owner in self._owners.get(f"{kind}/{digest}", ())

    def add(self, owner: Owner, items: Iterable[tuple[Kind, Digest]]) -> None:
        """Link every (kind, digest) of `items` to `owner`; new links are appended to disk."""
        new = []
        for kind, digest in items:
            key = f"{kind}/{digest}"
            owners = self._owners.setdefault(key, set())
            if owner not in owners:
                owners.add(owner)
                new.append(key)
        if not new:
            return
        path = self.root / owner[0] / owner[1] / _FILE
        data = "".join(f"{key}\n" for key in new).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                # One write of whole lines: appends of a few hundred bytes are not split.
                if os.write(fd, data) != len(data):
                    raise OSError("short write")
            finally:
                os.close(fd)
        except OSError as error:
            log.warning(
                "store_write_failed",
                what=f"links of {owner[0]}/{owner[1]}",
                reason=str(error),
                kept="in memory until restart",
            )
