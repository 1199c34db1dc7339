"""Split horizon: which view (set of zone files) a client's source address selects, and
`Routing`, the ACL + views + zone set that the server routes queries by.

The first view whose `clients` networks contain the address wins; allowed clients that
match none get the configured default view. A view with no zone files forwards
everything, which is how the cache host itself sees the real public names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from dnsoverride.common.grammar import IPNetwork
from dnsoverride.dns.acl import Acl, IPAddress
from dnsoverride.dns.config import ServeConfig, View
from dnsoverride.dns.zones.model import ZoneSet


class ViewTable:
    """The configured views in order, plus the default for unmatched clients."""

    def __init__(self, views: Iterable[View], default: str) -> None:
        self.views = tuple(views)
        self.default = next(view for view in self.views if view.name == default)

    def view_for(self, address: IPAddress) -> View:
        """The first view whose networks contain `address`, else the default view."""
        return self.choose(address)[0]

    def choose(self, address: IPAddress) -> tuple[View, IPNetwork | None]:
        """`view_for`, with the network that chose the view (None: the default view)."""
        for view in self.views:
            for network in view.clients:
                if address in network:
                    return view, network
        return self.default, None


class Routing:
    """Who may query (ACL), which view each client gets, how fast it may be answered over
    UDP (the rate limit), and the zone set the views select from: built from one config
    and one zone load, and only ever replaced as a whole, so a query never meets new
    views with old zones (or the reverse). What the reloader swaps; its identity covers
    the zones and the reloadable part of the config.
    """

    def __init__(self, config: ServeConfig, zone_set: ZoneSet) -> None:
        self.acl = Acl(config.allow)
        self.views = ViewTable(config.views, config.default_view)
        self.ratelimit = config.ratelimit
        self.zone_set = zone_set
        routing = repr((config.allow, config.views, config.default_view, config.ratelimit))
        self.content_hash = hashlib.sha256(
            f"{zone_set.content_hash}\n{routing}".encode()
        ).hexdigest()

    def name_count(self) -> int:
        """How many names the zone set overrides."""
        return self.zone_set.name_count()

    def changes_from(self, old: Routing) -> tuple[list[str], list[str], list[str]]:
        """The names the zone set added, removed and changed since `old`'s."""
        return self.zone_set.changes_from(old.zone_set)
