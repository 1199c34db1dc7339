"""The `packages:` section of the cache's config -> frozen dataclasses: the mirrorlist
responder's rules (`mirrorlist:`), the metalink responder's (`metalink:`), and the
repository cache's settings (repos_config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

from dnsoverride.cache.packages.repos_config import REPOS_KEYS, RepositoriesConfig
from dnsoverride.common.configfile import Section

PACKAGES_KEYS = ("mirrorlist", "metalink", *REPOS_KEYS)


@dataclass(frozen=True)
class PackagesConfig:
    """Everything the package side of the cache needs, validated."""

    repositories: RepositoriesConfig = field(default_factory=RepositoriesConfig)

    @classmethod
    def read(cls, section: Section) -> Self:
        return cls(repositories=RepositoriesConfig.read(section))
