"""Atomic file writes: a crash or kill mid-write never leaves a half-written output.

Every output of d2v goes through these: write to a temporary file in the same
directory, fsync, then rename over the target (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, IO

from d2vcli.errors import UserError


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e}); re-run `d2v prepare` to rebuild it") from e
    return rows


class OutputExistsError(UserError):
    """An output would overwrite files the user has; the message names them and offers --force."""


def claim_output_dir(out_dir: Path, owned: Iterable[str], force: bool, what: str) -> list[Path]:
    """Make `out_dir` ready for a writer whose files are named `owned`; returns what it removed.

    A missing or empty directory is fine. A non-empty one is refused unless `force`; with
    `force` the files named `owned` (what an earlier run of the same writer left, e.g. stale
    tokenizer files of another model kind) are removed and every other file is left alone.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir} is a file; {what} writes a folder: pick another path")
    present = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if not present:
        return []
    if not force:
        shown = ", ".join(present[:8]) + (" ..." if len(present) > 8 else "")
        raise OutputExistsError(
            f"{out_dir} is not empty ({shown}); {what} would overwrite or mix with these files. Pick an empty "
            f"or new folder, or pass --force to replace what an earlier export wrote there "
            f"({', '.join(sorted(owned))}; other files are kept)."
        )
    removed = []
    for name in owned:
        p = out_dir / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


def refuse_overwrite(paths: Iterable[Path], force: bool, what: str) -> None:
    """Refuse to replace any existing file of `paths` unless `force` (the message names them)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise OutputExistsError(
            f"{what} would replace {', '.join(existing)}. Pick another --out (or --name), or pass --force to "
            f"replace it."
        )
