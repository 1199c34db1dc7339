"""Suite-wide set-up: the fixture plugins (registry, systemd), and the `e2e` marker kept
honest.

A test marked `e2e` starts processes: a daemon, a real peer (dnsmasq, unbound, the
distribution registry, skopeo), the CLI, or a network namespace. Every other test is a
unit test and runs in the quick loop (`pytest -m "not e2e"`); one that starts a process
anyway fails, naming what it started, so the quick loop stays quick and the marker true.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

pytest_plugins = (
    "tests.support.registry_fixtures",
    "tests.support.systemd",
    "tests.support.yum_fixtures",
)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    started: list[str] = []

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        started.append(f"{args!r:.120}")
        raise AssertionError(f"a test not marked e2e started a process: {started[-1]}")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    yield
    # Also when the code under test caught the error (a zone parse worker falls back).
    if started:
        pytest.fail(f"not marked e2e, but started a process: {started[0]}")
