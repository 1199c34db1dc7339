"""dnf against the test package internet with no cache in between: the harness itself.

These runs prove the fixtures are what the cache tests take them for: real RPMs in real
repositories that an unmodified dnf installs from the stock CentOS 7 (mirrorlist), CentOS
Stream 9 and EPEL 9 (metalink over HTTPS) repo files, and a lying upstream that dnf
itself catches (so a cache that passed the lie through would fail the same way).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.dnf_client import (
    CENTOS7_BASE_REPO,
    EPEL9_REPO,
    FEDORA41_REPO,
    STREAM9_CENTOS_REPO,
    Client,
)
from tests.support.yum_fixtures import PackageInternet
from tests.support.yum_repos import C7_OS, PackageSet, World

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def nevra(*rpms: object) -> set[str]:
    return {rpm.filename.removesuffix(".noarch.rpm") for rpm in rpms}  # type: ignore[attr-defined]


def test_stock_repo_files_install_straight_from_the_fake_upstream(
    tmp_path: Path, package_internet: PackageInternet, package_set: PackageSet
) -> None:
    netns, upstream = package_internet.netns, package_internet.upstream
    centos7 = Client(tmp_path / "c7", "7", {"CentOS-Base.repo": CENTOS7_BASE_REPO})
    result = centos7.install(netns, "ci-app")
    assert result.returncode == 0, result.stdout + result.stderr
    assert nevra(package_set.app, package_set.lib) <= centos7.installed()
    assert upstream.count("/7.9.2009/os/x86_64/repodata/repomd.xml") == 1
    assert upstream.count("/" + package_set.app.filename) == 1

    stream = Client(
        tmp_path / "s9", "9", {"centos.repo": STREAM9_CENTOS_REPO}, ca=package_internet.ca_cert
    )
    result = stream.install(netns, "hello-ci")
    assert result.returncode == 0, result.stdout + result.stderr
    assert nevra(package_set.hello) <= stream.installed()

    epel = Client(tmp_path / "epel", "9", {"epel.repo": EPEL9_REPO}, ca=package_internet.ca_cert)
    result = epel.install(netns, "ci-big-0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert nevra(package_set.big[0]) <= epel.installed()
    assert upstream.count(f"/Packages/c/{package_set.big[0].filename}") == 1

    # Fedora-style: zstd-compressed metadata (createrepo_c >= 1.0), Packages/<letter>/.
    fedora = Client(
        tmp_path / "fedora", "41", {"fedora.repo": FEDORA41_REPO}, ca=package_internet.ca_cert
    )
    ok = fedora.install(netns, "ci-app")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert nevra(package_set.app, package_set.lib) <= fedora.installed()
    assert upstream.count("-primary.xml.zst") == 1


def test_dnf_itself_rejects_what_a_lying_upstream_serves(
    tmp_path: Path, package_internet: PackageInternet, package_set: PackageSet, world: World
) -> None:
    netns, upstream = package_internet.netns, package_internet.upstream
    upstream.wrong_bytes.add("/" + package_set.hello.filename)
    client = Client(tmp_path / "wrong", "7", {"CentOS-Base.repo": CENTOS7_BASE_REPO})
    result = client.install(netns, "hello-ci")
    assert result.returncode != 0
    assert "checksum doesn't match" in result.stdout + result.stderr
    assert "hello-ci" not in " ".join(client.installed())

    upstream.wrong_bytes = {world.repos[C7_OS].data()["primary"].href}
    client = Client(tmp_path / "repodata", "7", {"CentOS-Base.repo": CENTOS7_BASE_REPO})
    result = client.install(netns, "hello-ci")
    assert result.returncode != 0
    assert "checksum doesn't match" in result.stdout + result.stderr
    assert "Failed to download metadata for repo 'base'" in result.stdout + result.stderr
