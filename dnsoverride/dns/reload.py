"""What `dnsoverride serve` hot-reloads, and from where: the zones directory and the config
file (the generic mechanics, events, debounce, fingerprint and periodic check, are
`dnsoverride.common.reloader`), loaded as one `Routing` validated as `dnsoverride check`
validates it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import structlog

from dnsoverride.common import reloader
from dnsoverride.common.heaptrim import trim_heap
from dnsoverride.common.metrics import Collectors
from dnsoverride.common.reloader import Reloader, ReloadStats, S, Sources
from dnsoverride.dns.config import ServeConfig, ServeFlags, load_config
from dnsoverride.dns.views import Routing
from dnsoverride.dns.zones.load import ZoneFileCache, is_zone_file_name, load_zone_set, zone_files

log = structlog.get_logger(__name__)


def zone_sources(zones_dir: Path, config_file: Path | None) -> Sources:
    """The zone files of `zones_dir` and the config file, as the reloader watches them."""
    files = (config_file,) if config_file is not None else ()
    return Sources(zones_dir, is_zone_file_name, zone_files, files)


def fingerprint(zones_dir: Path, config_file: Path | None) -> str:
    """The content fingerprint of the zone files and the config file."""
    return reloader.fingerprint(zone_sources(zones_dir, config_file))


def zone_reloader(
    *,
    load: Callable[[], S],
    swap: Callable[[S], object],
    current: S,
    zones_dir: Path,
    interval: float,
    config_file: Path | None = None,
    **options: Any,
) -> Reloader[S]:
    """A Reloader of what `load` builds from `zones_dir` (and `config_file`); `options`
    are the Reloader's own (registry, baseline, stats, debounce, settle_max)."""
    return Reloader(
        load=load,
        swap=swap,
        current=current,
        sources=zone_sources(zones_dir, config_file),
        interval=interval,
        **options,
    )


# What a config reload applies at once (with the zones); every other key is read at start.
HOT_CONFIG_KEYS = frozenset({"allow", "views", "default_view", "ratelimit"})


def serve_loader(
    config: ServeConfig, path: Path | None, flags: ServeFlags, *, report: bool = True
) -> Callable[[], Routing]:
    """What `dnsoverride serve` reloads: the config file and the zones, validated exactly as
    `dnsoverride check` would validate them now, as one `Routing` (ACL, views, zone set).
    `path` is the config file (None: none), `flags` what the command line set over it.

    `allow`, `views`, `default_view` and `ratelimit` take effect with the reload; a change
    to any other key (listeners, upstreams, cache, ...) is logged as needing a restart and
    the running value stays (`report`: logged; a worker's loader does not, the supervisor
    has). The zones directory is always the running one. Unchanged zone files are not
    parsed again (a ZoneFileCache lives as long as the loader).
    """

    cache = ZoneFileCache()
    reported: list[str] = []

    def load() -> Routing:
        edited = load_config(path, flags) if path is not None else config
        restart = [
            f.name
            for f in fields(config)
            if f.name not in HOT_CONFIG_KEYS and getattr(edited, f.name) != getattr(config, f.name)
        ]
        if restart != reported:
            # Once per distinct change, not on every reload after it.
            reported[:] = restart
            if restart and report:
                log.warning("config_change_needs_restart", config=str(path), keys=restart)
        hot = replace(config, **{key: getattr(edited, key) for key in HOT_CONFIG_KEYS})
        zone_set = load_zone_set(config.zones, hot.view_selectors(), cache)
        # Merge each view's files now, in this thread, not on the first query.
        for selectors in hot.view_selectors().values():
            zone_set.select(selectors)
        return Routing(hot, zone_set)

    return load


# The fewest names a first load's seconds are scaled from and to: below it the load is mostly
# what any load costs (the files' listing, the parser's start: 0.4-0.7 ms here for 0 or 1
# name, 1.1 ms for 100, 62 ms for 10,000), and scaling that per name would give a set
# that grew by a reload from 1 name to 10^6 an hour to start in (2,200 s; 41 s scaled
# from 10,000 names).
SCALED_FROM = 100


@dataclass
class ServeStart:
    """Taken before `dnsoverride serve` reads its zones: the files' fingerprint at that
    moment (so an edit made during a long first load still reloads), the loader that the
    first load and every reload share (its parse cache spares unchanged files), and the
    stats that the first load already counts in (so the metrics exist from the start)."""

    baseline: str
    loader: Callable[[], Routing]
    stats: ReloadStats = field(default_factory=ReloadStats)
    # The first load: its seconds and names (a reload parses only the files that changed)
    seconds: float = 0.0
    names: int = 0

    def load(self) -> Routing:
        """The first load, counted as a successful reload."""
        started = time.perf_counter()
        routing = self.loader()
        trim_heap()
        self.seconds = time.perf_counter() - started
        self.names = routing.zone_set.name_count()
        self.stats.succeeded(self.seconds)
        return routing

    def load_seconds(self, names: int) -> float:
        """How long loading `names` names from scratch takes here: the first load, which
        parsed every file, scaled to `names`; or the last reload if that took longer."""
        scaled = self.seconds * max(names, SCALED_FROM) / max(self.names, SCALED_FROM)
        return max(scaled, self.stats.last_duration_seconds or 0.0)


def serve_start(
    config: ServeConfig, path: Path | None, flags: ServeFlags, *, report: bool = True
) -> ServeStart:
    """Call before the first load, then load with `.load()` (`report`: see `serve_loader`)."""
    loader = serve_loader(config, path, flags, report=report)
    return ServeStart(fingerprint(config.zones, path), loader)


def serve_reloader(
    install: Callable[[Routing], object],
    current: Routing,
    *,
    config: ServeConfig,
    path: Path | None,
    start: ServeStart,
    registry: Collectors | None = None,
) -> Reloader[Routing]:
    """The reloader of `dnsoverride serve`: watches the zones and the config file and hands
    every new `Routing` to `install` (on the loop thread)."""
    return zone_reloader(
        load=start.loader,
        swap=install,
        current=current,
        zones_dir=config.zones,
        config_file=path,
        interval=config.reload_interval,
        registry=registry,
        baseline=start.baseline,
        stats=start.stats,
    )
