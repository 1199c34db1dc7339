"""Checks across the files one view sees: a name defined in two of them, and CNAME chains
the server could not answer (loops, more names than it follows, more records than a
DNS message holds)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from dnsoverride.common.errors import Problem
from dnsoverride.dns.constants import MAX_CNAME_CHAIN
from dnsoverride.dns.zones.model import NameEntry, Overrides, ZoneFile, ZoneSet
from dnsoverride.dns.zones.records import ANSWER_ROOM, QTYPE_CNAME, rrset_bytes


def view_problems(zone_set: ZoneSet, view: str, selectors: frozenset[str] | None) -> list[Problem]:
    """Problems with one view's choice of files: unknown files, a name in two files,
    and CNAME chains the server cannot follow within the view (see `cname_problems`)."""
    problems = []
    for selector in sorted(selectors or ()):
        if not any(zone.matches(selector) for zone in zone_set.files):
            problems.append(
                Problem(
                    zone_set.directory,
                    0,
                    f"view {view!r} names zone file {selector!r}, which does not exist",
                )
            )
    files = zone_set.selected(selectors)
    overrides = zone_set.select(selectors)
    if sum(len(zone.stored) for zone in files) != len(overrides.owners):
        problems.extend(_defined_twice(view, files, overrides))
    problems.extend(cname_problems(files, overrides))
    return problems


def _defined_twice(view: str, files: Iterable[ZoneFile], overrides: Overrides) -> list[Problem]:
    problems = []
    for zone in files:
        for name in zone.stored:
            owner = overrides.owners[name]
            if owner is not zone:
                first, entry = owner.entry(name), zone.entry(name)
                assert first is not None and entry is not None
                problems.append(
                    Problem(
                        entry.file,
                        entry.line,
                        f"{name} is already defined in "
                        f"{first.file}:{first.line} (both files are in view {view!r})",
                    )
                )
    return problems


def cname_problems(files: Iterable[ZoneFile], overrides: Overrides) -> list[Problem]:
    """What the server cannot answer among the CNAMEs of one view's files: loops, chains
    of more names than it follows (`MAX_CNAME_CHAIN`), and chains whose records outgrow a
    DNS message. Each problem is reported once, at the name a chain starts from (or, for
    a loop, at its first name in file order)."""
    chains = _Chains(overrides)
    for zone in files:
        for name in zone.cnames:
            if overrides.owners.get(name) is zone:
                chains.walk(name)
    return chains.problems()


class _Chains:
    """The CNAME chains of one view, each name walked once: `hops[name]` is how many names
    the server visits answering it (itself included), `size[name]` the bytes of records
    it adds to the answer; a name that is or leads into a loop is in `looping`."""

    def __init__(self, overrides: Overrides) -> None:
        self.overrides = overrides
        self.hops: dict[str, int] = {}
        self.size: dict[str, int] = {}
        self.next: dict[str, str] = {}  # the name (or wildcard) a CNAME leads to locally
        self.entries: dict[str, NameEntry] = {}
        self.looping: set[str] = set()
        self.loops: list[list[NameEntry]] = []

    def walk(self, start: str) -> None:
        path: list[NameEntry] = []
        position: dict[str, int] = {}
        entry = self.overrides.lookup(start)
        while entry is not None:
            name = entry.name
            if name in self.hops or name in self.looping:
                break
            if name in position:
                self.loops.append(path[position[name] :])
                break
            position[name] = len(path)
            path.append(entry)
            self.entries[name] = entry
            target = entry.cname
            following = self.overrides.lookup(target) if target is not None else None
            if following is None:
                entry = None
                break
            self.next[name] = following.name
            entry = following
        after = None if entry is None else entry.name
        if after is not None and (after in self.looping or after in position):
            self.looping.update(e.name for e in path)
            return
        hops = self.hops.get(after, 0) if after is not None else 0
        size = self.size.get(after, 0) if after is not None else 0
        for entry in reversed(path):
            own = entry.rrsets.get(QTYPE_CNAME)
            if own is not None:
                hops, size = hops + 1, size + rrset_bytes(own)
            else:  # the end of the chain: the largest answer it may give
                hops, size = 1, max(rrset_bytes(rrset) for rrset in entry.rrsets.values())
            self.hops[entry.name], self.size[entry.name] = hops, size

    def problems(self) -> list[Problem]:
        found = []
        for loop in self.loops:
            first = min(loop, key=lambda entry: (entry.file, entry.line))
            at = loop.index(first)
            names = [entry.name for entry in loop[at:] + loop[:at]]
            found.append(
                Problem(
                    first.file,
                    first.line,
                    f"{first.name}: CNAME loop {_chain_text([*names, names[0]])}: "
                    "the server can only answer SERVFAIL",
                )
            )
        too_long = {n for n, hops in self.hops.items() if hops > MAX_CNAME_CHAIN}
        too_big = {n for n, size in self.size.items() if size > ANSWER_ROOM}
        reasons: list[tuple[set[str], Callable[[str], str]]] = [
            (
                too_long,
                lambda n: (
                    f"visits {self.hops[n]} names; the server follows at most {MAX_CNAME_CHAIN}"
                ),
            ),
            (
                too_big,
                lambda n: (
                    f"answers with {self.size[n]:,} bytes of records, more than a DNS "
                    f"message holds ({ANSWER_ROOM:,} after header, question and EDNS)"
                ),
            ),
        ]
        for failing, why in reasons:
            for name in sorted(_heads(failing, self.next)):
                entry = self.entries[name]
                chain = _chain_text(self._chain(name))
                found.append(
                    Problem(entry.file, entry.line, f"{name}: CNAME chain {chain} {why(name)}")
                )
        return found

    def _chain(self, name: str) -> list[str]:
        names = [name]
        while names[-1] in self.next and len(names) <= MAX_CNAME_CHAIN + 2:
            names.append(self.next[names[-1]])
        return names


def _heads(names: set[str], following: Mapping[str, str]) -> set[str]:
    """The names of `names` that no other name of `names` leads to: where chains start."""
    return names - {following[name] for name in names if name in following}


def _chain_text(names: list[str]) -> str:
    shown = names if len(names) <= 6 else [*names[:3], "...", *names[-2:]]
    return " -> ".join(shown)
