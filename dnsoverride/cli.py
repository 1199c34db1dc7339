"""Command-line entry point: `dnsoverride serve | cache (alias registry) | check | status |
explain | ca | completion`.

This module only parses arguments and dispatches; each command lives with the
component it runs, and takes the flags as the small frozen dataclass its loader reads
(`ServeFlags`, `CacheFlags`), never the argparse namespace. Implementations are
imported lazily so that `dnsoverride serve` does not pay for the cache's imports and
the reverse. Each subcommand's `--help` gives a one-line description and examples; the
man page (argparse-manpage) and shell completion (shtab) are generated from this parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

# structlog imports `rich` at import time when it is installed, for pretty tracebacks in
# its console renderer: 5.5 MB of every daemon's idle memory (issue 13). Ours never uses
# them (`format_exc_info` renders an exception as a field before any renderer sees it),
# so structlog is told rich is absent while it is imported (None in sys.modules makes
# `import rich` fail), and only then: `status` and `explain` draw their tables with rich.
_HIDE_RICH = "rich" not in sys.modules
if _HIDE_RICH:
    sys.modules["rich"] = None  # type: ignore[assignment]

from dnsoverride import __version__  # noqa: E402 (after hiding rich)
from dnsoverride.common.configfile import require_file  # noqa: E402
from dnsoverride.common.errors import ConfigError, UserError  # noqa: E402
from dnsoverride.common.log import LEVELS, LogOptions  # noqa: E402

if _HIDE_RICH:
    del sys.modules["rich"]

# Where `status`, `explain --live` and `cache ls/purge/warm` look for the daemons' admin
# listeners (their `metrics:`, `control_socket:`) unless told: serve's config, the
# cache's, and the cache's from before it served packages (dnsoverride/adminclient.py).
PACKAGED_CONFIGS = (
    Path("/etc/dnsoverride/dnsoverride.yaml"),
    Path("/etc/dnsoverride/cache.yaml"),
    Path("/etc/dnsoverride/registry.yaml"),
)


def _add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="log output format (default: console on a terminal, JSON lines otherwise)",
    )
    parser.add_argument("--log-level", choices=LEVELS, default=None, help="minimum log level")


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    examples: str,
) -> argparse.ArgumentParser:
    """A subcommand whose --help says `summary` and shows `examples` (one per line)."""
    return commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser; kept separate from `main` so tests can inspect it."""
    parser = argparse.ArgumentParser(
        prog="dnsoverride",
        description="Split-horizon override DNS server and pull-through registry and "
        "package cache.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"dnsoverride {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "run the override DNS server (in the foreground)",
        """
dnsoverride serve --zones ./zones
dnsoverride serve --listen 0.0.0.0:53 --upstream 192.0.2.53 --zones /etc/dnsoverride/zones
dnsoverride serve --config /etc/dnsoverride/dnsoverride.yaml
""",
    )
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
        "--metrics",
        metavar="HOST:PORT",
        help="admin listener for /metrics, /healthz, /readyz, /status, /explain",
    )
    serve.add_argument(
        "--query-log", action="store_true", default=None, help="log every query (off by default)"
    )
    serve.add_argument(
        "--workers",
        metavar="N|auto",
        help="processes answering queries on the same ports (default auto: one per usable "
        "CPU, at most 4, fewer for a large zone set)",
    )
    _add_logging_flags(serve)

    # `registry` is the name from before the cache served packages: the same daemon.
    for name, summary, examples in (
        (
            "cache",
            "run the pull-through cache: registry and package repositories (in the foreground)",
            """
dnsoverride cache --listen 0.0.0.0:5000 --max-size 20G
dnsoverride cache --config /etc/dnsoverride/cache.yaml
""",
        ),
        (
            "registry",
            "the same as `cache` (its name before it served packages)",
            "dnsoverride registry --config /etc/dnsoverride/cache.yaml",
        ),
    ):
        cache = _command(commands, name, summary, examples)
        cache.add_argument("--config", metavar="FILE", help="cache config file (YAML)")
        cache.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:5000")
        cache.add_argument(
            "--upstream",
            metavar="URL",
            help="default registry upstream (default https://registry-1.docker.io)",
        )
        cache.add_argument("--storage", metavar="DIR", help="store directory")
        cache.add_argument("--max-size", metavar="SIZE", help="store budget, e.g. 20G")
        cache.add_argument("--tls-cert", metavar="FILE", help="TLS certificate (PEM)")
        cache.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
        cache.add_argument(
            "--metrics",
            metavar="HOST:PORT",
            help="admin listener for /metrics, /healthz, /readyz, /status",
        )
        cache.add_argument(
            "--control-socket",
            metavar="PATH",
            help="unix socket for `cache purge` and `cache warm` (mode 0660)",
        )
        _add_logging_flags(cache)
        if name == "cache":
            _add_cache_commands(cache)

    check = _command(
        commands,
        "check",
        "validate configs and zones without serving (file:line: reason, exit 1)",
        """
dnsoverride check --zones ./zones
dnsoverride check --config /etc/dnsoverride/dnsoverride.yaml
dnsoverride check --cache-config /etc/dnsoverride/cache.yaml
""",
    )
    check.add_argument("--config", metavar="FILE", help="serve's config file (YAML)")
    check.add_argument("--zones", metavar="DIR", help="zones directory (default ./zones)")
    check.add_argument(
        "--cache-config",
        "--registry-config",
        dest="cache_config",
        metavar="FILE",
        help="the cache's config file (--registry-config: the same); alone, only it is checked",
    )

    status = _command(
        commands,
        "status",
        "show what the running daemons are doing, from their admin listeners",
        """
dnsoverride status                       # the daemons of /etc/dnsoverride/*.yaml
dnsoverride status --admin 127.0.0.1:9353 --admin 127.0.0.1:9354
dnsoverride status --json | jq '.[0].reload'
""",
    )
    _add_admin_flags(status)
    status.add_argument(
        "--cache-config",
        "--registry-config",
        dest="cache_config",
        metavar="FILE",
        help=f"the cache's config, for its `metrics:` (default {PACKAGED_CONFIGS[1]}, else "
        f"{PACKAGED_CONFIGS[2]}; --registry-config: the same)",
    )

    explain = _command(
        commands,
        "explain",
        "show how the DNS server answers a name, and why",
        """
dnsoverride explain registry-1.docker.io --from 10.1.2.3
dnsoverride explain www.apps.ci.example --type AAAA --zones ./zones
dnsoverride explain registry-1.docker.io --live   # the running server, with its health state
""",
    )
    explain.add_argument("name", metavar="NAME", help="the name asked")
    explain.add_argument(
        "--type", default="A", metavar="TYPE", help="record type asked (default A)"
    )
    explain.add_argument(
        "--from",
        dest="client",
        metavar="CLIENT_IP",
        help="the client's address: its view (default: the default view)",
    )
    explain.add_argument("--zones", metavar="DIR", help="zones directory (default ./zones)")
    explain.add_argument(
        "--live",
        action="store_true",
        help="ask the running server (its admin listener) instead of reading the files",
    )
    _add_admin_flags(explain)

    _add_ca(commands)

    completion = _command(
        commands,
        "completion",
        "print a shell completion script, generated from these options",
        """
dnsoverride completion bash > /etc/bash_completion.d/dnsoverride
dnsoverride completion zsh > "${fpath[1]}/_dnsoverride"
""",
    )
    completion.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    # Every command's examples under `dnsoverride --help`, and so in the man page (which
    # argparse-manpage renders from the top-level parser's epilog only).
    parser.epilog = "examples:\n" + "\n".join(dict.fromkeys(_examples(parser)))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    """The example lines of every subcommand's epilog, in parser order."""
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                lines += [line for line in (sub.epilog or "").splitlines()[1:] if line]
                lines += _examples(sub)
    return lines


def _add_cache_commands(cache: argparse.ArgumentParser) -> None:
    """`cache ls | purge | warm`, beside the daemon's own flags (no action: run it)."""
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    ls = _command(
        actions,
        "ls",
        "list what the running cache holds: images and package repositories",
        """
dnsoverride cache ls
dnsoverride cache ls --repo 'library/*' --json
""",
    )
    ls.add_argument("--repo", metavar="PATTERN", help="only repositories matching PATTERN")
    purge = _command(
        actions,
        "purge",
        "remove an image, a digest, or what was not used for a while from the running cache",
        """
dnsoverride cache purge library/alpine:3.20
dnsoverride cache purge sha256:4bcff63911fcb4448bd4fdacec207030997caf25e9bea4045fa6c8c44de311d1
dnsoverride cache purge --older-than 30d --dry-run
""",
    )
    purge.add_argument("target", nargs="?", metavar="IMAGE|DIGEST", help="what to remove")
    purge.add_argument("--older-than", metavar="DURATION", help="everything unused that long")
    purge.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    warm = _command(
        actions,
        "warm",
        "fetch images (every platform) into the running cache before clients ask",
        """
dnsoverride cache warm library/alpine:3.20 registry-1.docker.io/library/python:3.12
dnsoverride cache warm --listed        # the config's warm: list, now
""",
    )
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="[REGISTRY/]NAME[:TAG|@DIGEST]")
    warm.add_argument("--listed", action="store_true", help="warm the config's warm: list now")
    for parser in (ls, purge, warm):
        parser.add_argument(
            "--admin",
            metavar="SOCKET|HOST:PORT",
            action="append",
            help="the cache's control socket or admin listener (default: its config's "
            "control_socket:, else metrics:)",
        )
        parser.add_argument(
            "--cache-config",
            "--config",
            dest="cache_config",
            metavar="FILE",
            help=f"the cache's config (default {PACKAGED_CONFIGS[1]})",
        )
        parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def _add_ca(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = _command(
        commands,
        "ca",
        "internal CA and certificates for overridden names",
        """
dnsoverride ca init --dir /root/dnsoverride-ca --name-constraint docker.io
dnsoverride ca issue --dir /root/dnsoverride-ca registry-1.docker.io --out /etc/dnsoverride/tls/reg
""",
    )
    ca_commands = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    ca_init = _command(
        ca_commands,
        "init",
        "create the CA key and certificate",
        "dnsoverride ca init --dir /root/dnsoverride-ca --name-constraint docker.io",
    )
    ca_init.add_argument("--dir", required=True, metavar="DIR", help="CA directory")
    ca_init.add_argument("--days", type=int, default=3650, help="CA validity (default 3650)")
    ca_init.add_argument(
        "--name-constraint",
        metavar="NAME",
        action="append",
        help="only allow certificates for NAME and names below it; repeat for several",
    )
    ca_init.add_argument("--force", action="store_true", help="replace an existing CA")
    ca_issue = _command(
        ca_commands,
        "issue",
        "issue a server certificate",
        """
dnsoverride ca issue --dir /root/dnsoverride-ca registry-1.docker.io --group dnsoverride
dnsoverride ca issue --dir /root/ca --from-zones /etc/dnsoverride/zones --cache-address 10.0.0.5
""",
    )
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


def _add_admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        action="append",
        help="a daemon's admin listener (its --metrics); repeat for several",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"serve's config: its `metrics:` (default {PACKAGED_CONFIGS[0]}), for explain "
        "also its views and zones",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


SHELLS = ("bash", "zsh", "tcsh")


def _config(flag: str, text: str | None) -> Path | None:
    """A config file given by `flag`: it must be a file (UserError naming the flag)."""
    if not text:
        return None
    path = Path(text)
    require_file(path, f"{flag} {text}")
    return path


def _admin_configs(args: argparse.Namespace) -> list[tuple[Path, str | None]]:
    """The configs whose `metrics:` say where the admin listeners are: those given, else
    the packaged ones (flag None: a missing packaged file is skipped)."""
    given = [
        ("--config", args.config),
        ("--cache-config", getattr(args, "cache_config", None)),
    ]
    if any(text for _, text in given):
        return [(Path(text), flag) for flag, text in given if text]
    return [(path, None) for path in PACKAGED_CONFIGS]


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "check":
        from dnsoverride.check import run as run_check

        serve = _config("--config", args.config)
        cache = _config("--cache-config", args.cache_config)
        return run_check(serve, args.zones, cache)
    if args.command == "status":
        from dnsoverride.status import run as run_status

        return run_status(args.admin or [], _admin_configs(args), args.json)
    if args.command == "explain":
        return _explain(args)
    if args.command == "completion":
        import shtab

        print(shtab.complete(build_parser(), shell=args.shell))
        return 0
    if args.command == "ca":
        from dnsoverride.ca import run as run_ca

        return run_ca(args)
    if args.command == "cache" and args.cache_command:
        return _cache_command(args)
    logging = LogOptions(args.log_format, args.log_level or "info")
    config = _config("--config", args.config)
    if args.command == "serve":
        from dnsoverride.dns.config import ServeFlags
        from dnsoverride.dns.daemon import run as run_serve

        serve_flags = ServeFlags(
            listen=tuple(args.listen or ()),
            upstream=tuple(args.upstream or ()),
            metrics=args.metrics,
            zones=args.zones,
            query_log=bool(args.query_log),
            workers=args.workers,
        )
        return run_serve(config, serve_flags, logging)
    from dnsoverride.cache.config import CacheFlags
    from dnsoverride.cache.daemon import run as run_cache

    cache_flags = CacheFlags(
        listen=args.listen,
        upstream=args.upstream,
        storage=args.storage,
        max_size=args.max_size,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics=args.metrics,
        control_socket=args.control_socket,
    )
    return run_cache(config, cache_flags, logging)


def _cache_command(args: argparse.Namespace) -> int:
    from dnsoverride import cachectl

    cachectl.check(args)
    configs: list[tuple[Path, str | None]]
    if args.cache_config:
        configs = [(Path(args.cache_config), "--cache-config")]
    else:
        configs = [(path, None) for path in PACKAGED_CONFIGS[1:]]
    admin = cachectl.find(args.admin or [], configs)
    if args.cache_command == "ls":
        return cachectl.ls(admin, args.repo, args.json)
    if args.cache_command == "purge":
        return cachectl.purge(admin, args.target, args.older_than, args.dry_run, args.json)
    return cachectl.warm(admin, args.images, args.listed, args.json)


def _explain(args: argparse.Namespace) -> int:
    from dnsoverride import adminclient
    from dnsoverride import explain as explain_command

    if args.live:
        configs = (
            [(Path(args.config), "--config")] if args.config else [(PACKAGED_CONFIGS[0], None)]
        )
        admin = adminclient.find(args.admin or [], configs)[0]
        document = explain_command.live(admin, args.name, args.type, args.client)
        where = f"live, from the server at {admin}"
    else:
        if args.admin:
            raise UserError("--admin is for --live; without it explain reads the files")
        config = _config("--config", args.config)
        document = explain_command.from_files(config, args.zones, args.name, args.type, args.client)
        where = "from the files; health checks not run: every override served"
    explain_command.show(document, args.json, where)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, run the command, and map user errors to a message and exit status:
    one line per problem, `dnsoverride: error: ...` (check prints its problems itself)."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"dnsoverride: error: {problem}", file=sys.stderr)
        return 1 if args.command == "check" else 2
    except UserError as error:
        print(f"dnsoverride: error: {error}", file=sys.stderr)
        return 1 if args.command == "check" else 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
