"""The command line of a fresh Python interpreter that is one of ours: a `serve` worker, a
zone-parse worker. It runs with this interpreter's flags and this process's sys.path, so
it imports what this process imported, under the settings it was given."""

from __future__ import annotations

import subprocess
import sys


def python_command(code: str) -> list[str]:
    """`python <our flags> -c <code>`, our sys.path set before `code` runs."""
    # Set in the code: under -E or -I the interpreter would ignore PYTHONPATH. Strings
    # only (what imports read: a pathlib.Path's repr would not evaluate there); repr
    # writes any string, quotes, newlines and surrogate escapes, as source.
    path = [entry for entry in sys.path if isinstance(entry, str) and entry]
    return [
        sys.executable,
        *interpreter_flags(),
        "-c",
        f"import sys; sys.path[:] = {path!r}; {code}",
    ]


def interpreter_flags() -> list[str]:
    """The flags `python` was given (-X dev, -X faulthandler, -W, -O, -I, -E, -s, -B ...),
    as sys.flags, sys.warnoptions and sys._xoptions hold them, and -P."""
    # What multiprocessing passes to the interpreters it starts (multiprocessing.util
    # re-exports this private function; its contract, "arguments reproducing the current
    # settings", has held since Python 3.3) ...
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    # ... but of -X only the few it names: the rest (int_max_str_digits, pycache_prefix,
    # no_debug_ranges, warn_default_encoding, perf ...) as they were given.
    given = {flags[i + 1].partition("=")[0] for i, flag in enumerate(flags) if flag == "-X"}
    for name, value in sys._xoptions.items():
        if name not in given:
            flags += ["-X", name if value is True else f"{name}={value}"]
    # -P in any case: no working directory first on sys.path (`-c` puts it there), so
    # nothing planted where the command was started is imported in place of a module
    # (-I implies it).
    if not sys.flags.safe_path:
        flags.append("-P")
    return flags
