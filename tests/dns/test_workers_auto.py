"""`workers: auto`: the CPUs the server can keep busy, at most 4, as `load_config` reads it
in a process whose CPUs are really limited: by its affinity, or by a cgroup CPU bandwidth
limit (what a container's `--cpus` or a Kubernetes CPU limit sets; it leaves the affinity
at every CPU of the host).

The cgroup test fails on s13-dns at 1d2c3b0: `auto` counted the affinity only, and a
process limited to 1 CPU by its cgroup on this 2-CPU box got 2 workers.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dnsoverride.common.cpus import cgroup_cpu_limit, usable_cpus

CGROUP = Path("/sys/fs/cgroup")
e2e = pytest.mark.e2e  # starts processes
_READ = (
    "import sys; from pathlib import Path; "
    "from dnsoverride.dns.config import ServeFlags, load_config; "
    "print(load_config(Path(sys.argv[1]), ServeFlags(upstream=('127.0.0.1:53',))).workers)"
)


def _auto_workers(tmp_path: Path, before: Callable[[], None] | None = None) -> int:
    """`workers: auto` as a fresh process reads it (`before` runs in it first)."""
    config = tmp_path / "serve.yaml"
    config.write_text("workers: auto\n")
    done = subprocess.run(
        [sys.executable, "-c", _READ, str(config)],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=before,
    )
    return int(done.stdout)


@e2e
def test_auto_is_the_cpus_of_the_affinity_at_most_four(tmp_path: Path) -> None:
    cpus = os.sched_getaffinity(0)
    assert _auto_workers(tmp_path) == min(len(cpus), 4)
    first = min(cpus)
    assert _auto_workers(tmp_path, lambda: os.sched_setaffinity(0, {first})) == 1


@pytest.fixture
def one_cpu_cgroup() -> Iterator[Path]:
    """A fresh cgroup (random name, removed after) limited to 1 CPU of bandwidth."""
    name = f"dnsoverride-test-{secrets.token_hex(4)}"
    if (CGROUP / "cpu" / "cpu.cfs_quota_us").exists():  # v1, the cpu controller
        directory = CGROUP / "cpu" / name
        limit = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}
    elif "cpu" in (CGROUP / "cgroup.subtree_control").read_text().split():  # v2
        directory = CGROUP / name
        limit = {"cpu.max": "100000 100000"}
    else:
        pytest.skip("no cgroup cpu controller to make a limited cgroup in")
    try:
        directory.mkdir()
    except OSError as error:
        pytest.skip(f"cannot make a cgroup: {error}")
    try:
        for file, value in limit.items():
            (directory / file).write_text(value)
        yield directory
    finally:
        directory.rmdir()  # its processes have exited


@e2e
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to limit to 1")
def test_auto_counts_a_cgroup_cpu_limit_below_the_affinity(
    tmp_path: Path, one_cpu_cgroup: Path
) -> None:
    def join() -> None:
        (one_cpu_cgroup / "cgroup.procs").write_text(str(os.getpid()))

    assert _auto_workers(tmp_path, join) == 1


def test_the_limit_is_the_tightest_up_the_hierarchy_and_unreadable_is_none(
    tmp_path: Path,
) -> None:
    """From a /proc/self stand-in over real files: a v2 pod limit of 1.5 CPUs above the
    process's own unlimited cgroup counts (rounded up), a v1 limit mounted elsewhere too;
    files that are missing or say nothing sensible mean no limit."""
    proc = tmp_path / "proc"
    proc.mkdir()
    unified = tmp_path / "unified"
    leaf = unified / "kubepods" / "pod1" / "ctr"
    leaf.mkdir(parents=True)
    (unified / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    (leaf / "cpu.max").write_text("max 100000\n")
    (proc / "cgroup").write_text("0::/kubepods/pod1/ctr\n")
    (proc / "mountinfo").write_text(
        f"30 1 0:26 / {unified} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
        "31 1 0:27 / /proc rw - proc proc rw\n"
    )
    assert cgroup_cpu_limit(proc) == 1.5
    assert usable_cpus(proc) == min(len(os.sched_getaffinity(0)), 2)

    v1 = tmp_path / "v1"
    (v1 / "job").mkdir(parents=True)
    (v1 / "job" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (proc / "cgroup").write_text("4:cpu,cpuacct:/job\n0::/kubepods/pod1/ctr\n")
    with (proc / "mountinfo").open("a") as mountinfo:
        mountinfo.write(f"32 1 0:28 / {v1} rw shared:9 - cgroup cgroup rw,cpu,cpuacct\n")
    assert cgroup_cpu_limit(proc) == 0.5
    assert usable_cpus(proc) == 1

    (v1 / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    (unified / "kubepods" / "pod1" / "cpu.max").write_text("garbage\n")
    assert cgroup_cpu_limit(proc) is None
    (proc / "cgroup").unlink()
    assert cgroup_cpu_limit(proc) is None
