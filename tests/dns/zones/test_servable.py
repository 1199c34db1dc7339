"""`check` (and every load) rejects what the server cannot serve, each at file:line
(issue 10, item 9), and accepts exactly what it can: the limits are tested at their
boundaries against the answer path itself and a real server over TCP.

Before the fix `dnsoverride check` passed all of these: a 70 KB TXT (every query
SERVFAIL with a traceback), a name with 10,000 A records (TC with no records, even over
TCP), a 10-link CNAME chain (SERVFAIL past MAX_CNAME_CHAIN) and CNAME loops.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dnslib
import pytest

from dnsoverride.dns import answer
from dnsoverride.dns.constants import MAX_CNAME_CHAIN
from dnsoverride.dns.zones import load as zone_load
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.dns.zones.model import Overrides, ZoneSetError
from dnsoverride.dns.zones.records import ANSWER_ROOM
from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(
    directory: Path, views: dict[str, frozenset[str] | None] | None = None
) -> list[str]:
    with pytest.raises(ZoneSetError) as caught:
        load_zone_set(directory, views)
    return [str(problem) for problem in caught.value.problems]


def addresses(count: int) -> str:
    return (
        "[" + ", ".join(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(count)) + "]"
    )


def chain(length: int, *, end: str = "end.test") -> str:
    """`length` CNAMEs c0 -> c1 -> ... -> end, one name per line from line 2."""
    lines = ["records:"]
    for index in range(length):
        target = f"c{index + 1}.test" if index + 1 < length else end
        lines.append(f"  c{index}.test: {{CNAME: {target}}}")
    if end == "end.test":
        lines.append("  end.test: {A: 10.0.0.1}")
    return "\n".join(lines) + "\n"


@pytest.mark.e2e
def test_check_reports_each_unservable_zone_at_its_line(tmp_path: Path) -> None:
    """The four cases of the issue through `dnsoverride check`: exit 0 ("ok") before."""
    zone_dir = tmp_path / "zones"
    zone_dir.mkdir()
    big = write(zone_dir, "big.yaml", f"records:\n  txt.test:\n    TXT: '{'x' * 70_000}'\n")
    many = write(zone_dir, "many.yaml", f"records:\n  many.test:\n    A: {addresses(10_000)}\n")
    long = write(zone_dir, "long.yaml", chain(10))
    loop = write(
        zone_dir,
        "loop.yaml",
        "records:\n  a.test: {CNAME: b.test}\n  b.test: {CNAME: c.test}\n"
        "  c.test: {CNAME: a.test}\n",
    )
    config = tmp_path / "dnsoverride.yaml"
    config.write_text("upstreams: [127.0.0.1:1]\nzones: zones\n")
    result = subprocess.run(
        [sys.executable, "-m", "dnsoverride", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1, result.stdout
    lines = result.stderr.splitlines()
    assert lines == [
        f"{big}:3: txt.test: bad TXT value '{'x' * 27}...{'x' * 28}': "
        "70,275 bytes as a record, more than the 65,535 a record holds "
        "(the text is sent as strings of up to 255 bytes, each with a length byte)",
        f"{long}:2: c0.test: CNAME chain c0.test -> c1.test -> c2.test -> ... -> c9.test -> "
        f"end.test visits 11 names; the server follows at most {MAX_CNAME_CHAIN}",
        f"{loop}:2: a.test: CNAME loop a.test -> b.test -> c.test -> a.test: "
        "the server can only answer SERVFAIL",
        f"{many}:3: many.test: the 10,000 A records take 160,000 bytes, more than a DNS "
        f"message holds ({ANSWER_ROOM:,} after header, question and EDNS)",
    ]


def test_a_wildcard_that_leads_to_itself_is_a_loop(tmp_path: Path) -> None:
    path = write(tmp_path, "w.yaml", "records:\n  '*.w.test': {CNAME: x.w.test}\n")
    assert problems_of(tmp_path) == [
        f"{path}:2: *.w.test: CNAME loop *.w.test -> *.w.test: the server can only answer SERVFAIL"
    ]


def test_only_the_head_of_a_long_chain_is_reported_each_head_once(tmp_path: Path) -> None:
    # Two names lead into one over-long chain: both are reported; the chain's own names
    # (c0, c1: also over the limit from where they stand) are not repeated.
    more = "  one.test: {CNAME: c0.test}\n  two.test: {CNAME: c0.test}\n"
    path = write(tmp_path, "c.yaml", chain(9) + more)
    problems = problems_of(tmp_path)
    assert [p.split(": CNAME chain")[0] for p in problems] == [
        f"{path}:12: one.test",
        f"{path}:13: two.test",
    ]


def test_loops_and_chains_are_checked_per_view(tmp_path: Path) -> None:
    """x -> y in a.yaml, y -> x in b.yaml: a loop only for views that see both files;
    views sharing the files report it once."""
    a = write(tmp_path, "a.yaml", "records:\n  x.test: {CNAME: y.test}\n")
    write(tmp_path, "b.yaml", "records:\n  y.test: {CNAME: x.test}\n")
    only_a = {"ci": frozenset({"a"})}
    assert load_zone_set(tmp_path, only_a).select(frozenset({"a"})).lookup("x.test") is not None
    both = {"ci": frozenset({"a", "b"}), "all": None, "dc2": frozenset({"a.yaml", "b"})}
    assert problems_of(tmp_path, both) == [
        f"{a}:2: x.test: CNAME loop x.test -> y.test -> x.test: the server can only answer SERVFAIL"
    ]


def test_a_name_given_twice_in_one_file_in_different_case_is_a_problem(tmp_path: Path) -> None:
    """YAML sees two keys; the zone one name: before, the later silently won."""
    path = write(
        tmp_path, "a.yaml", "records:\n  A.test: {A: 10.0.0.1}\n  a.test.: {A: 10.0.0.2}\n"
    )
    assert problems_of(tmp_path) == [
        f"{path}:3: a.test is defined twice in this file (first at line 2)"
    ]


def served(overrides: Overrides, name: str) -> answer.LocalAnswer:
    entry = overrides.lookup(name)
    assert entry is not None
    return answer.local_answer(dnslib.DNSRecord.question(name, "A"), entry, overrides, serial=1)


@pytest.mark.parametrize("end", ["end.test", "upstream.example"])
def test_the_chain_limit_is_exactly_what_the_answer_path_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    """For every chain length, the loader accepts it exactly when the server answers it
    (a chain ending in local data, and one leaving the zones for an upstream name); the
    same zones loaded without the CNAME check show what the answer path would do."""
    for length in range(1, MAX_CNAME_CHAIN + 4):
        directory = tmp_path / f"{end}-{length}"
        directory.mkdir()
        write(directory, "c.yaml", chain(length, end=end))
        try:
            load_zone_set(directory)
            accepted = True
        except ZoneSetError:
            accepted = False
        with monkeypatch.context() as patch:
            patch.setattr(zone_load, "cname_problems", lambda files, overrides: [])
            local = served(load_zone_set(directory).select(None), "c0.test")
        answered = local.reply.header.rcode != dnslib.RCODE.SERVFAIL
        assert accepted == answered, (end, length)
        if answered:
            assert len(local.reply.rr) == length + (end == "end.test")


def test_the_largest_accepted_rrset_fits_a_message_for_any_query(tmp_path: Path) -> None:
    """4,075 A records under a wildcard: accepted, and the answer to a 253-character
    name with EDNS and the longest DNS cookie still fits 65,535 bytes; 4,076 do not load."""
    fits = ANSWER_ROOM // 16
    assert fits == 4075
    write(tmp_path, "w.yaml", f"records:\n  '*.w.test':\n    A: {addresses(fits)}\n")
    overrides = load_zone_set(tmp_path).select(None)
    qname = ("a" * 61 + ".") * 3 + "a" * (253 - 3 * 62 - len(".w.test")) + ".w.test"
    assert len(qname) == 253
    entry = overrides.lookup(qname)
    assert entry is not None
    request = dnslib.DNSRecord.question(qname, "A")
    local = answer.local_answer(request, entry, overrides, serial=1)
    edns = answer.ClientEdns(True, 65535, False, cookie=b"c" * 8)
    cookie = dnslib.EDNSOption(10, b"c" * 40)
    wire = answer.pack(local.reply, edns, 1232, limit=65535, options=[cookie])
    assert dnslib.DNSRecord.parse(wire).header.tc == 0
    assert len(wire) <= 65535
    write(tmp_path, "w.yaml", f"records:\n  '*.w.test':\n    A: {addresses(fits + 1)}\n")
    [problem] = problems_of(tmp_path)
    assert "the 4,076 A records take 65,216 bytes, more than a DNS message holds" in problem


def test_txt_limits_count_bytes_and_string_lengths(tmp_path: Path) -> None:
    # 65,280 UTF-8 bytes (two per character) make 256 strings: 65,536 bytes of data.
    write(tmp_path, "t.yaml", f"records:\n  t.test: {{TXT: '{'é' * 32_640}'}}\n")
    [problem] = problems_of(tmp_path)
    assert "65,536 bytes as a record, more than the 65,535 a record holds" in problem
    # One byte less is a valid record, but with the rest of the answer too big a message.
    write(tmp_path, "t.yaml", f"records:\n  t.test: {{TXT: '{'x' * 65_279}'}}\n")
    [problem] = problems_of(tmp_path)
    assert "the 1 TXT records take 65,547 bytes, more than a DNS message holds" in problem


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[DnsPeer]:
    with dnsmasq(tmp_path, "--address=/test/") as peer:
        yield peer


@pytest.mark.e2e
def test_a_real_server_answers_the_largest_accepted_records_over_tcp(
    tmp_path: Path, upstream: DnsPeer
) -> None:
    """What the check lets through at its limits is answered in full, not TC."""
    zone_dir = tmp_path / "zones"
    zone_dir.mkdir()
    txt = "y" * 64_000  # 64,251 bytes of record data
    write(
        zone_dir,
        "big.yaml",
        f"records:\n  txt.test: {{TXT: '{txt}'}}\n  many.test: {{A: {addresses(4075)}}}\n"
        + chain(MAX_CNAME_CHAIN - 1).removeprefix("records:\n"),
    )
    load_zone_set(zone_dir)  # what check says
    with dnsoverride_serve(tmp_path, zone_dir, [upstream.address]) as server:
        reply = server.query("txt.test", "TXT", tcp=True, use_edns=0, payload=1232)
        assert not reply.flags & 0x0200  # TC
        assert b"".join(reply.answer[0][0].strings) == txt.encode()
        reply = server.query("many.test", "A", tcp=True)
        assert not reply.flags & 0x0200
        assert len(reply.answer[0]) == 4075
        reply = server.query("c0.test", "A", tcp=True)
        assert [str(rrset.name) for rrset in reply.answer][-1] == "end.test."
        assert len(reply.answer) == MAX_CNAME_CHAIN
