"""Terminal output shared by all commands: one rich console, progress bars, config and table printing."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

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

from d2vcli.config import changes

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


def config_summary(cfg: Any, base: Any, title: str, base_name: str, saved: Optional[Path] = None) -> str:
    """A few lines: what `cfg` changes relative to `base` (the defaults or the preset), and where the whole is.

    The full resolved config is about 90 lines; printed before every run (and every demo stage)
    it buried the lines that matter, including a one-line error printed right after it.
    """
    diff = changes(cfg, base)
    head = f"{title}: {base_name}" + (f", changed: {len(diff)} setting{'s' * (len(diff) != 1)}" if diff
                                      else ", nothing changed")
    lines = [head] + [f"  {key} = {_short(new)}   (was {_short(old)})" for key, old, new in diff]
    if saved is not None:
        lines.append(f"full config: {saved}")
    return "\n".join(lines)


def print_config_summary(cfg: Any, base: Any, title: str, base_name: str, saved: Optional[Path] = None) -> None:
    console.print(config_summary(cfg, base, title, base_name, saved), markup=False, highlight=False, soft_wrap=True)


def _short(value: Any) -> str:
    text = repr(list(value)) if isinstance(value, tuple) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t
