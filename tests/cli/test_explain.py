"""`dnsoverride explain`: the view and its rule, the owning file:line, the wildcard, the
forwarded case, a CNAME chain, on the files; and a health-withdrawn override live, from
a running server's admin listener (a real process, a real dnsmasq upstream)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dnsoverride.cli import main
from tests.support.edits import health_withdrawn_zone
from tests.support.peers import dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

ZONE = """\
records:
  registry-1.docker.io:
    A: 10.0.0.5
  alias.ci.example:
    CNAME: hop.ci.example
  hop.ci.example:
    CNAME: registry-1.docker.io
  "*.apps.ci.example":
    CNAME: ingress.ci.example.
  ci.example:
    TXT: hello
"""
DC2 = "records:\n  registry-1.docker.io:\n    A: 10.2.0.5\n"
CONFIG = """\
zones: zones
upstreams: [192.0.2.53]
views:
  - {name: cache-host, clients: [10.0.0.5/32], zones: []}
  - {name: dc2, clients: [10.2.0.0/16], zones: [dc2]}
  - {name: ci, clients: [10.0.0.0/8], zones: [ci]}
default_view: ci
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text(ZONE)
    (zones / "dc2.yaml").write_text(DC2)
    config = tmp_path / "dnsoverride.yaml"
    config.write_text(CONFIG)
    return config


def explain(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> dict[str, Any]:
    assert main(["explain", "--config", str(config), "--json", *args]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    return document


def test_the_view_and_the_rule_that_chose_it(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dc2 = explain(capsys, files, "registry-1.docker.io", "--from", "10.2.3.4")
    assert (dc2["view"], dc2["view_rule"]) == ("dc2", "clients 10.2.0.0/16 contains 10.2.3.4")
    assert dc2["steps"][0]["records"] == ["10.2.0.5"]
    cache = explain(capsys, files, "registry-1.docker.io", "--from", "10.0.0.5")
    assert cache["view"] == "cache-host"
    assert cache["outcome"] == "forwarded to 192.0.2.53:53"
    outside = explain(capsys, files, "registry-1.docker.io", "--from", "127.0.0.1")
    assert outside["view"] == "ci"
    assert outside["view_rule"] == "default_view 'ci': no view's clients contain 127.0.0.1"
    refused = explain(capsys, files, "registry-1.docker.io", "--from", "203.0.113.9")
    assert refused["outcome"] == "REFUSED: 203.0.113.9 is not in `allow`"


def test_file_and_line_of_the_owner(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    found = explain(capsys, files, "REGISTRY-1.docker.io.")
    step = found["steps"][0]
    assert (step["source"], step["file"], step["line"]) == (
        "override",
        str(files.parent / "zones" / "ci.yaml"),
        2,
    )
    assert found["outcome"] == "answered locally: 1 A record(s)"
    nodata = explain(capsys, files, "ci.example", "--type", "AAAA")
    assert nodata["outcome"] == "NODATA with a synthesized SOA: ci.example has TXT, no AAAA"


def test_wildcard_and_forwarded(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wild = explain(capsys, files, "www.apps.ci.example")
    first = wild["steps"][0]
    assert (first["source"], first["owner"], first["line"]) == ("wildcard", "*.apps.ci.example", 8)
    assert wild["outcome"] == "CNAME target ingress.ci.example forwarded to 192.0.2.53:53"
    below = explain(capsys, files, "deep.ci.example")
    assert below["outcome"] == "forwarded to 192.0.2.53:53"
    assert below["steps"][0]["why"].startswith("names below ci.example (")
    assert explain(capsys, files, "example.org")["steps"][0]["why"] == "no override in this view"


def test_cname_chain(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chain = explain(capsys, files, "alias.ci.example", "--type", "A")
    assert [(s["name"], s.get("cname"), s.get("records")) for s in chain["steps"]] == [
        ("alias.ci.example", "hop.ci.example", None),
        ("hop.ci.example", "registry-1.docker.io", None),
        ("registry-1.docker.io", None, ["10.0.0.5"]),
    ]


def test_plain_text_names_file_line_and_chain(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json and not on a terminal: aligned plain text, no escape codes."""
    assert main(["explain", "--config", str(files), "alias.ci.example"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert f"{files.parent / 'zones' / 'ci.yaml'}:4" in out
    assert "CNAME hop.ci.example" in out
    assert "answered locally: 1 A record(s)" in out


@pytest.mark.e2e
def test_bad_input_is_one_line(files: Path) -> None:
    for args, message in (
        (["nope..name"], "not a DNS name"),
        (["a.test", "--type", "BOGUS"], "unknown record type 'BOGUS'"),
        (["a.test", "--from", "not-an-ip"], "not an IP address"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "dnsoverride", "explain", "--config", str(files), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq")
@pytest.mark.timeout(60)
def test_live_shows_an_override_withdrawn_by_health(tmp_path: Path) -> None:
    """The live daemon's health verdict: the override of a name whose only address fails
    its TCP check is withdrawn, and explain --live says so (on the files it is served)."""
    zones = tmp_path / "zones"
    zones.mkdir()
    admin = f"127.0.0.1:{free_port()}"
    with (
        health_withdrawn_zone(zones),
        dnsmasq(tmp_path, "--address=/gated.test/192.0.2.77") as upstream,
        dnsoverride_serve(tmp_path, zones, [upstream.address], "--metrics", admin) as server,
    ):
        command = [sys.executable, "-m", "dnsoverride", "explain", "gated.test", "--live"]
        deadline = time.monotonic() + 20
        while True:
            result = subprocess.run(
                [*command, "--admin", admin, "--json"], capture_output=True, text=True, check=True
            )
            document = json.loads(result.stdout)
            if document["steps"][0].get("health", {}).get("withdrawn"):
                break
            assert time.monotonic() < deadline, document
            time.sleep(0.1)
        step = document["steps"][0]
        assert step["health"] == {"withdrawn": True, "targets": {"127.0.0.1": False}}
        assert step["why"] == "override withdrawn: every health-checked address is down"
        assert document["outcome"] == f"forwarded to {upstream.address}"
        # What the server answers agrees: the upstream's address, not the override's.
        reply = server.query("gated.test")
        assert [rr.to_text().split()[-1] for rr in reply.answer] == ["192.0.2.77"]
        text = subprocess.run(
            [*command, "--admin", admin], capture_output=True, text=True, check=True
        ).stdout
        assert "[health: withdrawn; 127.0.0.1 down]" in text
        # The daemon's 400 for a bad question is one line too.
        bad = subprocess.run(
            [*command[:4], "bad..name", "--live", "--admin", admin],
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad.returncode == 2
        assert bad.stderr.splitlines() == [
            f"dnsoverride: error: {admin} (--admin): not a DNS name: "
            "name 'bad..name' has an empty label"
        ]
    files = subprocess.run(
        [sys.executable, "-m", "dnsoverride", "explain", "gated.test", "--zones", str(zones)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "answered locally" in files.stdout, files
