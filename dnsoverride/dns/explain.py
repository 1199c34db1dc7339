"""`dnsoverride explain`: how the server would answer one question, and why.

`explain` walks the same rules as the resolver (dns/resolver.py, dns/answer.py) over one
`Routing`: the ACL, the view table and its rule for the client, then the owner of the
name in that view's files (exact name or wildcard, with its file:line), the CNAME chain
through local data, and the health state that can withdraw an override. It returns a
plain JSON-able dict, the same whether it ran on the files (`dnsoverride explain`) or in
the running daemon (`/explain` on the admin listener, `explain --live`), so one renderer
shows both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import dnslib

from dnsoverride.dns.acl import client_address
from dnsoverride.dns.constants import MAX_CNAME_CHAIN
from dnsoverride.dns.health import TargetState
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.model import NameEntry, Overrides
from dnsoverride.dns.zones.names import name_problem, normalize_name
from dnsoverride.dns.zones.records import TYPE_NAMES

Health = Mapping[str, Mapping[str, TargetState]]


def qtype_number(text: str) -> int:
    """The QTYPE of a type name (`A`, `aaaa`, `TYPE65`); ValueError for an unknown one."""
    upper = text.upper()
    if upper.startswith("TYPE") and upper[4:].isdigit() and int(upper[4:]) < 1 << 16:
        return int(upper[4:])
    number = dnslib.QTYPE.reverse.get(upper)
    if number is None:
        raise ValueError(f"unknown record type {text!r}")
    return int(number)


def explain(
    routing: Routing,
    upstreams: Sequence[str],
    name: str,
    qtype: str = "A",
    client: str | None = None,
    *,
    withdrawn: frozenset[str] = frozenset(),
    health: Health | None = None,
) -> dict[str, object]:
    """How `name` `qtype` asked by `client` (None: a client no view names) is answered.

    `withdrawn` and `health` are the running daemon's health verdicts (none on files
    alone: every override is served). ValueError for a bad name, type or address.
    """
    problem = name_problem(name, wildcard_ok=False)
    if problem is not None:
        raise ValueError(f"not a DNS name: {problem}")
    qname = normalize_name(name)
    number = qtype_number(qtype)
    report: dict[str, object] = {
        "name": qname,
        "type": TYPE_NAMES.get(number, dnslib.QTYPE.get(number, f"TYPE{number}")),
        "client": client,
    }
    view = routing.views.default
    rule = f"default_view {view.name!r}: no --from given"
    if client is not None:
        try:
            address = client_address(client)
        except ValueError:
            raise ValueError(f"not an IP address: {client!r}") from None
        if not routing.acl.allows(address):
            report["outcome"] = f"REFUSED: {client} is not in `allow`"
            report["steps"] = []
            return report
        view, network = routing.views.choose(address)
        rule = (
            f"clients {network} contains {client}"
            if network is not None
            else f"default_view {view.name!r}: no view's clients contain {client}"
        )
    report["view"] = view.name
    report["view_rule"] = rule
    report["view_zones"] = "all" if view.zones is None else sorted(view.zones)
    overrides = routing.zone_set.select(view.zones)
    chain = _Chain(overrides, withdrawn, health or {})
    report["outcome"] = chain.walk(qname, number, list(upstreams))
    report["steps"] = chain.steps
    return report


class _Chain:
    """The walk from the asked name through local CNAMEs; `steps` says what each name did."""

    def __init__(self, overrides: Overrides, withdrawn: frozenset[str], health: Health) -> None:
        self.overrides = overrides
        self.withdrawn = withdrawn
        self.health = health
        self.steps: list[dict[str, object]] = []

    def walk(self, name: str, qtype: int, upstreams: list[str]) -> str:
        forwarded = f"forwarded to {', '.join(upstreams)}"
        entry = self._owner(name)
        if entry is None:
            return forwarded
        for _ in range(MAX_CNAME_CHAIN):
            rrset = entry.rrsets.get(qtype)
            if rrset is not None:
                self.steps[-1]["records"] = list(rrset.texts)
                return f"answered locally: {len(rrset.texts)} {TYPE_NAMES[qtype]} record(s)"
            cname = entry.cname
            if cname is None:
                defined = ", ".join(sorted(TYPE_NAMES[t] for t in entry.rrsets))
                return (
                    f"NODATA with a synthesized SOA: {name} has {defined}, no {TYPE_NAMES[qtype]}"
                )
            self.steps[-1]["cname"] = cname
            name = cname
            following = self._owner(name)
            if following is None:
                return f"CNAME target {name} {forwarded}"
            entry = following
        return "SERVFAIL: the CNAME chain loops or is longer than the server follows"

    def _owner(self, name: str) -> NameEntry | None:
        """The entry serving `name` (a step recorded either way), None to forward it."""
        entry = self.overrides.lookup(name)
        step: dict[str, object] = {"name": name}
        self.steps.append(step)
        if entry is None:
            step["source"] = "forwarded"
            below = self._overridden_parent(name)
            step["why"] = (
                f"names below {below.name} ({below.file}:{below.line}) are forwarded: "
                "no wildcard covers them"
                if below is not None
                else "no override in this view"
            )
            return None
        step["source"] = "wildcard" if entry.name.startswith("*.") else "override"
        step["owner"] = entry.name
        step["file"] = entry.file
        step["line"] = entry.line
        if entry.health is not None:
            targets = self.health.get(entry.name, {})
            step["health"] = {
                "withdrawn": entry.name in self.withdrawn,
                "targets": {address: state.up for address, state in targets.items()},
            }
            if entry.name in self.withdrawn:
                step["why"] = "override withdrawn: every health-checked address is down"
                return None
        return entry

    def _overridden_parent(self, name: str) -> NameEntry | None:
        labels = name.split(".")
        for index in range(1, len(labels)):
            parent = ".".join(labels[index:])
            owner = self.overrides.owners.get(parent)
            if owner is not None:
                return owner.entry(parent)
        return None
