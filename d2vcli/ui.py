"""Terminal output shared by all commands: one rich console, progress bars, config and table printing."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from d2vcli.config import to_yaml

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar; quiet (no live redraw) when not on a terminal, e.g. in CI logs."""
    disable = not sys.stdout.isatty() and os.environ.get("D2V_PROGRESS", "") != "1"
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


def print_config(cfg: Any, title: str = "resolved config") -> None:
    console.rule(f"[bold]{title}")
    console.print(to_yaml(cfg).rstrip(), markup=False, soft_wrap=True)
    console.rule()


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
