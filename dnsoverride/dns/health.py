"""Health checks of override targets: which health-gated overrides are withdrawn right now.

Owns the probes, the per-target fall/rise state machine, one checker task per gated name,
and the immutable set of withdrawn names handed to the DNS answer path (the `health:` key
itself is parsed with the zones, `dnsoverride.dns.zones.health`).

A probe runs against the override's OWN addresses: the TCP probe connects to each address;
the HTTPS probe connects to each address while the URL keeps the overridden name, so SNI,
Host and certificate verification (against the configured CA file) all use that name,
exactly as a CI client would (the CA file is stat'ed on every probe and re-read when it
was replaced or rewritten, so a rotated CA needs no zone change). While every target of a
name is down the override is withdrawn, and the DNS server forwards the name upstream
instead; CI then falls back to the real registry rather than failing. Targets start "up"
so a restart does not withdraw overrides before the first checks have run; `fall`
consecutive failures take a target down, `rise` consecutive successes bring it back.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from dnsoverride.dns.zones.health import GatedOverride, HealthCheck

if TYPE_CHECKING:
    import aiohttp
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

log = structlog.get_logger(__name__)


HTTPS_PORT = 443


def _client_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclass(frozen=True)
class TargetState:
    """Health of one address: `up`, and how many results in a row contradicted it."""

    up: bool = True
    streak: int = 0

    def advance(self, ok: bool, fall: int, rise: int) -> TargetState:
        """The state after one probe result; flips after `fall` failures / `rise` successes."""
        if ok == self.up:
            return TargetState(self.up, 0)
        streak = self.streak + 1
        if streak >= (rise if ok else fall):
            return TargetState(ok, 0)
        return TargetState(self.up, streak)


class Prober:
    """Runs one check against the addresses of one name, over connections it owns."""

    def __init__(self, name: str, check: HealthCheck) -> None:
        self._name = name
        self._check = check
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._ssl: ssl.SSLContext | None = None
        self._ssl_error = ""
        self._ca_version: tuple[int, int, int] | None = None
        self._closing: list[asyncio.Future[None]] = []

    def _trust(self) -> ssl.SSLContext | None:
        """The probes' TLS context, rebuilt when the CA file is replaced or rewritten.

        One stat per probe: a rotated CA is picked up by the next check without a zone
        change. A CA file that cannot be read keeps the last good context (and logs).
        """
        ca_file = self._check.ca_file
        if ca_file is None:
            if self._ssl is None:
                self._ssl = _client_context(None)
            return self._ssl
        try:
            info = ca_file.stat()
            version = (info.st_ino, info.st_mtime_ns, info.st_size)
        except OSError as error:
            version, reason = None, os.strerror(error.errno or 0)
        if version is not None and version == self._ca_version:
            return self._ssl
        if version is not None:
            try:
                context = _client_context(ca_file)
            except (OSError, ssl.SSLError) as error:
                reason = str(error)
            else:
                if self._ssl is not None:
                    log.info("health_ca_reloaded", name=self._name, ca=str(ca_file))
                self._ssl, self._ca_version = context, version
                # Open sessions carry the old context; the next probes make new ones.
                old, self._sessions = self._sessions, {}
                for session in old.values():
                    self._closing.append(asyncio.ensure_future(session.close()))
                return context
        if reason != self._ssl_error:
            log.warning("health_ca_unusable", name=self._name, ca=str(ca_file), error=reason)
        self._ssl_error, self._ca_version = reason, version
        return self._ssl

    async def probe(self, address: str) -> str | None:
        """None when `address` passes the check, otherwise why it failed."""
        try:
            async with asyncio.timeout(self._check.timeout):
                if self._check.kind == "tcp":
                    _, writer = await asyncio.open_connection(address, self._check.port)
                    writer.close()
                    return None
                return await self._probe_https(address)
        except TimeoutError:
            return f"no answer within {self._check.timeout:g}s"
        except OSError as error:
            return self._reason(error)
        except Exception as error:  # anything else costs one check, never the checker task
            log.exception("health_probe_error", name=self._name, address=address)
            return f"{type(error).__name__}: {error}"

    def _reason(self, error: Exception) -> str:
        if isinstance(error, ssl.SSLError):
            return str(error)
        # asyncio's connect errors repeat the address; the log event already has it.
        if isinstance(error, OSError) and error.errno:
            return os.strerror(error.errno)
        return str(error) or type(error).__name__

    async def _probe_https(self, address: str) -> str | None:
        # Imported on the first HTTPS check: an HTTP client is 10 MB of a `serve` that has
        # none (issue 13); TCP checks and the DNS path never need it.
        import aiohttp

        context = self._trust()
        if context is None:
            return f"CA file unusable: {self._ssl_error}"
        session = self._sessions.get(address)
        if session is None:
            # force_close makes every probe a fresh TCP+TLS handshake, which is what
            # clients will do.
            connector = aiohttp.TCPConnector(ssl=context, force_close=True)
            session = aiohttp.ClientSession(connector=connector)
            self._sessions[address] = session
        # The connection goes to this one target; SNI, certificate verification and Host
        # use the overridden name, as a client's would.
        port = self._check.port
        host = f"[{address}]" if ":" in address else address
        url = f"https://{host}:{port}{self._check.path}"
        headers = {"Host": self._name if port == HTTPS_PORT else f"{self._name}:{port}"}
        try:
            async with session.get(
                url, headers=headers, server_hostname=self._name, allow_redirects=False
            ) as response:
                if response.status in self._check.expect:
                    return None
                return f"HTTP status {response.status}"
        except aiohttp.ClientSSLError as error:
            return str(error)
        except aiohttp.ClientError as error:
            return self._reason(error)

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        await asyncio.gather(*self._closing)
        self._closing.clear()


@dataclass
class _NameHealth:
    """The mutable health of one gated name; written only by that name's checker task."""

    override: GatedOverride
    targets: dict[str, TargetState]
    checks: dict[tuple[str, bool], int] = field(default_factory=dict)
    flips: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None

    @property
    def withdrawn(self) -> bool:
        return not any(state.up for state in self.targets.values())


class HealthMonitor:
    """One checker task per gated name; publishes the withdrawn names as one frozenset.

    `on_change` receives every new withdrawn set (the DNS server swaps it in and bumps its
    answer-cache generation). Call `update` with the gated overrides of each new zone set.
    """

    def __init__(self, on_change: Callable[[frozenset[str]], object]) -> None:
        self._on_change = on_change
        self._names: dict[str, _NameHealth] = {}
        self._withdrawn: frozenset[str] = frozenset()

    @property
    def withdrawn(self) -> frozenset[str]:
        return self._withdrawn

    def update(self, overrides: Iterable[GatedOverride]) -> None:
        """Start, restart or stop checker tasks to match `overrides`; unchanged ones keep state."""
        wanted = {override.name.rstrip(".").lower(): override for override in overrides}
        for name in list(self._names):
            if name not in wanted or self._names[name].override != wanted[name]:
                self._stop(name)
        for name, override in wanted.items():
            if name not in self._names:
                health = _NameHealth(
                    override, {address: TargetState() for address in override.addresses}
                )
                health.task = asyncio.get_running_loop().create_task(
                    self._run(name, health), name=f"health-{name}"
                )
                self._names[name] = health
        self._publish()

    def _stop(self, name: str) -> None:
        health = self._names.pop(name)
        if health.task is not None:
            health.task.cancel()

    async def close(self) -> None:
        tasks = [health.task for health in self._names.values() if health.task is not None]
        for name in list(self._names):
            self._stop(name)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _publish(self) -> None:
        withdrawn = frozenset(name for name, health in self._names.items() if health.withdrawn)
        if withdrawn != self._withdrawn:
            self._withdrawn = withdrawn
            self._on_change(withdrawn)

    async def _run(self, name: str, health: _NameHealth) -> None:
        check = health.override.check
        prober = Prober(name, check)
        try:
            while True:
                addresses = list(health.targets)
                results = await asyncio.gather(*(prober.probe(address) for address in addresses))
                was_withdrawn = health.withdrawn
                for address, failure in zip(addresses, results, strict=True):
                    self._record(name, health, address, failure)
                if health.withdrawn != was_withdrawn:
                    if health.withdrawn:
                        log.warning("override_withdrawn", name=name, targets=addresses)
                    else:
                        log.info(
                            "override_restored",
                            name=name,
                            up=[a for a, state in health.targets.items() if state.up],
                        )
                    self._publish()
                await asyncio.sleep(check.interval)
        finally:
            await prober.close()

    @staticmethod
    def _record(name: str, health: _NameHealth, address: str, failure: str | None) -> None:
        check = health.override.check
        before = health.targets[address]
        after = before.advance(failure is None, check.fall, check.rise)
        health.targets[address] = after
        key = (address, failure is None)
        health.checks[key] = health.checks.get(key, 0) + 1
        if after.up != before.up:
            health.flips[address] = health.flips.get(address, 0) + 1
            if after.up:
                log.info("health_target_up", name=name, address=address, successes=check.rise)
            else:
                log.warning(
                    "health_target_down",
                    name=name,
                    address=address,
                    failures=check.fall,
                    reason=failure,
                )

    def states(self) -> Mapping[str, Mapping[str, TargetState]]:
        """Current state of every target of every gated name (for metrics and tests)."""
        return {name: dict(health.targets) for name, health in self._names.items()}

    def collector(self) -> Collector:
        """A collector of this monitor's metrics, to register with the daemon's."""
        return _HealthCollector(self)


class _HealthCollector:
    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        # prometheus-client on a scrape only (common/metrics.py)
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily(
            "dnsoverride_health_target_up",
            "Whether a health-gated override target passes its check (1) or not (0)",
            labels=["name", "address"],
        )
        withdrawn = GaugeMetricFamily(
            "dnsoverride_override_withdrawn",
            "Whether a health-gated override is withdrawn and the name forwarded (1)",
            labels=["name"],
        )
        checks = CounterMetricFamily(
            "dnsoverride_health_checks",
            "Health probes run, by result",
            labels=["name", "address", "result"],
        )
        flips = CounterMetricFamily(
            "dnsoverride_health_flips",
            "Times a target changed between up and down",
            labels=["name", "address"],
        )
        for name, health in list(self._monitor._names.items()):
            withdrawn.add_metric([name], 1.0 if health.withdrawn else 0.0)
            for address, state in list(health.targets.items()):
                up.add_metric([name, address], 1.0 if state.up else 0.0)
                flips.add_metric([name, address], health.flips.get(address, 0))
                for ok in (True, False):
                    checks.add_metric(
                        [name, address, "pass" if ok else "fail"],
                        health.checks.get((address, ok), 0),
                    )
        yield from (up, withdrawn, checks, flips)
