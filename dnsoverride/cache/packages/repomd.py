"""yum/dnf repository metadata as the cache needs it: repomd.xml and the package list.

`parse_repomd` reads a `repodata/repomd.xml` (the few KiB a repository's identity is):
its `<data>` entries, each a file under the repository root with the checksum and size it
must have. `read_primary` streams a repository's `primary` metadata (gzip, xz, bz2, zstd
or plain XML; tens of MB uncompressed for EPEL, more for Fedora) with xml.etree's
iterparse and yields, per package, the location and the checksum and size the package
file must have — the facts the cache verifies packages against; nothing else of the
metadata is kept.

Checksum types are those createrepo_c writes: `sha` (sha1), `sha1`, `sha224`, `sha256`,
`sha384`, `sha512`; `md5` and anything else are refused (a repository that only offers
md5 cannot be verified, so it is not cached). Malformed input raises `RepodataError`
with the reason; decompressed primary data larger than the size its repomd.xml declares
(`open-size`) or than MAX_PRIMARY_OPEN whatever it declares, or with more than
MAX_PRIMARY_ENTRY bytes between two package entries (iterparse would hold one huge text
node whole), is refused too, so a compression bomb costs nothing.

The XML parser and the decompressors are imported where metadata is read (a repository's
first request, or the start of a cache whose store holds repositories), not by every
cache that starts: 0.8 MB of an idle one (issue 13).
"""

from __future__ import annotations

import io
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dnsoverride.cache.store import ALGORITHMS, Digest

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    import zstandard

    Readable = io.BufferedIOBase | zstandard.ZstdDecompressionReader | IO[bytes]

REPO = "{http://linux.duke.edu/metadata/repo}"
COMMON = "{http://linux.duke.edu/metadata/common}"
XML_BASE = "{http://www.w3.org/XML/1998/namespace}base"
# repodata type names -> hashlib names; md5 is not there on purpose.
CHECKSUM_TYPES = {
    "sha": "sha1",
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}
# A real repomd.xml is 3-10 KiB (Fedora's, with zchunk and modules entries, ~7 KiB).
MAX_REPOMD = 1 << 20
# A 40,000-package primary (EPEL-sized) is ~60 MB uncompressed, Fedora's ~75,000 ~120 MB:
# 1 GiB is eight times the largest real one and what one parse may decompress at most.
MAX_PRIMARY_OPEN = 1 << 30
# One <package> entry is a few KiB (the largest, with long file lists, some 100 KiB).
MAX_PRIMARY_ENTRY = 16 << 20
_READ = 1 << 16


class RepodataError(Exception):
    """Repository metadata that cannot be used: the message says why."""


def parse_checksum(kind: str | None, value: str | None) -> Digest:
    """The content address a `<checksum type=...>` element gives (RepodataError if unusable)."""
    algorithm = CHECKSUM_TYPES.get((kind or "").lower())
    if algorithm is None:
        raise RepodataError(f"checksum type {kind!r} is not one the cache verifies")
    digest = (value or "").strip().lower()
    if len(digest) != ALGORITHMS[algorithm] or digest.strip(string.hexdigits[:16]):
        raise RepodataError(f"{kind} checksum {digest[:20]!r} is not a hex digest")
    return Digest(algorithm, digest)


@dataclass(frozen=True)
class DataFile:
    """One `<data>` entry of repomd.xml: a metadata file below the repository root."""

    type: str
    href: str
    checksum: Digest
    size: int | None  # createrepo_c always writes it; very old repositories do not
    open_size: int | None
    timestamp: int | None


@dataclass(frozen=True)
class Repomd:
    """A parsed repomd.xml, with its exact bytes (what clients get and metalinks describe)."""

    body: bytes
    data: tuple[DataFile, ...]

    @property
    def timestamp(self) -> int:
        """The newest `<timestamp>` of its data entries: what yum compares with a metalink's."""
        return max((item.timestamp or 0 for item in self.data), default=0)

    def by_type(self, kind: str) -> DataFile | None:
        return next((item for item in self.data if item.type == kind), None)

    def by_href(self) -> dict[str, DataFile]:
        return {item.href: item for item in self.data}


@dataclass(frozen=True)
class Package:
    """What primary says a package file below the repository root must be."""

    href: str
    checksum: Digest
    size: int


def parse_repomd(body: bytes) -> Repomd:
    import xml.etree.ElementTree as ET

    if len(body) > MAX_REPOMD:
        raise RepodataError(f"repomd.xml of {len(body)} bytes (at most {MAX_REPOMD})")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as error:
        raise RepodataError(f"repomd.xml is not XML: {error}") from None
    if root.tag != f"{REPO}repomd":
        raise RepodataError(f"repomd.xml's root element is {root.tag!r}, not repomd")
    entries = []
    seen: set[str] = set()
    for node in root.iter(f"{REPO}data"):
        kind = node.get("type", "")
        location = node.find(f"{REPO}location")
        checksum = node.find(f"{REPO}checksum")
        href = location.get("href") if location is not None else None
        if not kind or href is None or checksum is None:
            raise RepodataError(f"repomd.xml data entry {kind!r} lacks a location or checksum")
        if location is not None and location.get(XML_BASE):
            raise RepodataError(f"repomd.xml data entry {kind!r} lives elsewhere (xml:base)")
        href = _relative(href, f"data entry {kind!r}")
        if href in seen:
            raise RepodataError(f"repomd.xml lists {href} twice")
        seen.add(href)
        entries.append(
            DataFile(
                kind,
                href,
                parse_checksum(checksum.get("type"), checksum.text),
                _number(node.find(f"{REPO}size"), kind),
                _number(node.find(f"{REPO}open-size"), kind),
                _number(node.find(f"{REPO}timestamp"), kind),
            )
        )
    if not entries:
        raise RepodataError("repomd.xml lists no data files")
    return Repomd(body, tuple(entries))


def read_primary(path: Path, data: DataFile) -> Iterator[Package]:
    """Stream the package entries of a verified primary file (`data` is its repomd entry).

    Packages whose location carries `xml:base` live outside this repository and are
    skipped: the cache only serves what is below the repository root.
    """
    import lzma
    import xml.etree.ElementTree as ET

    import zstandard

    with path.open("rb") as raw, _decompressed(raw, data.href) as stream:
        limit = min(data.open_size or MAX_PRIMARY_OPEN, MAX_PRIMARY_OPEN)
        limited = _Limited(stream, limit, declared=data.open_size is not None)
        root: ET.Element | None = None
        try:
            for event, element in ET.iterparse(limited, events=("start", "end")):
                if root is None:
                    root = element
                if event != "end" or element.tag != f"{COMMON}package":
                    continue
                package = _package(element)
                root.clear()  # the packages seen so far: memory stays flat however many
                limited.entry_done()
                if package is not None:
                    yield package
        except ET.ParseError as error:
            raise RepodataError(f"{data.href}: not XML: {error}") from None
        except (OSError, EOFError, lzma.LZMAError, zstandard.ZstdError) as error:
            raise RepodataError(f"{data.href}: cannot decompress: {error}") from None


def package_map(path: Path, data: DataFile) -> tuple[dict[str, Package], list[Package]]:
    """The packages of a primary by href, and the entries that were replaced by a later
    one at the same href with another checksum or size (a broken repository: the last one
    is kept, the caller says so)."""
    packages: dict[str, Package] = {}
    replaced: list[Package] = []
    for package in read_primary(path, data):
        earlier = packages.get(package.href)
        if earlier is not None and earlier != package:
            replaced.append(earlier)
        packages[package.href] = package
    return packages, replaced


def _package(element: ET.Element) -> Package | None:
    location = element.find(f"{COMMON}location")
    checksum = element.find(f"{COMMON}checksum")
    size = element.find(f"{COMMON}size")
    if location is None or checksum is None or size is None:
        raise RepodataError("primary: a package entry lacks location, checksum or size")
    if location.get(XML_BASE):
        return None
    href = _relative(location.get("href") or "", "a package location")
    try:
        length = int(size.get("package", ""))
    except ValueError:
        raise RepodataError(f"primary: {href} has no package size") from None
    return Package(href, parse_checksum(checksum.get("type"), checksum.text), length)


def _relative(href: str, what: str) -> str:
    parts = href.split("/")
    if not href or href.startswith("/") or "://" in href or ".." in parts or "" in parts:
        raise RepodataError(f"{what} has an unusable href {href[:80]!r}")
    return href


def _number(node: ET.Element | None, kind: str) -> int | None:
    if node is None:
        return None
    try:
        return int((node.text or "").strip())
    except ValueError:
        raise RepodataError(f"repomd.xml data entry {kind!r}: {node.tag} is not a number") from None


def _decompressed(raw: IO[bytes], href: str) -> Readable:
    import bz2
    import gzip
    import lzma

    import zstandard

    if href.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if href.endswith(".xz"):
        return lzma.LZMAFile(raw, mode="rb")
    if href.endswith(".bz2"):
        return bz2.BZ2File(raw, mode="rb")
    if href.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if href.endswith(".xml"):
        return raw
    raise RepodataError(f"{href}: compression not one of gz, xz, bz2, zst")


class _Limited:
    """A read-only stream that fails once more than `limit` bytes came out, or more than
    MAX_PRIMARY_ENTRY since the last `entry_done`."""

    def __init__(self, stream: Readable, limit: int, *, declared: bool) -> None:
        self.stream = stream
        self.limit = limit
        self.declared = declared
        self.count = 0
        self.entry = 0

    def read(self, size: int = _READ) -> bytes:
        chunk = self.stream.read(size if size > 0 else _READ)
        self.count += len(chunk)
        self.entry += len(chunk)
        if self.count > self.limit:
            if self.declared and self.limit < MAX_PRIMARY_OPEN:
                raise RepodataError(f"primary decompresses to more than its open-size {self.limit}")
            raise RepodataError(f"primary decompresses to more than {self.limit} bytes (the limit)")
        if self.entry > MAX_PRIMARY_ENTRY:
            raise RepodataError(f"primary has an entry larger than {MAX_PRIMARY_ENTRY} bytes")
        return chunk

    def entry_done(self) -> None:
        self.entry = 0
