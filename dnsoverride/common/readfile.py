"""Reading a file an admin points a daemon at (a zone file, a config file) when the
directory holding it may also hold things that are not files: a dangling symlink, a
FIFO, a directory named like one. Each is an OSError naming what is wrong, never a
silent skip and never a read that blocks. And how such a file's name is hashed when it
is not UTF-8 (`FS_BYTES`)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

# How a file name that is not UTF-8 (`caf\xe9.yaml`, Latin-1) is encoded to be hashed: as
# its own bytes (Python decodes them to surrogates, which plain UTF-8 refuses to encode).
FS_BYTES = "surrogateescape"


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, symlinks followed; OSError when it cannot be read or is not a
    regular file. Opened without blocking: a FIFO would otherwise hold the reading thread
    (a reload, a fingerprint) until someone writes to it."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(f"not a regular file: {str(path)!r}")
    with open(descriptor, "rb") as file:
        return file.read()
