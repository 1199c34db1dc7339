"""Reading a daemon's Prometheus exposition the way Prometheus does (prometheus-client's
own parser), as a flat dict of samples."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[SampleKey, float]


def parse_samples(text: str) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """The samples of the admin listener at `host:port`."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
    return parse_samples(text)


def total(samples: Samples, name: str) -> float:
    """The sum of `name`'s samples over all their labels."""
    return sum(value for (sample, _), value in samples.items() if sample == name)
