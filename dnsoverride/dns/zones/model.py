"""The parsed zone set: `ZoneFile`, `ZoneSet` and `Overrides` (the lookup rules for
overridden names and wildcards), and the compact form most names are kept in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from dnsoverride.common.errors import ConfigError, Problem
from dnsoverride.common.readfile import FS_BYTES
from dnsoverride.dns.zones.health import GatedOverride, HealthCheck
from dnsoverride.dns.zones.names import normalize_name
from dnsoverride.dns.zones.records import (
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    TYPE_NAMES,
    RRSet,
    RRSets,
)


class ZoneSetError(ConfigError):
    """The zone set is not valid; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        super().__init__(problems, "invalid zones")


class NameEntry(NamedTuple):
    """An overridden name (or wildcard `*.suffix`) and all its data, from one file."""

    name: str
    file: str
    line: int
    ttl: int
    rrsets: Mapping[int, RRSet]
    health: HealthCheck | None = None

    @property
    def cname(self) -> str | None:
        """The CNAME target (lowercase, no trailing dot) when this name is an alias."""
        rrset = self.rrsets.get(QTYPE_CNAME)
        return rrset.texts[0].rstrip(".") if rrset else None

    def canonical(self) -> str:
        """A stable text form of the data, for hashing and diffing."""
        return _canonical(self.name, self.ttl, self.rrsets, self.health)


def _canonical(name: str, ttl: int, rrsets: Mapping[int, RRSet], health: HealthCheck | None) -> str:
    lines = [f"{name} ttl={ttl}"]
    for rtype in sorted(rrsets):
        rrset = rrsets[rtype]
        for text in sorted(rrset.texts):
            lines.append(f"  {TYPE_NAMES[rtype]} {rrset.ttl} {text}")
    if health is not None:
        lines.append(f"  health {health.canonical()}")
    return "\n".join(lines)


# How a zone file keeps its names. Most names (one record type, no health check) are kept
# as one string, "LINE TTL QTYPE TEXT[\nTEXT...]": a quarter of the memory of the
# NameEntry, RRSets, RRSet and tuples they stand for (1,000,000 names: ~0.25 GB instead
# of ~0.7 GB), and a tenth of the time to build. The rest are kept as NameEntry objects.
# Either is turned into a NameEntry when a query (or a check) asks for it.
Stored = str | NameEntry


def compact_form(line: int, rrset: RRSet) -> str | None:
    """The compact form of a one-RRset name, if its texts allow it (a TXT text may hold
    a newline, the separator)."""
    texts = "\n".join(rrset.texts)
    if len(rrset.texts) > 1 and texts.count("\n") != len(rrset.texts) - 1:
        return None
    return f"{line} {rrset.ttl} {rrset.rtype} {texts}"


def entry_of(name: str, file: str, stored: Stored) -> NameEntry:
    if type(stored) is not str:
        return stored  # type: ignore[return-value]
    line, ttl, rtype, texts = stored.split(" ", 3)
    rrset = RRSet(int(rtype), int(ttl), tuple(texts.split("\n")))
    return NameEntry(name, file, int(line), rrset.ttl, RRSets((rrset,)))


def _same_data(one: Stored, other: Stored) -> bool:
    return one == other or data_of(one) == data_of(other)


def data_of(stored: Stored) -> str:
    """What a name's data is, without where it is: equal exactly when the data is."""
    if type(stored) is str:
        return stored.partition(" ")[2]
    return stored.canonical()  # type: ignore[union-attr]


class _Entries(Mapping[str, NameEntry]):
    """A zone file's names as NameEntry objects, made on access from the stored form."""

    __slots__ = ("_file", "_stored")

    def __init__(self, file: str, stored: Mapping[str, Stored]) -> None:
        self._file = file
        self._stored = stored

    def __getitem__(self, name: str) -> NameEntry:
        return entry_of(name, self._file, self._stored[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __contains__(self, name: object) -> bool:
        return name in self._stored


@dataclass(frozen=True, slots=True)
class ZoneFile:
    """One zone file: its name in the directory (e.g. `ci.yaml`) and its names.

    `stored` holds each name's data in its compact form (see `Stored`); `entries` shows
    them as NameEntry objects. `cnames` and `checked` list the names that are aliases and
    the names with a health check, so set-wide checks need not look at every name.
    """

    name: str
    path: str
    stored: Mapping[str, Stored]
    cnames: tuple[str, ...] = ()
    checked: tuple[str, ...] = ()

    @property
    def entries(self) -> Mapping[str, NameEntry]:
        """Every name of the file as a NameEntry (made on access)."""
        return _Entries(self.path, self.stored)

    def entry(self, name: str) -> NameEntry | None:
        """The entry of `name` (lowercase, no trailing dot), if this file defines it."""
        stored = self.stored.get(name)
        return None if stored is None else entry_of(name, self.path, stored)

    def matches(self, selector: str) -> bool:
        """Views name files by file name (`ci.yaml`) or stem (`ci`)."""
        return selector in (self.name, Path(self.name).stem)


@dataclass(frozen=True, slots=True)
class Overrides:
    """The merged overrides one view sees; `lookup` applies the ownership rules.

    `owners` maps every name the view's files define to the first of them that does."""

    owners: Mapping[str, ZoneFile]

    def lookup(self, qname: str) -> NameEntry | None:
        """The entry answering `qname` (lowercase, no trailing dot), or None to forward.

        An exact name wins; otherwise the closest enclosing wildcard `*.parent` answers,
        but an overridden parent without a wildcard stops the search: names below an
        override are forwarded.
        """
        owners = self.owners
        zone = owners.get(qname)
        if zone is not None:
            return zone.entry(qname)
        dot = qname.find(".")
        while dot >= 0:  # each parent, nearest first (no list of labels: a cold miss's cost)
            parent = qname[dot + 1 :]
            wildcard = "*." + parent
            zone = owners.get(wildcard)
            if zone is not None:
                return zone.entry(wildcard)
            if parent in owners:
                return None
            dot = qname.find(".", dot + 1)
        return None


@dataclass(frozen=True)
class ZoneSet:
    """Every zone file of a directory, parsed and validated; never changes once built."""

    directory: str
    files: tuple[ZoneFile, ...]
    content_hash: str
    _selections: dict[frozenset[str] | None, Overrides] = field(
        default_factory=dict, compare=False, repr=False
    )

    def names(self) -> frozenset[str]:
        """Every overridden name (lowercase, no trailing dot) across all files."""
        return frozenset(self.select(None).owners)

    def name_count(self) -> int:
        """How many distinct names the files define (without building a set of them)."""
        return len(self.select(None).owners)

    def records_digest(self, name: str) -> str:
        """A digest of everything any file says about `name`, to tell what changed."""
        key = normalize_name(name)
        digest = hashlib.sha256()
        for zone in self.files:
            stored = zone.stored.get(key)
            if stored is not None:
                digest.update(f"{zone.name}\n{data_of(stored)}\n".encode(errors=FS_BYTES))
        return digest.hexdigest()

    def changes_from(self, old: ZoneSet) -> tuple[list[str], list[str], list[str]]:
        """The names added, removed and changed since `old`. Only the names of files that
        were re-parsed are compared (an unchanged file is the same object in both sets),
        one at a time: a full rewrite of 1,000,000 names builds no copy of either set. A
        name defined in several files changed when any of its files' data did."""
        kept = {id(zone) for zone in old.files} & {id(zone) for zone in self.files}
        gone = [zone for zone in old.files if id(zone) not in kept]
        came = [zone for zone in self.files if id(zone) not in kept]
        added: list[str] = []
        removed: list[str] = []
        changed: list[str] = []
        if not gone and not came:
            return added, removed, changed
        if old._unique() and self._unique():
            # Each name in one file: compare it with its one file in the other set (a name
            # of a re-parsed file cannot be in an unchanged file of the other set: it
            # would be in two files of that set).
            before, after = old.select(None).owners, self.select(None).owners
            for zone in came:
                for name, stored in zone.stored.items():
                    other = before.get(name)
                    if other is None:
                        added.append(name)
                    elif other.name != zone.name or not _same_data(other.stored[name], stored):
                        changed.append(name)
            removed.extend(name for zone in gone for name in zone.stored if name not in after)
            return added, removed, changed
        candidates = {name for zone in (*gone, *came) for name in zone.stored}
        for name in candidates:
            was, now = old._data(name), self._data(name)
            if not was:
                added.append(name)
            elif not now:
                removed.append(name)
            elif was != now:
                changed.append(name)
        return added, removed, changed

    def _unique(self) -> bool:
        """Whether no name is defined in more than one file."""
        return sum(len(zone.stored) for zone in self.files) == self.name_count()

    def _data(self, name: str) -> tuple[tuple[str, str], ...]:
        """What every file says about `name`, and which file says it."""
        return tuple(
            (zone.name, data_of(zone.stored[name])) for zone in self.files if name in zone.stored
        )

    def health_gated(self) -> tuple[GatedOverride, ...]:
        """Every name with a health check and the addresses it checks (first file wins)."""
        gated: dict[str, GatedOverride] = {}
        for zone in self.files:
            for name in zone.checked:
                entry = zone.entry(name)
                if entry is not None and entry.health is not None and name not in gated:
                    addresses = tuple(
                        text
                        for rtype in (QTYPE_A, QTYPE_AAAA)
                        if rtype in entry.rrsets
                        for text in entry.rrsets[rtype].texts
                    )
                    gated[name] = GatedOverride(name, entry.health, addresses)
        return tuple(gated.values())

    def selected(self, selectors: frozenset[str] | None) -> tuple[ZoneFile, ...]:
        """The files a view names (None: every file), in file order."""
        if selectors is None:
            return self.files
        return tuple(zone for zone in self.files if any(zone.matches(s) for s in selectors))

    def select(self, selectors: frozenset[str] | None) -> Overrides:
        """The overrides of the files a view names (None: every file), merged in file order."""
        cached = self._selections.get(selectors)
        if cached is not None:
            return cached
        owners: dict[str, ZoneFile] = {}
        # Later files first, so an earlier file's name overwrites: the first file wins.
        for zone in reversed(self.selected(selectors)):
            owners.update(dict.fromkeys(zone.stored, zone))
        overrides = Overrides(MappingProxyType(owners))
        self._selections[selectors] = overrides
        return overrides
