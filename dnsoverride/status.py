"""`dnsoverride status`: one screen on every daemon found, from its admin listener's
`/status` (dns/status.py, cache/status.py): as JSON (`--json`, one document per
daemon, as the daemon sent it plus `admin`), else as a `Report` per daemon. The exit
status is 1 when a daemon could not be asked, 0 otherwise.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dnsoverride import adminclient
from dnsoverride.common.errors import UserError
from dnsoverride.report import Report, Section, ago, render, seconds_text, size_text


def run(admins: Sequence[str], configs: Sequence[tuple[Path, str | None]], as_json: bool) -> int:
    """Ask each admin endpoint found (see adminclient.find) for `/status` and show it."""
    documents: list[dict[str, Any]] = []
    reports: list[Report] = []
    status = 0
    # A cache with a control socket and no `metrics:` is asked on its socket.
    for admin in adminclient.find(admins, configs, ("metrics", "control_socket")):
        try:
            document = adminclient.get_json(admin, "/status")
        except UserError as error:
            status = 1
            documents.append({"admin": str(admin), "error": str(error)})
            reports.append(Report(f"unreachable {admin}", str(error), ok=False))
            continue
        if not isinstance(document, dict) or "daemon" not in document:
            raise UserError(f"{admin} ({admin.source}): /status is not a dnsoverride status")
        documents.append({"admin": str(admin), **document})
        view = dns_report if document["daemon"] == "dns" else cache_report
        reports.append(view(str(admin), document))
    if as_json:
        json.dump(documents, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        render(reports)
    return status


def dns_report(admin: str, doc: Mapping[str, Any]) -> Report:
    """The DNS server's `/status` as a Report."""
    zones, reload, queries = doc["zones"], doc["reload"], doc["queries"]
    withdrawn = [h["name"] for h in doc["health"] if h["withdrawn"]]
    failed = reload["last_result"] == "failure"
    last = reload["last_failure_unix"] if failed else reload["last_success_unix"]
    overview = [
        ("listeners", ", ".join(doc["listeners"])),
        ("zones", f"{zones['directory']}: {len(zones['files'])} files, {zones['names']} names"),
        ("content hash", f"{zones['content_hash'][:16]} (generation {zones['generation']})"),
        (
            "last reload",
            f"{reload['last_result']} {ago(last)} "
            f"({reload['successes']} ok, {reload['failures']} failed since start)",
        ),
        *(("  problem", problem) for problem in (reload["last_problems"] if failed else [])),
        ("withdrawn", ", ".join(withdrawn) or "none"),
        *_workers_line(doc["workers"]),
        (
            "queries",
            f"{queries['total']} total, {_number(queries['qps'])}/s "
            f"over {queries['over_seconds']} s",
        ),
    ]
    sections = [
        Section("overview", overview),
        Section(
            "views",
            [
                (
                    v["name"] + (" (default)" if v["default"] else ""),
                    ", ".join(v["clients"]) or "-",
                    v["zones"] if v["zones"] == "all" else ", ".join(v["zones"]) or "none",
                )
                for v in doc["views"]
            ],
            ("view", "clients", "zone files"),
        ),
        Section(
            "zone files",
            [(f["name"], str(f["names"])) for f in zones["files"]],
            ("file", "names"),
        ),
        Section(
            "upstreams",
            [(u["address"], _upstream_state(u), _counts(u["failures"])) for u in doc["upstreams"]],
            ("upstream", "state", "failures"),
        ),
        Section(
            "caches",
            [
                (name, str(c["entries"]), str(c["hits"]), str(c["misses"]), _ratio(c["hit_ratio"]))
                for name, c in doc["caches"].items()
            ],
            ("cache", "entries", "hits", "misses", "hit ratio"),
        ),
    ]
    if doc["health"]:
        sections.append(
            Section(
                "health-gated overrides",
                [
                    (
                        h["name"],
                        "WITHDRAWN" if h["withdrawn"] else "served",
                        ", ".join(
                            f"{a} {'up' if up else 'down'}" for a, up in h["targets"].items()
                        ),
                    )
                    for h in doc["health"]
                ],
                ("name", "override", "targets"),
            )
        )
    workers = doc["workers"]
    if workers["configured"] > 1:
        sections.append(
            Section(
                "worker processes",
                [
                    (
                        str(p["worker"]) + (" (supervisor)" if p["worker"] == 0 else ""),
                        str(p["pid"]),
                        "serving" if p["serving"] else "NOT SERVING",
                        "current" if p["routing"] == zones["content_hash"] else "RELOADING",
                    )
                    for p in workers["processes"]
                ],
                ("worker", "pid", "state", "zones"),
            )
        )
    ok = (
        not failed
        and all(u["up"] and not u.get("demoted_seconds") for u in doc["upstreams"])
        and workers["serving"] == workers["configured"]
    )
    headline = f"DNS server, pid {doc['pid']}, up {_duration(doc)}"
    return Report(f"dns {admin}", headline, sections, ok)


def _workers_line(workers: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The overview's `workers` line: the processes serving, and why `workers: auto`
    chose their number (when it did)."""
    if workers["configured"] == 1:
        text = "1 process"
    else:
        text = f"{workers['serving']} of {workers['configured']} serving, "
        text += f"{workers['restarts']} restarted since start"
    why = workers.get("auto")  # absent from the /status of a server before it
    return [("workers", f"{text} (auto: {why})" if why else text)]


def cache_report(admin: str, doc: Mapping[str, Any]) -> Report:
    """The cache's `/status` as a Report."""
    store = doc["store"]
    budget = store["budget_bytes"]
    use = f"{size_text(store['bytes'])} in {store['entries']} entries"
    if budget:
        use += f" of {size_text(budget)} ({store['bytes'] / budget:.0%})"
    else:
        use += " (no budget)"
    overview = [
        ("listeners", ", ".join(doc["listeners"])),
        ("store", f"{store['root']}: {use}"),
        ("evictions", str(store["evictions"])),
        ("writable", store["not_ready"] or "yes"),
        ("coalesced", f"{doc['coalesced']} requests joined a download in flight"),
    ]
    if doc.get("names_withheld"):
        # An admin listener others reach: repositories, digests and reasons left out.
        overview.append(("names", "withheld on this listener: ask the control socket"))
    sections = [
        Section("overview", overview),
        Section(
            "hit ratio",
            [
                (kind, str(h["hits"]), str(h["misses"]), _ratio(h["hit_ratio"]))
                for kind, h in doc["hits"].items()
            ],
            ("kind", "hits", "misses", "hit ratio"),
        ),
        Section(
            "downloads in flight",
            [
                (
                    d["digest"][:19],
                    f"{d['upstream']}/{d['repository']}" if d["repository"] else d["upstream"],
                    d["kind"],
                    f"{size_text(d['bytes'])} of {size_text(d['size']) if d['size'] else '?'}",
                    str(d["waiters"]),
                )
                for d in doc["downloads"]
            ],
            ("digest", "from", "kind", "progress", "waiters"),
        ),
        Section(
            "upstreams",
            [
                (
                    u["name"],
                    u["state"],
                    u["detail"] or "-",
                    str(u["errors"]),
                    "-" if u["ratelimit_remaining"] is None else str(u["ratelimit_remaining"]),
                    ", ".join(
                        f"{repo} {b['status']} for {b['seconds_left']} s"
                        for repo, b in u["backoff"].items()
                    )
                    or "-",
                )
                for u in doc["upstreams"]
            ],
            ("registry upstream", "state", "why", "errors", "rate limit left", "Retry-After"),
        ),
        Section(
            "package upstreams",
            [
                (p["name"], p["state"], p["detail"] or "-", str(p["repositories"]))
                for p in doc["package_upstreams"]
            ],
            ("package upstream", "state", "why", "repositories"),
        ),
        Section(
            "recent errors",
            [
                (ago(e["unix"]), e["request"], f"{e['status']} {e['code']}", e["message"])
                for e in doc["recent_errors"][-10:]
            ],
            ("when", "request", "status", "reason"),
        ),
    ]
    if doc["warm"]:
        sections.append(
            Section(
                "warm list",
                [
                    (
                        w["image"],
                        f"every {seconds_text(w['interval'])}",
                        "never" if w["last_run_unix"] is None else ago(w["last_run_unix"]),
                        "FAILED: " + w["last_error"] if w["last_error"] else _ago_ok(w),
                    )
                    for w in doc["warm"]
                ],
                ("image", "interval", "last warm", "result"),
            )
        )
    upstreams = [*doc["upstreams"], *doc["package_upstreams"]]
    ok = store["not_ready"] is None and all(u["state"] != "DOWN" for u in upstreams)
    headline = f"cache, pid {doc['pid']}, up {_duration(doc)}"
    return Report(f"cache {admin}", headline, sections, ok)


def _ago_ok(warm: Mapping[str, Any]) -> str:
    return "-" if warm["last_success_unix"] is None else "ok"


def _duration(doc: Mapping[str, Any]) -> str:
    return seconds_text(time.time() - doc["started_unix"])


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _targets(targets: Mapping[str, bool]) -> str:
    return ", ".join(f"{address} {'up' if up else 'down'}" for address, up in targets.items())


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "0"


def _upstream_state(upstream: Mapping[str, Any]) -> str:
    """A DNS upstream's verdict: DOWN (marked down), demoted (tried after the others for
    the seconds shown: it let questions time out that another answered), else up."""
    if not upstream["up"]:
        return "DOWN"
    demoted = upstream.get("demoted_seconds")
    return f"demoted, {demoted:g} s left" if demoted else "up"
