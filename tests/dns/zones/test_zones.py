"""Zone file parsing, validation (file:line for every problem) and lookup rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dnslib
import pytest
import structlog

from dnsoverride.common import yamlsource
from dnsoverride.dns.reload import fingerprint
from dnsoverride.dns.zones import workers
from dnsoverride.dns.zones.live import LiveZones
from dnsoverride.dns.zones.load import ZoneFileCache, load_zone_set
from dnsoverride.dns.zones.model import ZoneSetError
from dnsoverride.dns.zones.parse import Parts
from tests.support.interpreters import python_output

MINIMAL = """\
ttl: 60                      # optional default TTL for this file
records:
  registry-1.docker.io:
    A: 10.0.0.5              # a value or a list
  mirrorlist.centos.org:
    A: [10.0.0.6, 10.0.0.7]
    AAAA: fd00::6
  "*.apps.ci.example":
    CNAME: ingress.ci.example.
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(directory: Path) -> list[str]:
    with pytest.raises(ZoneSetError) as caught:
        load_zone_set(directory)
    return [str(p) for p in caught.value.problems]


def test_minimal_form_from_the_issue(tmp_path: Path) -> None:
    write(tmp_path, "ci.yaml", MINIMAL)
    zone_set = load_zone_set(tmp_path)
    assert zone_set.names() == {
        "registry-1.docker.io",
        "mirrorlist.centos.org",
        "*.apps.ci.example",
    }
    overrides = zone_set.select(None)
    entry = overrides.lookup("mirrorlist.centos.org")
    assert entry is not None
    assert entry.ttl == 60
    assert [str(r) for r in entry.rrsets[dnslib.QTYPE.A].rdatas] == ["10.0.0.6", "10.0.0.7"]
    assert entry.rrsets[dnslib.QTYPE.AAAA].texts == ("fd00::6",)
    wildcard = overrides.lookup("build-7.apps.ci.example")
    assert wildcard is not None
    assert wildcard.cname == "ingress.ci.example"


def test_all_record_types_and_per_name_ttl(tmp_path: Path) -> None:
    write(
        tmp_path,
        "all.yml",
        """\
        records:
          Host.Example.:
            ttl: 5
            A: 192.0.2.1
            AAAA: 2001:db8::1
            TXT: ["hello world", "v=spf1 -all"]
            MX: 10 mail.example.
            NS: ns1.example
          _https._tcp.example:
            SRV: 10 5 443 host.example.
          1.2.0.192.in-addr.arpa:
            PTR: host.example.
        """,
    )
    overrides = load_zone_set(tmp_path).select(None)
    entry = overrides.lookup("host.example")
    assert entry is not None
    assert entry.ttl == 5
    assert entry.rrsets[dnslib.QTYPE.MX].texts == ("10 mail.example.",)
    assert entry.rrsets[dnslib.QTYPE.TXT].ttl == 5
    srv = overrides.lookup("_https._tcp.example")
    assert srv is not None
    assert srv.ttl == 60  # the embedded default
    assert srv.rrsets[dnslib.QTYPE.SRV].texts == ("10 5 443 host.example.",)
    assert overrides.lookup("1.2.0.192.in-addr.arpa") is not None


def test_every_problem_is_reported_with_file_and_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "bad.yaml",
        """\
        ttl: 60
        records:
          ip.example:
            A: 10.0.0.300
          type.example:
            BOGUS: x
          alias.example:
            CNAME: other.example.
            A: 10.0.0.1
          ttl.example:
            ttl: -5
            A: 10.0.0.1
          bad..name:
            A: 10.0.0.1
          -dash.example:
            A: 10.0.0.1
          list.example:
            A: [10.0.0.1, nope]
          health.example:
            A: 10.0.0.1
            health: {http: "http://10.0.0.1/"}
        """,
    )
    broken = write(tmp_path, "broken.yml", "records:\n  a.example: [\n")
    problems = problems_of(tmp_path)
    assert problems[0].startswith(f"{bad}:4: ip.example: bad A value '10.0.0.300'")
    assert problems[1].startswith(f"{bad}:6: type.example: unknown record type or key 'BOGUS'")
    assert problems[2].startswith(f"{bad}:7: alias.example: CNAME cannot be combined")
    assert problems[3].startswith(f"{bad}:11: bad TTL -5")
    assert problems[4].startswith(f"{bad}:13: name 'bad..name' has an empty label")
    assert problems[5].startswith(f"{bad}:15: name '-dash.example'")
    assert problems[6].startswith(f"{bad}:18: list.example: bad A value 'nope'")
    assert problems[7].startswith(f"{bad}:21: health.example: unknown health key(s) http")
    assert problems[8].startswith(f"{broken}:3: YAML syntax error")
    assert len(problems) == 9


def test_duplicate_keys_and_bad_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dup.yaml",
        """\
        records:
          a.example:
            A: 10.0.0.1
          a.example:
            A: 10.0.0.2
          b.example: 10.0.0.3
          c.example:
            CNAME: [x.example, y.example]
        extra: 1
        """,
    )
    problems = problems_of(tmp_path)
    assert problems == [
        f"{path}:4: duplicate key 'a.example' (first at line 2)",
        f"{path}:6: b.example: expected a mapping of record types, e.g. 'A: 10.0.0.5'",
        f"{path}:8: c.example: CNAME takes exactly one target",
        f"{path}:9: unknown key 'extra' (expected one of: ttl, records)",
    ]


def test_record_type_spelled_twice_in_different_case(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "case.yaml",
        """\
        records:
          a.example:
            A: 10.0.0.1
            a: 10.0.0.2
        """,
    )
    assert problems_of(tmp_path) == [
        f"{path}:4: a.example: record type A given twice ('A' and 'a')",
    ]


def test_ownership_and_wildcard_rules(tmp_path: Path) -> None:
    write(
        tmp_path,
        "z.yaml",
        """\
        records:
          owned.example: {A: 10.0.0.1}
          "*.wild.example": {A: 10.0.0.2}
          exact.wild.example: {A: 10.0.0.3}
        """,
    )
    overrides = load_zone_set(tmp_path).select(None)
    assert overrides.lookup("below.owned.example") is None  # forwarded
    assert overrides.lookup("example") is None
    deep = overrides.lookup("a.b.wild.example")
    assert deep is not None
    assert deep.name == "*.wild.example"
    exact = overrides.lookup("exact.wild.example")
    assert exact is not None
    assert exact.name == "exact.wild.example"
    assert overrides.lookup("wild.example") is None  # the wildcard does not cover its parent


def test_views_select_files_and_conflicts_are_problems(tmp_path: Path) -> None:
    write(tmp_path, "ci.yaml", "records:\n  r.example: {A: 10.0.0.1}\n")
    other = write(tmp_path, "dc2.yaml", "records:\n  r.example: {A: 10.0.0.2}\n")
    zone_set = load_zone_set(tmp_path, {"ci": frozenset({"ci"}), "dc2": frozenset({"dc2.yaml"})})
    ci = zone_set.select(frozenset({"ci"})).lookup("r.example")
    dc2 = zone_set.select(frozenset({"dc2.yaml"})).lookup("r.example")
    assert ci is not None
    assert dc2 is not None
    assert (ci.rrsets[1].texts, dc2.rrsets[1].texts) == (("10.0.0.1",), ("10.0.0.2",))
    assert zone_set.select(frozenset()).lookup("r.example") is None
    with pytest.raises(ZoneSetError) as caught:
        load_zone_set(tmp_path, {"both": None, "typo": frozenset({"nope"})})
    reasons = [str(p) for p in caught.value.problems]
    assert any(r.startswith(f"{other}:2: r.example is already defined in") for r in reasons)
    assert any("view 'typo' names zone file 'nope', which does not exist" in r for r in reasons)


def test_hashes_and_digests_track_content(tmp_path: Path) -> None:
    path = write(
        tmp_path, "a.yaml", "records:\n  x.example: {A: 10.0.0.1}\n  y.example: {A: 10.0.0.9}\n"
    )
    first = load_zone_set(tmp_path)
    path.write_text("# a comment only changes nothing\n" + path.read_text())
    same = load_zone_set(tmp_path)
    path.write_text("records:\n  x.example: {A: 10.0.0.2}\n  y.example: {A: 10.0.0.9}\n")
    changed = load_zone_set(tmp_path)
    assert first.content_hash == same.content_hash != changed.content_hash
    assert first.records_digest("X.example.") != changed.records_digest("x.example")
    assert first.records_digest("y.example") == changed.records_digest("y.example")


def test_canonical_text_of_one_record_has_the_general_form(tmp_path: Path) -> None:
    # One type with one value takes a shortcut; a second value must only add its line.
    write(tmp_path, "a.yaml", "records:\n  a.example: {A: 10.0.0.1, ttl: 30}\n")
    one = load_zone_set(tmp_path).files[0].entries["a.example"].canonical()
    write(tmp_path, "a.yaml", "records:\n  a.example: {A: [10.0.0.2, 10.0.0.1], ttl: 30}\n")
    two = load_zone_set(tmp_path).files[0].entries["a.example"].canonical()
    assert one == "a.example ttl=30\n  A 30 10.0.0.1"
    assert two == one + "\n  A 30 10.0.0.2"


@pytest.mark.parametrize(
    "value", ["010.0.0.1", "1.2.3", "1.2.3.4.5", "0x1.2.3.4", "256.0.0.1", "1.2.3.4/32", "::1"]
)
def test_a_values_are_strict_dotted_quads(tmp_path: Path, value: str) -> None:
    write(tmp_path, "a.yaml", f"records:\n  a.example:\n    A: '{value}'\n")
    assert problems_of(tmp_path) == [
        f"{tmp_path / 'a.yaml'}:3: a.example: bad A value '{value}': not an IPv4 address"
    ]


def test_records_are_built_from_their_canonical_texts(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """\
        records:
          a.example:
            TXT: ['say "hi" \\" ok', "%s"]
            MX: 10 Mail.Example
          b.example: {SRV: 1 2 443 Host.Example., AAAA: "2001:DB8:0::1"}
        """
        % ("x" * 300),
    )
    entries = load_zone_set(tmp_path).files[0].entries
    txt = entries["a.example"].rrsets[dnslib.QTYPE.TXT].rdatas
    assert txt[0].data == [b'say "hi" \\" ok']
    assert txt[1].data == [b"x" * 255, b"x" * 45]
    assert str(entries["a.example"].rrsets[dnslib.QTYPE.MX].rdatas[0]) == "10 mail.example."
    b = entries["b.example"].rrsets
    assert str(b[dnslib.QTYPE.SRV].rdatas[0]) == "1 2 443 host.example."
    assert str(b[dnslib.QTYPE.AAAA].rdatas[0]) == "2001:db8::1"


def test_changes_mark_exactly_the_changed_names(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "records:\n  x.example: {A: 10.0.0.1}\n  y.example: {A: 10.0.0.9}\n")
    write(tmp_path, "b.yaml", "records:\n  y.example: {A: 10.0.0.8}\n  w.example: {A: 1.1.1.1}\n")
    cache = ZoneFileCache()
    first = load_zone_set(tmp_path, cache=cache)
    write(tmp_path, "b.yaml", "records:\n  y.example: {A: 10.0.0.7}\n  z.example: {A: 1.1.1.1}\n")
    second = load_zone_set(tmp_path, cache=cache)
    assert first.files[0] is second.files[0]  # a.yaml was not parsed again
    added, removed, changed = second.changes_from(first)
    assert (added, removed) == (["z.example"], ["w.example"])
    assert changed == ["y.example"]  # defined twice; one of them changed
    # Moving a name to another line changes nothing; a whole new parse compares the same.
    moved = "records:\n\n  y.example: {A: 10.0.0.9}\n  x.example: {A: 10.0.0.1}\n"
    write(tmp_path, "a.yaml", moved)
    assert load_zone_set(tmp_path).changes_from(second) == ([], [], [])


def test_live_zones_swap_bumps_generation(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", MINIMAL)
    first = load_zone_set(tmp_path)
    live = LiveZones(first)
    assert live.snapshot() == (first, 1)
    second = load_zone_set(tmp_path)
    assert live.swap(second) == 2
    assert live.current is second
    assert live.generation == 2


def test_empty_directory_and_missing_directory(tmp_path: Path) -> None:
    assert load_zone_set(tmp_path).names() == frozenset()
    problems = problems_of(tmp_path / "missing")
    assert problems == [f"{tmp_path / 'missing'}: zones directory does not exist"]


def dnsoverride_check(config: Path, zones: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dnsoverride",
            "check",
            "--config",
            str(config),
            "--zones",
            str(zones),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.e2e
def test_check_command_prints_problems_and_exits_1(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", "records:\n  a.example:\n    A: 300.1.1.1\n")
    config = tmp_path.parent / f"{tmp_path.name}-config.yaml"
    config.write_text("upstreams: [192.0.2.53]\n")
    result = dnsoverride_check(config, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"{tmp_path / 'bad.yaml'}:3: a.example: bad A value '300.1.1.1': not an IPv4 address"
    )
    (tmp_path / "bad.yaml").write_text(MINIMAL)
    result = dnsoverride_check(config, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "3 names" in result.stdout


def big_set(directory: Path) -> None:
    """Three files: plain names, every kind of stored entry, and a file with problems."""
    write(
        directory,
        "a.yaml",
        "records:\n"
        + "".join(f"  h{i}.a.test: {{A: 10.0.{i // 250}.{i % 250}}}\n" for i in range(2000)),
    )
    write(
        directory,
        "b.yaml",
        """\
        records:
          multi.test: {A: [10.0.0.1, 10.0.0.2], AAAA: fd00::1, ttl: 5}
          checked.test:
            A: 10.0.0.3
            health: {tcp: 443}
          alias.test: {CNAME: multi.test}
          txt.test: {TXT: ["line\\nbreak", "two"]}
        """,
    )
    write(directory, "c.yaml", "records:\n  bad.test: {A: 10.0.0.300}\n  ok.test: {A: 10.0.0.4}\n")


def count_worker_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of files each worker process is handed, in the order they start."""
    calls: list[int] = []
    real = workers._in_worker

    def counted(jobs: list[tuple[Path, bytes]]) -> list[Parts]:
        calls.append(len(jobs))
        return real(jobs)

    monkeypatch.setattr(workers, "_in_worker", counted)
    return calls


@pytest.mark.e2e
def test_worker_processes_parse_exactly_what_this_process_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big_set(tmp_path)
    with pytest.raises(ZoneSetError) as alone:
        load_zone_set(tmp_path)
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    calls = count_worker_calls(monkeypatch)
    with pytest.raises(ZoneSetError) as shared:
        load_zone_set(tmp_path)
    assert sorted(calls) == [1, 2]  # three files over two workers, biggest alone
    assert shared.value.problems == alone.value.problems
    (tmp_path / "c.yaml").unlink()
    parallel = load_zone_set(tmp_path)
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 1 << 40)
    serial = load_zone_set(tmp_path)
    assert parallel.content_hash == serial.content_hash
    for name in ("h1999.a.test", "multi.test", "checked.test", "alias.test", "txt.test"):
        assert parallel.select(None).lookup(name) == serial.select(None).lookup(name)
    assert parallel.health_gated() == serial.health_gated()
    assert parallel.files[1].cnames == ("alias.test",)


def test_a_cgroup_cpu_limit_of_one_keeps_the_parse_in_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container limited to one CPU (`usable_cpus` counts the cgroup limit) parses here:
    worker processes would only take turns on that CPU. Fails before: the count was the
    affinity alone (2 on this box), so two workers started."""
    big_set(tmp_path)
    (tmp_path / "c.yaml").unlink()
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "usable_cpus", lambda: 1)
    calls = count_worker_calls(monkeypatch)
    assert load_zone_set(tmp_path).name_count() == 2004
    assert calls == []


@pytest.mark.e2e
def test_a_failing_worker_is_logged_and_its_files_parsed_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big_set(tmp_path)
    (tmp_path / "c.yaml").unlink()
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "_WORKER", "import sys; sys.exit('no workers here')")
    with structlog.testing.capture_logs() as logs:
        zone_set = load_zone_set(tmp_path)
    assert zone_set.name_count() == 2004
    failures = [e for e in logs if e["event"] == "zone_parse_worker_failed"]
    assert len(failures) == 2
    assert "exit status 1: no workers here" in failures[0]["reason"]


@pytest.mark.e2e
def test_workers_never_import_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parse worker was `python -c ...`, which puts the working directory first on its
    `sys.path`: run from a directory anyone can write (`cd /tmp; dnsoverride check`), a
    planted `structlog.py` ran as root in every worker. The entry-point script and the
    daemon under systemd do not import from there; their workers must not either. Fails
    on the code before the fix (the planted module runs)."""
    zone_dir = tmp_path / "zones"
    zone_dir.mkdir()
    big_set(zone_dir)
    (zone_dir / "c.yaml").unlink()
    planted = tmp_path / "shared"
    planted.mkdir()
    marker = tmp_path / "planted-module-ran"
    (planted / "structlog.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit('planted')\n"
    )
    monkeypatch.chdir(planted)
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    with structlog.testing.capture_logs() as logs:
        zone_set = load_zone_set(zone_dir)
    assert zone_set.name_count() == 2004
    assert not marker.exists()
    assert not [event for event in logs if event["event"] == "zone_parse_worker_failed"]


@pytest.mark.e2e
def test_zone_file_names_that_are_not_readable_files_are_problems(tmp_path: Path) -> None:
    """A `*.yaml` entry that is a dangling symlink (its target moved), a symlink loop, a
    FIFO or a directory was skipped without a word: `check` said ok and a reload dropped
    that file's names. Each is now a problem at the file; a FIFO is never opened for a
    blocking read (the reload thread would hang). Fails on the code before the fix."""
    zone_dir = tmp_path / "zones"
    zone_dir.mkdir()
    write(zone_dir, "good.yaml", MINIMAL)
    (zone_dir / "moved.yaml").symlink_to(tmp_path / "elsewhere" / "ci.yaml")
    (zone_dir / "loop.yaml").symlink_to(zone_dir / "loop.yaml")
    os.mkfifo(zone_dir / "fifo.yaml")
    (zone_dir / "dir.yaml").mkdir()
    config = tmp_path / "config.yaml"
    config.write_text("upstreams: [192.0.2.53]\n")
    result = dnsoverride_check(config, zone_dir)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(zone_dir / name) for name in ("dir.yaml", "fifo.yaml", "loop.yaml", "moved.yaml")
    ]
    assert "not a regular file" in lines[0] and "not a regular file" in lines[1]
    assert "Too many levels of symbolic links" in lines[2]
    assert "No such file or directory" in lines[3]
    for name in ("moved.yaml", "loop.yaml", "fifo.yaml"):
        (zone_dir / name).unlink()
    (zone_dir / "dir.yaml").rmdir()
    assert dnsoverride_check(config, zone_dir).returncode == 0


@pytest.mark.parametrize(
    "worker",
    [
        "pass",  # exits 0 having written nothing
        "import sys; sys.stdout.write('2026-01-01 [warning] something\\n')",  # a log line
        "import pickle, sys; pickle.dump(None, sys.stdout.buffer)",  # a pickle, not results
    ],
)
@pytest.mark.e2e
def test_a_worker_that_exits_0_with_garbage_is_logged_and_its_files_parsed_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker: str
) -> None:
    """A worker that succeeds without writing its results (nothing, a stray line on stdout,
    something else pickled) raised EOFError or TypeError out of the whole load: `check`
    printed a traceback, a reload crashed. It is a failed worker like any other now.
    Fails on the code before the fix."""
    big_set(tmp_path)
    (tmp_path / "c.yaml").unlink()
    monkeypatch.setattr(workers, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(workers, "_WORKER", worker)
    with structlog.testing.capture_logs() as logs:
        zone_set = load_zone_set(tmp_path)
    assert zone_set.name_count() == 2004
    assert len([e for e in logs if e["event"] == "zone_parse_worker_failed"]) == 2


@pytest.mark.e2e
def test_a_zone_file_name_that_is_not_utf8_is_read_like_any_other(tmp_path: Path) -> None:
    """A file named in Latin-1 (`café.yaml` copied from an old host: b'caf\\xe9.yaml'): the
    set's digest and the reload fingerprint encoded the name as UTF-8 and raised, so
    `check` printed a traceback, `serve` would not start, and a running server's every
    reload crashed while the file was there (no zone change applied again). Fails on
    the code before the fix."""
    zone_dir = tmp_path / "zones"
    zone_dir.mkdir()
    write(zone_dir, "good.yaml", MINIMAL)
    latin1 = os.path.join(os.fsencode(zone_dir), b"caf\xe9.yaml")
    with open(latin1, "w") as file:
        file.write("records:\n  cafe.example: {A: 10.0.0.9}\n")
    zone_set = load_zone_set(zone_dir)
    assert zone_set.select(None).lookup("cafe.example") is not None
    assert fingerprint(zone_dir, None) != fingerprint(tmp_path, None)
    config = tmp_path / "config.yaml"
    config.write_text("upstreams: [192.0.2.53]\n")
    result = dnsoverride_check(config, zone_dir)
    assert result.returncode == 0, result
    with open(latin1, "w") as file:
        file.write("records:\n  cafe.example: {A: 10.0.0.256}\n")
    result = dnsoverride_check(config, zone_dir)
    assert result.returncode == 1, result
    assert result.stderr.splitlines() == [
        f"{zone_dir}/caf\\udce9.yaml:2: cafe.example: bad A value '10.0.0.256': not an IPv4 address"
    ]


def test_a_txt_escape_that_is_no_character_is_a_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libyaml refuses `"\\ud800"` (half of a UTF-16 pair) as a syntax error; PyYAML's
    pure-Python parser, used where libyaml is not installed, makes a string of it, and
    the TXT size check raised UnicodeEncodeError out of the whole load (a traceback from
    `check`, a crashed reload). Fails on the code before the fix."""
    monkeypatch.setattr(yamlsource, "_CParser", None)
    write(tmp_path, "t.yaml", 'records:\n  a.example: {TXT: "x\\ud800"}\n')
    assert problems_of(tmp_path) == [
        f"{tmp_path / 't.yaml'}:2: a.example: bad TXT value 'x\\ud800': "
        "not valid Unicode (half of a UTF-16 surrogate pair)"
    ]


@pytest.mark.e2e
def test_a_parse_worker_runs_with_our_interpreter_flags(tmp_path: Path) -> None:
    """A parse worker started by an interpreter under `-X faulthandler -X
    int_max_str_digits=1000 -W error::ResourceWarning` is that interpreter with those
    flags and its sys.path (as a `serve` worker is: common/interpreter.py), and parses.
    Failed before the fix: it was `python -P -c ...`, none of the flags."""
    parent = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parents[3])!r})
        from pathlib import Path
        from dnsoverride.common.interpreter import python_command
        from dnsoverride.dns.zones import workers
        started = []
        sys.addaudithook(
            lambda event, args: event == "subprocess.Popen" and started.append(list(args[1]))
        )
        parsed = workers._in_worker([(Path("z.yaml"), b"records: {{a.test: {{A: 10.0.0.1}}}}")])
        print(json.dumps([started, python_command(workers._WORKER), len(parsed)]))
        """
    )
    flags = ["-X", "faulthandler", "-X", "int_max_str_digits=1000", "-W", "error::ResourceWarning"]
    output = python_output(flags, parent, tmp_path)
    assert "zone_parse_worker_failed" not in output
    started, ours, parsed = json.loads(output.splitlines()[-1])
    assert started == [ours] and parsed == 1
    assert ours[0] == sys.executable and "-Werror::ResourceWarning" in ours
    assert ours[ours.index("-X") : ours.index("-c")] == [*flags[:4], "-P"]
