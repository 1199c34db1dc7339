"""`serve` configuration: defaults, file, flags over file, every problem with file:line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dnsoverride.common.errors import ConfigError, UserError
from dnsoverride.common.grammar import Endpoint
from dnsoverride.dns.config import (
    AUTO_WORKERS_CAP,
    ProbeConfig,
    ServeConfig,
    ServeFlags,
    TcpConfig,
    fit_workers,
    load_config,
)


def args(config: str | None = None, **flags: object) -> tuple[Path | None, ServeFlags]:
    """The config path and the flags `load_config` takes, as the command line gives them."""
    repeated = {key: tuple(value) for key, value in flags.items() if isinstance(value, list)}
    return (Path(config) if config else None), ServeFlags(**{**flags, **repeated})  # type: ignore[arg-type]


def test_embedded_defaults(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nsearch x\n")
    config = load_config(*args(), resolv_conf=resolv)
    assert config.listen == (Endpoint("127.0.0.1", 5353),)
    assert config.zones == Path("zones")
    assert config.upstreams == (Endpoint("192.0.2.53", 53), Endpoint("fe80::1%eth0", 53))
    assert ipaddress.ip_network("10.0.0.0/8") in config.allow
    assert ipaddress.ip_network("fc00::/7") in config.allow
    assert not any(ipaddress.ip_address("8.8.8.8") in net for net in config.allow)
    assert [view.name for view in config.views] == ["default"]
    assert config.views[0].zones is None
    assert config.timeout <= 2.0
    assert config.query_log is False


def test_file_then_flags(tmp_path: Path) -> None:
    (tmp_path / "myzones").mkdir()
    (tmp_path / "other").mkdir()
    path = tmp_path / "dnsoverride.yaml"
    path.write_text(
        "listen: ['[::1]:53', 127.0.0.1:53]\n"
        "zones: myzones\n"
        "upstreams: [192.0.2.1, '192.0.2.2:5353']\n"
        "allow: [10.0.0.0/8]\n"
        "views:\n"
        "  - {name: cache, clients: [10.0.0.5/32], zones: []}\n"
        "  - {name: ci, clients: [10.0.0.0/8], zones: [ci]}\n"
        "default_view: ci\n"
        "cache: {size: 5, min_ttl: 1, max_ttl: 60}\n"
        "timeout: 1.5\n"
        "query_log: true\n"
    )
    config = load_config(*args(config=str(path)))
    assert config.listen == (Endpoint("::1", 53), Endpoint("127.0.0.1", 53))
    assert config.zones == tmp_path / "myzones"
    assert config.upstreams == (Endpoint("192.0.2.1", 53), Endpoint("192.0.2.2", 5353))
    assert [(v.name, v.zones) for v in config.views] == [
        ("cache", frozenset()),
        ("ci", frozenset({"ci"})),
    ]
    assert config.default_view == "ci"
    assert (config.cache.size, config.cache.min_ttl, config.cache.max_ttl) == (5, 1, 60)
    assert config.attempt_timeout <= config.timeout == 1.5
    flagged = load_config(
        *args(
            config=str(path),
            listen=["127.0.0.2:5300"],
            upstream=["192.0.2.9"],
            zones=str(tmp_path / "other"),
        )
    )
    assert flagged.listen == (Endpoint("127.0.0.2", 5300),)
    assert flagged.upstreams == (Endpoint("192.0.2.9", 53),)
    assert flagged.zones == tmp_path / "other"
    assert flagged.default_view == "ci"  # the rest still from the file


def test_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "listen: [127.0.0.1]\n"
        "upstreams: [not-an-ip]\n"
        "allow: [10.0.0.0/33]\n"
        "cache: {size: 0, colour: red}\n"
        "timeout: fast\n"
        "views:\n"
        "  - {name: a, clients: [10.0.0.0/8], zones: nope}\n"
        "default_view: b\n"
        "bogus: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(*args(config=str(path)))
    problems = [str(problem) for problem in caught.value.problems]
    expected_lines = [1, 2, 3, 4, 4, 5, 7, 8, 9]
    file_problems = [p for p in problems if p.startswith(f"{path}:")]
    assert [int(p.split(":")[1]) for p in file_problems] == expected_lines
    assert "needs a port" in file_problems[0]
    assert "unknown key 'colour'" in " ".join(problems)
    assert "unknown key 'bogus'" in file_problems[-1]
    assert any("default_view 'b' is not one of the views" in p for p in problems)


def test_tuning_keys_defaults_and_values(tmp_path: Path) -> None:
    default = load_config(*args(upstream=["127.0.0.1:53"]))
    assert default.probe == ProbeConfig(interval=2.0, name="")
    assert default.tcp == TcpConfig(max_connections=512, pipeline=100, idle_timeout=10.0)
    assert default.failure_log_interval == 10.0
    assert default.cache.stale_reuse == 2.0
    assert default.cache.max_bytes == 64 << 20
    path = tmp_path / "tuned.yaml"
    path.write_text(
        "upstreams: [127.0.0.1]\n"
        "probe: {interval: 0.5, name: Example.COM.}\n"
        "failure_log_interval: 60\n"
        "tcp:\n"
        "  max_connections: 64\n"
        "  pipeline: 8\n"
        "  idle_timeout: 2.5\n"
        "cache: {stale_reuse: 0.5, size: 10, max_bytes: 1M}\n"
    )
    config = load_config(*args(config=str(path)))
    assert config.probe == ProbeConfig(interval=0.5, name="example.com")
    assert config.tcp == TcpConfig(max_connections=64, pipeline=8, idle_timeout=2.5)
    assert config.failure_log_interval == 60
    assert config.cache.stale_reuse == 0.5 and config.cache.size == 10
    assert config.cache.max_bytes == 1 << 20


def test_tuning_key_problems_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "upstreams: [127.0.0.1]\n"
        "probe:\n"
        "  interval: 0\n"
        "  name: 'bad..name'\n"
        "  when: always\n"
        "tcp:\n"
        "  max_connections: 0\n"
        "  pipeline: lots\n"
        "  idle_timeout: -1\n"
        "failure_log_interval: soon\n"
        "cache: {stale_reuse: 9999, max_bytes: 1K}\n"
        "tcp_extra: 1\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(*args(config=str(path)))
    problems = sorted(map(str, caught.value.problems), key=lambda p: int(p.split(":")[1]))
    assert [int(p.split(":")[1]) for p in problems] == [3, 4, 5, 7, 8, 9, 10, 11, 11, 12]
    text = "\n".join(problems)
    assert "probe: interval: expected a number from 0.1 to 3600" in problems[0]
    assert "probe: name:" in problems[1] and "empty label" in problems[1]
    assert "probe: unknown key 'when'" in problems[2]
    assert "max_connections: expected an integer from 1 to 65535" in problems[3]
    assert "idle_timeout" in problems[5]
    assert "failure_log_interval" in problems[6]
    assert "stale_reuse" in text
    assert "cache: max_bytes: '1K' is 1,024 bytes: expected 65,535 to" in text
    assert "unknown key 'tcp_extra'" in text


def test_settings_sections_must_be_mappings(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: [127.0.0.1]\ncache: 5\nprobe: [1]\ntcp: yes\n")
    with pytest.raises(ConfigError) as caught:
        load_config(*args(config=str(path)))
    assert sorted(map(str, caught.value.problems)) == [
        f"{path}:2: cache: expected a mapping with size, max_bytes, min_ttl, max_ttl, "
        "negative_max_ttl, stale_ttl, stale_reuse",
        f"{path}:3: probe: expected a mapping with interval, name",
        f"{path}:4: tcp: expected a mapping with max_connections, pipeline, idle_timeout, "
        "max_queued",
    ]


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listen: [127.0.0.1:53\n")
    with pytest.raises(ConfigError) as caught:
        load_config(*args(config=str(path)))
    assert str(caught.value.problems[0]).startswith(f"{path}:2: YAML syntax error")
    with pytest.raises(UserError, match="does not exist"):
        load_config(*args(config=str(tmp_path / "missing.yaml")))


def test_forwarding_to_ourselves_is_refused() -> None:
    with pytest.raises(ConfigError, match="is our own listening address"):
        load_config(*args(listen=["127.0.0.1:5300"], upstream=["127.0.0.1:5300"]))
    with pytest.raises(ConfigError, match=r"is our own listening address 0\.0\.0\.0:5300"):
        load_config(*args(listen=["0.0.0.0:5300"], upstream=["127.0.0.1:5300"]))
    # Another port on the same host is a different server.
    assert load_config(*args(listen=["127.0.0.1:5300"], upstream=["127.0.0.1:53"])).upstreams


def test_no_upstream_anywhere(tmp_path: Path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example\n")
    with pytest.raises(ConfigError, match="no upstream resolvers"):
        load_config(*args(), resolv_conf=empty)


def test_workers_auto_is_the_usable_cpus_capped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dnsoverride.yaml"
    # The affinity alone: a cgroup CPU limit of the machine running the tests would lower
    # the count (tests/dns/test_workers_auto.py covers that).
    monkeypatch.setattr("dnsoverride.common.cpus.cgroup_cpu_limit", lambda *_: None)
    for cpus, expected, why in (
        (range(1), 1, "1 usable CPU"),
        (range(3), 3, "3 usable CPUs"),
        (range(16), AUTO_WORKERS_CAP, "16 usable CPUs, at most 4"),
    ):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, cpus=cpus: set(cpus))
        path.write_text("workers: auto\nupstreams: [192.0.2.1]\n")
        config = load_config(*args(str(path)))
        assert (config.workers, config.workers_auto) == (expected, why)
        # auto is the default, in a file without `workers` and with no file at all
        path.write_text("upstreams: [192.0.2.1]\n")
        assert load_config(*args(str(path))).workers == expected
        default = load_config(*args(None, upstream=["192.0.2.1"]))
        assert (default.workers, default.workers_auto) == (expected, why)
        # --workers over the file, a number or auto
        path.write_text("workers: 2\nupstreams: [192.0.2.1]\n")
        assert load_config(path, ServeFlags(workers="auto")).workers == expected
        assert load_config(path, ServeFlags(workers="5")).workers_auto is None
    path.write_text("workers: 2\nupstreams: [192.0.2.1]\n")
    config = load_config(*args(str(path)))
    assert (config.workers, config.workers_auto) == (2, None)  # set, not derived
    assert load_config(path, ServeFlags(workers="7")).workers == 7
    with pytest.raises(ConfigError, match="--workers: expected an integer from 1 to 64 or auto"):
        load_config(path, ServeFlags(workers="0"))
    path.write_text("workers_auto: yes\nupstreams: [192.0.2.1]\n")  # derived, not a key
    with pytest.raises(ConfigError, match="workers_auto"):
        load_config(*args(str(path)))
    for bad in ("0", "65", "many", "true"):
        path.write_text(f"workers: {bad}\nupstreams: [192.0.2.1]\n")
        with pytest.raises(ConfigError) as raised:
            load_config(*args(str(path)))
        assert f"{path}:1: workers: expected an integer from 1 to 64 or auto" in str(raised.value)


def test_workers_auto_fits_a_large_zone_set() -> None:
    """Each process holds its own copy of the zones: `auto` keeps the copies beyond the
    first within `AUTO_EXTRA_NAMES` names; a number the config set is never lowered."""
    four = ServeConfig(workers=4, workers_auto="8 usable CPUs, at most 4")
    for names, expected in (
        (0, 4),
        (7, 4),
        (100_000, 4),
        (100_001, 3),
        (150_000, 3),
        (150_001, 2),
        (300_000, 2),
        (300_001, 1),
        (1_000_000, 1),
    ):
        assert fit_workers(four, names).workers == expected, names
    assert fit_workers(four, 100_000) is four  # nothing to say: the CPUs decided
    fitted = fit_workers(four, 1_000_000).workers_auto
    assert fitted == (
        "1,000,000 zone names, a copy in each process: the copies beyond the first hold at "
        "most 300,000 names (8 usable CPUs, at most 4)"
    )
    assert fit_workers(ServeConfig(workers=2, workers_auto="2 usable CPUs"), 250_000).workers == 2
    assert fit_workers(ServeConfig(workers=4), 1_000_000).workers == 4  # set by the admin
