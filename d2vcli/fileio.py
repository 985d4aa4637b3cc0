"""Atomic file writes: a crash or kill mid-write never leaves a half-written output.

Every output of d2v goes through these: write to a temporary file in the same
directory, fsync, then rename over the target (atomic on POSIX).

A process killed mid-write leaves its temporary file behind. The names say whose it is,
`.<target>.<host>.<pid>.<random>.tmp` (`temp_dir` makes directories the same way), so the next
run of a command can remove the leftovers in the directories it writes (`remove_stale_temps`)
without touching a file that a live process is still writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, IO

from d2vcli.errors import UserError
from d2vcli.locks import hold

# Temp names of other hosts, and of versions before the host and pid were in the name, cannot
# be checked against a process table; they count as leftovers once nothing can still be writing
# them (no d2v output takes this long to write in one piece).
FOREIGN_TEMP_AGE_S = 24 * 3600
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")


def _host() -> str:
    """This machine's name as it appears in temp names (letters, digits and '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"


def _temp_prefix(target: str) -> str:
    return f".{target}.{_host()}.{os.getpid()}."


def temp_dir(parent: Path, label: str) -> Path:
    """A new private directory in `parent` with our temp naming (so leftovers are found and removed)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temp_prefix(label), suffix=".tmp", dir=parent))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a temp file or directory of ours that no live process is writing:
    made on this host by a pid that is gone, or (other hosts, older versions) untouched for a day."""
    path = Path(path)
    m = _TEMP_RE.match(path.name)
    if m is not None and m["host"] == _host():
        return not _pid_alive(int(m["pid"]))
    if m is None and _LEGACY_TEMP_RE.match(path.name) is None:
        return False
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_TEMP_AGE_S


def remove_stale_temps(directory: Path, recursive: bool = False) -> list[Path]:
    """Delete the leftovers of killed writers (see `is_stale_temp`) in `directory`; returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for entry in (directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp")):
        if not is_stale_temp(entry):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # its owner or another cleaner finished first
            continue
    return removed


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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


STAMP_NAME = "corpus.json"  # {"params": what it was made with, "info": what it holds}


def _read_stamp(folder: Path):
    try:
        return json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_stamped_dir(out_dir: Path | str, params: dict, what: str, build: Callable[[Path], dict]) -> dict:
    """A generated folder (a synthetic corpus), made whole or not at all; returns its stamped info.

    An existing `out_dir` stamped with the same `params` is reused as it is. Otherwise `build(tmp)`
    fills a temporary sibling and returns the info to stamp, and the sibling is renamed into place,
    so an interrupted run leaves no partial folder. A folder with another stamp is replaced; one
    without a stamp is user data and never touched (FileExistsError naming `what`).
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Two processes generating into one folder would each remove what the other renamed into place:
    # the second is refused with the holder's pid instead (the first one's folder is then reusable).
    with hold(out.parent / f".{out.name}.lock", f"generating the {what} in {out}"):
        return _build_stamped_dir(out, params, what, build)


def _build_stamped_dir(out: Path, params: dict, what: str, build: Callable[[Path], dict]) -> dict:
    stamp = _read_stamp(out)
    if stamp is not None and stamp.get("params") == params:
        return stamp["info"]
    if out.exists() and any(out.iterdir()) and stamp is None:
        raise FileExistsError(f"{out} exists and is not a d2v {what}; pass another --out or remove it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        info = build(tmp)
        atomic_write_text(tmp / STAMP_NAME, json.dumps({"params": params, "info": info}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
