"""The repository cache's part of the `packages:` section (placeholder: repos.py's owner
fills it in: upstream repositories, metadata TTL).

`RepositoriesConfig.read(section)` reads the keys of REPOS_KEYS from the `packages:`
section; packages/config.py calls it and keeps the result as `PackagesConfig.repositories`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from dnsoverride.common.configfile import Section

REPOS_KEYS: tuple[str, ...] = ()


@dataclass(frozen=True)
class RepositoriesConfig:
    """The upstream package repositories the cache serves pull-through."""

    @classmethod
    def read(cls, section: Section) -> Self:
        return cls()
