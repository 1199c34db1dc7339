"""cache/packages/metalink.py: the metalink 3.0 answer describes the repomd.xml the cache
serves: exact size, mm0:timestamp = the newest <data> timestamp (yum compares it), sha256
and sha512 (librepo checks the strongest), older snapshots as mm0:alternates, URLs at
the upstream's overridden host. Parsed back here the way yum (namespaces) and librepo
(literal `mm0:` names) read it; preset base URLs checked against the research note's
upstream layouts (§6); unknown repo/arch a 404 with its reason logged.

The repository cache is stood in for by a tiny in-test source (the e2e with dnf and the
real repository cache lives with repos.py's tests).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
from structlog.testing import capture_logs

from dnsoverride.cache.app import Order, Route
from dnsoverride.cache.fetch import FetchError
from dnsoverride.cache.packages.config import MetalinkConfig, MetalinkRule
from dnsoverride.cache.packages.metalink import (
    CONTENT_TYPE,
    Metalink,
    metalink_document,
    repomd_timestamp,
)
from dnsoverride.cache.packages.refusal import NoAnswerError
from dnsoverride.cli import main
from tests.support.cache_routes import get
from tests.support.cache_routes import serving as serving_routes
from tests.support.registry_peers import CacheProcess

ML = "{http://www.metalinker.org/}"
MM0 = "{http://fedorahosted.org/mirrormanager}"
TYPES = (
    "primary",
    "filelists",
    "other",
    "primary_db",
    "filelists_db",
    "other_db",
    "group",
    "group_gz",
    "updateinfo",
    "modules",
)


def repomd(revision: int, newest: int) -> bytes:
    """A repomd.xml as createrepo_c writes it (10 data entries, ~6 KiB), whose newest data
    timestamp is `newest` and not the last entry's."""
    entries = []
    for index, kind in enumerate(TYPES):
        digest = hashlib.sha256(f"{revision}-{kind}".encode()).hexdigest()
        stamp = newest if kind == "filelists" else newest - 100 - index
        entries.append(
            f'  <data type="{kind}">\n'
            f'    <checksum type="sha256">{digest}</checksum>\n'
            f'    <open-checksum type="sha256">{digest[::-1]}</open-checksum>\n'
            f'    <location href="repodata/{digest}-{kind}.xml.gz"/>\n'
            f"    <timestamp>{stamp}</timestamp>\n"
            f"    <size>{1000 + index}</size>\n"
            f"    <open-size>{9000 + index}</open-size>\n"
            "  </data>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<repomd xmlns="http://linux.duke.edu/metadata/repo" '
        'xmlns:rpm="http://linux.duke.edu/metadata/rpm">\n'
        f"  <revision>{revision}</revision>\n" + "".join(entries) + "</repomd>\n"
    ).encode()


@dataclass(frozen=True)
class Version:
    body: bytes


class Source:
    """The repository cache, stood in for: one repository's served repomd.xml versions."""

    def __init__(self, versions: dict[str, list[bytes]], down: bool = False) -> None:
        self.versions = versions
        self.down = down
        self.asked: list[str] = []

    async def served_repomd(self, url: str) -> tuple[Version, Sequence[Version]] | None:
        self.asked.append(url)
        if self.down:
            raise FetchError("upstream unreachable and nothing cached", status=503)
        if url not in self.versions:
            return None
        current, *previous = self.versions[url]
        return Version(current), [Version(body) for body in previous]


EPEL9 = "https://dl.fedoraproject.org/pub/epel/9/Everything/x86_64/"
STREAM = "https://mirror.stream.centos.org/"
PUB = "https://dl.fedoraproject.org/pub/"


@pytest.mark.parametrize(
    ("repo", "arch", "base"),
    [
        ("centos-baseos-9-stream", "x86_64", f"{STREAM}9-stream/BaseOS/x86_64/os/"),
        ("centos-appstream-9-stream", "aarch64", f"{STREAM}9-stream/AppStream/aarch64/os/"),
        ("centos-crb-9-stream", "x86_64", f"{STREAM}9-stream/CRB/x86_64/os/"),
        (
            "centos-highavailability-9-stream",
            "x86_64",
            f"{STREAM}9-stream/HighAvailability/x86_64/os/",
        ),
        ("centos-nfv-9-stream", "x86_64", f"{STREAM}9-stream/NFV/x86_64/os/"),
        ("centos-rt-9-stream", "x86_64", f"{STREAM}9-stream/RT/x86_64/os/"),
        (
            "centos-resilientstorage-9-stream",
            "ppc64le",
            f"{STREAM}9-stream/ResilientStorage/ppc64le/os/",
        ),
        ("centos-baseos-10-stream", "x86_64", f"{STREAM}10-stream/BaseOS/x86_64/os/"),
        ("CentOS-BaseOS-10-Stream", "s390x", f"{STREAM}10-stream/BaseOS/s390x/os/"),
        ("centos-baseos-debug-9-stream", "x86_64", f"{STREAM}9-stream/BaseOS/x86_64/debug/tree/"),
        ("centos-appstream-source-9-stream", "source", f"{STREAM}9-stream/AppStream/source/tree/"),
        (
            "centos-extras-sig-extras-common-9-stream",
            "x86_64",
            f"{STREAM}SIGs/9-stream/extras/x86_64/extras-common/",
        ),
        ("epel-9", "x86_64", EPEL9),
        ("epel-8", "aarch64", f"{PUB}epel/8/Everything/aarch64/"),
        ("epel-debug-9", "x86_64", f"{PUB}epel/9/Everything/x86_64/debug/"),
        ("epel-source-9", "source", f"{PUB}epel/9/Everything/source/tree/"),
        ("epel-next-9", "x86_64", f"{PUB}epel/next/9/Everything/x86_64/"),
        ("epel-7", "x86_64", f"{PUB}archive/epel/7/x86_64/"),
        ("epel-10.0", "x86_64", f"{PUB}epel/10.0/Everything/x86_64/"),
        ("fedora-41", "x86_64", f"{PUB}fedora/linux/releases/41/Everything/x86_64/os/"),
        ("updates-released-f41", "x86_64", f"{PUB}fedora/linux/updates/41/Everything/x86_64/"),
        (
            "updates-testing-f41",
            "aarch64",
            f"{PUB}fedora/linux/updates/testing/41/Everything/aarch64/",
        ),
    ],
)
def test_presets_follow_the_upstream_layouts(repo: str, arch: str, base: str) -> None:
    assert Metalink(MetalinkConfig(), Source({})).base_url(repo, arch) == base


@pytest.mark.parametrize(
    "repo",
    [
        "centos-foo-9-stream",
        "centos-baseos-8-stream",
        "centos-powertools-9-stream",
        "epel-6",
        "fedora-rawhide",
        "updates-released-41",
        "fedora41",
    ],
)
def test_unknown_repos(repo: str) -> None:
    with pytest.raises(NoAnswerError, match=f"repo = {repo} arch = x86_64 error: invalid repo"):
        Metalink(MetalinkConfig(), Source({})).base_url(repo, "x86_64")


def test_rules_come_first_and_presets_can_be_turned_off() -> None:
    rule = MetalinkRule("https://mirror.ci.example/epel/$arch/", repos=frozenset({"epel-9"}))
    config = MetalinkConfig(rules=(rule,), presets=("fedora",))
    metalink = Metalink(config, Source({}))
    assert metalink.base_url("EPEL-9", "aarch64") == "https://mirror.ci.example/epel/aarch64/"
    assert metalink.base_url("fedora-41", "x86_64").endswith("/releases/41/Everything/x86_64/os/")
    with pytest.raises(NoAnswerError):
        metalink.base_url("centos-baseos-9-stream", "x86_64")


def test_the_document_describes_the_served_repomd() -> None:
    current, older = repomd(3, 1795969700), repomd(2, 1795969600)
    assert len(current) > 4096
    text = metalink_document((Version(current), [Version(older)]), [EPEL9 + "repodata/repomd.xml"])
    # yum reads it with namespaces ...
    root = ElementTree.fromstring(text)
    assert root.tag == f"{ML}metalink" and root.get("version") == "3.0"
    (file,) = root.iter(f"{ML}file")
    assert file.get("name") == "repomd.xml"
    assert file.findtext(f"{MM0}timestamp") == "1795969700"
    assert file.findtext(f"{ML}size") == str(len(current))
    hashes = {h.get("type"): h.text for h in file.find(f"{ML}verification") or []}
    assert hashes == {
        "sha256": hashlib.sha256(current).hexdigest(),
        "sha512": hashlib.sha512(current).hexdigest(),
    }
    (alternate,) = file.iter(f"{MM0}alternate")
    assert alternate.findtext(f"{MM0}timestamp") == "1795969600"
    assert alternate.findtext(f"{ML}size") == str(len(older))
    older_hashes = {h.get("type"): h.text for h in alternate.iter(f"{ML}hash")}
    assert older_hashes["sha512"] == hashlib.sha512(older).hexdigest()
    (url,) = file.iter(f"{ML}url")
    assert url.text == EPEL9 + "repodata/repomd.xml"
    assert (url.get("protocol"), url.get("type")) == ("https", "https")
    # ... librepo by literal qualified names: the prefix must be exactly `mm0`.
    assert "<mm0:timestamp>1795969700</mm0:timestamp>" in text
    assert "<mm0:alternates>" in text and text.count("<metalink ") == 1


def test_yums_checks_pass() -> None:
    """yum (metalink.py, _checkRepoXMLMetalink): timestamp == the repomd's (max data
    timestamp), length == size, every hash type both know matches."""
    body = repomd(7, 1700000000)
    root = ElementTree.fromstring(metalink_document((Version(body), []), [EPEL9]))
    (file,) = root.iter(f"{ML}file")
    assert int(file.findtext(f"{MM0}timestamp") or 0) == repomd_timestamp(body) == 1700000000
    assert int(file.findtext(f"{ML}size") or 0) == len(body)
    for hash_element in file.iter(f"{ML}hash"):
        assert hash_element.text == hashlib.new(hash_element.get("type") or "", body).hexdigest()
    assert root.find(f".//{MM0}alternates") is None


@pytest.fixture
async def serving() -> AsyncIterator[tuple[str, Source]]:
    source = Source({EPEL9: [repomd(5, 1795969900), repomd(4, 1795969800)]})
    route = Route("metalink", Order.METALINK, Metalink(MetalinkConfig(), source).handle)
    async with serving_routes([route]) as base_url:
        yield base_url, source


async def test_epel_9_metalink_as_dnf_asks_it(serving: tuple[str, Source]) -> None:
    base_url, source = serving
    query = "/metalink?repo=epel-9&arch=x86_64&infra=stock&content=centos&countme=2"
    status, content_type, text = await get(base_url + query)
    assert (status, content_type) == (200, CONTENT_TYPE)
    assert source.asked == [EPEL9]
    file = next(ElementTree.fromstring(text).iter(f"{ML}file"))
    served = source.versions[EPEL9][0]
    assert file.findtext(f"{ML}size") == str(len(served))
    assert hashlib.sha512(served).hexdigest() in text


@pytest.mark.parametrize(
    ("query", "status", "code", "reason"),
    [
        (
            "/metalink?repo=epel-6&arch=x86_64",
            404,
            "METALINK_UNKNOWN",
            "repo = epel-6 arch = x86_64 error: invalid repo or arch",
        ),
        ("/metalink?repo=epel-9", 404, "METALINK_UNKNOWN", "arch not specified"),
        ("/metalink?arch=x86_64", 404, "METALINK_UNKNOWN", "repo not specified"),
        (
            "/metalink?repo=epel-9&arch=x86_64/../../x",
            404,
            "METALINK_UNKNOWN",
            "invalid arch 'x86_64/../../x'",
        ),
        (
            "/metalink?repo=epel-8&arch=x86_64",
            404,
            "METALINK_UNKNOWN",
            f"no upstream repository is configured for {PUB}epel/8/Everything/x86_64/",
        ),
        (
            "/repodata/repomd.xml?repo=epel-9&arch=x86_64",
            404,
            "METALINK_UNKNOWN",
            "no metalink at /repodata/repomd.xml: ask /metalink?repo=R&arch=A",
        ),
        ("/mirrorlist?repo=epel-6&arch=x86_64", 404, "METALINK_UNKNOWN", "repo = epel-6 arch"),
    ],
)
async def test_no_answer_is_a_404_with_the_reason_logged(
    serving: tuple[str, Source], query: str, status: int, code: str, reason: str
) -> None:
    base_url, _ = serving
    with capture_logs() as logs:
        answered, content_type, body = await get(base_url + query)
    assert (answered, content_type) == (status, "text/plain")
    assert body.startswith(reason) and body.count("\n") == 1
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert (line["status"], line["error_code"], line["error"]) == (status, code, body.strip())


async def test_the_mirrorlist_form_answers_the_base_url(serving: tuple[str, Source]) -> None:
    """`mirrorlist=https://mirrors.fedoraproject.org/mirrorlist?repo=epel-9&arch=...`
    (older repo files) gets the repository's base URL, one line, without asking the
    repository cache."""
    base_url, source = serving
    answer = await get(base_url + "/mirrorlist?repo=epel-9&arch=x86_64")
    assert answer == (200, "text/plain", EPEL9 + "\n")
    assert source.asked == []


async def test_nothing_to_serve_is_a_503_with_the_reason(serving: tuple[str, Source]) -> None:
    base_url, source = serving
    source.down = True
    with capture_logs() as logs:
        status, _, body = await get(base_url + "/metalink?repo=epel-9&arch=x86_64")
    assert (status, body) == (503, f"{EPEL9}: upstream unreachable and nothing cached\n")
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["error_code"] == "UNAVAILABLE"


@pytest.mark.e2e
def test_the_cache_answers_the_metalink_hosts_over_https(tmp_path: Path) -> None:
    """`dnsoverride cache` as a real process with a certificate from `ca issue
    --from-zones` over the shipped example zones: a client trusting only that CA reaches
    mirrors.fedoraproject.org and mirrors.centos.org by SNI and Host; an unknown repo is
    MirrorManager's 404 with its reason, in the access log."""
    root = Path(__file__).resolve().parents[3]
    ca_dir = tmp_path / "ca"
    assert main(["ca", "init", "--dir", str(ca_dir)]) == 0
    out = tmp_path / "cache"
    command = ["ca", "issue", "--dir", str(ca_dir), "--from-zones", str(root / "zones")]
    assert main([*command, "--cache-address", "127.0.0.1", "--out", str(out)]) == 0
    config = {"tls": {"cert": f"{out}.crt", "key": f"{out}.key"}}
    cache = CacheProcess(tmp_path / "store", "", config=config, command="cache").start()
    context = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    try:
        for host in ("mirrors.fedoraproject.org", "mirrors.centos.org"):
            status, body = https_get(cache.port, host, "/metalink?repo=epel-6&arch=x86_64", context)
            assert (status, body) == (
                404,
                "repo = epel-6 arch = x86_64 error: invalid repo or arch\n",
            )
        line = cache.wait_log('"METALINK_UNKNOWN"')[0]
        assert json.loads(line)["path"] == "/metalink?repo=epel-6&arch=x86_64"
        # The same listener, another name of the certificate: the mirror list.
        status, body = https_get(
            cache.port, "mirrorlist.centos.org", "/?release=8&arch=aarch64&repo=BaseOS", context
        )
        assert (status, body) == (200, "http://vault.centos.org/8.5.2111/BaseOS/aarch64/os/\n")
    finally:
        cache.stop()


def https_get(port: int, host: str, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    """GET over TLS to 127.0.0.1:`port` as the client of `host` would (SNI and Host)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        connection._tunnel_host = None  # type: ignore[attr-defined]  # no CONNECT tunnel
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        connection.sock = context.wrap_socket(sock, server_hostname=host)
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()
