"""`dnsoverride explain NAME`: how the DNS server would answer a question, and why.

On the files alone (like `check`: the config and zones, every override served), or with
`--live` from the running daemon's `/explain` (its routing and health verdicts of now).
Both give the document of `dns.explain.explain`; shown as a Report, or as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dnsoverride import adminclient
from dnsoverride.common.errors import UserError
from dnsoverride.dns.config import ServeFlags, load_config
from dnsoverride.dns.explain import explain
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.report import Report, Section, render


def from_files(
    config: Path | None, zones: str | None, name: str, qtype: str, client: str | None
) -> dict[str, object]:
    """The explanation from the config and zone files, as `check` reads them."""
    serve = load_config(config, ServeFlags(zones=zones))
    routing = Routing(serve, load_zone_set(serve.zones, serve.view_selectors()))
    upstreams = [str(upstream) for upstream in serve.upstreams]
    try:
        return explain(routing, upstreams, name, qtype, client)
    except ValueError as error:
        raise UserError(str(error)) from None


def live(admin: adminclient.AdminEndpoint, name: str, qtype: str, client: str | None) -> Any:
    """The explanation from the running daemon's `/explain`."""
    query = {"name": name, "type": qtype}
    if client is not None:
        query["from"] = client
    return adminclient.get_json(admin, "/explain", query)


def show(document: Mapping[str, Any], as_json: bool, where: str) -> None:
    """Print the explanation: JSON, or a Report (`where`: files or the daemon asked)."""
    if as_json:
        json.dump(document, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    overview = [("asked by", document["client"] or "(no --from)")]
    if "view" in document:
        overview += [
            ("view", f"{document['view']}: {document['view_rule']}"),
            (
                "view sees",
                "every zone file"
                if document["view_zones"] == "all"
                else ", ".join(document["view_zones"]) or "no zone files",
            ),
        ]
    overview.append(("answer", document["outcome"]))
    steps = [_step(step) for step in document["steps"]]
    report = Report(
        f"{document['name']} {document['type']}",
        f"({where})",
        [Section("why", overview), Section("chain", steps, ("name", "from", "gives"))],
        ok=not document["outcome"].startswith(("REFUSED", "SERVFAIL")),
    )
    render([report])


def _step(step: Mapping[str, Any]) -> tuple[str, str, str]:
    if step["source"] == "forwarded":
        where = "upstream"
    else:
        where = f"{step['file']}:{step['line']}"
        if step["source"] == "wildcard":
            where = f"wildcard {step['owner']} at {where}"
    health = step.get("health")
    if health is not None:
        targets = ", ".join(f"{a} {'up' if up else 'down'}" for a, up in health["targets"].items())
        state = "withdrawn" if health["withdrawn"] else "served"
        where += f" [health: {state}{'; ' + targets if targets else ''}]"
    if "records" in step:
        gives = ", ".join(step["records"])
    elif "cname" in step:
        gives = f"CNAME {step['cname']}"
    else:
        gives = step.get("why", "")
    return step["name"], where, gives
