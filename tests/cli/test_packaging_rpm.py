"""packaging/rpm and .ci/install-deps: the spec as rpmspec parses it for each distribution
it targets (EL 8/9 bundle a python3.11 virtualenv, Fedora uses the system python3 and its
libraries), and the dnf branch of install-deps run against a recording dnf.

The bundled build itself is checked by hand (it needs the wheels from PyPI): see
packaging/rpm/make-wheelhouse and the README's "Install from the RPM"."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
SPEC = PACKAGING / "rpm" / "dnsoverride.spec"
UNITS = PACKAGING / "systemd"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
VENV = "/usr/lib/dnsoverride"

needs_rpmspec = pytest.mark.skipif(
    shutil.which("rpmspec") is None, reason="needs rpmspec (rpm package)"
)
# No define: what an rpm-based distribution that is neither EL nor Fedora gets.
DISTS = [[], ["rhel 8"], ["rhel 9"], ["fedora 41"]]
EL = [["rhel 8"], ["rhel 9"]]


def _rpmspec(spec: Path, defines: list[str], *query: str, sourcedir: Path | None = None) -> str:
    argv = ["rpmspec", *query]
    for define in [*defines, *([f"_sourcedir {sourcedir}"] if sourcedir else [])]:
        argv += ["--define", define]
    result = subprocess.run(
        [*argv, str(spec)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _parsed(defines: list[str]) -> str:
    return _rpmspec(SPEC, defines, "-P")


def _tags(spec: str, tag: str) -> list[str]:
    return re.findall(rf"^{tag}:\s*(.+?)\s*$", spec, re.MULTILINE)


_SECTIONS = "description|prep|build|install|check|pre|post|preun|postun|files|changelog"


def _section(spec: str, name: str) -> str:
    """The body of `%name` up to the next section line."""
    match = re.search(rf"^%{name}\b.*?\n(.*?)(?=^%(?:{_SECTIONS})\b|\Z)", spec, re.M | re.S)
    assert match, f"no %{name} section"
    return match.group(1)


def _before_install(spec: str) -> str:
    """%prep, %generate_buildrequires and %build: rpmspec -P (4.18) sometimes leaves out a
    section line that follows an %endif, so they are taken together."""
    match = re.search(r"^%prep\n(.*?)^%install\n", spec, re.M | re.S)
    assert match
    return match.group(1)


def _macros(tmp_path: Path, defines: list[str], names: list[str]) -> dict[str, str]:
    """Values of the spec's macros for a distribution: rpmspec -P prints no %global, so a
    copy of the spec echoes them in %prep."""
    probe = "".join(f": MACRO {name}=%{{?{name}}}\n" for name in names)
    copy = tmp_path / SPEC.name
    copy.write_text(SPEC.read_text().replace("\n%prep\n", f"\n%prep\n{probe}", 1))
    parsed = _rpmspec(copy, defines, "-P")
    return dict(re.findall(r"^: MACRO ([\w]+)=(.*)$", parsed, re.MULTILINE))


@needs_rpmspec
@pytest.mark.parametrize("defines", DISTS, ids=lambda d: d[0] if d else "default")
def test_rpm_spec_parses_and_matches_the_project(defines: list[str]) -> None:
    spec = _parsed(defines)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _tags(spec, "Version") == [VERSION]
    assert _tags(spec, "Name") == [project["name"]]
    # Every packaged file is installed by the spec.
    config = PACKAGING / "config"
    shipped = [*UNITS.iterdir(), *config.rglob("*.yaml"), *(PACKAGING / "grafana").glob("*.json")]
    for path in shipped:
        assert f"packaging/{path.relative_to(PACKAGING)} " in spec, path
    for unit in [*UNITS.glob("*.service"), *UNITS.glob("*.socket")]:
        assert f"/usr/lib/systemd/system/{unit.name}" in spec
    assert "/usr/bin/dnsoverride" in _section(spec, "files")


@needs_rpmspec
@pytest.mark.parametrize("defines", EL, ids=lambda d: d[0])
def test_el_bundles_a_python311_virtualenv(tmp_path: Path, defines: list[str]) -> None:
    """EL 8/9's python3 (3.6/3.9) is too old and EPEL has no Python 3.11 libraries: the
    package needs AppStream's python3.11 and nothing from EPEL."""
    spec = _parsed(defines)
    build_requires = _tags(spec, "BuildRequires")
    assert {"python3.11", "python3.11-pip"} <= set(build_requires)
    assert not {"python3-devel", "pyproject-rpm-macros"} & set(build_requires)
    assert _tags(spec, "Requires") == ["python3.11"]
    # The wheels carry native code: an arch package, for the arches of the wheelhouse.
    assert _tags(spec, "BuildArch") == []
    wheelhouse_arches = re.search(
        r"ARCHES:-([\w ]+)\}", (PACKAGING / "rpm" / "make-wheelhouse").read_text()
    )
    assert wheelhouse_arches
    assert _tags(spec, "ExclusiveArch") == [wheelhouse_arches.group(1)]
    assert f"dnsoverride-wheelhouse-{VERSION}.tar.gz" in _tags(spec, "Source2")
    # %autosetup -a 2: the wheelhouse is unpacked into the source tree.
    assert re.search(
        rf"-x \S+/dnsoverride-wheelhouse-{VERSION}\.tar\.gz$", _section(spec, "prep"), re.M
    )
    # Offline: pip may only use the wheelhouse.
    assert "--no-index --find-links dnsoverride-wheelhouse" in _before_install(spec)
    install = _section(spec, "install")
    assert re.search(rf"python3\.11 -m venv --without-pip \S+{VENV}\n", install)
    assert f"--find-links dnsoverride-wheelhouse-{VERSION} --find-links dist" in install
    assert re.search(rf"^ln -sr \S+{VENV}/bin/dnsoverride \S+/usr/bin/dnsoverride$", install, re.M)
    assert not re.search(r"^%pyproject", spec, re.MULTILINE)
    files = _section(spec, "files")
    assert re.search(rf"^{VENV}$", files, re.MULTILINE)
    macros = _macros(
        tmp_path,
        defines,
        [
            "__requires_exclude_from",
            "__provides_exclude_from",
            "__brp_mangle_shebangs_exclude_from",
            "__brp_python_bytecompile",
            "__brp_strip",
            "_build_id_links",
        ],
    )
    assert macros == {
        "__requires_exclude_from": f"^{VENV}/",
        "__provides_exclude_from": f"^{VENV}/",
        "__brp_mangle_shebangs_exclude_from": f"^{VENV}/",
        "__brp_python_bytecompile": "",
        "__brp_strip": "",
        "_build_id_links": "none",
    }


@needs_rpmspec
def test_fedora_uses_the_system_python_and_its_libraries(tmp_path: Path) -> None:
    spec = _parsed(["fedora 41"])
    assert {"python3-devel", "pyproject-rpm-macros", "systemd-rpm-macros"} <= set(
        _tags(spec, "BuildRequires")
    )
    assert not [r for r in _tags(spec, "(?:Build)?Requires") if "python3.11" in r]
    assert _tags(spec, "BuildArch") == ["noarch"]
    assert _tags(spec, "Source2") == []
    assert "\n%pyproject_buildrequires -x man\n" in _before_install(spec)
    assert "\n%pyproject_wheel\n" in _before_install(spec)
    assert "%pyproject_install" in _section(spec, "install")
    assert VENV not in spec.split("%changelog")[0]
    macros = _macros(
        tmp_path, ["fedora 41"], ["__requires_exclude_from", "__provides_exclude_from"]
    )
    assert macros == {"__requires_exclude_from": "", "__provides_exclude_from": ""}


@needs_rpmspec
@pytest.mark.parametrize("defines", EL, ids=lambda d: d[0])
def test_el_provides_name_what_the_wheelhouse_bundles(tmp_path: Path, defines: list[str]) -> None:
    """Provides: bundled(python3dist(NAME)) = VERSION for every pin of the wheelhouse's
    requirements.txt, names normalized as python3dist() names are (PEP 503, lower case)."""
    top = f"dnsoverride-wheelhouse-{VERSION}"
    pins = tmp_path / "requirements.txt"
    pins.write_text("PyYAML==6.0.2\nprometheus_client==0.21.0\nzope.interface==7.1\n")
    with tarfile.open(tmp_path / f"{top}.tar.gz", "w:gz") as tar:
        tar.add(pins, arcname=f"{top}/requirements.txt")
    provides = _rpmspec(SPEC, defines, "-q", "--provides", sourcedir=tmp_path).splitlines()
    bundled = sorted(line for line in provides if line.startswith("bundled("))
    assert bundled == [
        "bundled(python3dist(prometheus-client)) = 0.21.0",
        "bundled(python3dist(pyyaml)) = 6.0.2",
        "bundled(python3dist(zope-interface)) = 7.1",
    ]
    # Without the Source (a fresh checkout) the spec still parses, with no such lines.
    empty = _rpmspec(SPEC, defines, "-q", "--provides", sourcedir=tmp_path / "none")
    assert "bundled(" not in empty


@needs_rpmspec
def test_el8_creates_the_user_as_the_sysusers_file_says() -> None:
    """EL 8 has no %sysusers_create_compat: its %pre must make the same user by hand."""
    spec = _parsed(["rhel 8"])
    assert "systemd" in _tags(spec, "BuildRequires")
    assert "systemd-rpm-macros" not in _tags(spec, "BuildRequires")
    assert _tags(spec, r"Requires\(pre\)") == ["shadow-utils"]
    (line,) = [
        shlex.split(text)
        for text in (UNITS / "dnsoverride.sysusers.conf").read_text().splitlines()
        if text.startswith("u ")
    ]
    _, user, _, gecos, home, shell = line
    shell = "/sbin/nologin" if shell == "-" else shell
    pre = _section(spec, "pre")
    assert f"groupadd -r {user} " in pre
    (useradd,) = [
        shlex.split(text.split("||")[1]) for text in pre.splitlines() if "useradd" in text
    ]
    assert useradd == ["useradd", "-r", "-g", user, "-d", home, "-s", shell, "-c", gecos, user]
    for other in (["rhel 9"], ["fedora 41"]):
        assert "%sysusers_create_compat" in _section(_parsed(other), "pre")


# .ci/install-deps on a dnf machine: a PATH with no apt-get, a dnf that records what it is
# asked for (and fails for packages "not in the repositories"), a python3 of a given version.
_FAKE_DNF = """#!/bin/bash
echo "dnf $*" >>"$FAKE_LOG"
for arg in "$@"; do
    for missing in $FAKE_UNAVAILABLE; do
        [ "$arg" = "$missing" ] && { echo "No match for argument: $arg" >&2; exit 1; }
    done
done
# What the machine has afterwards, as far as the script looks.
for arg in "$@"; do
    [ "$arg" = python3.11 ] && ln -s python3 "$(dirname "$0")/python3.11"
done
exit 0
"""
_FAKE_PYTHON = """#!/bin/bash
if [ "$1" = -c ]; then
    exec {real} -c "import sys; sys.version_info = ($FAKE_PYTHON_VERSION,); $2"
fi
echo "$(basename "$0") $*" >>"$FAKE_LOG"
"""


def _install_deps_on_dnf(
    tmp_path: Path, python_version: str, unavailable: str = ""
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id", "basename", "ln"):
        real = shutil.which(tool)
        assert real
        (bin_dir / tool).symlink_to(real)
    (bin_dir / "dnf").write_text(_FAKE_DNF)
    python = _FAKE_PYTHON.replace("{real}", shutil.which("python3") or "python3")
    (bin_dir / "python3").write_text(python)
    for script in ("dnf", "python3"):
        (bin_dir / script).chmod(0o755)
    log = tmp_path / "log"
    log.touch()
    env = {
        "PATH": str(bin_dir),
        "FAKE_LOG": str(log),
        "FAKE_UNAVAILABLE": unavailable,
        "FAKE_PYTHON_VERSION": python_version,
    }
    bash = shutil.which("bash")
    assert bash
    result = subprocess.run(
        [bash, str(ROOT / ".ci" / "install-deps")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return result, log.read_text().splitlines()


@pytest.mark.skipif(os.geteuid() != 0, reason="run as root (install-deps adds sudo otherwise)")
def test_install_deps_on_el_installs_python311_and_reports_what_el_lacks(tmp_path: Path) -> None:
    result, calls = _install_deps_on_dnf(
        tmp_path, "3, 9", unavailable="dnsperf docker-distribution containerd moby-engine"
    )
    assert result.returncode == 0, result.stderr
    required = (
        "dnsmasq unbound skopeo bind-utils iproute systemd rpm-build createrepo_c vim-enhanced"
        " nginx python3.11 python3.11-pip"
    )
    assert calls == [
        f"dnf install -y -q {required}",
        "dnf install -y -q dnsperf",
        "dnf install -y -q docker-distribution",
        "dnf install -y -q containerd",
        "dnf install -y -q moby-engine",
        "python3.11 -m pip install -q --disable-pip-version-check -e .[test]",
    ]
    assert (
        "not in this machine's dnf repositories: dnsperf docker-distribution containerd"
        " moby-engine" in result.stderr
    )
    assert "python3.11 -m pytest" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="run as root (install-deps adds sudo otherwise)")
def test_install_deps_on_fedora_uses_python3(tmp_path: Path) -> None:
    result, calls = _install_deps_on_dnf(tmp_path, "3, 13")
    assert result.returncode == 0, result.stderr
    assert calls[0].endswith(" vim-enhanced nginx python3-pip")
    assert calls[-1] == "python3 -m pip install -q --disable-pip-version-check -e .[test]"
    assert result.stderr == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="run as root (install-deps adds sudo otherwise)")
def test_install_deps_fails_when_a_required_package_is_missing(tmp_path: Path) -> None:
    result, calls = _install_deps_on_dnf(tmp_path, "3, 12", unavailable="unbound")
    assert result.returncode != 0
    assert "No match for argument: unbound" in result.stderr
    assert not [call for call in calls if "pip install" in call]


@needs_rpmspec
@pytest.mark.parametrize("defines", DISTS, ids=lambda d: d[0] if d else "default")
def test_the_man_page_is_built_from_the_parser_and_shipped(defines: list[str]) -> None:
    """dnsoverride(1) is made by argparse-manpage from `dnsoverride.cli:build_parser` in
    %install (EL: argparse-manpage from the wheelhouse in a build-tree virtualenv, the
    parser from the installed one; Fedora: the `man` extra as a generated BuildRequires)
    and listed in %files."""
    spec = _parsed(defines)
    install = _section(spec, "install")
    assert re.search(
        r"argparse-manpage --module dnsoverride\.cli --function build_parser .*"
        rf"--version {re.escape(VERSION)} .*--output dnsoverride\.1$",
        install,
        re.MULTILINE,
    )
    assert re.search(
        r"^install -Dpm 0644 dnsoverride\.1 \S+/usr/share/man/man1/dnsoverride\.1$",
        install,
        re.MULTILINE,
    )
    assert re.search(r"^/usr/share/man/man1/dnsoverride\.1\*$", _section(spec, "files"), re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("argparse-manpage") for r in project["optional-dependencies"]["man"])
    if defines in EL:
        build = _before_install(spec)
        assert re.search(
            rf"install -q --no-index --find-links dnsoverride-wheelhouse-{VERSION} "
            r"argparse-manpage$",
            build,
            re.MULTILINE,
        )
        assert re.search(
            rf"PYTHONPATH=\S+{VENV}/lib/python3\.11/site-packages \\\n +manpage-venv/bin/",
            install,
        )
        wheelhouse = (PACKAGING / "rpm" / "make-wheelhouse").read_text()
        assert '["optional-dependencies"]["man"]' in wheelhouse
    elif defines == ["fedora 41"]:
        assert "\n%pyproject_buildrequires -x man\n" in _before_install(spec)
