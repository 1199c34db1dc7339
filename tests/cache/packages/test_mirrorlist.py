"""cache/packages/mirrorlist.py: what mirrorlist.centos.org answered, answered by the cache.

Every path of the `centos-vault` preset is checked against the vault layout of the
research note for issue 12 (§1.1: 6.10 with i386 in the main tree, 7.9.2009 with x86_64
only and the other arches under altarch/, 8.5.2111 and 8-stream as <Repo>/<arch>/os/);
unknown or missing values are 404s with a one-line reason and an access-log line.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dnsoverride.cache.app import Order, Route
from dnsoverride.cache.packages.config import MirrorlistConfig, MirrorRule
from dnsoverride.cache.packages.mirrorlist import Mirrorlist
from dnsoverride.cache.packages.refusal import NoAnswerError
from tests.support.cache_routes import get, serving
from tests.support.registry_peers import CacheProcess

VAULT = "http://vault.centos.org/"

# (release, repo, arch) -> the vault tree, as the research note lists them.
LAYOUT = [
    ("6", "os", "x86_64", "6.10/os/x86_64/"),
    ("6", "os", "i386", "6.10/os/i386/"),
    ("6", "updates", "i386", "6.10/updates/i386/"),
    ("6", "extras", "x86_64", "6.10/extras/x86_64/"),
    ("6", "centosplus", "x86_64", "6.10/centosplus/x86_64/"),
    ("6", "fasttrack", "x86_64", "6.10/fasttrack/x86_64/"),
    ("6", "sclo-rh", "x86_64", "6.10/sclo/x86_64/rh/"),
    ("6", "sclo-sclo", "i386", "6.10/sclo/i386/sclo/"),
    ("7", "os", "x86_64", "7.9.2009/os/x86_64/"),
    ("7", "updates", "x86_64", "7.9.2009/updates/x86_64/"),
    ("7", "extras", "x86_64", "7.9.2009/extras/x86_64/"),
    ("7", "centosplus", "x86_64", "7.9.2009/centosplus/x86_64/"),
    ("7", "fasttrack", "x86_64", "7.9.2009/fasttrack/x86_64/"),
    ("7", "cr", "x86_64", "7.9.2009/cr/x86_64/"),
    ("7", "sclo-rh", "x86_64", "7.9.2009/sclo/x86_64/rh/"),
    ("7", "sclo-sclo", "x86_64", "7.9.2009/sclo/x86_64/sclo/"),
    ("7", "os", "aarch64", "altarch/7.9.2009/os/aarch64/"),
    ("7", "updates", "aarch64", "altarch/7.9.2009/updates/aarch64/"),
    ("7", "os", "ppc64le", "altarch/7.9.2009/os/ppc64le/"),
    ("7", "extras", "ppc64", "altarch/7.9.2009/extras/ppc64/"),
    ("7", "os", "armhfp", "altarch/7.9.2009/os/armhfp/"),
    ("7", "os", "i386", "altarch/7.9.2009/os/i386/"),
    ("7", "sclo-rh", "aarch64", "altarch/7.9.2009/sclo/aarch64/rh/"),
    ("8", "BaseOS", "x86_64", "8.5.2111/BaseOS/x86_64/os/"),
    ("8", "baseos", "ppc64le", "8.5.2111/BaseOS/ppc64le/os/"),
    ("8", "AppStream", "aarch64", "8.5.2111/AppStream/aarch64/os/"),
    ("8", "PowerTools", "x86_64", "8.5.2111/PowerTools/x86_64/os/"),
    ("8", "extras", "x86_64", "8.5.2111/extras/x86_64/os/"),
    ("8", "centosplus", "x86_64", "8.5.2111/centosplus/x86_64/os/"),
    ("8", "fasttrack", "x86_64", "8.5.2111/fasttrack/x86_64/os/"),
    ("8", "cr", "x86_64", "8.5.2111/cr/x86_64/os/"),
    ("8", "Devel", "x86_64", "8.5.2111/Devel/x86_64/os/"),
    ("8", "HighAvailability", "x86_64", "8.5.2111/HighAvailability/x86_64/os/"),
    ("8-stream", "BaseOS", "x86_64", "8-stream/BaseOS/x86_64/os/"),
    ("8-stream", "appstream", "aarch64", "8-stream/AppStream/aarch64/os/"),
    ("8-stream", "PowerTools", "ppc64le", "8-stream/PowerTools/ppc64le/os/"),
    ("8-stream", "extras", "x86_64", "8-stream/extras/x86_64/os/"),
    ("8-stream", "centosplus", "x86_64", "8-stream/centosplus/x86_64/os/"),
    ("8-stream", "RT", "x86_64", "8-stream/RT/x86_64/os/"),
    ("8-stream", "HighAvailability", "x86_64", "8-stream/HighAvailability/x86_64/os/"),
    ("8-stream", "Devel", "x86_64", "8-stream/Devel/x86_64/os/"),
    # A pinned image may send the point release.
    ("7.9.2009", "os", "x86_64", "7.9.2009/os/x86_64/"),
    ("8.5.2111", "BaseOS", "x86_64", "8.5.2111/BaseOS/x86_64/os/"),
]


@pytest.mark.parametrize(("release", "repo", "arch", "path"), LAYOUT)
def test_vault_preset_follows_the_vault_layout(
    release: str, repo: str, arch: str, path: str
) -> None:
    assert Mirrorlist(MirrorlistConfig()).urls(release, repo, arch) == [VAULT + path]


@pytest.mark.parametrize(
    ("release", "repo", "arch", "reason"),
    [
        ("9", "os", "x86_64", "unknown release '9' (the vault preset knows 6, 7, 8, 8-stream)"),
        ("5", "os", "x86_64", "unknown release '5'"),
        ("7", "BaseOS", "x86_64", "unknown repo 'BaseOS' for release 7"),
        ("8", "os", "x86_64", "unknown repo 'os' for release 8"),
        ("7", "os", "s390x", "unknown arch 's390x' for release 7"),
        ("6", "os", "aarch64", "unknown arch 'aarch64' for release 6"),
        ("8", "BaseOS", "i386", "unknown arch 'i386' for release 8"),
        ("8-stream", "NFV", "x86_64", "unknown repo 'NFV' for release 8-stream"),
    ],
)
def test_vault_preset_unknowns(release: str, repo: str, arch: str, reason: str) -> None:
    with pytest.raises(NoAnswerError) as caught:
        Mirrorlist(MirrorlistConfig()).urls(release, repo, arch)
    assert str(caught.value).startswith(reason)


def test_rules_come_first_and_fill_their_templates() -> None:
    config = MirrorlistConfig(
        vault_url="http://vault.ci.example/centos-vault/",
        rules=(
            MirrorRule(
                ("http://mirror.ci.example/centos/$release/$repo/$basearch/",),
                releases=frozenset({"7"}),
                repos=frozenset({"os", "updates"}),
            ),
            MirrorRule(
                ("http://a.example/$release/$repo/$arch/", "http://b.example/$repo/$arch/"),
                arches=frozenset({"aarch64"}),
            ),
        ),
    )
    mirrorlist = Mirrorlist(config)
    assert mirrorlist.urls("7", "OS", "x86_64") == ["http://mirror.ci.example/centos/7/OS/x86_64/"]
    assert mirrorlist.urls("8", "BaseOS", "aarch64") == [
        "http://a.example/8/BaseOS/aarch64/",
        "http://b.example/BaseOS/aarch64/",
    ]
    # No rule matches: the preset, under the configured vault URL.
    assert mirrorlist.urls("7", "extras", "x86_64") == [
        "http://vault.ci.example/centos-vault/7.9.2009/extras/x86_64/"
    ]
    with pytest.raises(NoAnswerError, match="no mirrorlist rule for release=9"):
        Mirrorlist(MirrorlistConfig(preset=None)).urls("9", "os", "x86_64")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    mirrorlist = Mirrorlist(MirrorlistConfig())
    route = Route("mirrorlist", Order.MIRRORLIST, mirrorlist.handle)
    async with serving([route]) as url:
        yield url


@pytest.mark.parametrize(
    "query",
    [
        # CentOS 7's CentOS-Base.repo, with $infra set, and sent literally when unset.
        "/?release=7&arch=x86_64&repo=os&infra=stock",
        "/?release=7&arch=x86_64&repo=os&infra=$infra",
        # SCLo's form: no "/" before "?", another order; Fedora's /mirrorlist path; cc.
        "?arch=x86_64&release=7&repo=os",
        "/mirrorlist?release=7&arch=x86_64&repo=OS&cc=de",
    ],
)
async def test_the_forms_clients_send(base_url: str, query: str) -> None:
    assert await get(base_url + query) == (200, "text/plain", f"{VAULT}7.9.2009/os/x86_64/\n")


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("/?release=7&arch=x86_64", "repo not specified"),
        ("/?repo=os&arch=x86_64", "release not specified"),
        ("/?release=7&repo=os&arch=", "arch not specified"),
        ("/?release=9&arch=x86_64&repo=os", "unknown release '9'"),
        # A value that would add a line to the list (or change a URL's path) is refused.
        ("/?release=7%0Ahttp://evil.example/&arch=x86_64&repo=os", "invalid release"),
        ("/?release=7&arch=../x86_64&repo=os", "invalid arch '../x86_64'"),
        ("/centos/7/os/x86_64/repodata/repomd.xml", "no mirrorlist at /centos/7/os/x86_64/"),
    ],
)
async def test_no_answer_is_a_404_with_the_reason_logged(
    base_url: str, query: str, reason: str
) -> None:
    with capture_logs() as logs:
        status, content_type, body = await get(base_url + query)
    assert (status, content_type) == (404, "text/plain")
    assert body.startswith(reason) and body.endswith("\n") and body.count("\n") == 1
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert (line["log_level"], line["status"]) == ("warning", 404)
    assert (line["error_code"], line["error"]) == ("MIRRORLIST_UNKNOWN", body.strip())


def http_get(port: int, host: str, path: str) -> tuple[int, str]:
    """GET `path` from 127.0.0.1:`port` with the Host header `host` (the DNS override's
    effect): (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Host": host})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.e2e
def test_the_cache_answers_mirrorlist_centos_org(tmp_path: Path) -> None:
    """`dnsoverride cache` as a real process: Host mirrorlist.centos.org gets the list,
    with a configured rule ahead of the preset; its 404 is one access-log line."""
    config = {
        "packages": {
            "mirrorlist": {
                "rules": [
                    {"release": "7", "repo": "updates", "urls": ["http://m.ci.example/$repo/"]}
                ]
            }
        }
    }
    cache = CacheProcess(tmp_path / "store", "", config=config, command="cache").start()
    host = "mirrorlist.centos.org"
    try:
        assert http_get(cache.port, host, "/?release=7&arch=aarch64&repo=os") == (
            200,
            f"{VAULT}altarch/7.9.2009/os/aarch64/\n",
        )
        assert http_get(cache.port, host, "/?release=7&arch=x86_64&repo=updates") == (
            200,
            "http://m.ci.example/updates/\n",
        )
        status, body = http_get(cache.port, host, "/?release=42&arch=x86_64&repo=os")
        assert status == 404 and body.startswith("unknown release '42'")
        (line,) = cache.wait_log('"MIRRORLIST_UNKNOWN"')
        logged = json.loads(line)
        assert logged["path"] == "/?release=42&arch=x86_64&repo=os"
        assert logged["error"] == body.strip()
    finally:
        cache.stop()
