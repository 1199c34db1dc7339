"""systemd service protocol: sd_notify messages, watchdog pings, socket activation.

Implements the three environment-variable protocols documented in sd_notify(3),
sd_watchdog_enabled(3) and sd_listen_fds(3) with the stdlib `socket` module only,
so the daemons need neither libsystemd nor a binding to it. Outside systemd
(no variables set) every function is a cheap no-op.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

import structlog

from dnsoverride.common.errors import UserError

log = structlog.get_logger(__name__)

# sd_listen_fds(3): passed descriptors start right after stdin/stdout/stderr.
_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(value: str) -> str | bytes:
    # A leading '@' names a Linux abstract-namespace socket; the kernel wants a NUL there.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=...") as one datagram to $NOTIFY_SOCKET.

    Returns False, without raising, when not run under a notify-aware manager or when
    the send fails: a lost status message must never take the daemon down.
    """
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not fields:
        return False
    if not target.startswith(("/", "@")):
        log.warning("sd_notify_unsupported_address", address=target)
        return False
    # The protocol is one assignment per line: a newline inside a value (say, an error
    # message in STATUS=) would start a bogus assignment.
    message = "\n".join(field.replace("\n", " ") for field in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, _notify_address(target))
    except OSError as error:
        log.warning("sd_notify_failed", address=target, error=str(error))
        return False
    return True


def notify_reloading() -> None:
    """Tell systemd a reload started (Type=notify-reload protocol, systemd >= 253).

    MONOTONIC_USEC lets systemd match the READY=1 that follows to this reload.
    """
    monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when the watchdog is off for this process.

    Pings at half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late
    wake-up does not get the service killed.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=usec)
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def watchdog_pinger() -> None:
    """Send WATCHDOG=1 every `watchdog_interval()` seconds until cancelled.

    Runs on the event loop on purpose: if the loop is stuck, the pings stop and
    systemd restarts the daemon, which is exactly what the watchdog is for.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def start_watchdog() -> asyncio.Task[None] | None:
    """`watchdog_pinger()` as a task on the running loop; None when systemd wants no pings."""
    if watchdog_interval() is None:
        return None
    return asyncio.get_running_loop().create_task(watchdog_pinger())


def inherited_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation, in order (fd 3, 4, ...); [] if none.

    The family and type of each socket are read from the descriptor itself, so a
    .socket unit with ListenDatagram= and ListenStream= yields one UDP and one TCP
    socket. The LISTEN_* variables are removed so that child processes do not
    mistake the descriptors for their own.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for name in _LISTEN_VARIABLES:
        os.environ.pop(name, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("listen_fds_invalid", value=count)
        return []
    sockets = []
    for fd in range(_LISTEN_FDS_START, _LISTEN_FDS_START + n):
        try:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        except OSError as error:
            raise UserError(
                f"socket activation: LISTEN_FDS={n}, but fd {fd} is not a socket ({error.strerror})"
            ) from None
    log.info("sockets_inherited", count=len(sockets))
    return sockets
