"""One config idiom and one grammar for both daemons: each message class names file:line
and the key, or the flag; `check` validates every config it is given.

Before this, serve refused `--upstream localhost:53` with "bad address" while the registry
had its own parser, `--listen 5353` said it "needs a port", `timeout: 2s` (serve) and
`tag_ttl: 5m` (registry) were refused, `--max-size 20` was a 20-byte budget, `0` no
budget at all, `20GB` 20 GiB, and the registry stopped at its first problem, with no line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dnsoverride.cache import config as cache_config
from dnsoverride.cache.config import CacheFlags
from dnsoverride.common.errors import ConfigError
from dnsoverride.common.grammar import (
    DNS_LISTENER,
    HTTP_LISTENER,
    RESOLVER,
    Endpoint,
    GrammarError,
    parse_duration,
    parse_endpoint,
    parse_size,
)
from dnsoverride.dns.config import ServeFlags, load_config


def problems(error: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [str(problem) for problem in error.value.problems]


def serve_problems(path: Path | None = None, **flags: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, ServeFlags(**flags))  # type: ignore[arg-type]
    return problems(caught)


def registry_problems(path: Path | None = None, **flags: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        cache_config.load(path, CacheFlags(**flags))
    return problems(caught)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "rule", "expected"),
    [
        ("127.0.0.1:53", DNS_LISTENER, Endpoint("127.0.0.1", 53)),
        ("[::1]:5353", DNS_LISTENER, Endpoint("::1", 5353)),
        (":5000", HTTP_LISTENER, Endpoint("0.0.0.0", 5000)),
        ("localhost:5000", HTTP_LISTENER, Endpoint("localhost", 5000)),
        ("192.0.2.53", RESOLVER, Endpoint("192.0.2.53", 53)),
        ("fe80::1%eth0", RESOLVER, Endpoint("fe80::1%eth0", 53)),
        ("[fe80::1%eth0]:5353", RESOLVER, Endpoint("fe80::1%eth0", 5353)),
        ("2001:db8::53", RESOLVER, Endpoint("2001:db8::53", 53)),
    ],
)
def test_endpoint_grammar(text: str, rule: object, expected: Endpoint) -> None:
    assert parse_endpoint(text, rule) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "rule", "reason"),
    [
        ("5353", DNS_LISTENER, "'5353' is a port without a host: write HOST:PORT"),
        ("127.0.0.1", DNS_LISTENER, "'127.0.0.1' needs a port (HOST:PORT)"),
        ("localhost:53", RESOLVER, "'localhost:53' names a host: a DNS resolver is given by IP"),
        ("localhost:53", DNS_LISTENER, "names a host: a DNS listener binds one IP address"),
        ("127.0.0.1:65536", DNS_LISTENER, "bad port in '127.0.0.1:65536'"),
        (":53", RESOLVER, "':53' has no host"),
        ("[10.0.0.1]:53", RESOLVER, "brackets are for IPv6 addresses only"),
        ("300.1.1.1:53", HTTP_LISTENER, "'300.1.1.1' is neither an IP address nor a host name"),
        ("10.0.0.1%eth0", RESOLVER, "neither an IP address nor a host name"),
    ],
)
def test_endpoint_grammar_refusals_say_why(text: str, rule: object, reason: str) -> None:
    with pytest.raises(GrammarError) as caught:
        parse_endpoint(text, rule)  # type: ignore[arg-type]
    assert reason in str(caught.value)


def test_durations() -> None:
    texts = ("5", "5s", "500ms", "1m", "1h", " 2.5s ", "7d")
    assert [parse_duration(text) for text in texts] == [5.0, 5.0, 0.5, 60.0, 3600.0, 2.5, 604800.0]
    assert parse_duration(3) == 3.0
    for bad in ("fast", "5w", "-1s", True, [1]):
        with pytest.raises(GrammarError, match=r"expected a duration \(5 or 5s, 500ms"):
            parse_duration(bad)


def test_sizes_binary_decimal_and_bare() -> None:
    gib = 1 << 30
    assert parse_size("20G") == parse_size("20GiB") == parse_size("20 gib") == 20 * gib
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("512M") == 512 << 20 and parse_size("512MB") == 512 * 10**6
    assert parse_size("64K") == 65536 and parse_size("1T") == 1 << 40
    assert parse_size("1000B") == 1000
    assert parse_size("1000", unit_required=False) == parse_size(1000, unit_required=False) == 1000
    with pytest.raises(GrammarError, match=r"'20' has no unit: write 20G \(GiB\), 20GB"):
        parse_size("20")
    with pytest.raises(GrammarError, match="expected a size"):
        parse_size("20 gigs")


def test_serve_flags_are_named_in_their_problems() -> None:
    found = serve_problems(listen=("5353",), upstream=("localhost:53",), metrics="nowhere")
    assert found == [
        "--listen: '5353' is a port without a host: write HOST:PORT, e.g. 127.0.0.1:5353 "
        "(one address) or 0.0.0.0:5353 (every IPv4 address)",
        "--metrics: 'nowhere' needs a port (HOST:PORT)",
        "--upstream: 'localhost:53' names a host: a DNS resolver is given by IP address "
        "(looking its name up would need a resolver already, possibly this one)",
    ]


def test_serve_file_problems_name_file_line_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dnsoverride.yaml",
        "upstreams: [localhost]\n"
        "listen: 5353\n"
        "tiemout: 2s\n"
        "cache: {min_ttl: 500ms, max_bytes: 67108864}\n"
        "tcp:\n"
        "  max_queued: 10K\n",
    )
    assert serve_problems(path) == [
        f"{path}:1: upstreams: 'localhost' names a host: a DNS resolver is given by IP "
        "address (looking its name up would need a resolver already, possibly this one)",
        f"{path}:2: listen: '5353' is a port without a host: write HOST:PORT, "
        "e.g. 127.0.0.1:5353 (one address) or 0.0.0.0:5353 (every IPv4 address)",
        f"{path}:3: unknown key 'tiemout' (did you mean 'timeout'?)",
        f"{path}:4: cache: max_bytes: 67108864 has no unit: write 67108864G (GiB), "
        "67108864GB (10^9 bytes), 67108864M, ... (a bare number would be 67108864 bytes)",
        f"{path}:4: cache: min_ttl: expected a number from 0 to 2147483647 whole seconds, "
        "not '500ms'",
        f"{path}:6: tcp: max_queued: '10K' is 10,240 bytes: expected 65,537 to 1,073,741,824",
    ]


def test_serve_takes_durations_and_sizes_with_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dnsoverride.yaml",
        "upstreams: [192.0.2.53]\n"
        "timeout: 2s\n"
        "attempt_timeout: 500ms\n"
        "reload_interval: 1m\n"
        "cache: {max_ttl: 1h, stale_reuse: 1500ms, max_bytes: 16M}\n"
        "tcp: {idle_timeout: 5s, max_queued: 1M}\n"
        "probe: {interval: 2s}\n",
    )
    config = load_config(path)
    assert (config.timeout, config.attempt_timeout, config.reload_interval) == (2.0, 0.5, 60.0)
    assert (config.cache.max_ttl, config.cache.stale_reuse) == (3600, 1.5)
    assert config.cache.max_bytes == 16 << 20
    assert (config.tcp.idle_timeout, config.tcp.max_queued) == (5.0, 1 << 20)
    assert config.probe.interval == 2.0


def test_registry_reports_every_problem_with_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "registry.yaml",
        "listen: 5000\n"
        "max_size: 20\n"
        "tag_ttl: soon\n"
        "timeouts: {connect: 2s, idel: 5}\n"
        "upstreams:\n"
        "  - {url: 'ftp://x'}\n"
        "  - {name: quay.io}\n"
        "resolvers: [localhost]\n"
        "clients: {visibility_ttl: 1m, colour: red}\n",
    )
    assert registry_problems(path) == [
        f"{path}:1: listen: '5000' is a port without a host: write HOST:PORT, "
        "e.g. 127.0.0.1:5000 (one address) or 0.0.0.0:5000 (every IPv4 address)",
        f"{path}:2: max_size: 20 has no unit: write 20G (GiB), 20GB (10^9 bytes), 20M, "
        "... (a bare number would be 20 bytes)",
        f"{path}:3: tag_ttl: expected a number from 0 to 2592000 seconds (a duration: 5 or "
        "5s, 500ms, 1m, 1h, 7d), not 'soon'",
        f"{path}:4: timeouts: unknown key 'idel' (did you mean 'idle'?)",
        f"{path}:6: upstreams[0]: invalid upstream URL 'ftp://x' (expected http(s)://host[:port])",
        f"{path}:7: upstreams[1]: 'url' is required",
        f"{path}:8: resolvers: 'localhost' names a host: a DNS resolver is given by IP address "
        "(looking its name up would need a resolver already, possibly this one)",
        f"{path}:9: clients: unknown key 'colour' (known: htpasswd, grants, require_auth, "
        "visibility_ttl)",
    ]


def test_registry_budget_flag() -> None:
    def budget(text: str) -> int:
        loaded = cache_config.load(None, CacheFlags(max_size=text)).budget
        assert loaded is not None
        return loaded.max_size

    assert budget("20GB") == 20 * 10**9
    assert budget("20G") == budget("20GiB") == 20 << 30
    assert registry_problems(max_size="20") == [
        "--max-size: '20' has no unit: write 20G (GiB), 20GB (10^9 bytes), 20M, ... "
        "(a bare number would be 20 bytes)"
    ]
    for zero in ("0", "0G"):
        assert registry_problems(max_size=zero) == [
            "--max-size: a budget of 0 would hold nothing: leave max_size out for no limit"
        ]


def test_registry_takes_durations_with_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "registry.yaml",
        "tag_ttl: 5m\ntimeouts: {connect: 500ms, idle: 1m}\nclients: {visibility_ttl: 1h}\n",
    )
    config = cache_config.load(path)
    assert config.registry.tag_ttl == 300.0
    assert (config.timeouts.connect, config.timeouts.idle) == (0.5, 60.0)
    assert config.registry.clients.visibility_ttl == 3600.0


def test_watermarks_without_a_budget_are_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "registry.yaml", "high_watermark: 0.9\nlow_watermark: 2\n")
    assert registry_problems(path) == [
        f"{path}:1: high_watermark: applies to max_size, which is not set (no budget: no eviction)",
        f"{path}:2: low_watermark: expected a fraction above 0 and at most 1, not 2",
    ]


def run_check(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnsoverride", "check", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.e2e
def test_check_validates_the_registry_config(tmp_path: Path) -> None:
    bad = write(tmp_path, "registry.yaml", "max_size: 0\ntls: {listen: '127.0.0.1:8443'}\n")
    result = run_check("--registry-config", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{bad}:1: max_size: a budget of 0 would hold nothing: leave max_size out for no limit",
        f"{bad}:2: tls: listen: needs a certificate (cert/key or certificates)",
    ]
    assert result.stdout == ""
    good = write(tmp_path, "good.yaml", "listen: 127.0.0.1:5001\nmax_size: 10G\n")
    result = run_check("--registry-config", str(good))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("ok: cache: listen 127.0.0.1:5001, 1 registry upstreams")
    # --registry-config is the name from before the cache served packages: the same check.
    assert run_check("--cache-config", str(good)).stdout == result.stdout


@pytest.mark.e2e
def test_check_with_both_configs_reports_both(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text("records:\n  a.test: {A: 10.0.0.1}\n")
    serve = write(
        tmp_path, "dnsoverride.yaml", "upstreams: [192.0.2.53]\ntimeout: 2 s\nworkers: 3\n"
    )
    registry = write(tmp_path, "registry.yaml", "tag_ttl: 5 min\n")
    result = run_check(
        "--config", str(serve), "--zones", str(zones), "--registry-config", str(registry)
    )
    assert result.returncode == 1
    assert result.stdout == (
        "ok: serve: 1 zone files, 1 names, 1 views, upstreams 192.0.2.53:53, workers 3\n"
    )
    assert result.stderr.splitlines() == [
        f"{registry}:1: tag_ttl: expected a number from 0 to 2592000 seconds (a duration: 5 "
        "or 5s, 500ms, 1m, 1h, 7d), not '5 min'"
    ]
    missing = run_check("--registry-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert (
        missing.stderr
        == f"dnsoverride: error: --cache-config {tmp_path / 'nope.yaml'}: does not exist\n"
    )
