"""repomd.xml and primary parsing against what createrepo_c really writes.

Every compression a real repository uses (gzip: CentOS 7/Stream; xz: EPEL; bz2: the
sqlite files; zstd: createrepo_c >= 1.0 and Fedora, recompressed here because Debian's
createrepo_c 0.17 cannot write it), the sha1/sha256/sha512 checksum types, a primary of
real size, and the hostile cases: md5 only, hrefs leaving the repository, a compression
bomb, truncated and non-XML files.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import time
from pathlib import Path

import pytest
import zstandard

from dnsoverride.cache.packages import repomd
from dnsoverride.cache.packages.repomd import (
    DataFile,
    RepodataError,
    parse_repomd,
    read_primary,
)
from dnsoverride.cache.store import Digest
from tests.support.yum_repos import PackageSet, make_repo


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("checksum", "compress", "algorithm"),
    [("sha256", "gz", "sha256"), ("sha", "xz", "sha1"), ("sha512", "bz2", "sha512")],
)
def test_createrepo_output_parses_to_the_files_and_packages_on_disk(
    tmp_path: Path, package_set: PackageSet, checksum: str, compress: str, algorithm: str
) -> None:
    rpms = package_set.all_v1()
    repo = make_repo(tmp_path / "repo", rpms, checksum=checksum, compress=compress)
    repomd = parse_repomd(repo.repomd)
    assert {item.type for item in repomd.data} >= {"primary", "filelists", "other", "primary_db"}
    for item in repomd.data:
        data = (repo.root / item.href).read_bytes()
        assert item.checksum == Digest(algorithm, hashlib.new(algorithm, data).hexdigest())
        assert item.size == len(data)
    assert repomd.timestamp == max(item.timestamp or 0 for item in repomd.data) > 0
    primary = repomd.by_type("primary")
    assert primary is not None and primary.href.endswith(f".xml.{compress}")
    packages = {p.href: p for p in read_primary(repo.root / primary.href, primary)}
    assert set(packages) == set(repo.packages.values())
    for rpm in rpms:
        entry = packages[repo.packages[rpm.filename]]
        data = rpm.path.read_bytes()
        assert entry.size == len(data)
        assert entry.checksum == Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


@pytest.mark.e2e
def test_zstd_primary_as_fedora_ships_it(tmp_path: Path, package_set: PackageSet) -> None:
    repo = make_repo(tmp_path / "repo", package_set.all_v1(), database=False)
    primary = parse_repomd(repo.repomd).by_type("primary")
    assert primary is not None
    xml = gzip.decompress((repo.root / primary.href).read_bytes())
    zst = tmp_path / "primary.xml.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(xml))
    entry = DataFile("primary", "repodata/primary.xml.zst", primary.checksum, None, len(xml), 1)
    assert {p.href for p in read_primary(zst, entry)} == set(repo.packages.values())


ENTRY = (
    '<package type="rpm"><name>pkg{i}</name><arch>x86_64</arch>'
    '<version epoch="0" ver="1.{i}" rel="1.el9"/>'
    '<checksum type="sha256" pkgid="YES">{digest}</checksum>'
    "<summary>A package of a real repository, number {i}</summary>"
    "<description>" + "Long description text. " * 20 + "</description>"
    "<packager>Fedora Project</packager><url>https://example.org/{i}</url>"
    '<time file="1700000000" build="1690000000"/>'
    '<size package="{size}" installed="{size}" archive="{size}"/>'
    '<location href="Packages/p/pkg{i}-1.{i}-1.el9.x86_64.rpm"/>'
    "<format><rpm:license>MIT</rpm:license><rpm:vendor>Fedora Project</rpm:vendor>"
    '<rpm:group>Unspecified</rpm:group><rpm:header-range start="4504" end="9973"/>'
    '<rpm:provides><rpm:entry name="pkg{i}" flags="EQ" epoch="0" ver="1.{i}" rel="1"/>'
    '<rpm:entry name="pkg{i}(x86-64)" flags="EQ" epoch="0" ver="1.{i}" rel="1"/>'
    '</rpm:provides><rpm:requires><rpm:entry name="libc.so.6()(64bit)"/>'
    '<rpm:entry name="rtld(GNU_HASH)"/></rpm:requires>'
    "<file>/usr/bin/pkg{i}</file></format></package>\n"
)


def write_synthetic_primary(path: Path, count: int) -> int:
    """A gzip primary.xml of `count` packages shaped like EPEL's (format sections
    included), written entry by entry (the test process stays small: later tests measure
    the peak memory of processes it forks); its uncompressed size."""
    written = 0
    with gzip.open(path, "wb", compresslevel=1) as stream:

        def put(text: str) -> None:
            nonlocal written
            data = text.encode()
            stream.write(data)
            written += len(data)

        put(
            '<?xml version="1.0" encoding="UTF-8"?>\n<metadata xmlns="http://linux.duke.edu/'
            'metadata/common" xmlns:rpm="http://linux.duke.edu/metadata/rpm" '
            f'packages="{count}">\n'
        )
        for i in range(count):
            digest = hashlib.sha256(str(i).encode()).hexdigest()
            put(ENTRY.format(i=i, digest=digest, size=1000 + i))
        put("</metadata>\n")
    return written


def test_real_size_primary_streams(tmp_path: Path) -> None:
    """EPEL 9 has ~20k packages and a ~50 MB primary.xml: 40k entries here."""
    path = tmp_path / "primary.xml.gz"
    size = write_synthetic_primary(path, 40_000)
    assert size > 40_000_000
    entry = DataFile("primary", "repodata/x-primary.xml.gz", Digest("sha256", "0" * 64),
                     None, size, 1)  # fmt: skip
    start = time.monotonic()
    count, sample = 0, None
    for package in read_primary(path, entry):
        if count == 123:
            sample = package
        count += 1
    took = time.monotonic() - start
    assert count == 40_000
    assert sample is not None
    assert sample.href == "Packages/p/pkg123-1.123-1.el9.x86_64.rpm"
    assert sample.size == 1123
    print(f"40k-package primary ({size / 1e6:.0f} MB) parsed in {took:.1f}s")


def test_decompression_past_open_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "primary.xml.gz"
    write_synthetic_primary(path, 200)
    entry = DataFile("primary", "repodata/p.xml.gz", Digest("sha256", "0" * 64), None, 1000, 1)
    with pytest.raises(RepodataError, match="more than its open-size 1000"):
        list(read_primary(path, entry))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x1f\x8b\x08\x00garbage", "cannot decompress"),
        (gzip.compress(b"<html><body>login</body></html>")[:-10], "cannot decompress"),
        (gzip.compress(b"<metadata><package"), "not XML"),
        (
            gzip.compress(
                b'<metadata xmlns="http://linux.duke.edu/metadata/common"><package>'
                b'<checksum type="md5">0123456789abcdef0123456789abcdef</checksum>'
                b'<size package="5"/><location href="a.rpm"/></package></metadata>'
            ),
            "checksum type 'md5'",
        ),
        (
            gzip.compress(
                b'<metadata xmlns="http://linux.duke.edu/metadata/common"><package>'
                b'<checksum type="sha256">' + b"a" * 64 + b'</checksum><size package="5"/>'
                b'<location href="../../etc/passwd"/></package></metadata>'
            ),
            "unusable href",
        ),
    ],
)
def test_broken_primary_is_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "primary.xml.gz"
    path.write_bytes(content)
    entry = DataFile("primary", "repodata/p.xml.gz", Digest("sha256", "0" * 64), None, None, 1)
    with pytest.raises(RepodataError, match=message):
        list(read_primary(path, entry))


def test_packages_elsewhere_by_xml_base_are_skipped(tmp_path: Path) -> None:
    digest = "b" * 64
    xml = (
        '<metadata xmlns="http://linux.duke.edu/metadata/common">'
        f'<package><checksum type="sha256">{digest}</checksum><size package="5"/>'
        '<location xml:base="http://elsewhere.example/" href="Packages/x.rpm"/></package>'
        f'<package><checksum type="sha256">{digest}</checksum><size package="6"/>'
        '<location href="Packages/y.rpm"/></package></metadata>'
    ).encode()
    path = tmp_path / "primary.xml"
    path.write_bytes(xml)
    entry = DataFile("primary", "repodata/p.xml", Digest("sha256", "0" * 64), None, None, 1)
    assert [p.href for p in read_primary(path, entry)] == ["Packages/y.rpm"]


def repomd_with(data: str) -> bytes:
    return (
        '<?xml version="1.0"?><repomd xmlns="http://linux.duke.edu/metadata/repo">'
        f"<revision>1</revision>{data}</repomd>"
    ).encode()


def data_entry(kind: str, href: str, checksum: str = "sha256", value: str = "c" * 64) -> str:
    return (
        f'<data type="{kind}"><checksum type="{checksum}">{value}</checksum>'
        f'<location href="{href}"/><timestamp>5</timestamp><size>10</size></data>'
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>Sign in</html>", "root element"),
        (b"not xml at all", "not XML"),
        (repomd_with(""), "lists no data files"),
        (repomd_with(data_entry("primary", "repodata/p.gz", "md5", "d" * 32)), "'md5'"),
        (repomd_with(data_entry("primary", "repodata/p.gz", "sha256", "xyz")), "not a hex"),
        (repomd_with(data_entry("primary", "/etc/passwd")), "unusable href"),
        (repomd_with(data_entry("primary", "http://evil.example/p.gz")), "unusable href"),
        (repomd_with(data_entry("a", "repodata/p.gz") + data_entry("b", "repodata/p.gz")), "twice"),
        (b"<x>" + b" " * (1 << 20) + b"</x>", "at most"),
    ],
)
def test_unusable_repomd_is_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(RepodataError, match=re.escape(message)):
        parse_repomd(body)


def test_a_primary_without_open_size_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `open-size` (or a lying huge one): decompression still stops at
    MAX_PRIMARY_OPEN (lowered here to 1 MiB for a 2 MiB primary). Failed before the fix: a
    primary without open-size was decompressed without limit (a gzip bomb)."""
    monkeypatch.setattr(repomd, "MAX_PRIMARY_OPEN", 1 << 20, raising=False)
    path = tmp_path / "primary.xml.gz"
    assert write_synthetic_primary(path, 2000) > 2 << 20
    for declared in (None, 10**12):
        entry = DataFile("primary", "repodata/p.xml.gz", Digest("sha256", "0" * 64), None,
                         declared, 1)  # fmt: skip
        with pytest.raises(RepodataError, match="more than 1048576 bytes"):
            list(read_primary(path, entry))


def test_one_huge_entry_in_primary_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One text node of 1 MiB (iterparse would hold it whole) past MAX_PRIMARY_ENTRY
    (lowered to 256 KiB) is refused, with a truthful open-size. Failed before the fix: the
    only bound was the open-size, so one entry could be gigabytes in memory."""
    monkeypatch.setattr(repomd, "MAX_PRIMARY_ENTRY", 256 << 10, raising=False)
    body = (
        b'<metadata xmlns="http://linux.duke.edu/metadata/common"><package><description>'
        + b"A" * (1 << 20)
        + b'</description><checksum type="sha256">'
        + b"a" * 64
        + b"</checksum>"
        b'<size package="5"/><location href="a.rpm"/></package></metadata>'
    )
    path = tmp_path / "primary.xml.gz"
    path.write_bytes(gzip.compress(body))
    entry = DataFile("primary", "repodata/p.xml.gz", Digest("sha256", "0" * 64), None,
                     len(body), 1)  # fmt: skip
    with pytest.raises(RepodataError, match="an entry larger than 262144 bytes"):
        list(read_primary(path, entry))


def test_duplicate_hrefs_with_other_checksums_are_reported(tmp_path: Path) -> None:
    """Two entries at one href with different checksums: the last is kept and the earlier
    one reported (the cache logs `primary_duplicate_href` naming both); an identical repeat
    is not a conflict. Failed before the fix: the earlier entry was dropped silently (no
    `package_map`)."""

    def entry(digit: str, size: int) -> bytes:
        return (
            b'<package><checksum type="sha256">' + digit.encode() * 64 + b"</checksum>"
            b'<size package="' + str(size).encode() + b'"/><location href="a.rpm"/></package>'
        )

    body = (
        b'<metadata xmlns="http://linux.duke.edu/metadata/common">'
        + entry("a", 5) + entry("a", 5) + entry("b", 6)
        + b"</metadata>"
    )  # fmt: skip
    path = tmp_path / "primary.xml.gz"
    path.write_bytes(gzip.compress(body))
    data = DataFile("primary", "repodata/p.xml.gz", Digest("sha256", "0" * 64), None, None, 1)
    packages, replaced = repomd.package_map(path, data)
    assert packages["a.rpm"].checksum == Digest("sha256", "b" * 64)
    assert [(p.checksum, p.size) for p in replaced] == [(Digest("sha256", "a" * 64), 5)]
