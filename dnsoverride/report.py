"""How the read-only commands (`status`, `explain`) show what they found: a `Report` of
titled sections, each a key/value list or a table, drawn with `rich` (colour, boxed
tables) on a terminal and as aligned plain text otherwise (pipes, logs, `watch`), so
scripts that grep the output see no escape codes. `--json` bypasses this module.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

Row = tuple[str, ...]


@dataclass(frozen=True)
class Section:
    """A titled block: `columns` None for key/value pairs (two-element rows), else a table."""

    title: str
    rows: Sequence[Row]
    columns: Row | None = None


@dataclass(frozen=True)
class Report:
    """One thing reported on (a daemon, an explained name), with a one-line headline."""

    title: str
    headline: str
    sections: list[Section] = field(default_factory=list)
    ok: bool = True  # False: drawn as a problem (red on a terminal)


def ago(unix: float | None) -> str:
    """`12 s ago`, `5 min ago`, `3.2 h ago`; `never` for None."""
    if unix is None:
        return "never"
    return f"{seconds_text(time.time() - unix)} ago"


def seconds_text(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size_text(count: int) -> str:
    """Bytes in binary units: `512 B`, `3.0 MiB`."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def render(reports: list[Report], stream: TextIO | None = None) -> None:
    """Write `reports` to `stream` (stdout): rich tables on a terminal, plain text otherwise."""
    out = stream or sys.stdout
    if out.isatty():
        _rich(reports, out)
    else:
        out.write(plain(reports))


def plain(reports: list[Report]) -> str:
    """The plain-text form: a headline per report, then each section indented, aligned."""
    lines: list[str] = []
    for report in reports:
        lines.append(f"{report.title}: {report.headline}")
        for section in report.sections:
            lines.append(f"  {section.title}:")
            header = [section.columns] if section.columns else []
            rows = header + list(section.rows)
            if not section.rows:
                lines.append("    (none)")
                continue
            widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
            for row in rows:
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                lines.append("    " + "  ".join(cells).rstrip())
        lines.append("")
    return "\n".join(lines)


def _rich(reports: list[Report], out: TextIO) -> None:
    console = Console(file=out, highlight=False)
    for report in reports:
        style = "bold green" if report.ok else "bold red"
        console.print(Text(report.title, style=style), Text(report.headline))
        for section in report.sections:
            if section.columns:
                table = Table(title=section.title, title_justify="left", expand=False)
                for column in section.columns:
                    table.add_column(column)
            else:
                table = Table(title=section.title, title_justify="left", show_header=False)
                table.add_column(style="bold")
                table.add_column()
            for row in section.rows:
                table.add_row(*row)
            if not section.rows:
                table.add_row(*(["(none)"] + [""] * (len(section.columns or ("", "")) - 1)))
            console.print(table)
        console.print()
