"""The `health:` key in zone files: parsed with the zone, errors at file:line, gated names."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from dnsoverride.dns.zones.health import GatedOverride, HealthCheck
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.dns.zones.model import ZoneSet, ZoneSetError
from tests.support.transparent_certs import make_ca


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def test_health_key_is_parsed_and_listed(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    write(
        tmp_path,
        "ci.yaml",
        f"""\
        records:
          registry-1.docker.io:
            A: [10.0.0.5, 10.0.0.6]
            AAAA: fd00::5
            health:
              https: https://registry-1.docker.io/v2/
              expect: [200, 401]
              ca: {ca.cert_file.name}
              interval: 2s
              timeout: 1s
              fall: 2
              rise: 1
          mirror.test:
            A: 10.0.0.7
            health: {{tcp: 80}}
          plain.test:
            A: 10.0.0.8
        """,
    )
    zone_set = load_zone_set(tmp_path)
    gated = {override.name: override for override in zone_set.health_gated()}
    assert gated == {
        "registry-1.docker.io": GatedOverride(
            "registry-1.docker.io",
            HealthCheck(
                kind="https",
                port=443,
                path="/v2/",
                expect=frozenset({200, 401}),
                ca_file=tmp_path / ca.cert_file.name,
                interval=2.0,
                timeout=1.0,
                fall=2,
                rise=1,
            ),
            ("10.0.0.5", "10.0.0.6", "fd00::5"),
        ),
        "mirror.test": GatedOverride(
            "mirror.test", HealthCheck(kind="tcp", port=80), ("10.0.0.7",)
        ),
    }


def test_changing_only_the_health_check_changes_the_digest(tmp_path: Path) -> None:
    zone = "records:\n  mirror.test:\n    A: 10.0.0.7\n    health: {tcp: %d}\n"
    write(tmp_path, "ci.yaml", zone % 80)
    before = load_zone_set(tmp_path)
    write(tmp_path, "ci.yaml", zone % 8080)
    after = load_zone_set(tmp_path)
    assert before.records_digest("mirror.test") != after.records_digest("mirror.test")
    assert before.content_hash != after.content_hash


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("    A: 10.0.0.7\n    health: {tcp: 80, fall: 0}\n", 5, "fall must be a whole number"),
        ("    CNAME: other.test.\n    health: {tcp: 80}\n", 5, "needs A or AAAA records"),
        (
            "    A: 10.0.0.7\n    health:\n      https: https://elsewhere.test/\n",
            5,
            "is not the overridden name",
        ),
    ],
)
def test_bad_health_is_a_zone_problem_at_its_line(
    tmp_path: Path, body: str, line: int, reason: str
) -> None:
    path = write(tmp_path, "ci.yaml", "ttl: 60\nrecords:\n  mirror.test:\n" + body)
    with pytest.raises(ZoneSetError) as caught:
        load_zone_set(tmp_path)
    (problem,) = caught.value.problems
    assert str(problem).startswith(f"{path}:{line}: mirror.test: ")
    assert reason in problem.reason


def test_live_zones_withdraw_bumps_generation_and_swap_notifies(tmp_path: Path) -> None:
    write(tmp_path, "ci.yaml", "records:\n  mirror.test:\n    A: 10.0.0.7\n    health: {tcp: 80}\n")
    zone_set = load_zone_set(tmp_path)
    live = LiveZones(zone_set)
    seen: list[ZoneSet] = []
    live.on_swap(seen.append)
    generation = live.generation
    assert live.withdraw(frozenset({"mirror.test"})) == generation + 1
    assert live.withdrawn == {"mirror.test"}
    assert live.snapshot() == (zone_set, generation + 1)
    live.swap(zone_set)
    assert seen == [zone_set]
    assert live.generation == generation + 2
