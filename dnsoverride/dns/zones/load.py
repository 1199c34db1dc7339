"""A zones directory -> one validated `ZoneSet` (every problem at once), re-parsing only
the files whose bytes changed since the last load."""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

from dnsoverride.common.errors import Problem
from dnsoverride.common.readfile import FS_BYTES, read_regular_file
from dnsoverride.dns.zones.chains import cname_problems, view_problems
from dnsoverride.dns.zones.model import ZoneFile, ZoneSet, ZoneSetError
from dnsoverride.dns.zones.parse import ParsedFile
from dnsoverride.dns.zones.workers import parse_all

ZONE_SUFFIXES = (".yaml", ".yml")


def is_zone_file_name(name: str) -> bool:
    """`*.yaml`/`*.yml`, not hidden: hidden names are editor lock files (`.#x.yaml`),
    atomic-write temporaries (`.ansible_tmp...yaml`) and ConfigMap internals (`..data`)."""
    return name.endswith(ZONE_SUFFIXES) and not name.startswith(".")


def zone_files(directory: Path) -> list[Path]:
    """The zone files of a directory, sorted: every top-level entry named as
    `is_zone_file_name` says, whatever it is (`read_regular_file` tells what is wrong with
    a dangling symlink, a FIFO or a directory: skipping one would drop its names unseen)."""
    return sorted(path for path in directory.iterdir() if is_zone_file_name(path.name))


def empty_reason(directory: Path) -> str:
    """Why `directory` yields no zone files: empty, or what it holds instead (a few names)."""
    try:
        others = sorted(path.name for path in directory.iterdir())
    except OSError as error:
        return f"cannot read it: {error.strerror or error}"
    if not others:
        return "the directory is empty: nothing is overridden, every query is forwarded"
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return (
        f"no zone files: only names ending in {' or '.join(ZONE_SUFFIXES)} (not hidden) are "
        f"read, it holds {shown}; nothing is overridden, every query is forwarded"
    )


class ZoneFileCache:
    """Parsed files by path and content digest, so a reload re-parses only what changed.

    Keyed on the bytes actually parsed (never on mtime, which is too coarse to notice a
    quick rewrite); keeps only the reusable files of the most recent load, so whatever
    `dnsoverride check` would say about the files now, a cached load says too.
    """

    def __init__(self) -> None:
        self._files: dict[tuple[str, bytes], ParsedFile] = {}

    def parse(self, paths: Iterable[Path]) -> list[ParsedFile]:
        """Every file of `paths`, in order: cached when its bytes were parsed last time."""
        files: dict[tuple[str, bytes], ParsedFile | None] = {}
        misses: dict[tuple[str, bytes], tuple[Path, bytes]] = {}
        for path in paths:
            try:
                data = read_regular_file(path)
            except OSError as error:
                problem = Problem(str(path), 0, f"cannot read: {error}")
                files[(str(path), b"")] = ParsedFile(
                    ZoneFile(path.name, str(path), MappingProxyType({})), (problem,), ""
                )
                continue
            key = (str(path), hashlib.sha256(data).digest())
            known = self._files.get(key)
            if known is None:
                misses[key] = (path, data)
            files[key] = known
        for key, parsed in zip(misses, parse_all(list(misses.values())), strict=True):
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
        reason = "is a file, not a zones directory" if directory.exists() else "does not exist"
        raise ZoneSetError([Problem(str(directory), None, f"zones directory {reason}")])
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
    try:
        paths = zone_files(directory)
    except OSError as error:
        # Unreadable now (permissions changed under a running server): a problem like a
        # broken file, so a reload keeps the last good set and says why.
        reason = f"cannot read the zones directory: {error.strerror or error}"
        raise ZoneSetError([Problem(str(directory), None, reason)]) from None
    parsed = cache.parse(paths)
    problems = [problem for file in parsed for problem in file.problems]
    files = [file.zone for file in parsed]
    digest = hashlib.sha256()
    for file in parsed:
        digest.update(f"== {file.zone.name} {file.digest}\n".encode(errors=FS_BYTES))
    zone_set = ZoneSet(str(directory), tuple(files), digest.hexdigest())
    if views is None:
        problems.extend(cname_problems(zone_set.files, zone_set.select(None)))
    for view, selectors in (views or {}).items():
        problems.extend(view_problems(zone_set, view, selectors))
    if problems:
        # Views that share files find the same CNAME problems: each is reported once.
        unique = dict.fromkeys(problems)
        raise ZoneSetError(sorted(unique, key=lambda p: (p.file, p.line or 0)))
    return zone_set
