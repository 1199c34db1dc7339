"""Zone files: YAML on disk -> one immutable, validated `ZoneSet`, and the live holder.

Owns the zone file format, its validation (every problem reported as `file:line: reason`,
all of them at once, including whatever the server could not answer: records over wire
limits, CNAME loops and over-long chains within a view), the compact form names are kept
in, the parse of big sets in worker processes, the lookup rules for overridden names and
wildcards, and `LiveZones`, the single holder the DNS server reads and `reload.py` swaps.
(YAML itself, with its limits, is `yamlsource`.)

Format (every `*.yaml` / `*.yml` in the zones directory)::

    ttl: 60                       # optional default TTL for the file
    records:
      registry-1.docker.io:
        A: 10.0.0.5               # a value or a list of values
        ttl: 30                   # optional per-name TTL
      "*.apps.ci.example":
        CNAME: ingress.ci.example.

Names are absolute with or without the trailing dot and case-insensitive. Keys of a name
are record types, `ttl` or `health` (a check that withdraws the override while its addresses
fail, see `dnsoverride.health`); anything else is rejected so that a typo (or a feature
this version does not have yet) is an error rather than silently ignored.
"""

from __future__ import annotations

import gc
import hashlib
import ipaddress
import os
import pickle
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import dnslib
import structlog

from dnsoverride import yamlsource
from dnsoverride.health import GatedOverride, HealthCheck, HealthSpecError, parse_health
from dnsoverride.yamlsource import brief

log = structlog.get_logger(__name__)

DEFAULT_TTL = 60
MAX_TTL = 2**31 - 1
ZONE_SUFFIXES = (".yaml", ".yml")
FILE_KEYS = ("ttl", "records")
NAME_KEYS = ("ttl", "health")
RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT", "MX", "SRV", "PTR", "NS")

_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
# Every label valid at once: the common case, one regex call instead of one per label.
_LABELS = r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_VALID_NAME = re.compile(_LABELS)
_VALID_OWNER = re.compile(r"(?:\*\.)?" + _LABELS)
_QTYPES = {rtype: int(getattr(dnslib.QTYPE, rtype)) for rtype in RECORD_TYPES}
QTYPE_A, QTYPE_AAAA, QTYPE_CNAME = _QTYPES["A"], _QTYPES["AAAA"], _QTYPES["CNAME"]
QTYPE_TXT = _QTYPES["TXT"]
# How many names the server visits for one answer following CNAMEs (dns/answer.py): the
# queried name and the targets of up to 7 more CNAMEs (8 CNAMEs when the last target is
# resolved upstream).
MAX_CNAME_CHAIN = 8
# Wire limits (RFC 1035): a record's data, and a DNS message (over TCP, its 2-byte length).
MAX_RDATA = 65535
MAX_MESSAGE = 65535
# What an answer's records may take of a message: the 12-byte header, the question (a name
# of up to 255 bytes, type and class) and our EDNS OPT record with a DNS cookie (RFC 7873:
# 11 bytes, option header 4, cookie up to 40) take the rest.
ANSWER_ROOM = MAX_MESSAGE - (12 + 255 + 4 + 11 + 4 + 40)
# Below this many bytes of zone files to parse, this process parses them all: starting a
# worker process costs ~0.3 s, parsing a megabyte ~0.2 s.
PARALLEL_MIN_BYTES = 8 << 20
# From this many records on an RRset of fixed-size records may not fit a message (A:
# ~4,000, names: ~230), so only such RRsets (and TXT) are measured.
_BIG_RRSET = 200


@dataclass(frozen=True)
class ZoneProblem:
    """One thing wrong with a zone file, at a 1-based line."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class ZoneSetError(Exception):
    """The zone set is not valid; `problems` lists every problem found, in file order."""

    def __init__(self, problems: Iterable[ZoneProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


# RRSet and NameEntry are NamedTuples rather than frozen dataclasses: as immutable, and
# built 3x faster and smaller.
class RRSet(NamedTuple):
    """The records of one type at one name, as canonical texts (validated when loaded)."""

    rtype: int
    ttl: int
    texts: tuple[str, ...]

    @property
    def rdatas(self) -> tuple[Any, ...]:
        """The records as dnslib RDATA objects. Built on use, not kept: a local answer is
        packed once and then served from the answer cache, while keeping them costs
        memory and load time for every name of a large set."""
        build = _RDATA_FROM_TEXT[self.rtype]
        return tuple(build(text) for text in self.texts)


class RRSets(Mapping[int, RRSet]):
    """A name's RRSets by type: an immutable mapping over a tuple, a quarter of a dict's
    size (most names have one or two types; a scan of those is as fast as hashing)."""

    __slots__ = ("_rrsets",)

    def __init__(self, rrsets: Iterable[RRSet]) -> None:
        self._rrsets = tuple(rrsets)

    def __getitem__(self, rtype: int) -> RRSet:
        for rrset in self._rrsets:
            if rrset.rtype == rtype:
                return rrset
        raise KeyError(rtype)

    def __iter__(self) -> Iterator[int]:
        return (rrset.rtype for rrset in self._rrsets)

    def __len__(self) -> int:
        return len(self._rrsets)

    def __repr__(self) -> str:
        return f"RRSets({self._rrsets!r})"


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
            lines.append(f"  {_TYPE_NAMES[rtype]} {rrset.ttl} {text}")
    if health is not None:
        lines.append(f"  health {health.canonical()}")
    return "\n".join(lines)


# How a zone file keeps its names. Most names (one record type, no health check) are kept
# as one string, "LINE TTL QTYPE TEXT[\nTEXT...]": a quarter of the memory of the
# NameEntry, RRSets, RRSet and tuples they stand for (1,000,000 names: ~0.25 GB instead
# of ~0.7 GB), and a tenth of the time to build. The rest are kept as NameEntry objects.
# Either is turned into a NameEntry when a query (or a check) asks for it.
Stored = str | NameEntry


def _compact(line: int, rrset: RRSet) -> str | None:
    """The compact form of a one-RRset name, if its texts allow it (a TXT text may hold
    a newline, the separator)."""
    texts = "\n".join(rrset.texts)
    if len(rrset.texts) > 1 and texts.count("\n") != len(rrset.texts) - 1:
        return None
    return f"{line} {rrset.ttl} {rrset.rtype} {texts}"


def _entry_of(name: str, file: str, stored: Stored) -> NameEntry:
    if type(stored) is not str:
        return stored  # type: ignore[return-value]
    line, ttl, rtype, texts = stored.split(" ", 3)
    rrset = RRSet(int(rtype), int(ttl), tuple(texts.split("\n")))
    return NameEntry(name, file, int(line), rrset.ttl, RRSets((rrset,)))


def _same_data(one: Stored, other: Stored) -> bool:
    return one == other or _data_of(one) == _data_of(other)


def _data_of(stored: Stored) -> str:
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
        return _entry_of(name, self._file, self._stored[name])

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
        return None if stored is None else _entry_of(name, self.path, stored)

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
        labels = qname.split(".")
        for index in range(1, len(labels)):
            parent = ".".join(labels[index:])
            wildcard = "*." + parent
            zone = owners.get(wildcard)
            if zone is not None:
                return zone.entry(wildcard)
            if parent in owners:
                return None
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
                digest.update(f"{zone.name}\n{_data_of(stored)}\n".encode())
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
            (zone.name, _data_of(zone.stored[name])) for zone in self.files if name in zone.stored
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

    def view_problems(self, view: str, selectors: frozenset[str] | None) -> list[ZoneProblem]:
        """Problems with one view's choice of files: unknown files, a name in two files,
        and CNAME chains the server cannot follow within the view (see `cname_problems`)."""
        problems = []
        for selector in sorted(selectors or ()):
            if not any(zone.matches(selector) for zone in self.files):
                problems.append(
                    ZoneProblem(
                        self.directory,
                        0,
                        f"view {view!r} names zone file {selector!r}, which does not exist",
                    )
                )
        files = self.selected(selectors)
        overrides = self.select(selectors)
        if sum(len(zone.stored) for zone in files) != len(overrides.owners):
            problems.extend(_defined_twice(view, files, overrides))
        problems.extend(cname_problems(files, overrides))
        return problems


def _defined_twice(view: str, files: Iterable[ZoneFile], overrides: Overrides) -> list[ZoneProblem]:
    problems = []
    for zone in files:
        for name in zone.stored:
            owner = overrides.owners[name]
            if owner is not zone:
                first, entry = owner.entry(name), zone.entry(name)
                assert first is not None and entry is not None
                problems.append(
                    ZoneProblem(
                        entry.file,
                        entry.line,
                        f"{name} is already defined in "
                        f"{first.file}:{first.line} (both files are in view {view!r})",
                    )
                )
    return problems


def cname_problems(files: Iterable[ZoneFile], overrides: Overrides) -> list[ZoneProblem]:
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
                hops, size = hops + 1, size + _rrset_bytes(own)
            else:  # the end of the chain: the largest answer it may give
                hops, size = 1, max(_rrset_bytes(rrset) for rrset in entry.rrsets.values())
            self.hops[entry.name], self.size[entry.name] = hops, size

    def problems(self) -> list[ZoneProblem]:
        found = []
        for loop in self.loops:
            first = min(loop, key=lambda entry: (entry.file, entry.line))
            at = loop.index(first)
            names = [entry.name for entry in loop[at:] + loop[:at]]
            found.append(
                ZoneProblem(
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
                    ZoneProblem(entry.file, entry.line, f"{name}: CNAME chain {chain} {why(name)}")
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


def normalize_name(name: str) -> str:
    """Lowercase, without the trailing dot: the form names are compared in."""
    return name.rstrip(".").lower() if name != "." else ""


def name_problem(name: str, wildcard_ok: bool) -> str | None:
    """Why `name` is not a valid domain name (None when it is)."""
    text = normalize_name(name)
    if not text:
        return "empty name"
    if len(text) > 253:
        return f"name {brief(name)} is longer than 253 characters"
    if (_VALID_OWNER if wildcard_ok else _VALID_NAME).fullmatch(text):
        return None
    labels = text.split(".")
    for index, label in enumerate(labels):
        if label == "*" and index == 0 and wildcard_ok and len(labels) > 1:
            continue
        if label == "*" or "*" in label:
            return f"name {brief(name)}: '*' is only allowed as the whole first label of an owner"
        if not label:
            return f"name {brief(name)} has an empty label"
        if len(label) > 63:
            return f"name {brief(name)} has a label longer than 63 characters"
        if not _LABEL.match(label):
            return (
                f"name {brief(name)}: label {brief(label)} may only hold letters, digits, "
                "'-' and '_' and may not start or end with '-'"
            )
    return None


def is_zone_file_name(name: str) -> bool:
    """`*.yaml`/`*.yml`, not hidden: hidden names are editor lock files (`.#x.yaml`),
    atomic-write temporaries (`.ansible_tmp...yaml`) and ConfigMap internals (`..data`)."""
    return name.endswith(ZONE_SUFFIXES) and not name.startswith(".")


def zone_files(directory: Path) -> list[Path]:
    """The zone files of a directory, sorted: top-level, named as `is_zone_file_name` says,
    symlinks followed."""
    return sorted(
        path for path in directory.iterdir() if is_zone_file_name(path.name) and path.is_file()
    )


@dataclass(frozen=True)
class _ParsedFile:
    zone: ZoneFile
    problems: tuple[ZoneProblem, ...]
    digest: str

    @property
    def reusable(self) -> bool:
        """Whether the file's bytes alone decide this result. Not so with problems (one may
        be an unreadable health `ca` file that gets fixed) or with a `ca` file at all."""
        if self.problems:
            return False
        for name in self.zone.checked:
            entry = self.zone.entry(name)
            if entry is not None and entry.health is not None and entry.health.ca_file:
                return False
        return True


class ZoneFileCache:
    """Parsed files by path and content digest, so a reload re-parses only what changed.

    Keyed on the bytes actually parsed (never on mtime, which is too coarse to notice a
    quick rewrite); keeps only the reusable files of the most recent load, so whatever
    `dnsoverride check` would say about the files now, a cached load says too.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, bytes], _ParsedFile] = {}

    def parse(self, paths: Iterable[Path]) -> list[_ParsedFile]:
        """Every file of `paths`, in order: cached when its bytes were parsed last time."""
        files: dict[tuple[str, bytes], _ParsedFile | None] = {}
        misses: dict[tuple[str, bytes], tuple[Path, bytes]] = {}
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as error:
                problem = ZoneProblem(str(path), 0, f"cannot read: {error}")
                files[(str(path), b"")] = _ParsedFile(
                    ZoneFile(path.name, str(path), MappingProxyType({})), (problem,), ""
                )
                continue
            key = (str(path), hashlib.sha256(data).digest())
            known = self._files.get(key)
            if known is None:
                misses[key] = (path, data)
            files[key] = known
        for key, parsed in zip(misses, _parse_all(list(misses.values())), strict=True):
            files[key] = parsed
        self._files = {key: file for key, file in files.items() if file and file.reusable}
        return [file for file in files.values() if file is not None]


def load_zone_set(
    directory: Path,
    views: Mapping[str, frozenset[str] | None] | None = None,
    cache: ZoneFileCache | None = None,
) -> ZoneSet:
    """Parse and validate every zone file in `directory`; raise ZoneSetError with ALL problems.

    `views` (view name -> zone file selectors, None meaning every file) adds the checks
    that need the daemon config: every named file exists, no name is defined twice in
    one view, and the CNAME chains each view sees can be answered (without `views`,
    those of all files together). `cache` (kept by the reloader) spares re-parsing
    unchanged files.
    """
    if not directory.is_dir():
        raise ZoneSetError([ZoneProblem(str(directory), 0, "zones directory does not exist")])
    # Building ~10^6 objects triggers repeated full collections that also walk everything
    # already alive (the set being served): 3x slower for 100,000 names. What is built
    # here is acyclic, so reference counting alone frees whatever is dropped.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load_zone_set(directory, views, cache or ZoneFileCache())
    finally:
        if collecting:
            # Promote what was built straight to the oldest generation: left in the youngest,
            # the next collection would walk all of it in one go with the GIL held (0.3 s for
            # 100,000 names: a stall of the event loop, whichever thread triggers it).
            gc.freeze()
            gc.unfreeze()
            gc.enable()


def _load_zone_set(
    directory: Path, views: Mapping[str, frozenset[str] | None] | None, cache: ZoneFileCache
) -> ZoneSet:
    parsed = cache.parse(zone_files(directory))
    problems = [problem for file in parsed for problem in file.problems]
    files = [file.zone for file in parsed]
    digest = hashlib.sha256()
    for file in parsed:
        digest.update(f"== {file.zone.name} {file.digest}\n".encode())
    zone_set = ZoneSet(str(directory), tuple(files), digest.hexdigest())
    if views is None:
        problems.extend(cname_problems(zone_set.files, zone_set.select(None)))
    for view, selectors in (views or {}).items():
        problems.extend(zone_set.view_problems(view, selectors))
    if problems:
        # Views that share files find the same CNAME problems: each is reported once.
        unique = dict.fromkeys(problems)
        raise ZoneSetError(sorted(unique, key=lambda p: (p.file, p.line)))
    return zone_set


class _Problems:
    """The problems of one file, collected while parsing it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[ZoneProblem] = []

    def add(self, line: int, reason: str) -> None:
        self.items.append(ZoneProblem(self.file, line, reason))

    def duplicates(self, mapping: yamlsource.LineMap) -> None:
        for key, line in mapping.duplicates:
            self.add(line, f"duplicate key {brief(key)} (first at line {mapping.key_lines[key]})")

    def ttl(self, value: Any, line: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTL:
            self.add(
                line, f"bad TTL {brief(value)}: expected an integer from 0 to {MAX_TTL} (seconds)"
            )
            return None
        return value


class _Parts(NamedTuple):
    """What parsing one file yields, in a form that crosses a process boundary."""

    stored: dict[str, Stored]
    cnames: tuple[str, ...]
    checked: tuple[str, ...]
    problems: tuple[ZoneProblem, ...]
    digest: str  # of the data, not of the bytes: comments and layout do not change it


def _parse_file(path: Path, data: bytes) -> _ParsedFile:
    return _parsed(path, _load_file(str(path), data))


def _parsed(path: Path, parts: _Parts) -> _ParsedFile:
    zone = ZoneFile(
        path.name, str(path), MappingProxyType(parts.stored), parts.cnames, parts.checked
    )
    return _ParsedFile(zone, parts.problems, parts.digest)


def _parse_all(misses: list[tuple[Path, bytes]]) -> list[_ParsedFile]:
    """Parse `misses` (path, bytes) in order. The parse is Python code (one core per
    process), so when there is enough to parse to pay for starting them, the files are
    shared out, biggest first, among worker processes, one per core."""
    workers = min(len(misses), len(os.sched_getaffinity(0)))
    if workers < 2 or sum(len(data) for _, data in misses) < PARALLEL_MIN_BYTES:
        return [_parse_file(path, data) for path, data in misses]
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for index in sorted(range(len(misses)), key=lambda i: -len(misses[i][1])):
        least = loads.index(min(loads))
        shares[least].append(index)
        loads[least] += len(misses[index][1])
    with ThreadPoolExecutor(workers, thread_name_prefix="zone-parse") as threads:
        outcomes = list(threads.map(lambda share: _in_worker([misses[i] for i in share]), shares))
    parsed: dict[int, _ParsedFile] = {}
    for share, outcome in zip(shares, outcomes, strict=True):
        for index, parts in zip(share, outcome, strict=True):
            parsed[index] = _parsed(misses[index][0], parts)
    return [parsed[index] for index in range(len(misses))]


# A worker is a plain `python -c` process that reads its files from stdin and writes what
# it parsed to stdout, both pickled: not multiprocessing, whose spawn would re-import the
# program's main module (and fork is unsafe in a daemon with threads).
_WORKER = "from dnsoverride.zones import _worker; _worker()"


def _in_worker(jobs: list[tuple[Path, bytes]]) -> list[_Parts]:
    """`_load_file` of each job in a worker process; in this one if that fails."""
    payload = pickle.dumps([(str(path), data) for path, data in jobs], pickle.HIGHEST_PROTOCOL)
    # The worker imports this package from wherever this process did.
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        process = subprocess.run(
            [sys.executable, "-c", _WORKER],
            input=payload,
            capture_output=True,
            env=environment,
            check=False,
        )
        if process.returncode == 0:
            results: list[_Parts] = pickle.loads(process.stdout)
            return results
        reason = f"exit status {process.returncode}: {process.stderr.decode(errors='replace')}"
    except (OSError, pickle.UnpicklingError) as error:
        reason = str(error)
    log.warning("zone_parse_worker_failed", reason=brief(reason), files=len(jobs))
    return [_load_file(str(path), data) for path, data in jobs]


def _worker() -> None:
    """A parse worker's main (see `_WORKER`). The collector stays off: what it builds is
    acyclic, and collections would only walk it again and again."""
    gc.disable()
    jobs: list[tuple[str, bytes]] = pickle.load(sys.stdin.buffer)
    results = [_load_file(path, data) for path, data in jobs]
    pickle.dump(results, sys.stdout.buffer, pickle.HIGHEST_PROTOCOL)


def _load_file(path: str, data: bytes) -> _Parts:
    """Parse one zone file's bytes."""
    problems = _Problems(path)

    def failed() -> _Parts:
        return _Parts({}, (), (), tuple(problems.items), "")

    try:
        document = yamlsource.load(data.decode("utf-8"))
    except yamlsource.YamlError as error:
        problems.add(error.line, error.reason)
        return failed()
    except UnicodeDecodeError as error:
        problems.add(0, f"cannot read: {error}")
        return failed()
    if document is None:
        return failed()
    if not isinstance(document, yamlsource.LineMap):
        problems.add(1, "a zone file must be a mapping with 'records' (and optionally 'ttl')")
        return failed()
    problems.duplicates(document)
    for key in document:
        if key not in FILE_KEYS:
            problems.add(
                document.key_lines[key], f"unknown key {brief(key)} (expected one of: ttl, records)"
            )
    file_ttl = DEFAULT_TTL
    if "ttl" in document:
        file_ttl = problems.ttl(document["ttl"], document.key_lines["ttl"]) or DEFAULT_TTL
    records = document.get("records")
    if records is None:
        return failed()
    if not isinstance(records, yamlsource.LineMap):
        problems.add(document.key_lines["records"], "'records' must be a mapping of name -> types")
        return failed()
    problems.duplicates(records)
    stored, cnames, checked, digest = _names(records, file_ttl, problems)
    return _Parts(stored, tuple(cnames), tuple(checked), tuple(problems.items), digest)


def _names(
    records: yamlsource.LineMap, file_ttl: int, problems: _Problems
) -> tuple[dict[str, Stored], list[str], list[str], str]:
    """Every name of `records` in its stored form, the aliases among them, the names
    with a health check, and the digest of their data. The hot loop of a zone set: one
    record type with one plain value (most names) goes straight to the compact form,
    and an A record (most of those) is checked inline."""
    stored: dict[str, Stored] = {}
    cnames: list[str] = []
    checked: list[str] = []
    hashed: list[str] = []  # name, data, name, data, ...: hashed in one go at the end
    add_hashed = hashed.append
    key_lines = records.key_lines
    valid_owner = _VALID_OWNER.fullmatch
    qtypes = _QTYPES
    line_map = yamlsource.LineMap
    inet_pton, af_inet = socket.inet_pton, socket.AF_INET
    a_prefix = f"{file_ttl} {QTYPE_A} "
    for raw_name, body in records.items():
        line = key_lines[raw_name]
        if type(raw_name) is not str:
            problems.add(line, f"name {brief(raw_name)} must be a string")
            continue
        name = raw_name.rstrip(".").lower()  # normalize_name, inline
        # The valid case in one regex call; name_problem says what is wrong otherwise.
        if len(name) > 253 or not valid_owner(name):
            reason = name_problem(raw_name, wildcard_ok=True)
            if reason:
                problems.add(line, reason)
                continue
        if name in stored:
            first = _entry_of(name, problems.file, stored[name]).line
            problems.add(line, f"{name} is defined twice in this file (first at line {first})")
            continue
        data: str | None = None
        if type(body) is line_map and len(body) == 1 and not body.duplicates:
            ((key, value),) = body.items()
            if key == "A" and type(value) is str:
                text = value.strip()
                try:
                    inet_pton(af_inet, text)
                except (OSError, ValueError):
                    pass  # the general path below says what is wrong
                else:
                    data = a_prefix + text
                    stored[name] = f"{line} {data}"
            else:
                qtype = qtypes.get(key)
                if qtype is not None and type(value) is str and qtype != QTYPE_TXT:
                    text, reason = _rdata(key, value)
                    if reason is None:
                        data = f"{file_ttl} {qtype} {text}"
                        stored[name] = f"{line} {data}"
                        if qtype == QTYPE_CNAME:
                            cnames.append(name)
        if data is None:
            entry = _entry(name, line, file_ttl, body, problems)
            if entry is None:
                continue
            compact = (
                None
                if entry.health is not None or len(entry.rrsets) > 1
                else (_compact(line, next(iter(entry.rrsets.values()))))
            )
            stored[name] = compact or entry
            data = compact.partition(" ")[2] if compact else entry.canonical()
            if QTYPE_CNAME in entry.rrsets:
                cnames.append(name)
            if entry.health is not None:
                checked.append(name)
        add_hashed(name)
        add_hashed(data)
    digest = hashlib.blake2b("\n".join(hashed).encode(), digest_size=16)
    return stored, cnames, checked, digest.hexdigest()


def _entry(name: str, line: int, file_ttl: int, body: Any, problems: _Problems) -> NameEntry | None:
    if not isinstance(body, yamlsource.LineMap) or not body:
        problems.add(line, f"{name}: expected a mapping of record types, e.g. 'A: 10.0.0.5'")
        return None
    before = len(problems.items)
    if body.duplicates:
        problems.duplicates(body)
    ttl = file_ttl
    if "ttl" in body:
        ttl = problems.ttl(body["ttl"], body.key_lines["ttl"]) or file_ttl
    rrsets: dict[int, RRSet] = {}
    spelled: dict[int, str] = {}
    key_lines = body.key_lines
    for key, value in body.items():
        if key in NAME_KEYS:
            continue
        rtype = key.upper() if isinstance(key, str) else key
        qtype = _QTYPES.get(rtype)
        if qtype is None:
            problems.add(
                key_lines[key],
                f"{name}: unknown record type or key {brief(key)} "
                f"(supported: {', '.join(RECORD_TYPES)}, ttl)",
            )
            continue
        # Types are case-insensitive but YAML keys are not: `A:` and `a:` are two keys
        # to YAML and one RRset to us, and the later one must not silently win.
        if qtype in spelled:
            problems.add(
                key_lines[key],
                f"{name}: record type {rtype} given twice "
                f"({brief(spelled[qtype])} and {brief(key)})",
            )
            continue
        spelled[qtype] = key
        rrset = _rrset(name, rtype, qtype, value, key_lines[key], ttl=ttl, problems=problems)
        if rrset is not None:
            rrsets[qtype] = rrset
    if QTYPE_CNAME in rrsets and len(rrsets) > 1:
        others = sorted(_TYPE_NAMES[t] for t in rrsets if t != QTYPE_CNAME)
        problems.add(
            line, f"{name}: CNAME cannot be combined with other data ({', '.join(others)})"
        )
    health = None
    if "health" in body:
        try:
            health = parse_health(name, body["health"], Path(problems.file).parent)
        except HealthSpecError as error:
            problems.add(body.key_lines["health"], f"{name}: {error}")
        if not {QTYPE_A, QTYPE_AAAA} & rrsets.keys():
            problems.add(
                body.key_lines["health"], f"{name}: a health check needs A or AAAA records"
            )
    if len(problems.items) != before:
        return None
    if not rrsets:
        problems.add(line, f"{name}: no records")
        return None
    return NameEntry(name, problems.file, line, ttl, RRSets(rrsets.values()), health)


def _rrset(
    name: str, rtype: str, qtype: int, value: Any, line: int, *, ttl: int, problems: _Problems
) -> RRSet | None:
    values = value if isinstance(value, yamlsource.LineList) else None
    items = (
        list(zip(values, values.item_lines, strict=True)) if values is not None else [(value, line)]
    )
    if not items:
        problems.add(line, f"{name}: {rtype} has no values")
        return None
    if rtype == "CNAME" and len(items) > 1:
        problems.add(line, f"{name}: CNAME takes exactly one target")
        return None
    before = len(problems.items)
    texts: dict[str, None] = {}
    for item, item_line in items:
        text, reason = _rdata(rtype, item)
        if reason:
            problems.add(item_line, f"{name}: bad {rtype} value {brief(item)}: {reason}")
        else:
            texts[text] = None
    if len(problems.items) != before:
        return None
    rrset = RRSet(qtype, ttl, tuple(texts))
    if len(texts) >= _BIG_RRSET or qtype == QTYPE_TXT:
        size = _rrset_bytes(rrset)
        if size > ANSWER_ROOM:
            problems.add(
                line,
                f"{name}: the {len(texts):,} {rtype} records take {size:,} bytes, more than "
                f"a DNS message holds ({ANSWER_ROOM:,} after header, question and EDNS)",
            )
            return None
    return rrset


def _rdata(rtype: str, value: Any) -> tuple[str, str | None]:
    """(canonical text, None) for one valid value, or ("", why the value is bad).

    The canonical text is what `RRSet.rdatas` builds the record from."""
    if rtype == "TXT":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return "", "expected a string"
        text = str(value)
        size = _txt_bytes(text)
        if size > MAX_RDATA:
            return "", (
                f"{size:,} bytes as a record, more than the {MAX_RDATA:,} a record holds "
                "(the text is sent as strings of up to 255 bytes, each with a length byte)"
            )
        return '"' + text.replace('"', '\\"') + '"', None
    if not isinstance(value, str):
        return "", "expected a string (quote it)"
    text = value.strip()
    if rtype == "A":
        # inet_pton is as strict as ipaddress (no leading zeros, four parts) and 5x faster.
        try:
            socket.inet_pton(socket.AF_INET, text)
        except (OSError, ValueError):
            return "", "not an IPv4 address"
        return text, None
    if rtype == "AAAA":
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            return "", "not an IPv6 address"
        return address.compressed, None
    if rtype in ("CNAME", "PTR", "NS"):
        reason = name_problem(text, wildcard_ok=False)
        if reason:
            return "", reason
        return normalize_name(text) + ".", None
    fields = text.split()
    if rtype == "MX":
        if len(fields) != 2 or not fields[0].isdigit() or int(fields[0]) > 65535:
            return "", "expected 'PREFERENCE HOST', e.g. '10 mail.example.'"
        reason = name_problem(fields[1], wildcard_ok=False)
        if reason:
            return "", reason
        return f"{int(fields[0])} {normalize_name(fields[1])}.", None
    # SRV
    if len(fields) != 4 or not all(f.isdigit() and int(f) <= 65535 for f in fields[:3]):
        return "", "expected 'PRIORITY WEIGHT PORT TARGET', e.g. '10 5 443 host.example.'"
    reason = name_problem(fields[3], wildcard_ok=False) if fields[3] != "." else None
    if reason:
        return "", reason
    priority, weight, port = (int(f) for f in fields[:3])
    return f"{priority} {weight} {port} {normalize_name(fields[3])}.", None


def _txt_bytes(text: str) -> int:
    """Record data bytes of a TXT text: its UTF-8 bytes as character-strings of at most
    255 bytes, each after a length byte (RFC 1035 3.3.14); an empty text is one empty
    string."""
    size = len(text.encode())
    return size + max(1, -(-size // 255))


def _rrset_bytes(rrset: RRSet) -> int:
    """An upper bound of the bytes an RRset's records take in an answer: each record's
    owner (a 2-byte pointer to a name already in the message), type, class, TTL and
    length (10 bytes), and its data with any name in it uncompressed."""
    rtype = rrset.rtype
    fixed = _FIXED_RDATA.get(rtype)
    if fixed is not None:
        return len(rrset.texts) * (12 + fixed)
    total = 0
    for text in rrset.texts:
        if rtype == QTYPE_TXT:
            total += 12 + _txt_bytes(text[1:-1].replace('\\"', '"'))
        else:  # a name (CNAME, PTR, NS) after MX's 2 or SRV's 6 bytes of numbers
            target = text.rsplit(" ", 1)[-1]
            total += 12 + _NAME_RDATA_PREFIX[rtype] + len(target) + 1
    return total


def _txt(text: str) -> Any:
    value = text[1:-1].replace('\\"', '"').encode()
    return dnslib.TXT([value[i : i + 255] for i in range(0, len(value), 255)] or [b""])


def _mx(text: str) -> Any:
    preference, target = text.split()
    return dnslib.MX(target, int(preference))


def _srv(text: str) -> Any:
    priority, weight, port, target = text.split()
    return dnslib.SRV(int(priority), int(weight), int(port), target)


# Canonical text (as `_rdata` makes it) -> dnslib RDATA.
_RDATA_FROM_TEXT: dict[int, Callable[[str], Any]] = {
    _QTYPES["A"]: dnslib.A,
    _QTYPES["AAAA"]: dnslib.AAAA,
    _QTYPES["CNAME"]: dnslib.CNAME,
    _QTYPES["PTR"]: dnslib.PTR,
    _QTYPES["NS"]: dnslib.NS,
    _QTYPES["TXT"]: _txt,
    _QTYPES["MX"]: _mx,
    _QTYPES["SRV"]: _srv,
}
_TYPE_NAMES = {number: rtype for rtype, number in _QTYPES.items()}
_FIXED_RDATA = {_QTYPES["A"]: 4, _QTYPES["AAAA"]: 16}
_NAME_RDATA_PREFIX = {
    _QTYPES["CNAME"]: 0,
    _QTYPES["PTR"]: 0,
    _QTYPES["NS"]: 0,
    _QTYPES["MX"]: 2,
    _QTYPES["SRV"]: 6,
}
