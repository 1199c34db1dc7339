"""Finding the daemons' admin listeners and asking their JSON endpoints, for `status`,
`explain --live` and the `cache ls/purge/warm` commands.

An admin endpoint is given with `--admin HOST:PORT` or `--admin /path/to/socket` (the
cache's unix control socket), or read from the daemons' config files (the packaged ones,
`/etc/dnsoverride/dnsoverride.yaml` and `/etc/dnsoverride/cache.yaml`, or
`/etc/dnsoverride/registry.yaml` from before the cache served packages: cli.py's
`PACKAGED_CONFIGS`, unless `--config`/`--cache-config` name others): their `metrics:`
key, and for the cache commands first the cache's `control_socket:`. An endpoint found in
two files is asked once. Only those keys are read: the rest of a config (zones, TLS files)
may be unreadable to the user running the command, and has no say in where the daemon
listens for its admin.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dnsoverride.common import yamlsource
from dnsoverride.common.errors import UserError
from dnsoverride.common.grammar import HTTP_LISTENER, Endpoint, GrammarError, parse_endpoint

TIMEOUT = 5.0
# A listener on every address is reached on loopback.
_ANY = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class AdminEndpoint:
    """An admin listener (TCP `endpoint`, or the unix `socket`) and where it was found
    (`--admin`, or the config file)."""

    endpoint: Endpoint | None
    source: str
    socket: Path | None = None

    def target(self, path: str, query: dict[str, str] | None = None) -> str:
        suffix = f"?{urllib.parse.urlencode(query)}" if query else ""
        return f"{path}{suffix}"

    def connection(self, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
        if self.socket is not None:
            return _UnixConnection(self.socket, timeout)
        assert self.endpoint is not None
        host = _ANY.get(self.endpoint.host, self.endpoint.host)
        return http.client.HTTPConnection(host, self.endpoint.port, timeout=timeout)

    def __str__(self) -> str:
        return str(self.socket) if self.socket is not None else str(self.endpoint)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket (the standard library speaks it over TCP only)."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def parse_admin(text: str) -> AdminEndpoint:
    """`--admin HOST:PORT` or `--admin PATH` (a unix socket: the value has a `/`);
    UserError naming the flag for a bad value."""
    if "/" in text:
        return AdminEndpoint(None, "--admin", Path(text))
    try:
        return AdminEndpoint(parse_endpoint(text, HTTP_LISTENER), "--admin")
    except GrammarError as error:
        raise UserError(f"--admin {text}: {error}") from None


def from_config(
    path: Path, flag: str | None, keys: Sequence[str] = ("metrics",)
) -> AdminEndpoint | None:
    """The endpoint of the first of `keys` (`metrics`, `control_socket`) the config at
    `path` sets; None when the file does not exist (a packaged config of a daemon not
    installed) or sets none. UserError naming `flag` (or the file) when it cannot be
    read."""
    label = f"{flag} {path}" if flag else str(path)
    if flag is None and not path.exists():
        return None
    try:
        document = yamlsource.load_file(path)
    except OSError as error:
        raise UserError(f"{label}: cannot read: {error.strerror}") from None
    except yamlsource.YamlError as error:
        raise UserError(f"{label}:{error.line}: {error.reason}") from None
    for key in keys:
        value = document.get(key) if isinstance(document, dict) else None
        if value is None:
            continue
        if key == "control_socket":
            return AdminEndpoint(None, str(path), Path(str(value)))
        try:
            return AdminEndpoint(parse_endpoint(str(value), HTTP_LISTENER), str(path))
        except GrammarError as error:
            raise UserError(f"{label}: {key}: {error}") from None
    return None


def find(
    admins: Sequence[str],
    configs: Sequence[tuple[Path, str | None]],
    keys: Sequence[str] = ("metrics",),
) -> list[AdminEndpoint]:
    """The endpoints of `--admin` if any, else those of `configs` ((path, flag) pairs; flag
    None for a packaged path; `keys` as `from_config` reads them); UserError when there is
    none."""
    if admins:
        return [parse_admin(text) for text in admins]
    found: list[AdminEndpoint] = []
    for path, flag in configs:
        admin = from_config(path, flag, keys)
        if admin is not None and all(str(admin) != str(seen) for seen in found):
            found.append(admin)
    if not found:
        looked = ", ".join(str(path) for path, _ in configs)
        raise UserError(
            f"no admin endpoint found in {looked} (no such file, or no "
            f"{' or '.join(f'`{key}:`' for key in keys)} in it); "
            "give --admin HOST:PORT (the daemon's --metrics)"
        )
    return found


def get_json(
    admin: AdminEndpoint,
    path: str,
    query: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> object:
    """GET a JSON endpoint; UserError with the reason when the daemon cannot be asked."""
    return ask(admin, "GET", path, query, timeout)


def ask(
    admin: AdminEndpoint,
    method: str,
    path: str,
    query: dict[str, str] | None = None,
    timeout: float = TIMEOUT,
) -> object:
    """`method` a JSON endpoint (POST: an action) and return its answer within `timeout`
    seconds; UserError with the reason (the daemon's own `error`, or why it cannot be
    reached) otherwise."""
    where = f"{admin} ({admin.source})"
    connection = admin.connection(timeout)
    try:
        connection.request(method, admin.target(path, query))
        response = connection.getresponse()
        body = response.read()
    except PermissionError:
        raise UserError(
            f"{where}: permission denied: the control socket is for root and the "
            "`dnsoverride` group (mode 0660)"
        ) from None
    except FileNotFoundError:
        raise UserError(
            f"{where}: cannot connect: no such socket (is the cache running?)"
        ) from None
    except (OSError, http.client.HTTPException) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"{where}: cannot connect: {reason}") from None
    finally:
        connection.close()
    try:
        document = json.loads(body)
    except ValueError as error:
        if response.status >= 400:
            reason = f"{response.status} {response.reason} (a dnsoverride admin listener?)"
            raise UserError(f"{where}: {reason}") from None
        raise UserError(f"{where}: not JSON: {error}") from None
    if response.status >= 400:
        reason = document.get("error") if isinstance(document, dict) else None
        raise UserError(f"{where}: {reason or f'{response.status} {response.reason}'}")
    return document
