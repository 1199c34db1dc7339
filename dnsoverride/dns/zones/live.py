"""`LiveZones`: the one holder of the zone set being served, swapped atomically."""

from __future__ import annotations

from collections.abc import Callable

from dnsoverride.dns.zones.model import ZoneSet


class LiveZones:
    """The one holder of the current ZoneSet; `swap` replaces it atomically.

    The (zone set, generation) pair lives in the single attribute `state` so a reader
    never sees a new set with an old generation (the DNS fast path reads `state[1]`
    directly: a property call per query is measurable there). The DNS answer cache tags
    answers with the generation, so a swap invalidates them all without scanning.
    """

    def __init__(self, zone_set: ZoneSet) -> None:
        self.state: tuple[ZoneSet, int] = (zone_set, 1)
        self._withdrawn: frozenset[str] = frozenset()
        self._swap_listeners: list[Callable[[ZoneSet], object]] = []

    @property
    def current(self) -> ZoneSet:
        """The zone set being served."""
        return self.state[0]

    @property
    def generation(self) -> int:
        """Bumped by every swap, starting at 1."""
        return self.state[1]

    def snapshot(self) -> tuple[ZoneSet, int]:
        """The current set and its generation, read together."""
        return self.state

    def swap(self, new: ZoneSet) -> int:
        """Serve `new` from now on; returns its generation."""
        generation = self.state[1] + 1
        self.state = (new, generation)
        for listener in self._swap_listeners:
            listener(new)
        return generation

    def on_swap(self, listener: Callable[[ZoneSet], object]) -> None:
        """Call `listener(new_set)` after every swap (the health monitor follows the zones)."""
        self._swap_listeners.append(listener)

    @property
    def withdrawn(self) -> frozenset[str]:
        """Health-gated names whose override is withdrawn: they are forwarded upstream."""
        return self._withdrawn

    def withdraw(self, names: frozenset[str]) -> int:
        """Replace the withdrawn names (from dnsoverride.health); returns the new generation.

        The generation bump drops every cached answer for a name whose override just went
        or came back, exactly like a zone swap does.
        """
        self._withdrawn = names
        generation = self.state[1] + 1
        self.state = (self.state[0], generation)
        return generation
