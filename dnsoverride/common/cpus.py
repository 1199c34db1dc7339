"""How many CPUs this process can keep busy: the CPUs it may run on (its affinity), fewer
when its cgroup's CPU bandwidth limit allows less.

A container's `--cpus` or a Kubernetes CPU limit is such a limit (cgroup v2 `cpu.max`,
v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), and it leaves the affinity at every CPU of
the host: counted by affinity alone, a pod limited to 1 CPU on a 64-core node would run
as many processes as it may have, each throttled in turn. The limit of every cgroup from
this process's own up to its mount's root applies (the tightest wins), as Go's runtime
and the JVM read it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

PROC_SELF = Path("/proc/self")


def usable_cpus(proc_self: Path = PROC_SELF) -> int:
    """The CPUs this process may run on, at most its cgroup CPU limit rounded up; >= 1."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(proc_self)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def cgroup_cpu_limit(proc_self: Path = PROC_SELF) -> float | None:
    """The tightest CPU bandwidth limit (in CPUs) over this process's cgroups and their
    ancestors; None when there is none, or none can be read."""
    try:
        memberships = (proc_self / "cgroup").read_text().splitlines()
        mounts = (proc_self / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    paths = _cgroup_paths(memberships)
    limits = []
    for line in mounts:
        # ID parent major:minor root mount-point options [optional...] - type source super
        fields, _, tail = line.partition(" - ")
        fstype, _, rest = tail.partition(" ")
        root, mount_point = fields.split(" ")[3:5]
        if fstype == "cgroup2":
            version = "2"
        elif fstype == "cgroup" and "cpu" in rest.rpartition(" ")[2].split(","):
            version = "1"
        else:
            continue
        member = paths.get(version)
        if member is None or not (member + "/").startswith(root.rstrip("/") + "/"):
            continue  # this mount does not hold our cgroup
        top = Path(mount_point)
        directory = top / member[len(root.rstrip("/")) :].lstrip("/")
        for level in (directory, *directory.parents):
            limit = _limit_in(level, version)
            if limit is not None:
                limits.append(limit)
            if level == top:
                break
    return min(limits, default=None)


def _cgroup_paths(memberships: list[str]) -> dict[str, str]:
    """From /proc/self/cgroup: "2" (the unified hierarchy) and "1" (the v1 hierarchy of
    the cpu controller) -> this process's cgroup path in it."""
    paths = {}
    for line in memberships:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths["2"] = path
        elif "cpu" in controllers.split(","):
            paths["1"] = path
    return paths


def _limit_in(directory: Path, version: str) -> float | None:
    """One cgroup's CPU limit in CPUs, None when it has none (or it cannot be read)."""
    try:
        if version == "2":
            quota, _, period = (directory / "cpu.max").read_text().partition(" ")
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text()
            period = (directory / "cpu.cfs_period_us").read_text()
        if quota.strip() == "max":
            return None
        cpus = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return cpus if cpus > 0 else None  # v1: -1 is no limit
