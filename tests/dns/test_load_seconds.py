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
    zones.mkdir()
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
