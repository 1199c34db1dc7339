"""What the supervisor measured of its own zone loads (`ServeStart.load_seconds`), which a
worker's start is given time by (dns/workerpool.py: 10 s + 5 x it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dnsoverride.dns.config import ServeFlags, load_config
from dnsoverride.dns.reload import ServeStart, serve_start


def _start(tmp_path: Path, names: int) -> tuple[ServeStart, int]:
    zones = tmp_path / "zones"
    zones.mkdir(parents=True)
    records = {f"h{i}.load.test": {"A": f"10.1.{i >> 8 & 255}.{i & 255}"} for i in range(names)}
    (zones / "z.yaml").write_text(json.dumps({"records": records}))
    flags = ServeFlags(listen=("127.0.0.1:0",), upstream=("127.0.0.1:9",), zones=str(zones))
    start = serve_start(load_config(None, flags), None, flags)
    return start, start.load().zone_set.name_count()


def test_the_first_load_is_measured_and_scaled_to_the_names_served_now(tmp_path: Path) -> None:
    """20,000 names: the first load's seconds are what the load took, scaled to the
    names served now (twice as many names: twice as long); a reload that took longer
    (a slower moment, or a set that changed shape) wins."""
    start, names = _start(tmp_path, 20_000)
    assert names == 20_000 and start.names == names
    assert 0 < start.seconds == start.stats.last_duration_seconds
    assert start.load_seconds(names) == pytest.approx(start.seconds)
    assert start.load_seconds(2 * names) == pytest.approx(2 * start.seconds)
    start.stats.succeeded(3 * start.seconds)  # a reload, as the reloader counts it
    assert start.load_seconds(names) == pytest.approx(3 * start.seconds)


def test_a_first_load_of_a_handful_of_names_is_not_scaled_per_name(tmp_path: Path) -> None:
    """A first load of 1 name (a placeholder zone) is mostly what any load costs; scaled
    to the 1,000,000 names a reload grew the set to it must come out near what a
    first load of 10,000 names scales to, not tens of times it (a wedged replacement
    waited for an hour). Failed before the fix: 1 name in ~0.4 ms, scaled per name to
    ~440 s, against ~6 s from 10,000 names."""
    one, _ = _start(tmp_path / "one", 1)
    many, _ = _start(tmp_path / "many", 10_000)
    from_many = many.load_seconds(1_000_000)
    # 20x: slack for a stall of the 1-name load on a busy machine (the bug was ~70x).
    assert from_many / 20 < one.load_seconds(1_000_000) < 20 * from_many


def test_a_first_load_of_a_handful_of_names_scaled_to_as_many_is_what_it_took(
    tmp_path: Path,
) -> None:
    """Fewer than 100 names then and now: the first load's seconds as they were (a slow
    disk's 5 s for 50 names is 5 s), not a share of them."""
    start, names = _start(tmp_path, 50)
    start.seconds = 5.0
    start.stats.last_duration_seconds = None
    assert start.load_seconds(names) == 5.0
