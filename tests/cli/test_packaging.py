"""packaging/: units checked by systemd's own tools, configs by the daemons' real config
loaders (the RPM spec: tests/cli/test_packaging_rpm.py)."""

from __future__ import annotations

import configparser
import ipaddress
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from dnsoverride.ca import names_from_zones
from dnsoverride.cache import config as cache_config
from dnsoverride.cache.packages import config as packages_config
from dnsoverride.cache.packages.repos_config import BUILT_IN
from dnsoverride.cache.registry import config as registry_config
from dnsoverride.cli import build_parser
from dnsoverride.dns import config as serve_config
from dnsoverride.dns.zones import load as zones
from tests.support.peers import dnsmasq, dnsoverride_serve
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
UNITS = PACKAGING / "systemd"
UNIT_FILES = sorted([*UNITS.glob("*.service"), *UNITS.glob("*.socket")])
SERVICES = [path for path in UNIT_FILES if path.suffix == ".service"]
CONFIG = PACKAGING / "config"
# The package hosts the example zones point at the cache: what the mirrorlist and
# metalink clients ask, and the repositories their answers name (which the repository
# cache routes: REPOSITORY_HOSTS).
REPOSITORY_HOSTS = {host for upstream in BUILT_IN for host in upstream.hosts}
PACKAGE_HOSTS = {
    "mirrorlist.centos.org",
    "mirrors.centos.org",
    "mirrors.fedoraproject.org",
    *REPOSITORY_HOSTS,
}

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze"
)


def _unit(path: Path) -> configparser.RawConfigParser:
    # strict=False: systemd allows repeating a key (ExecReload=, SystemCallFilter=).
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _installed_units(tmp_path: Path) -> list[Path]:
    """The units as installed, with ExecStart= pointing at this environment's entry point
    (systemd-analyze verify insists that the binary exists)."""
    dnsoverride = shutil.which("dnsoverride")
    assert dnsoverride, "the project must be installed (pip install -e .)"
    copies = []
    for unit in UNIT_FILES:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/usr/bin/dnsoverride", dnsoverride))
        copies.append(copy)
    return copies


@needs_systemd
@pytest.mark.e2e
def test_systemd_analyze_verify_passes_without_warnings(tmp_path: Path) -> None:
    units = _installed_units(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 even for unknown keys or unparsable values; it only warns about them.
    ours = [
        line
        for line in result.stderr.splitlines()
        if str(tmp_path) in line or "dnsoverride" in line
    ]
    assert result.returncode == 0, result.stderr
    assert ours == []


@needs_systemd
@pytest.mark.e2e
def test_systemd_analyze_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is only worth something if a misspelt hardening option shows up."""
    (unit,) = [u for u in _installed_units(tmp_path) if u.name == "dnsoverride.service"]
    unit.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHme=yes"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert "Unknown key" in result.stderr


@needs_systemd
@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
@pytest.mark.e2e
def test_services_are_hardened(tmp_path: Path, service: Path) -> None:
    """systemd's own exposure score (0 best .. 10 worst) stays at 2.0 or below."""
    (unit,) = [u for u in _installed_units(tmp_path) if u.name == service.name]
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if "unrecognized option" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    assert result.returncode == 0, result.stdout[-2000:]


@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_services_follow_the_daemon_protocol(service: Path) -> None:
    section = _unit(service)["Service"]
    assert section["Type"] == "notify"
    assert "/bin/kill -HUP $MAINPID" in section["ExecReload"]
    assert section["User"] == "dnsoverride"
    assert section["ProtectSystem"] == "strict"
    assert section["NoNewPrivileges"] == "yes"
    assert int(section["WatchdogSec"].removesuffix("s")) > 0
    assert "--log-format json" in section["ExecStart"]


def _commands(unit: Path) -> list[list[str]]:
    lines = unit.read_text().splitlines()
    return [
        shlex.split(line.split("=", 1)[1])
        for line in lines
        if line.startswith(("ExecStart=", "ExecReload=", "ExecStartPre=", "ExecStop="))
    ]


@pytest.mark.parametrize("service", SERVICES, ids=lambda p: p.name)
def test_unit_command_lines_parse_with_the_real_cli(service: Path) -> None:
    """A renamed or removed flag breaks the units; catch it here, not on the servers."""
    parser = build_parser()
    ours = [argv for argv in _commands(service) if argv[0] == "/usr/bin/dnsoverride"]
    assert ours
    for argv in ours:
        parser.parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown flag


def test_socket_passes_udp_before_tcp_on_port_53() -> None:
    # The daemon tells the sockets apart by type, but the README and the notes promise
    # fd 3 = UDP, fd 4 = TCP; ConfigParser keeps only the last of repeated keys, so read lines.
    lines = (UNITS / "dnsoverride.socket").read_text().splitlines()
    listen = [line for line in lines if line.startswith("Listen")]
    assert listen == ["ListenDatagram=53", "ListenStream=53"]
    assert _unit(UNITS / "dnsoverride.service")["Unit"]["Requires"] == "dnsoverride.socket"


def test_cache_keeps_its_store_in_the_cache_directory() -> None:
    """The store directory keeps its name from before the cache served packages, so an
    upgraded host's store carries over."""
    section = _unit(UNITS / "dnsoverride-cache.service")["Service"]
    store = Path("/var/cache") / section["CacheDirectory"]
    assert store == Path("/var/cache/dnsoverride/registry")
    assert cache_config.load(CONFIG / "cache.yaml").storage == store
    assert "--config /etc/dnsoverride/cache.yaml" in section["ExecStart"]


def test_the_control_socket_is_where_the_unit_lets_the_cache_create_it() -> None:
    """/run is read-only to the unit (ProtectSystem=strict) but for its RuntimeDirectory=;
    `dnsoverride cache purge/warm` look for the socket there by default."""
    from dnsoverride import cachectl

    section = _unit(UNITS / "dnsoverride-cache.service")["Service"]
    socket = cache_config.load(CONFIG / "cache.yaml").control_socket
    assert socket is not None and socket.parent == Path("/run") / section["RuntimeDirectory"]
    assert section["RuntimeDirectoryMode"] == "0750"
    assert socket == cachectl.DEFAULT_SOCKET


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="needs systemctl")
@pytest.mark.e2e
def test_registry_unit_name_is_an_alias_of_the_cache(tmp_path: Path) -> None:
    """dnsoverride-registry.service keeps working: enabling the cache links its old name
    too (Alias=), and the packaged unit-file symlink (the RPM's) is that same unit."""
    unit_dir = tmp_path / "usr/lib/systemd/system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "dnsoverride-cache.service").write_text(
        (UNITS / "dnsoverride-cache.service").read_text()
    )
    (unit_dir / "dnsoverride-registry.service").symlink_to("dnsoverride-cache.service")
    spec = (PACKAGING / "rpm" / "dnsoverride.spec").read_text()
    assert (
        "ln -s dnsoverride-cache.service %{buildroot}%{_unitdir}/dnsoverride-registry.service"
        in spec
    )

    def systemctl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["systemctl", f"--root={tmp_path}", *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    enabled = systemctl("enable", "dnsoverride-registry.service")
    assert enabled.returncode == 0, enabled.stderr
    etc = tmp_path / "etc/systemd/system"
    wanted = etc / "multi-user.target.wants" / "dnsoverride-cache.service"
    assert wanted.is_symlink()
    assert systemctl("is-enabled", "dnsoverride-cache.service").stdout.strip() == "enabled"
    assert systemctl("is-enabled", "dnsoverride-registry.service").stdout.strip() in (
        "alias",
        "enabled",
    )


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="needs systemd-sysusers and systemd-tmpfiles",
)
@pytest.mark.e2e
def test_sysusers_and_tmpfiles_create_the_user_and_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "dnsoverride.sysusers.conf")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = (tmp_path / "etc" / "passwd").read_text()
    (entry,) = [line for line in passwd.splitlines() if line.startswith("dnsoverride:")]
    uid, gid = (int(field) for field in entry.split(":")[2:4])
    assert 0 < uid < 1000  # a system user
    assert entry.endswith("nologin")
    subprocess.run(
        [
            "systemd-tmpfiles",
            f"--root={tmp_path}",
            "--create",
            str(UNITS / "dnsoverride.tmpfiles.conf"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    tls = (tmp_path / "etc/dnsoverride/tls").stat()
    store = (tmp_path / "var/cache/dnsoverride/registry").stat()
    assert (stat.S_IMODE(tls.st_mode), tls.st_uid, tls.st_gid) == (0o750, 0, gid)
    assert (stat.S_IMODE(store.st_mode), store.st_uid, store.st_gid) == (0o750, uid, gid)
    assert (tmp_path / "etc/dnsoverride/zones").is_dir()


def _documented_keys(path: Path) -> set[str]:
    """Keys that appear in the file as `key:`, active or in a commented-out example."""
    pattern = re.compile(r"^[#\s-]*([a-z][a-z0-9_]*):", re.MULTILINE)
    return set(pattern.findall(path.read_text()))


def test_dnsoverride_yaml_parses_with_the_serve_config_loader(tmp_path: Path) -> None:
    # A resolv.conf of our own: parsing must not depend on this machine's resolver.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    path = CONFIG / "dnsoverride.yaml"
    loaded = serve_config.load_config(path, resolv_conf=resolv)
    assert loaded.zones == CONFIG / "zones"
    assert loaded.metrics is not None
    # Every setting the daemon knows is documented in the shipped file.
    documented = _documented_keys(path)
    known = {
        *serve_config.TOP_KEYS,
        *serve_config.CACHE_KEYS,
        *serve_config.VIEW_KEYS,
        *serve_config.PROBE_KEYS,
        *serve_config.TCP_KEYS,
        *serve_config.RATELIMIT_KEYS,
        *serve_config.FORWARD_KEYS,
    }
    assert known - documented == set()
    # Names are used consistently by the daemons' own loader.
    assert zones.load_zone_set(loaded.zones, loaded.view_selectors()).names()


def test_cache_yaml_parses_with_the_cache_config_loader() -> None:
    path = CONFIG / "cache.yaml"
    loaded = cache_config.load(path)
    assert loaded.metrics is not None
    assert loaded.budget is not None
    assert loaded.registry.upstreams[0].name == "registry-1.docker.io"
    assert loaded.packages.mirrorlist.preset == "centos-vault"
    # Every setting the daemon knows is documented in the shipped file.
    documented = _documented_keys(path)
    known = {
        *cache_config.TOP_KEYS,
        *cache_config.TLS_KEYS,
        *registry_config.UPSTREAM_KEYS,
        *registry_config.CLIENTS_KEYS,
        *packages_config.PACKAGES_KEYS,
        *packages_config.MIRRORLIST_KEYS,
        *packages_config.MIRROR_RULE_KEYS,
        *packages_config.METALINK_KEYS,
        *packages_config.METALINK_RULE_KEYS,
    }
    assert known - documented == set()


def test_example_zone_loads() -> None:
    loaded = zones.load_zone_set(CONFIG / "zones")
    assert loaded.names() == {"registry-1.docker.io", *PACKAGE_HOSTS, "*.apps.ci.example"}
    assert [gated.name for gated in loaded.health_gated()] == ["registry-1.docker.io"]


def _uncommented(text: str, key: str) -> str:
    """`text` with its commented-out top-level block `# key:` switched on."""
    lines = text.splitlines()
    start = lines.index(f"# {key}:")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("# "))
    return "\n".join([*lines[:start], *(line[2:] for line in lines[start:end]), *lines[end:]])


def test_packaged_cache_config_serves_what_the_zone_sample_points_at(tmp_path: Path) -> None:
    """The zone sample sends registry-1.docker.io to the cache at 10.0.0.5 and health-checks
    HTTPS on 443 there; the cache config's transparent-mode block (commented out until a
    certificate exists) serves HTTPS on exactly that address, with a certificate issued as
    its comment says, for names it routes upstream. Fails on the pre-fix sample, whose
    `ca issue` line named no address."""
    sample = zones.load_zone_set(CONFIG / "zones")
    (gated,) = sample.health_gated()
    assert gated.check.kind == "https"
    text = (CONFIG / "cache.yaml").read_text()
    path = tmp_path / "cache.yaml"
    path.write_text(_uncommented(text, "tls"))
    cache = cache_config.load(path)
    assert cache.tls_listen is not None
    host, port = cache.tls_listen
    assert [(address, gated.check.port) for address in gated.addresses] == [(host, port)]
    # The certificate the comment's `ca issue` makes: every name pointing at the address.
    issue = re.search(r"--cache-address (\S+)", text)
    assert issue and issue.group(1) == host
    certified = names_from_zones(CONFIG / "zones", [ipaddress.ip_address(host)])
    assert certified == sorted([gated.name, *PACKAGE_HOSTS])
    routed = {name for upstream in cache.registry.upstreams for name in upstream.hosts}
    routed |= {*cache.packages.mirrorlist.hosts, *cache.packages.metalink.hosts}
    routed |= REPOSITORY_HOSTS
    assert set(certified) <= routed


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq")
@pytest.mark.timeout(60)
@pytest.mark.e2e
def test_packaged_config_and_example_zone_serve(tmp_path: Path) -> None:
    """The shipped dnsoverride.yaml and example zone, run by the real daemon."""
    zones_dir = tmp_path / "zones"
    zones_dir.mkdir()
    # Tests talk to loopback only: the example's 10.0.0.x targets (health-probed!) move there.
    example = (CONFIG / "zones" / "example.yaml").read_text()
    (zones_dir / "example.yaml").write_text(re.sub(r"\b10\.0\.0\.", "127.0.0.", example))
    config = (CONFIG / "dnsoverride.yaml").read_text()
    with (
        dnsmasq(tmp_path, "--address=/forwarded.test/192.0.2.1") as upstream,
        # --listen, --upstream and --metrics override the packaged values, as the unit's
        # socket does for `listen`.
        dnsoverride_serve(
            tmp_path,
            zones_dir,
            [upstream.address],
            "--metrics",
            f"127.0.0.1:{free_port()}",
            config=config,
        ) as server,
    ):
        (rrset,) = server.query("registry-1.docker.io").answer
        assert str(rrset[0]) == "127.0.0.5"
        for name in PACKAGE_HOSTS:
            (rrset,) = server.query(name).answer
            assert str(rrset[0]) == "127.0.0.5"
        (rrset,) = server.query("forwarded.test").answer
        assert str(rrset[0]) == "192.0.2.1"
