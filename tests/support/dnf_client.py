"""The real package client for the repository tests: `dnf --installroot` in a namespace.

The repo files below are the stock ones, unchanged (CentOS 7's CentOS-Base.repo with its
`mirrorlist=http://mirrorlist.centos.org/?release=$releasever&...&infra=$infra`, CentOS
Stream 9's centos.repo and EPEL 9's epel.repo with their `metalink=https://...`); only
what Debian's dnf lacks is given on the command line (research note §7.2):

- `--releasever` (Debian has no system-release), `$infra`/`$stream`/`$contentdir` as
  DNF_VAR_* variables (the values CentOS images carry in /etc/yum/vars and /etc/dnf/vars);
- `--config` of our own: Debian's /etc/dnf/dnf.conf sets skip_if_unavailable=True, which
  turns a broken repository into "No match for argument"; with ours and
  `--setopt=skip_if_unavailable=False` a failing repository fails the command;
- `--nogpgcheck` (the test RPMs are unsigned), `<repo>.sslcacert=` the test CA (what
  `update-ca-trust` does on a CentOS node), install_weak_deps off.

Each call uses a fresh install root, so every run is a cold client (dnf keeps its cache,
logs and rpmdb inside the root; Debian's rpm macros put the rpmdb at ~/.rpmdb there).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.transparent_netns import Netns

CENTOS7_BASE_REPO = """\
# CentOS-Base.repo
#
# The mirror system uses the connecting IP address of the client and the
# update status of each mirror to pick mirrors that are updated to and
# geographically close to the client.  You should use this for CentOS updates
# unless you are manually picking other mirrors.
#
# If the mirrorlist= does not work for you, as a fall back you can try the
# remarked out baseurl= line instead.
#
#

[base]
name=CentOS-$releasever - Base
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=os&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/os/$basearch/
gpgcheck=1
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7

#released updates
[updates]
name=CentOS-$releasever - Updates
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=updates&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/updates/$basearch/
gpgcheck=1
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7

#additional packages that may be useful
[extras]
name=CentOS-$releasever - Extras
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=extras&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/extras/$basearch/
gpgcheck=1
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7

#additional packages that extend functionality of existing packages
[centosplus]
name=CentOS-$releasever - Plus
mirrorlist=http://mirrorlist.centos.org/?release=$releasever&arch=$basearch&repo=centosplus&infra=$infra
#baseurl=http://mirror.centos.org/centos/$releasever/centosplus/$basearch/
gpgcheck=1
enabled=0
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-CentOS-7
"""

STREAM9_CENTOS_REPO = """\
[baseos]
name=CentOS Stream $releasever - BaseOS
metalink=https://mirrors.centos.org/metalink?repo=centos-baseos-$stream&arch=$basearch&protocol=https,http
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-centosofficial
gpgcheck=1
repo_gpgcheck=0
metadata_expire=6h
countme=1
enabled=1
"""

EPEL9_REPO = """\
[epel]
name=Extra Packages for Enterprise Linux $releasever - $basearch
# It is much more secure to use the metalink, but if you wish to use a local mirror
# place its address here.
#baseurl=https://download.example/pub/epel/$releasever/Everything/$basearch/
metalink=https://mirrors.fedoraproject.org/metalink?repo=epel-$releasever&arch=$basearch&infra=$infra&content=$contentdir
enabled=1
gpgcheck=1
countme=1
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-EPEL-$releasever
"""

FEDORA41_REPO = """\
[fedora]
name=Fedora $releasever - $basearch
#baseurl=http://download.example/pub/fedora/linux/releases/$releasever/Everything/$basearch/os/
metalink=https://mirrors.fedoraproject.org/metalink?repo=fedora-$releasever&arch=$basearch
enabled=1
countme=1
metadata_expire=7d
repo_gpgcheck=0
type=rpm
gpgcheck=1
gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-fedora-$releasever-$basearch
skip_if_unavailable=False
"""

DNF_CONF = """\
[main]
gpgcheck=0
installonly_limit=3
clean_requirements_on_remove=True
best=True
skip_if_unavailable=False
install_weak_deps=False
"""

# The values a stock CentOS image has in /etc/yum/vars and /etc/dnf/vars.
DNF_VARS = {"DNF_VAR_infra": "stock", "DNF_VAR_stream": "9-stream", "DNF_VAR_contentdir": "centos"}


@dataclass(frozen=True)
class Client:
    """A dnf install root with its repo files; `install` runs one cold `dnf install`."""

    workdir: Path
    releasever: str
    repo_files: dict[str, str]
    ca: Path | None = None

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    def argv(
        self, *packages: str, command: str = "install", options: tuple[str, ...] = ()
    ) -> list[str]:
        reposdir = self.workdir / "repos.d"
        reposdir.mkdir(parents=True, exist_ok=True)
        repo_ids = []
        for name, text in self.repo_files.items():
            (reposdir / name).write_text(text)
            repo_ids += [line[1:-1] for line in text.splitlines() if line.startswith("[")]
        config = self.workdir / "dnf.conf"
        config.write_text(DNF_CONF)
        argv = [
            "dnf", "-y", f"--config={config}", f"--installroot={self.root}",
            f"--releasever={self.releasever}", f"--setopt=reposdir={reposdir}",
            "--setopt=skip_if_unavailable=False", "--nogpgcheck",
        ]  # fmt: skip
        if self.ca is not None:
            argv += [f"--setopt={repo}.sslcacert={self.ca}" for repo in repo_ids]
        return [*argv, *options, command, *packages]

    def install(
        self, netns: Netns, *packages: str, command: str = "install", options: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(*packages, command=command, options=options)
        return netns.run(argv, timeout=180, env=dnf_env())

    def installed(self) -> set[str]:
        """`name-version-release` of every package in the root's rpmdb."""
        result = subprocess.run(
            ["rpm", "--root", str(self.root), "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}\n"],
            check=True,
            capture_output=True,
            text=True,
            env=dnf_env(),
        )
        return set(result.stdout.split())


def dnf_env() -> dict[str, str]:
    # /usr/bin/dnf runs /usr/bin/python3 (python3 on PATH may be another one); HOME fixes
    # where Debian's rpm macros put the rpmdb inside the root, for dnf and rpm alike.
    return {**os.environ, **DNF_VARS, "HOME": "/root", "PYTHONPATH": ""}
