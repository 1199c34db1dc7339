"""The cache's one config file: shared settings at the top, a `registry:` and a
`packages:` section; a registry.yaml from before the sections keeps working, and both
forms in one file is a problem at file:line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.packages.config import PACKAGES_KEYS
from dnsoverride.cache.store import Budget
from dnsoverride.common.errors import ConfigError

SECTIONS = """\
listen: 127.0.0.1:5001
storage: {storage}
max_size: 2G
resolvers: [127.0.0.1:5353]
timeouts: {connect: 2s, idle: 10s}
registry:
  upstreams:
    - url: https://quay.io
    - url: https://ghcr.io
      aliases: [ghcr.example]
  default_upstream: ghcr.io
  tag_ttl: 1m
  clients:
    visibility_ttl: 10m
packages: {}
"""

# The same settings in the form from before the sections (registry keys at the top).
LEGACY = """\
listen: 127.0.0.1:5001
storage: {storage}
max_size: 2G
resolvers: [127.0.0.1:5353]
timeouts: {connect: 2s, idle: 10s}
upstreams:
  - url: https://quay.io
  - url: https://ghcr.io
    aliases: [ghcr.example]
default_upstream: ghcr.io
tag_ttl: 1m
clients:
  visibility_ttl: 10m
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{storage}", str(tmp_path / "store")))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        cache_config.load(path)
    return [str(problem) for problem in caught.value.problems]


def test_sections_form(tmp_path: Path) -> None:
    config = cache_config.load(write(tmp_path, "cache.yaml", SECTIONS))
    assert (config.host, config.port) == ("127.0.0.1", 5001)
    assert config.storage == tmp_path / "store"
    assert config.budget == Budget(2 << 30)
    assert (config.timeouts.connect, config.timeouts.idle) == (2.0, 10.0)
    assert [u.name for u in config.registry.upstreams] == ["quay.io", "ghcr.io"]
    assert config.registry.upstream("ghcr.io").aliases == ("ghcr.example",)
    assert config.registry.default_upstream == "ghcr.io"
    assert config.registry.tag_ttl == 60.0
    assert config.registry.clients.visibility_ttl == 600.0


def test_legacy_form_reads_as_the_registry_section(tmp_path: Path) -> None:
    """A registry.yaml from before the sections loads to the very same config."""
    legacy = cache_config.load(write(tmp_path, "registry.yaml", LEGACY))
    sections = cache_config.load(write(tmp_path, "cache.yaml", SECTIONS))
    assert legacy == sections


def test_both_forms_at_once_is_a_problem_at_each_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "cache.yaml", "tag_ttl: 1m\nregistry:\n  tag_ttl: 2m\nclients: {}\n")
    reason = (
        "a registry setting at the top level (the form from before the sections) beside a "
        "registry: section (line 2): move it into registry:"
    )
    assert problems(path) == [f"{path}:1: tag_ttl: {reason}", f"{path}:4: clients: {reason}"]


def test_problems_inside_sections_name_the_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cache.yaml",
        "registry:\n  tag_tll: 1m\n  upstreams:\n    - url: ftp://x\npackages:\n  mirorlist: {}\n",
    )
    found = problems(path)
    assert found[0] == f"{path}:2: registry: unknown key 'tag_tll' (did you mean 'tag_ttl'?)"
    assert found[1].startswith(f"{path}:4: registry: upstreams[0]: invalid upstream URL")
    assert found[2] == f"{path}:6: packages: unknown key 'mirorlist' (did you mean 'mirrorlist'?)"
    assert len(found) == 3


def test_a_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "cache.yaml", "registry: [1, 2]\npackages: yes\n")
    assert [line.split(": ", 1)[1] for line in problems(path)] == [
        "registry: expected a mapping with upstreams, default_upstream, tag_ttl, clients",
        "packages: expected a mapping with " + ", ".join(PACKAGES_KEYS),
    ]


@pytest.mark.e2e
def test_check_cache_config_and_its_old_name(tmp_path: Path) -> None:
    path = write(tmp_path, "cache.yaml", SECTIONS)
    for flag in ("--cache-config", "--registry-config"):
        result = subprocess.run(
            [sys.executable, "-m", "dnsoverride", "check", flag, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.startswith("ok: cache: listen 127.0.0.1:5001, 2 registry upstreams")


def test_package_rules_and_their_problems(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "cache.yaml",
        """\
packages:
  mirrorlist:
    preset: none
    vault_url: http://vault.ci.example/centos
    rules:
      - release: 7
        repo: [OS, updates]
        urls: ["http://m.ci.example/$release/$repo/$basearch/"]
      - arch: []
        urls: ["ftp://m.ci.example/", "http://m.ci.example/$os/"]
      - release: [true]
  metalink:
    hosts: [Mirrors.Example.org.]
    presets: [epel, rhel]
    rules:
      - repo: epel-9
        url: https://mirror.ci.example/epel/$arch/
      - repo: x
""",
    )
    found = [line.split(": ", 1)[1] for line in problems(path)]
    assert found == [
        "packages: mirrorlist: vault_url: 'http://vault.ci.example/centos' must end in '/' "
        "(a repository's base URL)",
        "packages: mirrorlist: rules[1]: arch: expected at least one name "
        "(leave the key out to match any)",
        "packages: mirrorlist: rules[1]: urls: expected an http(s):// URL, not 'ftp://m.ci.example/'",
        "packages: mirrorlist: rules[1]: urls: unknown variable $os in "
        "'http://m.ci.example/$os/' (known: $release, $repo, $arch, $basearch)",
        "packages: mirrorlist: rules[2]: 'urls' is required",
        "packages: mirrorlist: rules[2]: release: expected a name, not True",
        "packages: metalink: presets: unknown preset 'rhel' (known: centos-stream, epel, fedora)",
        "packages: metalink: rules[1]: 'url' is required",
    ]
    good = path.read_text().split("      - arch: []")[0] + "  metalink:\n    presets: [epel]\n"
    path.write_text(good.replace("/centos\n", "/centos/\n"))
    packages = cache_config.load(path).packages
    (rule,) = packages.mirrorlist.rules
    assert (rule.releases, rule.repos, rule.arches) == (
        frozenset({"7"}),
        frozenset({"os", "updates"}),
        None,
    )
    assert packages.mirrorlist.preset is None
    assert packages.mirrorlist.vault_url == "http://vault.ci.example/centos/"
    assert packages.metalink.presets == ("epel",)
    assert packages.metalink.hosts == ("mirrors.centos.org", "mirrors.fedoraproject.org")


def test_the_send_timeout(tmp_path: Path) -> None:
    """`timeouts.send`: how long a client may take no bytes of a response (serving.py)."""
    assert cache_config.load(None).timeouts.send == 60.0
    path = write(tmp_path, "cache.yaml", "timeouts: {send: 2m}\n")
    assert cache_config.load(path).timeouts.send == 120.0
    for bad in ("0.5s", "forever", "-1s"):
        path = write(tmp_path, "bad.yaml", f"timeouts:\n  send: {bad}\n")
        [problem] = problems(path)
        assert problem.startswith(f"{path}:2: timeouts: send: expected a number from 1 to "), (
            problem
        )
