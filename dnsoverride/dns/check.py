"""What `dnsoverride check` validates of the DNS server: its config and every zone file,
as `serve` would load them (with the config's views), without serving. A zones directory
without zone files is valid for `serve` (it forwards everything, with a warning) but is
reported here as a problem: it is almost always a wrong path or file extension."""

from __future__ import annotations

from pathlib import Path

from dnsoverride.common.errors import ConfigError, Problem
from dnsoverride.dns.config import ServeFlags, fit_workers, load_config
from dnsoverride.dns.zones.load import empty_reason, load_zone_set


def check(path: Path | None, flags: ServeFlags) -> str:
    """A one-line summary of a valid config and zone set, with the number of processes
    `serve` would run; ConfigError (the config's problems, or the zones') otherwise."""
    config = load_config(path, flags)
    zone_set = load_zone_set(config.zones, config.view_selectors())
    if not zone_set.files:
        warning = Problem(str(config.zones), None, f"warning: {empty_reason(config.zones)}")
        raise ConfigError([warning], "no zone files")
    # What `serve` would run: `workers: auto` counts the zones too.
    fitted = fit_workers(config, zone_set.name_count())
    workers = f"workers {fitted.workers}"
    if fitted.workers_auto is not None:
        workers += f" (auto: {fitted.workers_auto})"
    return (
        f"{len(zone_set.files)} zone files, {zone_set.name_count()} names, "
        f"{len(config.views)} views, upstreams {', '.join(map(str, config.upstreams))}, " + workers
    )
