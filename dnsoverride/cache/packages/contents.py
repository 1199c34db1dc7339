"""What the package side of the store holds, repository by repository, for `dnsoverride
cache ls`: for each repository with a snapshot (served, or recorded before a restart and
read from the store, not restored), the files of its snapshots that are stored (repository metadata
and packages its primary describes), their bytes, and when any of them was last used.
Reading it is not a use, and never asks the upstream.
"""

from __future__ import annotations

from dnsoverride.cache.packages.repos import Repository, RepositoryCache
from dnsoverride.cache.store import Digest, Kind, Store


async def listing(repositories: RepositoryCache, repository: str | None) -> list[dict[str, object]]:
    """One entry per repository (those whose `upstream/root` starts with `repository`)."""
    found = []
    for repo in await repositories.recorded():
        if repository and not repo.where.startswith(repository):
            continue
        found.append(_entry(repositories.store, repo))
    return sorted(found, key=lambda entry: str(entry["repository"]))


def _entry(store: Store, repository: Repository) -> dict[str, object]:
    items: set[tuple[Kind, Digest]] = set()
    for snapshot in repository.snapshots():
        items.add(("repodata", snapshot.recorded))
        items.update(("repodata", item.checksum) for item in snapshot.files.values())
        items.update(("packages", package.checksum) for package in snapshot.packages.values())
    stored = [(kind, digest) for kind, digest in items if store.has(kind, digest)]
    times = [store.last_use(kind, digest) for kind, digest in stored]
    return {
        "repository": repository.where,
        "upstream": repository.upstream.name,
        "url": repository.url,
        "packages": sum(kind == "packages" for kind, _ in stored),
        "repodata_files": sum(kind == "repodata" for kind, _ in stored),
        "bytes": sum(store.size_of(kind, digest) or 0 for kind, digest in stored),
        "last_use_unix": max((t for t in times if t is not None), default=None),
        "failure": repository.failure,
    }
