"""The repository cache end to end: unchanged dnf clients in a namespace, through the DNS
override and the cache, against the lying package upstream.

    127.0.0.1:53      dnsoverride serve: the package hosts -> 127.0.0.2 (resolv.conf)
    127.0.0.2:80/443  dnsoverride cache: mirrorlist + metalink responders, repository
                      cache (built-in upstreams), certificates from the test CA; resolves
                      upstream names through its own `resolvers:` (the dnsmasq below)
    127.0.0.3:80/443  the package internet (tests/support/yum_upstream.py)
    127.0.0.5:53      dnsmasq: the real names -> 127.0.0.3

A CentOS 7 client follows its mirrorlist to vault.centos.org (the cache), a Stream 9 and
an EPEL 9 client their metalinks over HTTPS; then the faults of the issue: wrong package
bytes, repodata that does not match its repomd.xml, a repomd.xml that changes while
clients run, an upstream that is down, and 8 clients at once.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dnf_client import (
    CENTOS7_BASE_REPO,
    EPEL9_REPO,
    FEDORA41_REPO,
    STREAM9_CENTOS_REPO,
    Client,
)
from tests.support.mounts import tmpfs
from tests.support.transparent_netns import Netns
from tests.support.yum_fixtures import CACHE, DNS, PACKAGE_HOSTS, UPSTREAM_DNS, PackageInternet
from tests.support.yum_repos import C7_OS, PackageSet, Rpm, World

DNSOVERRIDE = [sys.executable, "-m", "dnsoverride"]

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@dataclass
class PackageCache:
    internet: PackageInternet
    storage: Path
    log: Path
    config: Path
    process: subprocess.Popen[bytes]
    tmp: Path

    @property
    def netns(self) -> Netns:
        return self.internet.netns

    def events(self, name: str) -> list[dict[str, object]]:
        events = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    events.append(event)
        return events

    def access_lines(
        self, keep: Callable[[dict[str, object]], bool], count: int, within: float = 10
    ) -> list[dict[str, object]]:
        """The access-log lines (event `request`) that `keep` keeps, once there are `count`
        of them: a line is written after its response went out, so it may trail the
        client's view by a moment (polled: the log has no event to wait on)."""
        deadline = time.monotonic() + within
        while True:
            lines = [event for event in self.events("request") if keep(event)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def restart(self) -> None:
        Netns.stop(self.process)
        self.process = start_cache_process(self.netns, self.config, self.log, self.internet.ca_cert)

    def stored(self, rpm: Rpm, algorithm: str = "sha256") -> bool:
        data = rpm.path.read_bytes()
        digest = hashlib.new(algorithm, data).hexdigest()
        path = self.storage / "packages" / algorithm / digest[:2] / digest
        return path.is_file() and path.read_bytes() == data

    def c7(self, name: str) -> Client:
        return Client(self.tmp / name, "7", {"CentOS-Base.repo": CENTOS7_BASE_REPO})

    def stream9(self, name: str) -> Client:
        return Client(
            self.tmp / name, "9", {"centos.repo": STREAM9_CENTOS_REPO}, ca=self.internet.ca_cert
        )

    def epel9(self, name: str) -> Client:
        return Client(self.tmp / name, "9", {"epel.repo": EPEL9_REPO}, ca=self.internet.ca_cert)

    def fedora41(self, name: str) -> Client:
        repos = {"fedora.repo": FEDORA41_REPO}
        return Client(self.tmp / name, "41", repos, ca=self.internet.ca_cert)


def start_cache_process(netns: Netns, config: Path, log: Path, ca: Path) -> subprocess.Popen[bytes]:
    # The cache trusts the test CA for its HTTPS upstreams (mirror.stream.centos.org,
    # dl.fedoraproject.org) as a host trusts its CA bundle: through SSL_CERT_FILE.
    process = netns.popen(
        [*DNSOVERRIDE, "cache", "--config", str(config), "--log-format", "json"],
        log,
        env={**os.environ, "SSL_CERT_FILE": str(ca)},
    )
    netns.wait_for_tcp(CACHE, 80, process)
    netns.wait_for_tcp(CACHE, 443, process)
    return process


def make_cache(
    tmp_path: Path,
    internet: PackageInternet,
    top: dict[str, object] | None = None,
    **packages: object,
) -> Iterator[PackageCache]:
    netns = internet.netns
    subprocess.run(
        [*DNSOVERRIDE, "ca", "issue", "--dir", str(internet.ca_dir), *PACKAGE_HOSTS,
         "--out", str(tmp_path / "cache-tls")],
        check=True, capture_output=True,
    )  # fmt: skip
    storage = tmp_path / "store"
    config = tmp_path / "cache.yaml"
    config.write_text(
        json.dumps(
            {
                "listen": f"{CACHE}:80",
                "storage": str(storage),
                "resolvers": [UPSTREAM_DNS],
                "tls": {
                    "listen": f"{CACHE}:443",
                    "cert": str(tmp_path / "cache-tls.crt"),
                    "key": str(tmp_path / "cache-tls.key"),
                },
                "packages": packages,
                **(top or {}),
            }
        )
    )
    log = tmp_path / "cache.log"
    process = start_cache_process(netns, config, log, internet.ca_cert)
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "packages.yaml").write_text(
        json.dumps({"ttl": 1, "records": {host: {"A": CACHE} for host in PACKAGE_HOSTS}})
    )
    serve = netns.popen(
        [*DNSOVERRIDE, "serve", "--zones", str(zones), "--listen", f"{DNS}:53",
         "--upstream", f"{UPSTREAM_DNS}:53"],
        tmp_path / "serve.log",
    )  # fmt: skip
    netns.wait_for_tcp(DNS, 53, serve)
    (netns.etc / "resolv.conf").write_text(f"nameserver {DNS}\n")
    # Both processes are stopped by the namespace's destroy().
    yield PackageCache(internet, storage, log, config, process, tmp_path)


@pytest.fixture
def package_cache(tmp_path: Path, package_internet: PackageInternet) -> Iterator[PackageCache]:
    yield from make_cache(tmp_path, package_internet)


@pytest.fixture
def eager_cache(tmp_path: Path, package_internet: PackageInternet) -> Iterator[PackageCache]:
    """A cache that revalidates repomd.xml on every request (metadata_ttl 0)."""
    yield from make_cache(tmp_path, package_internet, metadata_ttl=0)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def nevra(rpm: Rpm) -> str:
    return rpm.filename.removesuffix(".noarch.rpm")


def test_centos7_unchanged_repo_file_installs_through_the_cache(
    package_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    """mirrorlist.centos.org -> the cache's centos-vault preset -> vault.centos.org (the
    cache) -> the upstream vault; the store then holds the packages, verified."""
    upstream = package_cache.internet.upstream
    client = package_cache.c7("first")
    ok(client.install(package_cache.netns, "ci-app"))
    assert {nevra(package_set.app), nevra(package_set.lib)} <= client.installed()
    assert package_cache.stored(package_set.app) and package_cache.stored(package_set.lib)
    # The mirrorlist never reached the upstream: the cache answered it.
    assert not [r for r in upstream.requests if r.host == "mirrorlist.centos.org"]
    repo = world.repos[C7_OS]
    for item in repo.data().values():  # every file of the snapshot, once (yum reads *_db)
        assert upstream.count("/7.9.2009/os/x86_64/" + item.href) == 1

    # A second cold client within metadata_ttl: everything from the cache.
    before = len(upstream.requests)
    second = package_cache.c7("second")
    ok(second.install(package_cache.netns, "ci-app"))
    assert [r.path for r in upstream.requests[before:] if r.host == "vault.centos.org"] == []


def test_stream9_epel9_fedora41_metalinks_over_https_install(
    package_cache: PackageCache, package_set: PackageSet
) -> None:
    stream = package_cache.stream9("stream")
    ok(stream.install(package_cache.netns, "hello-ci"))
    assert nevra(package_set.hello) in stream.installed()
    # The metalinks came from the cache, describing the repomd.xml it serves.
    upstream = package_cache.internet.upstream
    assert not [r for r in upstream.requests if r.host.startswith("mirrors.")]
    assert package_cache.stored(package_set.hello)
    epel = package_cache.epel9("epel")  # EPEL-style: sha512 checksums, Packages/<letter>/
    ok(epel.install(package_cache.netns, "ci-big-0"))
    assert nevra(package_set.big[0]) in epel.installed()
    assert package_cache.stored(package_set.big[0], "sha512")
    fedora = package_cache.fedora41("fedora")  # zstd metadata, parsed by the cache too
    ok(fedora.install(package_cache.netns, "ci-app"))
    assert {nevra(package_set.app), nevra(package_set.lib)} <= fedora.installed()
    updated = package_cache.events("repository_updated")
    assert any(
        event["repository"] == "fedora/fedora/linux/releases/41/Everything/x86_64/os/"
        and event["packages"] == len(package_set.all_v1())
        for event in updated
    )


def test_wrong_package_bytes_fail_the_client_and_store_nothing(
    package_cache: PackageCache, package_set: PackageSet
) -> None:
    upstream = package_cache.internet.upstream
    upstream.wrong_bytes.add("/" + package_set.hello.filename)
    client = package_cache.c7("wrong")
    result = client.install(package_cache.netns, "hello-ci")
    assert result.returncode != 0
    assert nevra(package_set.hello) not in client.installed()
    assert not package_cache.stored(package_set.hello)
    failures = [
        event
        for event in package_cache.events("content_fetch_failed")
        if package_set.hello.sha256 in str(event.get("digest"))
    ]
    # One line per failed download (dnf retries), each naming the package and the reason.
    assert len(failures) == upstream.count("/" + package_set.hello.filename) >= 1
    assert all("does not match its digest" in str(event["error"]) for event in failures)


def test_repodata_not_matching_repomd_keeps_the_old_snapshot(
    eager_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    upstream = eager_cache.internet.upstream
    ok(eager_cache.c7("before").install(eager_cache.netns, "hello-ci"))
    # The upstream moves to a second generation whose primary is damaged on the mirror.
    upstream.publish(C7_OS, world.next_generation[C7_OS].root)
    upstream.wrong_bytes.add(world.next_generation[C7_OS].data()["primary"].href)
    client = eager_cache.c7("after")
    ok(client.install(eager_cache.netns, "hello-ci"))
    assert nevra(package_set.hello) in client.installed()  # 1.0-1: the old snapshot's
    assert nevra(package_set.hello_v2) not in client.installed()
    stale = eager_cache.events("repository_stale")
    assert stale and "does not match its digest" in str(stale[-1]["reason"])


def test_repodata_not_matching_repomd_on_a_cold_cache_is_a_client_error(
    package_cache: PackageCache, world: World
) -> None:
    upstream = package_cache.internet.upstream
    primary = world.repos[C7_OS].data()["primary"]
    upstream.wrong_bytes.add(primary.href)
    result = package_cache.c7("cold").install(package_cache.netns, "hello-ci")
    assert result.returncode != 0
    assert "502" in result.stdout + result.stderr
    assert not list((package_cache.storage / "packages").rglob("*"))
    unavailable = package_cache.events("repository_unavailable")
    assert unavailable and primary.checksum in json.dumps(unavailable)


def test_repomd_changing_mid_run_gives_every_client_one_snapshot(
    eager_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    netns, upstream = eager_cache.netns, eager_cache.internet.upstream
    old, new = world.repos[C7_OS], world.next_generation[C7_OS]
    # The mirror syncs the moment the cache has read its repomd.xml: the files that
    # repomd.xml lists are gone when the cache asks for them; it must start over.
    upstream.after["/7.9.2009/os/x86_64/repodata/repomd.xml"] = lambda: upstream.publish(
        C7_OS, new.root
    )
    first = eager_cache.c7("first")
    ok(first.install(netns, "hello-ci"))
    assert nevra(package_set.hello_v2) in first.installed()

    # A client holding the previous generation's metadata still gets its files.
    upstream.publish(C7_OS, old.root)
    holder = eager_cache.c7("holder")
    ok(holder.install(netns, command="makecache"))
    upstream.publish(C7_OS, new.root)
    ok(eager_cache.c7("newer").install(netns, "hello-ci"))  # the cache switches to new
    gone = old.data()["primary_db"].href
    assert not (new.root / gone).exists()
    fetched = http_get(netns, "vault.centos.org", f"/7.9.2009/os/x86_64/{gone}")
    assert hashlib.sha256(fetched).hexdigest() == old.data()["primary_db"].checksum
    # (metadata_expire=-1: dnf keeps the metadata it has, as it does for 6h-48h normally)
    ok(holder.install(netns, "hello-ci", options=("--setopt=metadata_expire=-1",)))
    assert nevra(package_set.hello) in holder.installed()


def test_upstream_down_cached_repositories_still_install(
    eager_cache: PackageCache, package_set: PackageSet
) -> None:
    upstream = eager_cache.internet.upstream
    ok(eager_cache.c7("warm").install(eager_cache.netns, "ci-app"))
    upstream.set_down(True)
    client = eager_cache.c7("down")
    ok(client.install(eager_cache.netns, "ci-app"))
    assert nevra(package_set.app) in client.installed()
    assert eager_cache.events("repository_stale")
    # A restart while the upstream is still down: the snapshot comes back from the store.
    eager_cache.restart()
    again = eager_cache.c7("restarted")
    ok(again.install(eager_cache.netns, "ci-app"))
    assert nevra(package_set.app) in again.installed()


def test_eight_concurrent_cold_clients_fetch_each_package_once(
    package_cache: PackageCache, package_set: PackageSet
) -> None:
    upstream = package_cache.internet.upstream
    upstream.rate = 2_000_000  # 2 s per big package: the clients' requests overlap
    names = ["ci-app", *(rpm.name for rpm in package_set.big)]
    clients = [package_cache.c7(f"client-{index}") for index in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: c.install(package_cache.netns, *names), clients))
    for result in results:
        ok(result)
    for rpm in package_set.install_set:
        assert upstream.count("/" + rpm.filename) == 1, rpm.filename
        assert package_cache.stored(rpm)
    for client in clients:
        assert {nevra(rpm) for rpm in package_set.install_set} <= client.installed()
    # They did overlap: requests joined a download in flight rather than finding it stored.
    joined = package_cache.access_lines(
        lambda event: event.get("cache") == "coalesced" and str(event["path"]).endswith(".rpm"),
        len(package_set.big),
    )
    assert len(joined) >= len(package_set.big)


def http_get(netns: Netns, host: str, path: str) -> bytes:
    """GET `path` from the cache as `host` inside the namespace (its own thread resolves
    nothing through the namespace's resolv.conf, so it goes to the cache's address)."""

    def fetch() -> bytes:
        connection = http.client.HTTPConnection(CACHE, 80, timeout=10)
        try:
            connection.request("GET", path, headers={"Host": host})
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:200])
            return body
        finally:
            connection.close()

    return netns.call(fetch)


def cache_get(
    netns: Netns, host: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request to the cache as `host`, from the namespace."""

    def fetch() -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(CACHE, 80, timeout=20)
        try:
            connection.request(method, path, headers={"Host": host, **(headers or {})})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    return netns.call(fetch)


VAULT = "vault.centos.org"
C7_PATH = "/7.9.2009/os/x86_64/"


def test_what_the_snapshot_does_not_describe(
    package_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    """.rpm and repodata/ files the served snapshot does not list are refused (404 with the
    reason, the upstream never asked); other files pass through unstored, logged."""
    netns, upstream = package_cache.netns, package_cache.internet.upstream
    status, _, _ = cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")
    assert status == 200
    before = len(upstream.requests)
    status, _, body = cache_get(netns, VAULT, C7_PATH + "Packages/evil-1.0-1.noarch.rpm")
    assert status == 404
    assert b"not described by the primary metadata" in body
    bogus = "repodata/" + "0" * 64 + "-primary.xml.gz"
    status, _, body = cache_get(netns, VAULT, C7_PATH + bogus)
    assert (status, body.startswith(bogus.encode())) == (404, True)
    assert b"is not listed by the repomd.xml served" in body
    assert len(upstream.requests) == before

    status, _, body = cache_get(netns, VAULT, C7_PATH + "RPM-GPG-KEY-CentOS-7")
    assert status == 200
    assert body == (world.repos[C7_OS].root / "RPM-GPG-KEY-CentOS-7").read_bytes()
    assert upstream.count("/RPM-GPG-KEY-CentOS-7") == 1
    assert package_cache.events("package_passthrough")[-1]["path"] == (
        C7_PATH.lstrip("/") + "RPM-GPG-KEY-CentOS-7"
    )
    stored = {path.name for path in package_cache.storage.rglob("*") if path.is_file()}
    assert hashlib.sha256(body).hexdigest() not in stored


def test_package_ranges_while_downloading_and_stored(
    package_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    netns, upstream = package_cache.netns, package_cache.internet.upstream
    big = package_set.big[1]
    data = big.path.read_bytes()
    assert cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")[0] == 200
    path = C7_PATH + world.repos[C7_OS].packages[big.filename]
    upstream.chunk = 64 * 1024  # still arriving while the range is asked for
    status, headers, body = cache_get(netns, VAULT, path, {"Range": "bytes=1000-1999"})
    assert (status, body) == (206, data[1000:2000])
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    status, headers, _ = cache_get(netns, VAULT, path, method="HEAD")
    assert (status, int(headers["Content-Length"])) == (200, len(data))
    status, _, body = cache_get(netns, VAULT, path)
    assert (status, body) == (200, data)
    status, _, body = cache_get(netns, VAULT, path, {"Range": f"bytes={len(data) - 10}-"})
    assert (status, body) == (206, data[-10:])
    assert upstream.count("/" + big.filename) == 1
    assert package_cache.stored(big)


def test_captive_portal_repomd_is_never_served(
    eager_cache: PackageCache, package_set: PackageSet
) -> None:
    """An HTML 200 (a login page) instead of repomd.xml: a warm cache serves its snapshot
    (logged stale), and nothing of the page reaches a client."""
    netns, upstream = eager_cache.netns, eager_cache.internet.upstream
    ok(eager_cache.c7("warm").install(netns, "hello-ci"))
    upstream.html.add("/repodata/repomd.xml")
    status, _, body = cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")
    assert status == 200 and body.startswith(b"<?xml") and b"<repomd" in body
    stale = eager_cache.events("repository_stale")
    assert stale and "root element" in str(stale[-1]["reason"])


def test_captive_portal_on_a_cold_cache_is_a_clear_error(package_cache: PackageCache) -> None:
    netns, upstream = package_cache.netns, package_cache.internet.upstream
    upstream.html.add("/repodata/repomd.xml")
    status, _, body = cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")
    assert status == 502
    assert b"root element" in body and b"centos-vault/7.9.2009/os/x86_64/" in body
    warnings = package_cache.access_lines(
        lambda event: event["path"] == "/7.9.2009/os/x86_64/repodata/repomd.xml", 1
    )
    assert [event["status"] for event in warnings] == [502]
    assert "root element" in str(warnings[0]["error"])


@pytest.fixture
def impatient_cache(tmp_path: Path, package_internet: PackageInternet) -> Iterator[PackageCache]:
    """A cache that gives up on an upstream silent for a second."""
    yield from make_cache(tmp_path, package_internet, {"timeouts": {"idle": 1}})


def test_stalled_upstream_fails_the_package_and_stores_nothing(
    impatient_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    netns, upstream = impatient_cache.netns, impatient_cache.internet.upstream
    assert cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")[0] == 200
    upstream.stall["/" + package_set.lib.filename] = 5
    path = C7_PATH + world.repos[C7_OS].packages[package_set.lib.filename]
    status, _, body = cache_get(netns, VAULT, path)
    assert status in (502, 503) and package_set.lib.filename.encode() in body
    assert not impatient_cache.stored(package_set.lib)
    failed = impatient_cache.events("content_fetch_failed")
    assert len(failed) == 1 and failed[0]["digest"] == f"sha256:{package_set.lib.sha256}"
    # The upstream speaks again: the next request fetches and verifies it.
    del upstream.stall["/" + package_set.lib.filename]
    status, _, body = cache_get(netns, VAULT, path)
    assert (status, body) == (200, package_set.lib.path.read_bytes())
    assert impatient_cache.stored(package_set.lib)


@pytest.fixture
def small_disk_cache(tmp_path: Path, package_internet: PackageInternet) -> Iterator[PackageCache]:
    """A cache whose store is a 3 MB tmpfs: room for the metadata, not for a big package."""
    with tmpfs(tmp_path / "store", "3m"):
        yield from make_cache(tmp_path, package_internet)


def test_disk_full_mid_package_cuts_the_client_short_and_stores_nothing(
    small_disk_cache: PackageCache, package_set: PackageSet, world: World
) -> None:
    netns = small_disk_cache.netns
    assert cache_get(netns, VAULT, C7_PATH + "repodata/repomd.xml")[0] == 200
    big = package_set.big[2]
    path = C7_PATH + world.repos[C7_OS].packages[big.filename]
    # The store takes bytes as they land: the disk fills mid-download, so the client's
    # response (200, sent as bytes arrived) is cut short before its end.
    with pytest.raises(http.client.IncompleteRead):
        cache_get(netns, VAULT, path)
    assert not small_disk_cache.stored(big)
    failed = small_disk_cache.events("store_write_failed")
    assert len(failed) == 1 and big.sha256 in str(failed[0]["digest"])
    assert not [p for p in (small_disk_cache.storage / "tmp").iterdir()]
    # What fits still does.
    small = C7_PATH + world.repos[C7_OS].packages[package_set.hello.filename]
    status, _, body = cache_get(netns, VAULT, small)
    assert (status, body) == (200, package_set.hello.path.read_bytes())
