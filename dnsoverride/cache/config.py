"""The cache's configuration: one YAML file + command-line flags -> frozen dataclasses.

The file has the shared settings at the top (listen, storage, budget, TLS, resolvers,
timeouts, metrics) and a section per kind of content: `registry:` (registry/config.py)
and `packages:` (packages/config.py). A registry.yaml written before the cache had
sections (`upstreams`, `default_upstream`, `tag_ttl`, `clients` at the top level) keeps
working: those keys are read as the `registry:` section; both forms in one file is a
problem at the line of each top-level registry key.

Read with the one config idiom (`dnsoverride.common.configfile`, as `serve` reads its
own): every problem of the file at once as `file:line: key: reason`, unknown keys with a
did-you-mean, flags read with the same grammar (their problems name the flag). Parsed
once at start-up; the defaults live in the dataclasses only: with no config file at all,
`dnsoverride cache` listens on 127.0.0.1:5000, mirrors Docker Hub, answers the package
hosts, and stores under the user's cache directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnsoverride.cache.packages.config import PACKAGES_KEYS, PackagesConfig
from dnsoverride.cache.registry.config import (
    REGISTRY_KEYS,
    WARM_KEYS,
    RegistryConfig,
    UpstreamConfig,
    WarmConfig,
)
from dnsoverride.cache.registry.references import parse_image
from dnsoverride.cache.session import TIMEOUT_KEYS, Timeouts
from dnsoverride.cache.store import Budget
from dnsoverride.common.configfile import Document, Flags, Section, require_file
from dnsoverride.common.errors import Problem
from dnsoverride.common.grammar import (
    HTTP_LISTENER,
    RESOLVER,
    Endpoint,
    GrammarError,
    parse_endpoint,
    parse_size,
)
from dnsoverride.common.yamlsource import LineMap, brief


def default_storage() -> Path:
    """`$XDG_CACHE_HOME/dnsoverride/registry`, else `~/.cache/dnsoverride/registry` (the
    directory name from before the cache served packages too, so stores carry over)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnsoverride" / "registry"


DEFAULT_LISTEN = Endpoint("127.0.0.1", 5000)


@dataclass(frozen=True)
class CacheConfig:
    """Everything `dnsoverride cache` needs, validated."""

    listen: Endpoint = DEFAULT_LISTEN
    storage: Path = field(default_factory=default_storage)
    budget: Budget | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    # HTTPS: certificate/key pairs chosen by SNI (tls.py). With `tls_listen` HTTPS is
    # served there and `listen` stays plain HTTP; without it `listen` is HTTPS.
    tls_pairs: tuple[tuple[Path, Path], ...] = ()
    tls_listen: Endpoint | None = None
    # DNS servers the upstream client asks instead of the system resolver (session.py).
    resolvers: tuple[Endpoint, ...] = ()
    metrics: Endpoint | None = None
    # The unix socket of the admin actions (purge, warm), mode 0660 (common/admin.py).
    control_socket: Path | None = None
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    packages: PackagesConfig = field(default_factory=PackagesConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)

    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port


# The keys of the file's top level: the shared settings (`max_size` and the watermarks
# make `budget`, `tls` makes the TLS fields), the sections, and the registry's keys of the
# form from before the sections.
SHARED_KEYS = (
    "listen",
    "storage",
    "max_size",
    "high_watermark",
    "low_watermark",
    "timeouts",
    "tls",
    "resolvers",
    "metrics",
    "control_socket",
)
TOP_KEYS = (*SHARED_KEYS, "registry", "packages", "warm", *REGISTRY_KEYS)
TLS_KEYS = ("cert", "key", "certificates", "listen")
PAIR_KEYS = ("cert", "key")


@dataclass(frozen=True)
class CacheFlags:
    """What the command line of `cache` (and `registry`) sets over the config file (None:
    not given)."""

    listen: str | None = None
    upstream: str | None = None
    storage: str | None = None
    max_size: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    metrics: str | None = None
    control_socket: str | None = None


def _budget(top: Section, max_size: int | None) -> Budget | None:
    """The store budget from `max_size` (the flag's or the file's) and the watermarks."""
    watermarks: dict[str, float] = {}
    for key in ("high_watermark", "low_watermark"):
        value = top.raw(key)
        if key not in top:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            top.problem(key, f"expected a fraction above 0 and at most 1, not {brief(value)}")
        else:
            watermarks[key] = float(value)
    if max_size is None:
        for key in watermarks:
            top.problem(key, "applies to max_size, which is not set (no budget: no eviction)")
        return None
    budget = Budget(max_size, **watermarks)
    if watermarks and not budget.low_watermark < budget.high_watermark:
        top.add(top.line_of("low_watermark"), "need low_watermark < high_watermark")
    return budget


def _max_size(value: object) -> int:
    """A store budget: a size with its unit (a budget below one item is warned of at run
    time, `store_budget_too_small`)."""
    if parse_size(value, unit_required=False) == 0:
        raise GrammarError("a budget of 0 would hold nothing: leave max_size out for no limit")
    return parse_size(value, unit_required=True)


def _tls(tls: Section | None, flags: CacheFlags, command_line: Flags) -> dict[str, Any]:
    """`tls_pairs` and `tls_listen`: the flag pair (else `tls: cert/key`) first, then every
    `tls: certificates` entry."""
    values: dict[str, Any] = {}
    pairs: list[tuple[Path, Path]] = []
    cert, key = flags.tls_cert, flags.tls_key
    if bool(cert) != bool(key):
        command_line.problems.append(Problem("--tls-cert", None, "--tls-key goes with it"))
    elif tls is not None and not cert:
        cert = tls.text("cert", "a certificate file path")
        key = tls.text("key", "a key file path")
        if bool(cert) != bool(key):
            tls.add(tls.line, "cert and key go together")
    if cert and key:
        pairs.append((Path(cert), Path(key)))
    if tls is not None:
        for pair in tls.sections("certificates", PAIR_KEYS):
            cert_file = pair.text("cert", "a certificate file path")
            key_file = pair.text("key", "a key file path")
            if cert_file and key_file:
                pairs.append((Path(cert_file), Path(key_file)))
            else:
                pair.add(pair.line, "needs cert and key")
        listen = tls.endpoint("listen", HTTP_LISTENER)
        if listen is not None:
            values["tls_listen"] = listen
            if not pairs:
                tls.problem("listen", "needs a certificate (cert/key or certificates)")
    values["tls_pairs"] = tuple(pairs)
    return values


def _read_shared(top: Section) -> dict[str, Any]:
    """The shared settings of the file (problems recorded), as CacheConfig values; the
    TLS and budget, which flags combine with, are read by `load`."""
    values: dict[str, Any] = {}
    top.endpoint("listen", HTTP_LISTENER)
    top.text("storage", "a directory path")
    top.endpoints("resolvers", RESOLVER)
    top.endpoint("metrics", HTTP_LISTENER)
    socket = top.text("control_socket", "a unix socket path")
    if socket is not None:
        if not Path(socket).is_absolute():
            top.problem("control_socket", f"expected an absolute path, not {socket!r}")
        else:
            values["control_socket"] = Path(socket)
    for key in ("listen", "resolvers", "metrics"):
        if key in top.values:
            values[key] = top.values[key]
    if "storage" in top.values:
        values["storage"] = Path(top.values["storage"])
    timeouts = top.section("timeouts", TIMEOUT_KEYS)
    if timeouts is not None:
        values["timeouts"] = Timeouts.read(timeouts)
    return values


def _registry_section(top: Section) -> Section:
    """The `registry:` section; for a config from before the sections, its keys at the top
    level read as one; both at once is a problem at each top-level registry key."""
    legacy = [key for key in REGISTRY_KEYS if key in top]
    section = top.section("registry", REGISTRY_KEYS)
    if legacy and "registry" in top:
        for key in legacy:
            top.problem(
                key,
                "a registry setting at the top level (the form from before the sections) "
                f"beside a registry: section (line {top.line_of('registry')}): "
                "move it into registry:",
            )
    if section is not None:
        return section
    mapping = LineMap({key: top.raw(key) for key in legacy})
    mapping.line = top.line
    mapping.key_lines = {key: top.line_of(key) for key in legacy}
    mapping.duplicates = ()
    return Section(top.document, mapping, "", REGISTRY_KEYS)


def load(path: Path | None, flags: CacheFlags | None = None) -> CacheConfig:
    """The config from the file at `path` (optional) with `flags` over it; ConfigError with
    every problem, of the file and of the flags."""
    flags = flags or CacheFlags()
    document = Document(path or Path("(no config file)"))
    top: Section | None = None
    if path is not None:
        require_file(path, f"config file {path}")
        top = document.top(TOP_KEYS)
    if top is None:
        top = document.blank(TOP_KEYS)
    values = _read_shared(top)
    command_line = Flags()
    for key, given in (
        ("listen", command_line.read("--listen", flags.listen, _http_listener)),
        ("metrics", command_line.read("--metrics", flags.metrics, _http_listener)),
        ("storage", Path(flags.storage) if flags.storage else None),
        ("control_socket", Path(flags.control_socket).absolute() if flags.control_socket else None),
    ):
        if given is not None:
            values[key] = given
    max_size = top.read("max_size", _max_size)
    max_size = command_line.read("--max-size", flags.max_size, _max_size) or max_size
    values["budget"] = _budget(top, max_size)
    values.update(_tls(top.section("tls", TLS_KEYS), flags, command_line))
    flag_upstream = command_line.read("--upstream", flags.upstream, UpstreamConfig.from_url)
    values["registry"] = RegistryConfig.read(_registry_section(top), flag_upstream)
    packages = top.section("packages", PACKAGES_KEYS)
    if packages is not None:
        values["packages"] = PackagesConfig.read(packages)
    warm = top.section("warm", WARM_KEYS)
    if warm is not None:
        registry: RegistryConfig = values["registry"]
        values["warm"] = WarmConfig.read(
            warm, lambda text: parse_image(text, registry.upstreams, registry.default_upstream)
        )
    document.raise_problems(*command_line.problems)
    return CacheConfig(**{key: value for key, value in values.items() if value is not None})


def _http_listener(text: str) -> Endpoint:
    return parse_endpoint(text, HTTP_LISTENER)
