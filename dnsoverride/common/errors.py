"""The errors that reach the user as messages instead of tracebacks, and `Problem`, the
one shape every complaint about an input takes (zone files, config files, flags), from
the loader that finds it to `dnsoverride check`'s output and a failed reload's log events.

Anything raised as (a subclass of) `UserError` is printed by the CLI as
`dnsoverride: error: <message>` and turned into exit status 2 (1 for `check`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass

# Below this a port needs privilege (net.ipv4.ip_unprivileged_port_start's default).
PRIVILEGED_PORTS = 1024


class UserError(Exception):
    """A problem the user can fix: bad flag, bad config, port in use, forwarding loop..."""


def listen_error(what: str, port: int, error: OSError) -> UserError:
    """The one-line error for a listener that cannot bind: the errno's text (not aiohttp's
    or asyncio's restatement of the address), and for a privileged port what to do."""
    # A name that does not resolve (socket.gaierror) carries a negative EAI_* code.
    code = error.errno
    reason = os.strerror(code) if code is not None and code > 0 else error.strerror or str(error)
    message = f"cannot listen on {what}: {reason}"
    if error.errno == errno.EACCES and 0 < port < PRIVILEGED_PORTS:
        message += (
            f" (port {port} needs privilege: start it from its systemd socket unit, or give "
            "it CAP_NET_BIND_SERVICE: AmbientCapabilities= in the unit, or setcap on python)"
        )
    return UserError(message)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: where it is and why it is wrong.

    `file` is a path, or a command-line flag (`--listen`) for a value given there; `line`
    is 1-based, 0 for the file as a whole, None where there are no lines (a flag).
    """

    file: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.reason}"
        return f"{self.file}:{self.line}: {self.reason}"


class ConfigError(UserError):
    """An input (config, zones) with problems: `problems` holds every one found."""

    def __init__(self, problems: Iterable[Problem], what: str = "invalid configuration") -> None:
        self.problems = tuple(problems)
        super().__init__(f"{what}:\n  " + "\n  ".join(map(str, self.problems)))
