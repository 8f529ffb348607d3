"""Terminal output: one rich console, tables, progress bars, and JSON for machines.

Every verb prints through here so ``--json`` can switch a whole command to
machine output (JSON on stdout, nothing else), and progress goes to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from sfedge.fileio import json_default
from sfedge.progress import Progress

__all__ = ["console", "err_console", "table", "print_json", "progress_bar", "fmt_bytes", "escape"]

# Off a terminal (CI logs, pipes) rich would wrap tables at 80 columns; give them room instead.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)



def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Table:
    """A rich table; numbers right-aligned, None shown as a dash.

    Cells and titles are plain text, never rich markup: they carry names read
    from bundles and reports, and a name such as ``[/]`` must print, not crash.
    """
    t = Table(title=Text(title) if title is not None else None, caption=caption, header_style="bold",
              title_justify="left")
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) if rows else False for i in range(len(columns))]
    for c, num in zip(columns, numeric):
        t.add_column(c, justify="right" if num else "left")
    for r in rows:
        t.add_row(*[Text("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))) for v in r])
    return t


def print_json(obj: Any) -> None:
    """Machine output: JSON on stdout only."""
    sys.stdout.write(json.dumps(obj, indent=2, default=json_default) + "\n")


@contextmanager
def progress_bar(description: str, total: float | None = None, enabled: bool = True) -> Iterator[Progress]:
    """A progress bar on stderr; yields ``update(message, fraction)`` (fraction None: keep position)."""
    if not enabled:
        yield lambda message, fraction=None: None
        return
    prog = RichProgress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn() if total else TextColumn(""),
        TextColumn("{task.fields[message]}", markup=False), TimeElapsedColumn(), console=err_console, transient=False,
    )
    with prog:
        task = prog.add_task(description, total=total or 1.0, message="")

        def update(message: str, fraction: float | None = None) -> None:
            if fraction is not None:
                prog.update(task, completed=fraction * (total or 1.0), message=message)
            else:
                prog.update(task, message=message)

        yield update
        prog.update(task, completed=total or 1.0)


def fmt_bytes(n: float | None) -> str:
    """1234567 -> '1.18 MiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
