"""Command-line entry point: `dnsoverride serve | check | registry | ca`.

This module only parses arguments and dispatches; each command lives with the
component it runs, and takes the flags as the small frozen dataclass its loader reads
(`ServeFlags`, `RegistryFlags`), never the argparse namespace. Implementations are
imported lazily so that `dnsoverride serve` does not pay for the registry's imports and
the reverse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# structlog imports `rich` at import time when it is installed, for pretty tracebacks in
# its console renderer: 5.5 MB of every daemon's idle memory (issue 13). Ours never uses
# them (`format_exc_info` renders an exception as a field before any renderer sees it),
# so structlog is told rich is absent (None in sys.modules makes `import rich` fail).
# Nothing in this package uses rich; a process that imported it already keeps it.
sys.modules.setdefault("rich", None)  # type: ignore[arg-type]

from dnsoverride import __version__  # noqa: E402 (after the rich line)
from dnsoverride.common.errors import UserError  # noqa: E402
from dnsoverride.common.log import LEVELS, LogOptions  # noqa: E402


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="log output format (default: console on a terminal, JSON lines otherwise)",
    )
    parser.add_argument("--log-level", choices=LEVELS, default=None, help="minimum log level")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; kept separate from `main` so tests can inspect it."""
    parser = argparse.ArgumentParser(
        prog="dnsoverride",
        description="Split-horizon override DNS server and pull-through registry cache.",
    )
    parser.add_argument("--version", action="version", version=f"dnsoverride {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the override DNS server")
    serve.add_argument("--config", metavar="FILE", help="daemon config file (YAML)")
    serve.add_argument("--zones", metavar="DIR", help="zones directory (default ./zones)")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        action="append",
        help="UDP+TCP listen address; repeat for several (default 127.0.0.1:5353)",
    )
    serve.add_argument(
        "--upstream",
        metavar="HOST[:PORT]",
        action="append",
        help="upstream resolver; repeat for several (default: /etc/resolv.conf)",
    )
    serve.add_argument(
        "--metrics", metavar="HOST:PORT", help="admin listener for /metrics, /healthz, /readyz"
    )
    serve.add_argument(
        "--query-log", action="store_true", default=None, help="log every query (off by default)"
    )
    _add_logging_flags(serve)

    check = commands.add_parser(
        "check", help="validate configs and zones without serving (file:line: reason, exit 1)"
    )
    check.add_argument("--config", metavar="FILE", help="serve's config file (YAML)")
    check.add_argument("--zones", metavar="DIR", help="zones directory (default ./zones)")
    check.add_argument(
        "--registry-config",
        metavar="FILE",
        help="the registry cache's config file; alone, only it is checked",
    )

    registry = commands.add_parser("registry", help="run the pull-through registry cache")
    registry.add_argument("--config", metavar="FILE", help="registry config file (YAML)")
    registry.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:5000")
    registry.add_argument(
        "--upstream", metavar="URL", help="default upstream (default https://registry-1.docker.io)"
    )
    registry.add_argument("--storage", metavar="DIR", help="blob store directory")
    registry.add_argument("--max-size", metavar="SIZE", help="store budget, e.g. 20G")
    registry.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
    registry.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    registry.add_argument(
        "--metrics", metavar="HOST:PORT", help="admin listener for /metrics, /healthz, /readyz"
    )
    _add_logging_flags(registry)

    ca = commands.add_parser("ca", help="internal CA and certificates for overridden names")
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    ca_init = ca_commands.add_parser("init", help="create the CA key and certificate")
    ca_init.add_argument("--dir", required=True, metavar="DIR", help="CA directory")
    ca_init.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    ca_init.add_argument(
        "--name-constraint",
        metavar="NAME",
        action="append",
        help="only allow certificates for NAME and names below it; repeat for several",
    )
    ca_init.add_argument("--force", action="store_true", help="replace an existing CA")
    ca_issue = ca_commands.add_parser("issue", help="issue a server certificate")
    ca_issue.add_argument("--dir", required=True, metavar="DIR", help="CA directory")
    ca_issue.add_argument("names", nargs="*", metavar="NAME", help="DNS names for the SANs")
    ca_issue.add_argument(
        "--from-zones", metavar="DIR", help="add every name the zones point at the cache"
    )
    ca_issue.add_argument(
        "--cache-address",
        metavar="ADDR",
        action="append",
        help="the cache's address for --from-zones; repeat for several",
    )
    ca_issue.add_argument("--days", type=int, default=365, help="validity (default 365, max 397)")
    ca_issue.add_argument(
        "--out", metavar="PREFIX", help="write PREFIX.crt and PREFIX.key (default DIR/FIRST-NAME)"
    )
    ca_issue.add_argument(
        "--group", metavar="GROUP", help="make the key 0640 and owned by GROUP (the daemon's)"
    )
    return parser


def _path(text: str | None) -> Path | None:
    return Path(text) if text else None


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        from dnsoverride.check import run as run_check

        return run_check(_path(args.config), args.zones, _path(args.registry_config))
    if args.command == "ca":
        from dnsoverride.ca import run as run_ca

        return run_ca(args)
    logging = LogOptions(args.log_format, args.log_level or "info")
    if args.command == "serve":
        from dnsoverride.dns.config import ServeFlags
        from dnsoverride.dns.daemon import run as run_serve

        serve_flags = ServeFlags(
            listen=tuple(args.listen or ()),
            upstream=tuple(args.upstream or ()),
            metrics=args.metrics,
            zones=args.zones,
            query_log=bool(args.query_log),
        )
        return run_serve(_path(args.config), serve_flags, logging)
    from dnsoverride.registry.config import RegistryFlags
    from dnsoverride.registry.daemon import run as run_registry

    registry_flags = RegistryFlags(
        listen=args.listen,
        upstream=args.upstream,
        storage=args.storage,
        max_size=args.max_size,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics=args.metrics,
    )
    return run_registry(_path(args.config), registry_flags, logging)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and map user errors to a message and exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except UserError as error:
        print(f"dnsoverride: error: {error}", file=sys.stderr)
        return 1 if args.command == "check" else 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
