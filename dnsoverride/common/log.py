"""structlog configuration shared by every daemon and command.

JSON lines when stdout is not a terminal (journald, files, pipes) or when asked for;
coloured key=value console output on a terminal. Everything is an event with fields.
Fields of the process (`bind_process`: a worker's index) are on every line it writes,
from whichever thread: structlog's contextvars stay in the context that bound them, and
a thread starts with an empty one.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Literal

import structlog
from structlog.typing import EventDict, WrappedLogger

LogFormat = Literal["json", "console"]
LEVELS = ("debug", "info", "warning", "error", "critical")

_PROCESS_FIELDS: dict[str, object] = {}


@dataclass(frozen=True)
class LogOptions:
    """How a daemon logs: `format` None picks by whether stdout is a terminal."""

    format: LogFormat | None = None
    level: str = "info"


def bind_process(**fields: object) -> None:
    """Put `fields` on every line this process logs from now on, whichever thread logs it."""
    _PROCESS_FIELDS.update(fields)


def _add_process_fields(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    for key, value in _PROCESS_FIELDS.items():
        event.setdefault(key, value)
    return event


def configure(options: LogOptions) -> None:
    """Configure structlog for the process."""
    log_format = options.format
    level = options.level
    if log_format is None:
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_process_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write per line (PrintLogger writes the newline apart): the worker processes
        # of `serve` share stdout, and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
