"""A fresh interpreter run with given flags and code, for the tests of what our own child
interpreters (serve and zone-parse workers) are started with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def python_output(flags: list[str], code: str, cwd: Path) -> str:
    """What `python <flags> -c <code>`, run in `cwd`, printed (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout
