"""`dnsoverride serve` over real sockets: a real dnsmasq upstream, dnspython and dig clients."""

from __future__ import annotations

import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.support.peers import DnsPeer, dnsmasq, dnsoverride_serve, unbound
from tests.support.ports import free_port

pytestmark = pytest.mark.e2e

ZONE = """\
ttl: 60
records:
  registry-1.docker.io:
    A: 10.0.0.5
  mirrorlist.centos.org:
    A: [10.0.0.6, 10.0.0.7]
    AAAA: fd00::6
  "*.apps.ci.example":
    CNAME: ingress.ci.example.
  ingress.ci.example:
    A: 10.0.0.9
  up-alias.ci.example:
    CNAME: www.forwarded.test.
  big.ci.example:
    A: [{addresses}]
  txt.ci.example:
    TXT: "hello"
    MX: 10 mail.ci.example.
"""
BIG = 60


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dns")


@pytest.fixture(scope="module")
def zones(workdir: Path) -> Path:
    directory = workdir / "zones"
    directory.mkdir()
    addresses = ", ".join(f"10.1.0.{i}" for i in range(1, BIG + 1))
    (directory / "ci.yaml").write_text(ZONE.format(addresses=addresses))
    return directory


@pytest.fixture(scope="module")
def upstream(workdir: Path) -> Iterator[DnsPeer]:
    big = [f"--host-record=big.forwarded.test,192.0.2.{i}" for i in range(1, 101)]
    with dnsmasq(
        workdir,
        "--address=/forwarded.test/192.0.2.1",
        "--address=/nx.test/",
        "--local-ttl=300",
        *big,
    ) as peer:
        yield peer


@pytest.fixture(scope="module")
def server(workdir: Path, zones: Path, upstream: DnsPeer) -> Iterator[DnsPeer]:
    # The default `workers` (auto: a process per usable CPU): the protocol tests below
    # hold whichever process the kernel hands each query (one per source port).
    with dnsoverride_serve(workdir, zones, [upstream.address], workers=None) as peer:
        yield peer


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(rdata.to_text() for rrset in reply.answer for rdata in rrset)


def _udp_socket() -> socket.socket:
    """A datagram socket for several queries from one source port (dnspython wants it
    non-blocking)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


def _query(name: str) -> dns.message.Message:
    return dns.message.make_query(name, "A")


def test_overridden_a_over_udp_and_tcp_is_authoritative(server: DnsPeer) -> None:
    for tcp in (False, True):
        reply = server.query("registry-1.docker.io", "A", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert addresses(reply) == ["10.0.0.5"]
        assert reply.flags & dns.flags.AA
        assert reply.flags & dns.flags.RA
        assert reply.flags & dns.flags.RD
        assert reply.answer[0].ttl == 60


def test_rd_is_echoed_and_case_is_preserved(server: DnsPeer) -> None:
    query = dns.message.make_query("ReGiStRy-1.DoCkEr.Io", "A")
    query.flags &= ~dns.flags.RD
    # One source port: the kernel hands both to the same process (the server runs the
    # default `workers`), so the second answer comes from its raw answer cache.
    with _udp_socket() as sock:
        for _ in range(2):
            reply = dns.query.udp(query, server.host, 3, server.port, sock=sock)
            assert not reply.flags & dns.flags.RD
            assert reply.question[0].name.to_text() == "ReGiStRy-1.DoCkEr.Io."
            assert addresses(reply) == ["10.0.0.5"]
    other_case = dns.query.udp(
        dns.message.make_query("registry-1.DOCKER.io", "A"), server.host, 3, server.port
    )
    assert other_case.question[0].name.to_text() == "registry-1.DOCKER.io."
    assert other_case.flags & dns.flags.RD


def test_aaaa_list_and_local_cname_wildcard(server: DnsPeer) -> None:
    assert addresses(server.query("mirrorlist.centos.org", "AAAA")) == ["fd00::6"]
    assert addresses(server.query("mirrorlist.centos.org", "A")) == ["10.0.0.6", "10.0.0.7"]
    reply = server.query("build-42.apps.ci.example", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    chain = [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)) for rrset in reply.answer]
    assert chain == [("build-42.apps.ci.example.", "CNAME"), ("ingress.ci.example.", "A")]
    assert reply.answer[1][0].to_text() == "10.0.0.9"


def test_undefined_type_on_overridden_name_is_nodata_with_soa(server: DnsPeer) -> None:
    for rdtype in ("AAAA", "HTTPS", "TXT"):
        reply = server.query("registry-1.docker.io", rdtype)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer == []
        assert reply.flags & dns.flags.AA
        assert [dns.rdatatype.to_text(r.rdtype) for r in reply.authority] == ["SOA"]
        assert reply.authority[0].ttl == 60


def test_txt_and_mx(server: DnsPeer) -> None:
    assert addresses(server.query("txt.ci.example", "TXT")) == ['"hello"']
    assert addresses(server.query("txt.ci.example", "MX")) == ["10 mail.ci.example."]


def test_names_below_an_override_are_forwarded(server: DnsPeer, workdir: Path) -> None:
    reply = server.query("below.registry-1.docker.io", "A")
    # dnsmasq knows nothing about it and refuses; we never answered it locally.
    assert not reply.flags & dns.flags.AA
    assert reply.rcode() == dns.rcode.SERVFAIL


def test_forwarded_name_and_nxdomain_pass_through(server: DnsPeer) -> None:
    with _udp_socket() as sock:  # one process: `again` is its cached answer
        reply = dns.query.udp(_query("www.forwarded.test"), server.host, 3, server.port, sock=sock)
        assert reply.rcode() == dns.rcode.NOERROR
        assert addresses(reply) == ["192.0.2.1"]
        assert not reply.flags & dns.flags.AA
        assert reply.flags & dns.flags.RA
        again = dns.query.udp(_query("WWW.forwarded.TEST"), server.host, 3, server.port, sock=sock)
    assert again.question[0].name.to_text() == "WWW.forwarded.TEST."
    assert addresses(again) == ["192.0.2.1"]
    assert 0 < again.answer[0].ttl <= 300
    assert server.query("host.nx.test", "A").rcode() == dns.rcode.NXDOMAIN


def test_cname_override_to_an_upstream_name(server: DnsPeer) -> None:
    reply = server.query("up-alias.ci.example", "A")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [dns.rdatatype.to_text(r.rdtype) for r in reply.answer] == ["CNAME", "A"]
    assert reply.answer[1][0].to_text() == "192.0.2.1"


def test_edns_is_echoed_and_large_udp_answers_are_truncated(server: DnsPeer) -> None:
    plain = dns.query.udp(
        dns.message.make_query("big.ci.example", "A"), server.host, 3, server.port
    )
    assert plain.flags & dns.flags.TC
    assert plain.answer == []
    assert plain.edns < 0  # no OPT for a client that sent none
    edns_query = dns.message.make_query("big.ci.example", "A", use_edns=0, payload=4096)
    edns_reply = dns.query.udp(edns_query, server.host, 3, server.port)
    assert edns_reply.edns == 0
    assert edns_reply.payload == 1232  # our buffer size, not the client's
    assert not edns_reply.flags & dns.flags.TC
    # TCP answers come from the answer cache too, never the truncated UDP one: both over
    # one connection, so from one process (the server runs the default `workers`).
    with socket.create_connection((server.host, server.port), timeout=5) as connection:
        full = dns.query.tcp(_query("big.ci.example"), server.host, 3, server.port, sock=connection)
        assert len(addresses(full)) == BIG
        again = dns.query.tcp(
            _query("big.ci.example"), server.host, 3, server.port, sock=connection
        )
    assert not again.flags & dns.flags.TC
    assert len(addresses(again)) == BIG


def test_upstream_truncation_is_retried_over_tcp(server: DnsPeer) -> None:
    reply = server.query("big.forwarded.test", "A", tcp=True)
    assert reply.rcode() == dns.rcode.NOERROR
    assert len(addresses(reply)) == 100


def test_any_gets_a_minimal_answer(server: DnsPeer) -> None:
    """RFC 8482, and issue 10 item 7: ANY on an override answered with the RRset of the
    lowest type number (here both A records), not the smallest one; fails before the fix."""
    local = server.query("mirrorlist.centos.org", "ANY")
    # One RRset, the smallest: one AAAA (28 octets) rather than two A records (32).
    assert [dns.rdatatype.to_text(r.rdtype) for r in local.answer] == ["AAAA"]
    assert len(local.answer[0]) == 1
    forwarded = server.query("www.forwarded.test", "ANY")
    assert [dns.rdatatype.to_text(r.rdtype) for r in forwarded.answer] == ["HINFO"]
    assert "RFC8482" in forwarded.answer[0][0].to_text()


def test_dig_sees_the_override(server: DnsPeer) -> None:
    result = subprocess.run(
        [
            "dig",
            "+time=2",
            "+tries=1",
            f"@{server.host}",
            "-p",
            str(server.port),
            "registry-1.docker.io",
            "A",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "status: NOERROR" in result.stdout
    assert "flags: qr aa rd ra" in result.stdout
    assert "registry-1.docker.io.\t60\tIN\tA\t10.0.0.5" in result.stdout
    short = subprocess.run(
        ["dig", "+short", "+tcp", f"@{server.host}", "-p", str(server.port), "www.forwarded.test"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert short.stdout.split() == ["192.0.2.1"]


def _raw(server: DnsPeer, packet: bytes) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(packet, (server.host, server.port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


def test_malformed_packets_get_formerr_or_are_dropped(server: DnsPeer) -> None:
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    packets = {
        "truncated header": b"\xbe\xef\x01",
        "bad label length": header + b"\x45abc\x00\x00\x01\x00\x01",
        "compression loop": header + b"\xc0\x0c\x00\x01\x00\x01",
        "label runs past end": header + b"\x3fabc",
        "garbage": bytes(range(256)) * 2,
        "no question": struct.pack("!HHHHHH", 0xBEEF, 0x0100, 0, 0, 0, 0),
    }
    for what, packet in packets.items():
        reply = _raw(server, packet)
        if reply is not None:
            assert reply[:2] == packet[:2], what
            assert reply[2] & 0x80, what
            assert reply[3] & 0x0F == dns.rcode.FORMERR, what
    assert _raw(server, packets["bad label length"]) is not None  # not silently dropped
    assert addresses(server.query("registry-1.docker.io")) == ["10.0.0.5"]
    assert server.process.poll() is None


def test_views_by_source_address_and_refused_clients(workdir: Path, upstream: DnsPeer) -> None:
    zones = workdir / "views-zones"
    zones.mkdir()
    (zones / "ci.yaml").write_text("records:\n  registry-1.docker.io: {A: 10.0.0.5}\n")
    (zones / "lab.yaml").write_text("records:\n  registry-1.docker.io: {A: 10.9.9.9}\n")
    config = """\
        allow: [127.0.0.1/32, 127.0.0.2/32]
        views:
          - name: cache-host
            clients: [127.0.0.2/32]
            zones: []
          - name: lab
            clients: [127.0.0.1/32]
            zones: [lab]
        default_view: lab
        """
    (zones.parent / "views-up").mkdir(exist_ok=True)
    with (
        dnsmasq(
            zones.parent / "views-up", "--address=/docker.io/198.51.100.7", "--local-ttl=60"
        ) as real,
        dnsoverride_serve(workdir, zones, [real.address], config=config) as server,
    ):
        lab = server.query("registry-1.docker.io", source="127.0.0.1")
        assert addresses(lab) == ["10.9.9.9"]
        assert lab.flags & dns.flags.AA
        cache_host = server.query("registry-1.docker.io", source="127.0.0.2")
        assert addresses(cache_host) == ["198.51.100.7"]  # the real name, from upstream
        assert not cache_host.flags & dns.flags.AA
        for tcp in (False, True):
            refused = server.query("registry-1.docker.io", source="127.0.0.3", tcp=tcp)
            assert refused.rcode() == dns.rcode.REFUSED
            assert refused.answer == []
        refused_forward = server.query("www.forwarded.test", source="127.0.0.3")
        assert refused_forward.rcode() == dns.rcode.REFUSED
    del upstream


def test_dead_upstream_servfail_within_budget_then_stale(workdir: Path, zones: Path) -> None:
    upstream_dir = workdir / "dying"
    upstream_dir.mkdir()
    config = """\
        timeout: 1.0
        attempt_timeout: 0.4
        cache: {max_ttl: 1}
        """
    dead_port = free_port()
    with (
        dnsmasq(upstream_dir, "--address=/stale.test/192.0.2.77", "--local-ttl=300") as real,
        dnsoverride_serve(
            workdir, zones, [real.address, f"127.0.0.1:{dead_port}"], config=config
        ) as server,
    ):
        assert addresses(server.query("a.stale.test")) == ["192.0.2.77"]
        real.stop()
        time.sleep(1.1)  # the cached answer (TTL clamped to 1 s) expires
        started = time.monotonic()
        stale = server.query("a.stale.test")
        assert time.monotonic() - started < 1.5
        assert stale.rcode() == dns.rcode.NOERROR
        assert addresses(stale) == ["192.0.2.77"]
        assert stale.answer[0].ttl == 30  # RFC 8767
        started = time.monotonic()
        failed = server.query("never-seen.stale.test", timeout=5)
        assert failed.rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - started < 1.5
        assert server.query("registry-1.docker.io").rcode() == dns.rcode.NOERROR


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnsoverride", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_refuses_to_forward_to_itself(zones: Path) -> None:
    port = free_port()
    result = _serve(
        "--zones", str(zones), "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{port}"
    )
    assert result.returncode == 2
    assert f"upstream 127.0.0.1:{port} is our own listening address" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_zone_stops_start_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(textwrap.dedent("records:\n  a.example:\n    A: 1.2.3\n"))
    result = _serve(
        "--zones",
        str(tmp_path),
        "--upstream",
        "127.0.0.1:9",
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == 2
    assert f"{tmp_path / 'bad.yaml'}:3: a.example: bad A value '1.2.3'" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_and_sigint_exit_0_with_start_event(
    workdir: Path, zones: Path, upstream: DnsPeer
) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        with dnsoverride_serve(
            workdir, zones, [upstream.address], "--query-log", workers=None
        ) as server:
            server.query("registry-1.docker.io")
            assert server.stop(sig) == 0
            log = server.log_text()
        assert '"event": "started"' in log
        assert f'"listeners": ["127.0.0.1:{server.port}"]' in log
        assert '"event": "query"' in log
        assert '"event": "stopped"' in log


def test_negative_answers_are_cached_from_the_soa(workdir: Path, zones: Path) -> None:
    upstream_dir = workdir / "negative"
    upstream_dir.mkdir()
    with (
        unbound(
            upstream_dir,
            [
                "neg.test. 3600 IN SOA ns.neg.test. h.neg.test. 1 3600 600 86400 120",
                "a.neg.test. 300 IN A 192.0.2.8",
            ],
            local_zones=['"neg.test." static'],
        ) as real,
        dnsoverride_serve(workdir, zones, [real.address]) as server,
    ):
        first = server.query("missing.neg.test")
        assert first.rcode() == dns.rcode.NXDOMAIN
        assert [dns.rdatatype.to_text(r.rdtype) for r in first.authority] == ["SOA"]
        nodata = server.query("a.neg.test", "AAAA")
        assert nodata.rcode() == dns.rcode.NOERROR
        assert nodata.answer == []
        real.stop()
        # Upstream gone: both negative answers still come from the cache (RFC 2308).
        assert server.query("MISSING.neg.test").rcode() == dns.rcode.NXDOMAIN
        assert server.query("a.neg.test", "AAAA", tcp=True).rcode() == dns.rcode.NOERROR
        cached = server.query("missing.neg.test", tcp=True)
        assert 0 < cached.authority[0].ttl <= 120


def test_ipv6_listener(workdir: Path, zones: Path, upstream: DnsPeer) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        free_port("::1")
    except OSError:
        pytest.skip("no ::1")
    with dnsoverride_serve(workdir, zones, [upstream.address], host="::1", workers=None) as server:
        assert addresses(server.query("registry-1.docker.io")) == ["10.0.0.5"]
        assert addresses(server.query("www.forwarded.test", tcp=True)) == ["192.0.2.1"]


def test_fuzzed_queries_never_stop_the_server(server: DnsPeer) -> None:
    rng = random.Random(2308)
    valid = dns.message.make_query("registry-1.docker.io", "A", use_edns=0).to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(400):
            packet = bytearray(valid)
            for _ in range(rng.randint(1, 6)):
                packet[rng.randrange(len(packet))] = rng.randrange(256)
            sock.sendto(bytes(packet[: rng.randint(1, len(packet))]), (server.host, server.port))
        for _ in range(100):
            sock.sendto(rng.randbytes(rng.randint(0, 600)), (server.host, server.port))
    for tcp in (False, True):
        assert addresses(server.query("registry-1.docker.io", tcp=tcp)) == ["10.0.0.5"]
    assert server.process.poll() is None
    assert "Traceback" not in server.log_text()


def test_zone_transfers_are_refused(server: DnsPeer) -> None:
    for rdtype in ("AXFR", "IXFR"):
        reply = server.query("registry-1.docker.io", rdtype, tcp=True)
        assert reply.rcode() == dns.rcode.REFUSED
        assert reply.answer == []


TCP_CAP = 20
TCP_IDLE = 2.0


@pytest.mark.timeout(60)
def test_tcp_connection_cap_and_idle_timeout_are_configured(
    workdir: Path, zones: Path, upstream: DnsPeer
) -> None:
    config = f"tcp: {{max_connections: {TCP_CAP}, idle_timeout: {TCP_IDLE}}}\n"
    with dnsoverride_serve(workdir, zones, [upstream.address], config=config) as server:
        idle = socket.create_connection((server.host, server.port), timeout=20)
        opened_at = time.monotonic()
        held = []
        try:
            for _ in range(TCP_CAP - 1):
                held.append(socket.create_connection((server.host, server.port), timeout=5))
            # At its cap: one more is accepted by the kernel, then closed at once.
            with socket.create_connection((server.host, server.port), timeout=5) as extra:
                assert extra.recv(2) == b""
            # A connection within the cap still answers.
            query = dns.message.make_query("registry-1.docker.io", "A")
            reply = dns.query.tcp(query, server.host, 3, server.port, sock=held[-1])
            assert addresses(reply) == ["10.0.0.5"]
        finally:
            for sock in held:
                sock.close()
        with idle:
            assert idle.recv(2) == b""  # closed by the server, not by our 20 s timeout
            waited = time.monotonic() - opened_at
    assert TCP_IDLE - 0.5 <= waited <= TCP_IDLE + 3
