"""`dnsoverride check`: validate the DNS config and every zone file without serving.

Prints one `file:line: reason` line per problem (config first, then zones) and returns
1 when there is any, 0 with a one-line summary otherwise — like `nginx -t`.
"""

from __future__ import annotations

import argparse
import sys

from dnsoverride.dns.config import ConfigError, load_config
from dnsoverride.dns.zones.load import load_zone_set
from dnsoverride.dns.zones.model import ZoneSetError


def run(args: argparse.Namespace) -> int:
    """Validate, print problems to stderr, return the exit status."""
    try:
        config = load_config(args)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return 1
    try:
        zone_set = load_zone_set(config.zones, config.view_selectors())
    except ZoneSetError as error:
        for zone_problem in error.problems:
            print(zone_problem, file=sys.stderr)
        return 1
    print(
        f"ok: {len(zone_set.files)} zone files, {zone_set.name_count()} names, "
        f"{len(config.views)} views, upstreams {', '.join(map(str, config.upstreams))}"
    )
    return 0
