"""`dnsoverride check`: validate every config it is given without serving, like `nginx -t`.

The DNS server's config and zones (`--config`, `--zones`; checked unless only
`--cache-config` is given) and the cache's config (`--cache-config`, alias
`--registry-config`).
Prints one `file:line: key: reason` line per problem (a flag's problem names the flag)
and returns 1 when there is any; otherwise one `ok:` line per config and 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from dnsoverride.cache import check as cache_check
from dnsoverride.common.errors import ConfigError, UserError
from dnsoverride.dns import check as dns_check
from dnsoverride.dns.config import ServeFlags


def run(serve: Path | None, zones: str | None, cache: Path | None) -> int:
    """Check what is given (the DNS server's config when nothing is); the exit status."""
    checks: list[tuple[str, str, Callable[[], str]]] = []
    if serve is not None or zones is not None or cache is None:
        flags = ServeFlags(zones=zones)
        checks.append(("serve", "--config", lambda: dns_check.check(serve, flags)))
    if cache is not None:
        checks.append(("cache", "--cache-config", lambda: cache_check.check(cache)))
    status = 0
    for daemon, flag, check in checks:
        try:
            summary = check()
        except ConfigError as error:
            for problem in error.problems:
                print(problem, file=sys.stderr)
            status = 1
        except UserError as error:
            print(f"{flag}: {error}", file=sys.stderr)
            status = 1
        else:
            print(f"ok: {daemon}: {summary}")
    return status
