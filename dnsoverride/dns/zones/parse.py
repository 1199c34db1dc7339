"""One zone file's bytes -> its names in their stored form, with every problem found as
`file:line: reason` (the hot loop of a zone set load)."""

from __future__ import annotations

import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from dnsoverride.common import yamlsource
from dnsoverride.common.errors import Problem
from dnsoverride.common.yamlsource import brief
from dnsoverride.dns.constants import MAX_NAME_TEXT, MAX_TTL
from dnsoverride.dns.zones.health import HealthCheck, HealthSpecError, parse_health
from dnsoverride.dns.zones.model import (
    NameEntry,
    Stored,
    ZoneFile,
    compact_form,
    entry_of,
)
from dnsoverride.dns.zones.names import VALID_OWNER, name_problem
from dnsoverride.dns.zones.records import (
    ANSWER_ROOM,
    BIG_RRSET,
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    QTYPE_TXT,
    QTYPES,
    RECORD_TYPES,
    TYPE_NAMES,
    RRSet,
    RRSets,
    rdata_text,
    rrset_bytes,
)

DEFAULT_TTL = 60


FILE_KEYS = ("ttl", "records")
NAME_KEYS = ("ttl", "health")


@dataclass(frozen=True)
class ParsedFile:
    zone: ZoneFile
    problems: tuple[Problem, ...]
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


class FileProblems:
    """The problems of one file, collected while parsing it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.items: list[Problem] = []

    def add(self, line: int, reason: str) -> None:
        self.items.append(Problem(self.file, line, reason))

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


class Parts(NamedTuple):
    """What parsing one file yields, in a form that crosses a process boundary."""

    stored: dict[str, Stored]
    cnames: tuple[str, ...]
    checked: tuple[str, ...]
    problems: tuple[Problem, ...]
    digest: str  # of the data, not of the bytes: comments and layout do not change it


def parse_file(path: Path, data: bytes) -> ParsedFile:
    return parsed_file(path, parse_bytes(str(path), data))


def parsed_file(path: Path, parts: Parts) -> ParsedFile:
    zone = ZoneFile(
        path.name, str(path), MappingProxyType(parts.stored), parts.cnames, parts.checked
    )
    return ParsedFile(zone, parts.problems, parts.digest)


def parse_bytes(path: str, data: bytes) -> Parts:
    """Parse one zone file's bytes."""
    problems = FileProblems(path)

    def failed() -> Parts:
        return Parts({}, (), (), tuple(problems.items), "")

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
    return Parts(stored, tuple(cnames), tuple(checked), tuple(problems.items), digest)


# Over the size rules on purpose: the per-name loop of a load (10^6 names: a helper call
# per name costs a tenth of the load); the uncommon cases leave it for `_entry`.
def _names(  # noqa: PLR0912, PLR0915 - the inlined hot loop
    records: yamlsource.LineMap, file_ttl: int, problems: FileProblems
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
    valid_owner = VALID_OWNER.fullmatch
    qtypes = QTYPES
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
        if len(name) > MAX_NAME_TEXT or not valid_owner(name):
            reason = name_problem(raw_name, wildcard_ok=True)
            if reason:
                problems.add(line, reason)
                continue
        if name in stored:
            first = entry_of(name, problems.file, stored[name]).line
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
                    text, reason = rdata_text(key, value)
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
                else (compact_form(line, next(iter(entry.rrsets.values()))))
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


def _entry(
    name: str, line: int, file_ttl: int, body: Any, problems: FileProblems
) -> NameEntry | None:
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
        qtype = QTYPES.get(rtype)
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
        others = sorted(TYPE_NAMES[t] for t in rrsets if t != QTYPE_CNAME)
        problems.add(
            line, f"{name}: CNAME cannot be combined with other data ({', '.join(others)})"
        )
    health = _health(name, body, rrsets, problems) if "health" in body else None
    if len(problems.items) != before:
        return None
    if not rrsets:
        problems.add(line, f"{name}: no records")
        return None
    return NameEntry(name, problems.file, line, ttl, RRSets(rrsets.values()), health)


def _health(
    name: str, body: yamlsource.LineMap, rrsets: dict[int, RRSet], problems: FileProblems
) -> HealthCheck | None:
    """The `health:` key of name `name` (whose records are `rrsets`)."""
    line = body.key_lines["health"]
    health = None
    try:
        health = parse_health(name, body["health"], Path(problems.file).parent)
    except HealthSpecError as error:
        problems.add(line, f"{name}: {error}")
    if not {QTYPE_A, QTYPE_AAAA} & rrsets.keys():
        problems.add(line, f"{name}: a health check needs A or AAAA records")
    return health


def _rrset(
    name: str, rtype: str, qtype: int, value: Any, line: int, *, ttl: int, problems: FileProblems
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
        text, reason = rdata_text(rtype, item)
        if reason:
            problems.add(item_line, f"{name}: bad {rtype} value {brief(item)}: {reason}")
        else:
            texts[text] = None
    if len(problems.items) != before:
        return None
    rrset = RRSet(qtype, ttl, tuple(texts))
    if len(texts) >= BIG_RRSET or qtype == QTYPE_TXT:
        size = rrset_bytes(rrset)
        if size > ANSWER_ROOM:
            problems.add(
                line,
                f"{name}: the {len(texts):,} {rtype} records take {size:,} bytes, more than "
                f"a DNS message holds ({ANSWER_ROOM:,} after header, question and EDNS)",
            )
            return None
    return rrset
