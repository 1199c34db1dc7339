"""Fixtures for the package-repository tests: the RPMs and trees (built once per session)
and "the package internet" in a network namespace.

`package_internet` makes a namespace whose resolv.conf points at a dnsmasq (127.0.0.5)
that sends every package host (vault.centos.org, mirror.stream.centos.org,
dl.fedoraproject.org, mirrorlist.centos.org, mirrors.centos.org,
mirrors.fedoraproject.org) to the fake upstream on 127.0.0.3:80 and :443, which holds a
certificate for all of them from a test CA. A test that runs the cache starts it on
127.0.0.2 and its `dnsoverride serve` on 127.0.0.1 and points resolv.conf there.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.transparent_certs import make_ca
from tests.support.transparent_netns import Netns, netns_unsupported
from tests.support.yum_repos import PackageSet, World, build_package_set, build_world
from tests.support.yum_upstream import YumUpstream

DNS, CACHE, ORIGIN, UPSTREAM_DNS = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.5"
PACKAGE_HOSTS = (
    "vault.centos.org",
    "mirror.stream.centos.org",
    "dl.fedoraproject.org",
    "mirrorlist.centos.org",
    "mirrors.centos.org",
    "mirrors.fedoraproject.org",
)


@pytest.fixture(scope="session")
def package_set(tmp_path_factory: pytest.TempPathFactory) -> PackageSet:
    return build_package_set(tmp_path_factory.mktemp("rpms"))


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, package_set: PackageSet) -> World:
    return build_world(tmp_path_factory.mktemp("world"), package_set)


@dataclass
class PackageInternet:
    netns: Netns
    upstream: YumUpstream
    ca_cert: Path  # trusted by clients (sslcacert=) and by the cache
    ca_dir: Path  # `dnsoverride ca` directory, to issue the cache's own certificates


@pytest.fixture
def package_internet(tmp_path: Path, world: World) -> Iterator[PackageInternet]:
    reason = netns_unsupported()
    if reason:
        pytest.skip(reason)
    ca_dir = tmp_path / "ca"
    ca = make_ca(ca_dir)
    cert, key = ca.issue(tmp_path, "origin", *PACKAGE_HOSTS)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    netns = Netns.create(nameserver=UPSTREAM_DNS)
    upstream = YumUpstream(world.root, netns=netns.name)
    try:
        records = [f"--host-record={host},{ORIGIN}" for host in PACKAGE_HOSTS]
        dnsmasq = netns.popen(
            [
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", f"--listen-address={UPSTREAM_DNS}", "--bind-interfaces",
                "--port=53", *[f"--local=/{host}/" for host in PACKAGE_HOSTS], *records,
            ],
            tmp_path / "dnsmasq.log",
        )  # fmt: skip
        netns.wait_for_tcp(UPSTREAM_DNS, 53, dnsmasq)
        upstream.start([(ORIGIN, 80, None), (ORIGIN, 443, context)])
        yield PackageInternet(netns, upstream, ca.cert_file, ca_dir)
    finally:
        upstream.stop()
        netns.destroy()
