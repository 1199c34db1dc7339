"""Running a command with its stdout on a real pseudo-terminal, as a user sees it: the
`rich` tables and progress bars the CLI draws only on a terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
from collections.abc import Sequence


def on_a_terminal(argv: Sequence[str], timeout: float = 10.0) -> str:
    """What `argv` writes to a terminal (200 columns, colour), once it exits 0."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"}
    process = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        assert ready, f"{argv} printed nothing within {timeout} s"
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout) == 0
    return b"".join(chunks).decode()
