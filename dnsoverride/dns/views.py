"""Split horizon: which view (set of zone files) a client's source address selects.

The first view whose `clients` networks contain the address wins; allowed clients that
match none get the configured default view. A view with no zone files forwards
everything, which is how the cache host itself sees the real public names.
"""

from __future__ import annotations

from collections.abc import Iterable

from dnsoverride.config import View
from dnsoverride.dns.acl import IPAddress


class ViewTable:
    """The configured views in order, plus the default for unmatched clients."""

    def __init__(self, views: Iterable[View], default: str) -> None:
        self.views = tuple(views)
        self.default = next(view for view in self.views if view.name == default)

    def view_for(self, address: IPAddress) -> View:
        """The first view whose networks contain `address`, else the default view."""
        for view in self.views:
            if any(address in network for network in view.clients):
                return view
        return self.default
