"""How people and tools change the files a daemon watches, done for real: a file renamed
over the old one (editors, config management), a Kubernetes ConfigMap `..data` swap, a
write the watched directory never sees (NFS); and zone texts, good, broken,
and one whose override a failing health check withdraws."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tests.support.ports import silent_port


def zone_text(records: dict[str, str]) -> str:
    """A zone file with one A record per name."""
    lines = ["records:"]
    for name, address in records.items():
        lines += [f"  {name}:", f"    A: {address}"]
    return "\n".join(lines) + "\n"


# Broken zone files: case -> (text, the line of the problem, words of its reason).
BROKEN = {
    "yaml syntax error": ("records:\n  a.test:\n\tA: 10.0.0.2\n", 3, "YAML syntax error"),
    "unknown type": ("records:\n  a.test:\n    AXFR: 10.0.0.2\n", 3, "unknown record type"),
    "bad ip": ("records:\n  a.test:\n    A: 10.0.0.256\n", 3, "not an IPv4 address"),
    "cname beside data": (
        "records:\n  a.test:\n    CNAME: x.test.\n    A: 10.0.0.2\n",
        2,
        "CNAME cannot be combined",
    ),
}


def save(path: Path, text: str) -> None:
    """As editors and config management save: a new file renamed over the old one."""
    temp = path.with_name("." + path.name + ".tmp")
    temp.write_text(text)
    os.replace(temp, path)


def configmap(root: Path, stamp: str, files: dict[str, str]) -> None:
    """What the kubelet does: new timestamped dir, `..data_tmp` symlink, rename to `..data`."""
    data = root / f"..{stamp}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    (root / "..data_tmp").symlink_to(data.name)
    os.replace(root / "..data_tmp", root / "..data")
    if old:
        for child in (root / old).iterdir():
            child.unlink()
        (root / old).rmdir()


def write_unseen(zones: Path, elsewhere: Path, name: str, text: str) -> None:
    """Change a zone file without an inotify event on the zones directory (as over NFS).

    Writing through a hard link in another directory changes the same inode, but
    inotify reports it only to watches on the directory the writer went through.
    """
    elsewhere.mkdir(exist_ok=True)
    link = elsewhere / name
    if not link.exists():
        os.link(zones / name, link)
    with link.open("r+") as file:
        file.truncate(0)
        file.write(text)


@contextlib.contextmanager
def health_withdrawn_zone(zones: Path) -> Iterator[None]:
    """`gated.yaml` in `zones`: gated.test -> 127.0.0.1, health-checked over TCP every
    200 ms (fall: 1) on a port held bound and not listening while the block runs, so the
    check is refused and a running server withdraws the override at its first probe."""
    with silent_port() as held:
        port = held.rpartition(":")[2]
        (zones / "gated.yaml").write_text(
            "records:\n  gated.test:\n    A: 127.0.0.1\n"
            f"    health: {{tcp: {port}, interval: 200ms, timeout: 100ms, fall: 1}}\n"
        )
        yield
