"""The repository cache's keys of the `packages:` section: upstreams and metadata_ttl,
their defaults, and each bad value as a problem at file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.packages.repos_config import (
    BUILT_IN,
    RepositoriesConfig,
    RepositoryUpstream,
)
from dnsoverride.common.errors import ConfigError


def load(tmp_path: Path, packages: str) -> cache_config.CacheConfig:
    path = tmp_path / "cache.yaml"
    path.write_text(f"storage: {tmp_path / 'store'}\npackages:\n{packages}")
    return cache_config.load(path)


def test_defaults_serve_the_trees_the_presets_name(tmp_path: Path) -> None:
    repositories = load(tmp_path, "  metadata_ttl: 90s\n").packages.repositories
    assert repositories.metadata_ttl == 90
    assert repositories.upstreams == BUILT_IN
    by_name = {upstream.name: upstream for upstream in BUILT_IN}
    assert by_name["centos-vault"].hosts == {"vault.centos.org"}
    assert by_name["fedora"].prefix == "/pub/"
    assert by_name["centos-stream"].url == "https://mirror.stream.centos.org/"


def test_an_internal_mirror_stands_in_for_a_real_host(tmp_path: Path) -> None:
    text = (
        "  upstreams:\n"
        "    - name: vault\n"
        "      url: http://mirror.internal/centos-vault\n"
        "      hosts: [vault.centos.org, Vault.Example]\n"
        "      prefix: /\n"
        "    - name: epel\n"
        "      url: https://mirror.internal/epel/\n"
    )
    upstreams = load(tmp_path, text).packages.repositories.upstreams
    assert upstreams == (
        RepositoryUpstream(
            "vault", "http://mirror.internal/centos-vault/",
            frozenset({"vault.centos.org", "vault.example"}), "/",
        ),
        RepositoryUpstream("epel", "https://mirror.internal/epel/",
                           frozenset({"mirror.internal"}), "/epel/"),
    )  # fmt: skip


A = "  upstreams:\n    - name: a\n      url: http://a.example/\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("  metadata_ttl: forever\n", "cache.yaml:3: packages: metadata_ttl: expected a number"),
        (
            "  upstreams:\n    - url: http://a.example/\n",
            "cache.yaml:4: packages: upstreams[0]: 'name' is required",
        ),
        (A.replace("name: a", "name: A B"), "invalid upstream name 'A B'"),
        (A.replace("http:", "ftp:"), "invalid upstream URL 'ftp://a.example/'"),
        (A + "      hosts: [a_b]\n", "invalid host 'a_b'"),
        (A + "      prefix: pub\n", "invalid prefix 'pub'"),
        (
            A + "    - name: a\n      url: http://b.example/\n",
            "cache.yaml:6: packages: upstreams[1]: name 'a' is taken (line 4)",
        ),
        (
            A + "    - name: b\n      url: http://c.example/\n      hosts: [a.example]\n",
            "cache.yaml:6: packages: upstreams[1]: a.example/ is taken (line 4)",
        ),
        (A + "      mirror: x\n", "unknown key 'mirror'"),
    ],
)
def test_bad_values_are_problems_at_their_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)


def test_the_packaged_config_spells_out_the_defaults() -> None:
    packaged = Path(__file__).resolve().parents[3] / "packaging" / "config" / "cache.yaml"
    repositories = cache_config.load(packaged).packages.repositories
    assert repositories == RepositoriesConfig()
    assert repositories.upstreams == BUILT_IN
