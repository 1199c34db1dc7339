"""`dnsoverride cache ls | purge | warm`: the running cache's contents, asked over its
control socket or admin listener (cache/contents.py answers them).

`ls` reads and `purge` and `warm` act: the cache answers all three only on its control
socket or a loopback admin listener (a listing names private repositories too). The endpoint is
`--admin` (HOST:PORT or a socket path), else the cache config's `control_socket:`, else
its `metrics:`, else the packaged socket `/run/dnsoverride/cache.sock`. Tables and a
progress bar on a terminal (rich), plain lines otherwise, JSON with `--json`; an error is
one line and exit status 2 (1: a warm failed).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dnsoverride import adminclient
from dnsoverride.common.errors import UserError
from dnsoverride.report import Report, Section, ago, render, size_text

DEFAULT_SOCKET = Path("/run/dnsoverride/cache.sock")
POLL = 0.1  # seconds between progress reads of a warm
# Listing or purging a store of thousands of images reads every manifest (3 s measured for
# 1000 ten-platform images on a busy 2-core machine); `--listed` waits for every warm.
TIMEOUT = 600.0


def check(args: Any) -> None:
    """UserError for a command line that asks nothing (before any daemon is looked for)."""
    if args.cache_command == "purge" and bool(args.target) == bool(args.older_than):
        raise UserError("cache purge: give IMAGE, DIGEST or --older-than DURATION (one of them)")
    if args.cache_command == "warm" and bool(args.images) == args.listed:
        raise UserError("cache warm: give IMAGE... or --listed (the config's warm: list)")


def find(
    admins: Sequence[str], configs: Sequence[tuple[Path, str | None]]
) -> adminclient.AdminEndpoint:
    """The cache's endpoint (see the module docstring)."""
    if admins:
        return adminclient.parse_admin(admins[0])
    try:
        return adminclient.find([], configs, ("control_socket", "metrics"))[0]
    except UserError as error:
        if any(flag for _, flag in configs):  # a config named on the command line: its error
            raise
        if not DEFAULT_SOCKET.exists():
            looked = ", ".join(str(path) for path, _ in configs)
            raise UserError(
                f"no cache found: no control_socket: or metrics: in {looked} (or no such "
                f"file), and no {DEFAULT_SOCKET}; give --admin SOCKET|HOST:PORT or --cache-config"
            ) from error
        return adminclient.AdminEndpoint(None, "the packaged control socket", DEFAULT_SOCKET)


def _print_json(document: object) -> None:
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")


# -- ls ------------------------------------------------------------------------------------
def ls(admin: adminclient.AdminEndpoint, repository: str | None, as_json: bool) -> int:
    query = {"repo": repository} if repository else None
    document = adminclient.get_json(admin, "/contents", query, TIMEOUT)
    if not isinstance(document, dict) or "images" not in document:
        raise UserError(f"{admin} ({admin.source}): /contents is not a dnsoverride cache's")
    if as_json:
        _print_json(document)
    else:
        render([contents_report(str(admin), document)])
    return 0


def contents_report(admin: str, doc: dict[str, Any]) -> Report:
    store = doc["store"]
    budget = f" of {size_text(store['budget_bytes'])}" if store["budget_bytes"] else ""
    headline = (
        f"{len(doc['images'])} images, {len(doc['repositories'])} package repositories; "
        f"store {size_text(store['bytes'])}{budget} in {store['entries']} entries"
    )
    images = [
        (
            image["image"],
            image["digest"][:19],
            _platforms(image["platforms"]),
            size_text(image["bytes"])
            + (f" ({size_text(image['shared_bytes'])} shared)" if image["shared_bytes"] else ""),
            ago(image["last_use_unix"]),
        )
        for image in doc["images"]
    ]
    repositories = [
        (
            repo["repository"],
            str(repo["packages"]),
            str(repo["repodata_files"]),
            size_text(repo["bytes"]),
            ago(repo["last_use_unix"]),
        )
        for repo in doc["repositories"]
    ]
    loose = doc["loose"]
    sections = [
        Section("images", images, ("image", "digest", "platforms", "bytes", "last use")),
        Section(
            "package repositories",
            repositories,
            ("repository", "packages", "metadata files", "bytes", "last use"),
        ),
        Section(
            "not reached by a tag",
            [("manifests and blobs", f"{loose['items']} ({size_text(loose['bytes'])})")],
        ),
    ]
    return Report(f"cache {admin}", headline, sections)


def _platforms(platforms: list[dict[str, Any]]) -> str:
    if not platforms:
        return "-"
    cached = [p["platform"] for p in platforms if p["cached"]]
    if len(cached) == len(platforms):
        return f"all {len(platforms)}: " + ", ".join(cached)
    return f"{len(cached)} of {len(platforms)}: " + (", ".join(cached) or "none")


# -- purge ---------------------------------------------------------------------------------
def purge(
    admin: adminclient.AdminEndpoint,
    target: str | None,
    older_than: str | None,
    dry_run: bool,
    as_json: bool,
) -> int:
    query: dict[str, str] = {}
    if older_than:
        query["older_than"] = older_than
    elif target and target.startswith(("sha256:", "sha512:")):
        query["digest"] = target
    elif target:
        query["image"] = target
    if dry_run:
        query["dry_run"] = "1"
    document = adminclient.ask(admin, "POST", "/purge", query, TIMEOUT)
    if not isinstance(document, dict) or "removed" not in document:
        raise UserError(f"{admin} ({admin.source}): /purge did not answer a purge")
    if as_json:
        _print_json(document)
        return 0
    verb = "would remove" if dry_run else "removed"
    removed = document["removed"]
    print(
        f"{verb} {len(removed)} items ({size_text(document['removed_bytes'])})"
        + (f", tags {', '.join(document['tags'])}" if document["tags"] else "")
    )
    for item in removed:
        print(f"  {verb} {item['kind']} {item['digest']} ({size_text(item['bytes'])})")
    for item in document["skipped"]:
        print(f"  skipped {item['kind']} {item['digest']}: {item['reason']}")
    return 0


# -- warm ----------------------------------------------------------------------------------
def warm(
    admin: adminclient.AdminEndpoint, images: Sequence[str], listed: bool, as_json: bool
) -> int:
    if listed:
        answer = adminclient.ask(admin, "POST", "/warm", {"listed": "1"}, TIMEOUT)
        jobs = answer.get("jobs", []) if isinstance(answer, dict) else []
    elif sys.stdout.isatty() and not as_json:
        jobs = _with_progress(admin, images)
    else:
        jobs = [_follow(admin, _start(admin, image)) for image in images]
    if as_json:
        _print_json(jobs)
    elif not sys.stdout.isatty() or listed:
        for job in jobs:
            print(_outcome(job))
    return 1 if any(job["state"] != "done" for job in jobs) else 0


def _start(admin: adminclient.AdminEndpoint, image: str) -> dict[str, Any]:
    job = adminclient.ask(admin, "POST", "/warm", {"image": image})
    if not isinstance(job, dict) or "job" not in job:
        raise UserError(f"{admin} ({admin.source}): /warm did not answer a warm job")
    return job


def _poll(admin: adminclient.AdminEndpoint, job: dict[str, Any]) -> dict[str, Any]:
    answer = adminclient.get_json(admin, "/warm/jobs", {"job": str(job["job"])})
    if not isinstance(answer, dict) or "state" not in answer:
        raise UserError(f"{admin} ({admin.source}): /warm/jobs did not answer job {job['job']}")
    return answer


def _follow(admin: adminclient.AdminEndpoint, job: dict[str, Any]) -> dict[str, Any]:
    while job["state"] == "running":
        time.sleep(POLL)  # the daemon has no push channel: its progress is polled
        job = _poll(admin, job)
    return job


def _with_progress(admin: adminclient.AdminEndpoint, images: Sequence[str]) -> list[dict[str, Any]]:
    """Every image's warm with a progress bar of its bytes, all at once, on a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    jobs = [_start(admin, image) for image in images]
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(file=sys.stdout)) as progress:
        tasks = [progress.add_task(job["image"], total=None) for job in jobs]
        while True:
            jobs = [_poll(admin, job) if job["state"] == "running" else job for job in jobs]
            for task, job in zip(tasks, jobs, strict=True):
                total = job["bytes"] or None
                done = job["bytes_done"]
                progress.update(task, total=total, completed=done, description=_label(job))
            if all(job["state"] != "running" for job in jobs):
                break
            time.sleep(POLL)
    for job in jobs:
        print(_outcome(job))
    return jobs


def _label(job: dict[str, Any]) -> str:
    if job["state"] == "failed":
        return f"{job['image']} FAILED"
    return f"{job['image']} {job['blobs_done']}/{job['blobs']} blobs"


def _outcome(job: dict[str, Any]) -> str:
    """One line per warmed image."""
    if job["state"] != "done":
        return f"FAILED {job['image']}: {job['error']}"
    seconds = (job["finished_unix"] or 0) - job["started_unix"]
    return (
        f"warmed {job['image']} {job['digest']}: {job['platforms']} platforms, "
        f"{job['manifests']} manifests, {job['blobs']} blobs ({job['blobs_fetched']} fetched "
        f"now), {size_text(job['bytes'])} in {seconds:.1f} s"
    )
