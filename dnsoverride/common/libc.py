"""The C library's functions the standard library does not wrap (malloc_trim, recvmmsg,
sendmmsg), reached through ctypes.

The C library is in the process already (the interpreter is linked against it):
`dlopen(NULL)` (`ctypes.CDLL(None)`) is the main program with its global symbols, the C
library's among them. `ctypes.util.find_library("c")` would find the same library by
running ldconfig (a subprocess, ~15 ms at import) and importing ctypes.util. A statically
linked interpreter may have no dynamic loader to ask (static musl's `dlopen` fails:
"Dynamic loading not supported"): then there is no function, as where one is missing.
"""

from __future__ import annotations

import ctypes
from typing import Any


def _process() -> ctypes.CDLL | None:
    try:
        # use_errno: a failed call's errno is kept for ctypes.get_errno (udpbatch reads it).
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_PROCESS = _process()


def function(name: str) -> Any | None:
    """The C library's function `name`, or None where this one has none (musl has no
    malloc_trim; a static or exotic build may lack others). A new function object each
    call: what one caller sets on it (argtypes, restype) is not another's."""
    if _PROCESS is None:
        return None
    try:
        return _PROCESS[name]
    except AttributeError:
        return None
