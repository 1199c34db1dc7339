"""Real RPMs and real yum repositories for the package-cache tests: rpmbuild + createrepo_c.

`build_rpm` writes a noarch package with rpmbuild (a payload of random, incompressible
bytes when asked, stored uncompressed so building a few MB takes a fraction of a second);
`make_repo` lays packages out as a distribution tree does and runs createrepo_c on it:

- CentOS 7 / vault style: `Packages/*.rpm`, sha256, gzip XML plus the bz2 sqlite
  databases (`*_db`) that yum 3 prefers;
- CentOS Stream 9 style: `Packages/*.rpm`, xz-compressed XML (`--general-compress-type`),
  no sqlite (dnf never reads it);
- EPEL style: `Packages/<first letter>/*.rpm`, xz XML;
- `checksum="sha"`/`"sha512"` for the old and the strong checksum types.

`World` is a directory of such trees by upstream host and path
(`<world>/vault.centos.org/7.9.2009/os/x86_64/`), which tests/support/yum_upstream.py serves.
Nothing here is a stand-in: dnf reads these repositories exactly as it reads the real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

REPO_NS = "{http://linux.duke.edu/metadata/repo}"


@dataclass(frozen=True)
class Rpm:
    """A built package: its file name (`<name>-<ver>-<rel>.noarch.rpm`) and bytes' facts."""

    name: str
    path: Path
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.path.name


def build_rpm(
    workdir: Path,
    name: str,
    version: str = "1.0",
    release: str = "1",
    *,
    payload: int = 0,
    requires: tuple[str, ...] = (),
) -> Rpm:
    """A noarch RPM with a small text file and, when `payload` > 0, that many random bytes."""
    topdir = workdir / "rpmbuild"
    spec = workdir / f"{name}-{version}-{release}.spec"
    big = (
        f"head -c {payload} /dev/urandom > %{{buildroot}}/usr/share/{name}/payload"
        if payload
        else "true"
    )
    files = f"/usr/share/{name}/hello.txt" + (f"\n/usr/share/{name}/payload" if payload else "")
    spec.write_text(
        textwrap.dedent(
            """\
            Name: {name}
            Version: {version}
            Release: {release}
            Summary: {name}, a package built by the dnsoverride tests
            License: MIT
            BuildArch: noarch
            {requires}
            %define _binary_payload w0.ufdio
            %description
            {name} test package
            %install
            mkdir -p %{{buildroot}}/usr/share/{name}
            echo {name}-{version}-{release} > %{{buildroot}}/usr/share/{name}/hello.txt
            {big}
            %files
            {files}
            """
        ).format(
            name=name,
            version=version,
            release=release,
            requires="\n".join(f"Requires: {item}" for item in requires),
            big=big,
            files=files,
        )
    )
    subprocess.run(
        ["rpmbuild", "--quiet", "--define", f"_topdir {topdir}", "-bb", str(spec)],
        check=True,
        capture_output=True,
    )
    path = topdir / "RPMS" / "noarch" / f"{name}-{version}-{release}.noarch.rpm"
    data = path.read_bytes()
    return Rpm(name, path, len(data), hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class DataFile:
    """One `<data>` entry of a repomd.xml."""

    type: str
    href: str
    checksum_type: str
    checksum: str
    size: int


@dataclass(frozen=True)
class Repo:
    """A repository tree on disk: `root/repodata/repomd.xml` and the packages below root."""

    root: Path
    packages: dict[str, str] = field(default_factory=dict)  # rpm file name -> href

    @property
    def repomd(self) -> bytes:
        return (self.root / "repodata" / "repomd.xml").read_bytes()

    def data(self) -> dict[str, DataFile]:
        """repomd.xml's data entries by type, read with the stdlib (the tests' own view)."""
        entries = {}
        for node in ET.fromstring(self.repomd).iter(f"{REPO_NS}data"):
            checksum = node.find(f"{REPO_NS}checksum")
            location = node.find(f"{REPO_NS}location")
            size = node.find(f"{REPO_NS}size")
            assert checksum is not None and location is not None and size is not None
            entries[node.attrib["type"]] = DataFile(
                node.attrib["type"],
                location.attrib["href"],
                checksum.attrib["type"],
                (checksum.text or "").strip(),
                int(size.text or 0),
            )
        return entries


def make_repo(
    root: Path,
    rpms: list[Rpm],
    *,
    checksum: str = "sha256",
    compress: str = "gz",
    database: bool = True,
    letter_dirs: bool = False,
) -> Repo:
    """Lay `rpms` out under `root` and run createrepo_c on it (`compress`: gz, xz or bz2)."""
    root.mkdir(parents=True, exist_ok=True)
    hrefs = {}
    for rpm in rpms:
        directory = Path("Packages") / (rpm.name[0].lower() if letter_dirs else "")
        (root / directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(rpm.path, root / directory / rpm.filename)
        hrefs[rpm.filename] = str(directory / rpm.filename)
    argv = ["createrepo_c", "--quiet", "--checksum", checksum, "--workers", "1"]
    if compress != "gz":
        argv += ["--general-compress-type", compress]
    if not database:
        argv.append("--no-database")
    subprocess.run([*argv, str(root)], check=True, capture_output=True)
    return Repo(root, hrefs)


@dataclass(frozen=True)
class PackageSet:
    """The packages the repository tests install, all built once per session."""

    hello: Rpm  # tiny, no dependencies
    hello_v2: Rpm  # the same name, a newer release: what a second repo generation adds
    lib: Rpm
    app: Rpm  # requires ci-lib: dnf must resolve a dependency through the cache
    big: tuple[Rpm, ...]  # a few MB each of incompressible payload

    @property
    def install_set(self) -> tuple[Rpm, ...]:
        """What `dnf install ci-app ci-big-*` transfers (hello stays for other tests)."""
        return (self.app, self.lib, *self.big)

    def all_v1(self) -> list[Rpm]:
        return [self.hello, self.lib, self.app, *self.big]


def build_package_set(workdir: Path, big_count: int = 3, big_size: int = 4_000_000) -> PackageSet:
    return PackageSet(
        hello=build_rpm(workdir, "hello-ci"),
        hello_v2=build_rpm(workdir, "hello-ci", release="2"),
        lib=build_rpm(workdir, "ci-lib", payload=20_000),
        app=build_rpm(workdir, "ci-app", payload=50_000, requires=("ci-lib",)),
        big=tuple(
            build_rpm(workdir, f"ci-big-{index}", payload=big_size) for index in range(big_count)
        ),
    )


# Where each style of repository lives upstream (host/path, as the real trees are laid out).
C7_OS = "vault.centos.org/7.9.2009/os/x86_64"
# CentOS-Base.repo also enables updates and extras: empty repositories here.
C7_EMPTY = ("vault.centos.org/7.9.2009/updates/x86_64", "vault.centos.org/7.9.2009/extras/x86_64")
STREAM9_BASEOS = "mirror.stream.centos.org/9-stream/BaseOS/x86_64/os"
EPEL9 = "dl.fedoraproject.org/pub/epel/9/Everything/x86_64"
FEDORA41 = "dl.fedoraproject.org/pub/fedora/linux/releases/41/Everything/x86_64/os"


def zstd_metadata(repo: Repo) -> Repo:
    """Recompress a repository's XML metadata with zstd, as createrepo_c >= 1.0 writes it
    for Fedora (Debian's createrepo_c 0.17 cannot): new file names, checksums and sizes in
    repomd.xml, edited as text so that everything else stays byte for byte."""
    text = repo.repomd.decode()
    for kind in ("primary", "filelists", "other"):
        entry = repo.data()[kind]
        old = repo.root / entry.href
        data = zstandard.ZstdCompressor().compress(gzip.decompress(old.read_bytes()))
        digest = hashlib.new(entry.checksum_type, data).hexdigest()
        href = f"repodata/{digest}-{kind}.xml.zst"
        (repo.root / href).write_bytes(data)
        old.unlink()
        start = text.index(f'<data type="{kind}">')
        end = text.index("</data>", start)
        block = (
            text[start:end]
            .replace(entry.href, href)  # (before the checksum: the name holds it too)
            .replace(entry.checksum, digest)
            .replace(f"<size>{entry.size}</size>", f"<size>{len(data)}</size>")
        )
        text = text[:start] + block + text[end:]
    (repo.root / "repodata" / "repomd.xml").write_text(text)
    return repo


GPG_KEY = (
    "-----BEGIN PGP PUBLIC KEY BLOCK-----\nVersion: GnuPG v1.4.5 (GNU/Linux)\n\n"
    "mQINBFOn/0sBEADLDyZ+DQHkcTHDQSE0a0B2iYAEXwpPvs67cJ4tmhe/iMOyVMh9\n"
    "-----END PGP PUBLIC KEY BLOCK-----\n"
)


@dataclass(frozen=True)
class World:
    """The upstream trees by `host/path`, plus second generations for the change tests."""

    root: Path
    repos: dict[str, Repo]
    next_generation: dict[str, Repo]  # same location, a later createrepo_c run


def build_world(workdir: Path, packages: PackageSet) -> World:
    """The upstream package trees the tests serve: CentOS 7 (vault), Stream 9, EPEL 9."""
    root = workdir / "world"
    styles = {
        C7_OS: {"checksum": "sha256", "compress": "gz", "database": True},
        STREAM9_BASEOS: {"checksum": "sha256", "compress": "xz", "database": False},
        EPEL9: {"checksum": "sha512", "compress": "xz", "database": False, "letter_dirs": True},
    }
    repos = {}
    next_generation = {}
    for location, style in styles.items():
        repos[location] = make_repo(root / location, packages.all_v1(), **style)  # type: ignore[arg-type]
        next_generation[location] = make_repo(
            workdir / "generation-2" / location,
            [*packages.all_v1(), packages.hello_v2],
            **style,  # type: ignore[arg-type]
        )
    fedora = make_repo(root / FEDORA41, packages.all_v1(), database=False, letter_dirs=True)
    repos[FEDORA41] = zstd_metadata(fedora)
    for location in C7_EMPTY:
        repos[location] = make_repo(root / location, [], **styles[C7_OS])  # type: ignore[arg-type]
    # What a distribution tree holds beside its repositories: keys, installer metadata.
    (root / C7_OS / "RPM-GPG-KEY-CentOS-7").write_text(GPG_KEY)
    return World(root, repos, next_generation)
