"""Zone files: YAML on disk -> one immutable, validated `ZoneSet`, and the live holder.

Owns the zone file format, its validation (every problem reported as `file:line: reason`,
all of them at once), the lookup rules for overridden names and wildcards, and
`LiveZones`, the single holder the DNS server reads and `reload.py` swaps.

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
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import dnslib

from dnsoverride import yamlsource
from dnsoverride.health import GatedOverride, HealthCheck, HealthSpecError, parse_health

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
# built 3x faster and smaller, which counts at 100,000 names per reload.
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
    """An overridden name (or wildcard `*.suffix`) and all its data, from one file.

    `digest` identifies the data (`canonical()`), for content hashes and reload diffs.
    """

    name: str
    file: str
    line: int
    ttl: int
    rrsets: Mapping[int, RRSet]
    health: HealthCheck | None = None
    digest: bytes = b""

    @property
    def cname(self) -> str | None:
        """The CNAME target (lowercase, no trailing dot) when this name is an alias."""
        rrset = self.rrsets.get(QTYPE_CNAME)
        return rrset.texts[0].rstrip(".") if rrset else None

    def canonical(self) -> str:
        """A stable text form of the data, for hashing and diffing."""
        return _canonical(self.name, self.ttl, self.rrsets, self.health)


def _canonical(name: str, ttl: int, rrsets: Mapping[int, RRSet], health: HealthCheck | None) -> str:
    if len(rrsets) == 1 and health is None:
        # Most names: one type, one value. The same text as below, without the sorting.
        (rrset,) = rrsets.values()
        if len(rrset.texts) == 1:
            return f"{name} ttl={ttl}\n  {_TYPE_NAMES[rrset.rtype]} {rrset.ttl} {rrset.texts[0]}"
    lines = [f"{name} ttl={ttl}"]
    for rtype in sorted(rrsets):
        rrset = rrsets[rtype]
        for text in sorted(rrset.texts):
            lines.append(f"  {_TYPE_NAMES[rtype]} {rrset.ttl} {text}")
    if health is not None:
        lines.append(f"  health {health.canonical()}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ZoneFile:
    """One zone file: its name in the directory (e.g. `ci.yaml`) and its entries."""

    name: str
    path: str
    entries: Mapping[str, NameEntry]

    def matches(self, selector: str) -> bool:
        """Views name files by file name (`ci.yaml`) or stem (`ci`)."""
        return selector in (self.name, Path(self.name).stem)


@dataclass(frozen=True, slots=True)
class Overrides:
    """The merged overrides one view sees; `lookup` applies the ownership rules."""

    entries: Mapping[str, NameEntry]

    def lookup(self, qname: str) -> NameEntry | None:
        """The entry answering `qname` (lowercase, no trailing dot), or None to forward.

        An exact name wins; otherwise the closest enclosing wildcard `*.parent` answers,
        but an overridden parent without a wildcard stops the search: names below an
        override are forwarded.
        """
        entry = self.entries.get(qname)
        if entry is not None:
            return entry
        labels = qname.split(".")
        for index in range(1, len(labels)):
            parent = ".".join(labels[index:])
            wildcard = self.entries.get("*." + parent)
            if wildcard is not None:
                return wildcard
            if parent in self.entries:
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
        return frozenset(name for zone in self.files for name in zone.entries)

    def records_digest(self, name: str) -> str:
        """A digest of everything any file says about `name`, to tell what changed."""
        key = normalize_name(name)
        digest = hashlib.sha256()
        for zone in self.files:
            entry = zone.entries.get(key)
            if entry is not None:
                digest.update(f"{zone.name}\n".encode() + entry.digest)
        return digest.hexdigest()

    def name_digests(self) -> dict[str, object]:
        """Every name -> a value that changes when its data changes, for diffing whole sets
        in one pass (the entries carry their digests); a name defined in several files is
        marked by each file's name and data, as view selection may tell them apart."""
        digests: dict[str, object] = {}
        several: dict[str, list[tuple[str, bytes]]] = {}
        for zone in self.files:
            for name, entry in zone.entries.items():
                if digests.setdefault(name, entry.digest) is not entry.digest:
                    several.setdefault(name, []).append((zone.name, entry.digest))
        for name, marks in several.items():
            first = next(z for z in self.files if name in z.entries)
            digests[name] = ((first.name, first.entries[name].digest), *marks)
        return digests

    def health_gated(self) -> tuple[GatedOverride, ...]:
        """Every name with a health check and the addresses it checks (first file wins)."""
        gated: dict[str, GatedOverride] = {}
        for zone in self.files:
            for name, entry in zone.entries.items():
                if entry.health is not None and name not in gated:
                    addresses = tuple(
                        text
                        for rtype in (QTYPE_A, QTYPE_AAAA)
                        if rtype in entry.rrsets
                        for text in entry.rrsets[rtype].texts
                    )
                    gated[name] = GatedOverride(name, entry.health, addresses)
        return tuple(gated.values())

    def select(self, selectors: frozenset[str] | None) -> Overrides:
        """The overrides of the files a view names (None: every file), merged in file order."""
        cached = self._selections.get(selectors)
        if cached is not None:
            return cached
        merged: dict[str, NameEntry] = {}
        for zone in self.files:
            if selectors is None or any(zone.matches(s) for s in selectors):
                for name, entry in zone.entries.items():
                    merged.setdefault(name, entry)
        overrides = Overrides(MappingProxyType(merged))
        self._selections[selectors] = overrides
        return overrides

    def view_problems(self, view: str, selectors: frozenset[str] | None) -> list[ZoneProblem]:
        """Problems with one view's choice of files: unknown files, a name in two files."""
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
        seen: dict[str, NameEntry] = {}
        for zone in self.files:
            if selectors is not None and not any(zone.matches(s) for s in selectors):
                continue
            for name, entry in zone.entries.items():
                first = seen.setdefault(name, entry)
                if first is not entry:
                    problems.append(
                        ZoneProblem(
                            entry.file,
                            entry.line,
                            f"{name} is already defined in "
                            f"{first.file}:{first.line} (both files are in view {view!r})",
                        )
                    )
        return problems


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
        return f"name {name!r} is longer than 253 characters"
    if (_VALID_OWNER if wildcard_ok else _VALID_NAME).fullmatch(text):
        return None
    labels = text.split(".")
    for index, label in enumerate(labels):
        if label == "*" and index == 0 and wildcard_ok and len(labels) > 1:
            continue
        if label == "*" or "*" in label:
            return f"name {name!r}: '*' is only allowed as the whole first label of an owner"
        if not label:
            return f"name {name!r} has an empty label"
        if len(label) > 63:
            return f"name {name!r} has a label longer than 63 characters"
        if not _LABEL.match(label):
            return (
                f"name {name!r}: label {label!r} may only hold letters, digits, '-' and '_' "
                "and may not start or end with '-'"
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
        return not self.problems and not any(
            entry.health is not None and entry.health.ca_file is not None
            for entry in self.zone.entries.values()
        )


class ZoneFileCache:
    """Parsed files by path and content digest, so a reload re-parses only what changed.

    Keyed on the bytes actually parsed (never on mtime, which is too coarse to notice a
    quick rewrite); keeps only the reusable files of the most recent load, so whatever
    `dnsoverride check` would say about the files now, a cached load says too.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, bytes], _ParsedFile] = {}

    def parse(self, paths: Iterable[Path]) -> list[_ParsedFile]:
        files: dict[tuple[str, bytes], _ParsedFile] = {}
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
            files[key] = self._files.get(key) or _parse_file(path, data)
        self._files = {key: file for key, file in files.items() if file.reusable}
        return list(files.values())


def load_zone_set(
    directory: Path,
    views: Mapping[str, frozenset[str] | None] | None = None,
    cache: ZoneFileCache | None = None,
) -> ZoneSet:
    """Parse and validate every zone file in `directory`; raise ZoneSetError with ALL problems.

    `views` (view name -> zone file selectors, None meaning every file) adds the checks
    that need the daemon config: every named file exists, no name is defined twice in
    one view. `cache` (kept by the reloader) spares re-parsing unchanged files.
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
    for view, selectors in (views or {}).items():
        problems.extend(zone_set.view_problems(view, selectors))
    if problems:
        raise ZoneSetError(sorted(problems, key=lambda p: (p.file, p.line)))
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
            self.add(line, f"duplicate key {key!r} (first at line {mapping.key_lines[key]})")

    def ttl(self, value: Any, line: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TTL:
            self.add(line, f"bad TTL {value!r}: expected an integer from 0 to {MAX_TTL} (seconds)")
            return None
        return value


def _parse_file(path: Path, data: bytes) -> _ParsedFile:
    zone, problems = _load_file(path, data)
    digest = hashlib.sha256()
    for name in sorted(zone.entries):
        digest.update(zone.entries[name].digest)
    return _ParsedFile(zone, tuple(problems), digest.hexdigest())


def _load_file(path: Path, data: bytes) -> tuple[ZoneFile, list[ZoneProblem]]:
    problems = _Problems(str(path))
    entries: dict[str, NameEntry] = {}
    zone = ZoneFile(path.name, str(path), MappingProxyType(entries))
    try:
        document = yamlsource.load(data.decode("utf-8"))
    except yamlsource.YamlSyntaxError as error:
        problems.add(error.line, f"YAML syntax error: {error.reason}")
        return zone, problems.items
    except UnicodeDecodeError as error:
        problems.add(0, f"cannot read: {error}")
        return zone, problems.items
    if document is None:
        return zone, problems.items
    if not isinstance(document, yamlsource.LineMap):
        problems.add(1, "a zone file must be a mapping with 'records' (and optionally 'ttl')")
        return zone, problems.items
    problems.duplicates(document)
    for key in document:
        if key not in FILE_KEYS:
            problems.add(
                document.key_lines[key], f"unknown key {key!r} (expected one of: ttl, records)"
            )
    file_ttl = DEFAULT_TTL
    if "ttl" in document:
        file_ttl = problems.ttl(document["ttl"], document.key_lines["ttl"]) or DEFAULT_TTL
    records = document.get("records")
    if records is None:
        return zone, problems.items
    if not isinstance(records, yamlsource.LineMap):
        problems.add(document.key_lines["records"], "'records' must be a mapping of name -> types")
        return zone, problems.items
    problems.duplicates(records)
    for raw_name, body in records.items():
        line = records.key_lines[raw_name]
        if not isinstance(raw_name, str):
            problems.add(line, f"name {raw_name!r} must be a string")
            continue
        name = normalize_name(raw_name)
        # The valid case in one regex call; name_problem says what is wrong otherwise.
        if len(name) > 253 or not _VALID_OWNER.fullmatch(name):
            reason = name_problem(raw_name, wildcard_ok=True)
            if reason:
                problems.add(line, reason)
                continue
        entry = _entry(name, line, file_ttl, body, problems)
        if entry is not None:
            entries[entry.name] = entry
    return zone, problems.items


def _entry(name: str, line: int, file_ttl: int, body: Any, problems: _Problems) -> NameEntry | None:
    if not isinstance(body, yamlsource.LineMap) or not body:
        problems.add(line, f"{name}: expected a mapping of record types, e.g. 'A: 10.0.0.5'")
        return None
    if len(body) == 1 and not body.duplicates:
        # Most names: one record type (spelled in capitals) with one plain value.
        ((key, value),) = body.items()
        qtype = _QTYPES.get(key)
        if qtype is not None and type(value) is str:
            text, reason = _rdata(key, value)
            if reason is None:
                only = {qtype: RRSet(qtype, file_ttl, (text,))}
                return _name_entry(name, problems.file, line, file_ttl, only, health=None)
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
                f"{name}: unknown record type or key {key!r} "
                f"(supported: {', '.join(RECORD_TYPES)}, ttl)",
            )
            continue
        # Types are case-insensitive but YAML keys are not: `A:` and `a:` are two keys
        # to YAML and one RRset to us, and the later one must not silently win.
        if qtype in spelled:
            problems.add(
                key_lines[key],
                f"{name}: record type {rtype} given twice ({spelled[qtype]!r} and {key!r})",
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
    return _name_entry(name, problems.file, line, ttl, rrsets, health=health)


def _name_entry(
    name: str,
    file: str,
    line: int,
    ttl: int,
    rrsets: dict[int, RRSet],
    *,
    health: HealthCheck | None,
) -> NameEntry:
    canonical = _canonical(name, ttl, rrsets, health).encode()
    digest = hashlib.blake2b(canonical, digest_size=16).digest()
    return NameEntry(name, file, line, ttl, RRSets(rrsets.values()), health, digest)


def _rrset(
    name: str, rtype: str, qtype: int, value: Any, line: int, *, ttl: int, problems: _Problems
) -> RRSet | None:
    if not isinstance(value, yamlsource.LineList):
        # One value (most names): no list to build.
        text, reason = _rdata(rtype, value)
        if reason:
            problems.add(line, f"{name}: bad {rtype} value {value!r}: {reason}")
            return None
        return RRSet(qtype, ttl, (text,))
    items = list(zip(value, value.item_lines, strict=True))
    if not items:
        problems.add(line, f"{name}: {rtype} has no values")
        return None
    if rtype == "CNAME" and len(items) > 1:
        problems.add(line, f"{name}: CNAME takes exactly one target")
        return None
    before = len(problems.items)
    texts: list[str] = []
    for item, item_line in items:
        text, reason = _rdata(rtype, item)
        if reason:
            problems.add(item_line, f"{name}: bad {rtype} value {item!r}: {reason}")
        elif text not in texts:
            texts.append(text)
    if len(problems.items) != before:
        return None
    return RRSet(qtype, ttl, tuple(texts))


def _rdata(rtype: str, value: Any) -> tuple[str, str | None]:
    """(canonical text, None) for one valid value, or ("", why the value is bad).

    The canonical text is what `RRSet.rdatas` builds the record from."""
    if rtype == "TXT":
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            return "", "expected a string"
        return '"' + str(value).replace('"', '\\"') + '"', None
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
