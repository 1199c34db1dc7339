"""Finding the daemons' admin listeners and reading their JSON endpoints, for `status` and
`explain --live`.

An admin endpoint is given with `--admin HOST:PORT`, or read from the `metrics:` key of
the daemons' config files (the packaged ones, `/etc/dnsoverride/dnsoverride.yaml` and
`/etc/dnsoverride/cache.yaml`, or `/etc/dnsoverride/registry.yaml` from before the cache
served packages, unless `--config`/`--cache-config` name others). An endpoint found in
two files is asked once.
Only that key is read: the rest of a config (zones, TLS files) may be unreadable to the
user running the command, and has no say in where the daemon listens for its admin.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dnsoverride.common import yamlsource
from dnsoverride.common.errors import UserError
from dnsoverride.common.grammar import HTTP_LISTENER, Endpoint, GrammarError, parse_endpoint

PACKAGED_CONFIGS = (
    Path("/etc/dnsoverride/dnsoverride.yaml"),
    Path("/etc/dnsoverride/cache.yaml"),
    Path("/etc/dnsoverride/registry.yaml"),
)
TIMEOUT = 5.0
# A listener on every address is reached on loopback.
_ANY = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class AdminEndpoint:
    """An admin listener and where it was found (`--admin`, or the config file)."""

    endpoint: Endpoint
    source: str

    def url(self, path: str, query: dict[str, str] | None = None) -> str:
        host = _ANY.get(self.endpoint.host, self.endpoint.host)
        host = f"[{host}]" if ":" in host else host
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"http://{host}:{self.endpoint.port}{path}{suffix}"

    def __str__(self) -> str:
        return str(self.endpoint)


def parse_admin(text: str) -> AdminEndpoint:
    """`--admin HOST:PORT`; UserError naming the flag for a bad value."""
    try:
        return AdminEndpoint(parse_endpoint(text, HTTP_LISTENER), "--admin")
    except GrammarError as error:
        raise UserError(f"--admin {text}: {error}") from None


def from_config(path: Path, flag: str | None) -> AdminEndpoint | None:
    """The `metrics:` endpoint of the config at `path`; None when the file does not exist
    (a packaged config of a daemon not installed) or sets none. UserError naming `flag`
    (or the file) when it cannot be read."""
    label = f"{flag} {path}" if flag else str(path)
    if flag is None and not path.exists():
        return None
    try:
        document = yamlsource.load_file(path)
    except OSError as error:
        raise UserError(f"{label}: cannot read: {error.strerror}") from None
    except yamlsource.YamlError as error:
        raise UserError(f"{label}:{error.line}: {error.reason}") from None
    value = document.get("metrics") if isinstance(document, dict) else None
    if value is None:
        return None
    try:
        return AdminEndpoint(parse_endpoint(str(value), HTTP_LISTENER), str(path))
    except GrammarError as error:
        raise UserError(f"{label}: metrics: {error}") from None


def find(admins: Sequence[str], configs: Sequence[tuple[Path, str | None]]) -> list[AdminEndpoint]:
    """The endpoints of `--admin` if any, else those of `configs` ((path, flag) pairs; flag
    None for a packaged path); UserError when there is none."""
    if admins:
        return [parse_admin(text) for text in admins]
    found: list[AdminEndpoint] = []
    for path, flag in configs:
        admin = from_config(path, flag)
        if admin is not None and all(admin.endpoint != seen.endpoint for seen in found):
            found.append(admin)
    if not found:
        looked = ", ".join(str(path) for path, _ in configs)
        raise UserError(
            f"no admin endpoint found in {looked} (no such file, or no `metrics:` in it); "
            "give --admin HOST:PORT (the daemon's --metrics)"
        )
    return found


def get_json(admin: AdminEndpoint, path: str, query: dict[str, str] | None = None) -> object:
    """GET a JSON endpoint; UserError with the reason when the daemon cannot be asked."""
    url = admin.url(path, query)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            reason = json.load(error).get("error", error.reason)
        except (ValueError, AttributeError):
            reason = f"{error.code} {error.reason} (a dnsoverride admin listener?)"
        raise UserError(f"{admin} ({admin.source}): {reason}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        reason = getattr(reason, "strerror", None) or reason
        raise UserError(f"{admin} ({admin.source}): cannot connect: {reason}") from None
    except ValueError as error:
        raise UserError(f"{admin} ({admin.source}): not JSON: {error}") from None
