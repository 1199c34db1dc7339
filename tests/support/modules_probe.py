"""Run a daemon's command line in this process and tell which modules it has imported.

    python tests/support/modules_probe.py SOCKET python -m dnsoverride serve ...

runs `dnsoverride serve ...` (everything after `-m dnsoverride`) as `python -m` would, in
this process, with one more thread: each client of the abstract unix socket SOCKET gets
the names of the modules imported so far, one a line (`imported_modules`). That is the
real daemon's `sys.modules` (a pure-Python module leaves no trace in /proc/PID/maps),
which the footprint tests read before and after a scrape. The probe itself imports only
what every daemon imports anyway (os, runpy, socket, sys, threading).
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
import threading


def _answer(server: socket.socket) -> None:
    while True:
        client, _ = server.accept()
        with client:
            client.sendall("\n".join(sorted(list(sys.modules))).encode())


def imported_modules(name: str) -> set[str]:
    """The modules the probed process named `name` has imported (its answer on SOCKET)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect("\0" + name)
        data = b""
        while chunk := client.recv(1 << 16):
            data += chunk
    return set(data.decode().split("\n"))


def main() -> None:
    name, *command = sys.argv[1:]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)  # abstract: nothing to clean up, gone with the process
    server.listen()
    threading.Thread(target=_answer, args=(server,), daemon=True).start()
    sys.argv = command[command.index("dnsoverride") :]
    sys.path[0] = os.getcwd()  # as `python -m` has it, not this file's directory
    runpy.run_module("dnsoverride", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
