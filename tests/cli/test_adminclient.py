"""Where `dnsoverride status` looks for the daemons: the cache daemon's packaged config
`cache.yaml` beside the `registry.yaml` of before it served packages, each listener asked
once. Fails before the merge of issue 12 with issue 14: only `registry.yaml` was read, and
a listener named by two configs was asked twice."""

from __future__ import annotations

from pathlib import Path

from dnsoverride import adminclient
from dnsoverride.cli import PACKAGED_CONFIGS, build_parser


def test_the_cache_daemon_is_found_by_its_config_and_its_old_name(tmp_path: Path) -> None:
    assert (
        Path("/etc/dnsoverride/dnsoverride.yaml"),
        Path("/etc/dnsoverride/cache.yaml"),
        Path("/etc/dnsoverride/registry.yaml"),
    ) == PACKAGED_CONFIGS
    cache = tmp_path / "cache.yaml"
    cache.write_text("listen: 0.0.0.0:5000\nmetrics: 127.0.0.1:9354\n")
    old = tmp_path / "registry.yaml"  # an upgrade copied it to cache.yaml and left it
    old.write_text("metrics: 127.0.0.1:9354\n")
    dns = tmp_path / "dnsoverride.yaml"
    dns.write_text("metrics: 127.0.0.1:9353\n")
    configs = [(dns, None), (cache, None), (old, None), (tmp_path / "absent.yaml", None)]
    found = adminclient.find([], configs)
    assert [(str(admin), admin.source) for admin in found] == [
        ("127.0.0.1:9353", str(dns)),
        ("127.0.0.1:9354", str(cache)),
    ]


def test_cache_config_and_its_old_name_are_one_option() -> None:
    parser = build_parser()
    for command in ("status", "check"):
        new = parser.parse_args([command, "--cache-config", "c.yaml"])
        old = parser.parse_args([command, "--registry-config", "c.yaml"])
        assert new.cache_config == old.cache_config == "c.yaml"
