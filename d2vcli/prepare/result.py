"""What `d2v prepare` returns: one `SplitSummary` per split inside a `PrepareSummary`, and its error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from d2vcli.errors import UserError
from d2vcli.ui import table


class PrepareError(UserError):
    """Input that `d2v prepare` cannot use; the message names the file or option and the fix."""


# Why a file (or a transcript entry, or a directory) is left out of a split; each skip is a row
# (path, reason, detail) of data/skipped-<split>.tsv.
SkipReason = Literal["unreadable", "empty", "no-transcript", "out-of-vocab", "text-too-long", "bad-vad",
                     "no-audio", "symlink-loop", "duplicate-dir"]
SKIP_REASONS: tuple[str, ...] = SkipReason.__args__  # type: ignore[attr-defined]
Skip = tuple[str, str, str]


@dataclass
class SplitSummary:
    """What happened to one split: returned to callers and printed as one table row."""

    split: str
    status: Literal["written", "up to date"]
    utterances: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    outputs: list[str] = field(default_factory=list)
    normalized: int = 0  # transcripts changed by text normalization (folder)
    orphan_transcripts: int = 0  # transcript entries whose audio does not exist (skipped as no-audio)

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class PrepareSummary:
    command: str
    splits: list[SplitSummary]
    dictionary: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    workdir: Optional[str] = None  # outputs inside it are shown relative to it

    def split(self, name: str) -> SplitSummary:
        for s in self.splits:
            if s.split == name:
                return s
        raise KeyError(f"no split {name!r} in this summary ({', '.join(s.split for s in self.splits)})")

    def table(self):
        """The summary table the CLI prints: one row per split."""
        show_norm = any(s.normalized for s in self.splits)
        cols = ["split", "status", "utterances", "hours", "skipped"] + (["normalized"] if show_norm else []) + ["outputs"]
        rows = []
        for s in self.splits:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items()) if n) or "0"
            row = [s.split, s.status, s.utterances, f"{s.hours:.3f}", skipped]
            if show_norm:
                row.append(s.normalized)
            rows.append(row + ["\n".join(self._short(p) for p in s.outputs)])
        title = f"d2v prepare {self.command}" + (f" (workspace {self.workdir})" if self.workdir else "")
        return table(title, cols, rows)

    def _short(self, path: str) -> str:
        if self.workdir and path.startswith(self.workdir.rstrip("/") + "/"):
            return os.path.relpath(path, self.workdir)
        return path
