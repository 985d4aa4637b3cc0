"""Advisory locks on files and directories that one process at a time may write.

    with hold(workspace.runs_dir / f".{name}.lock", f"run '{name}'", "wait for it to finish or pick another --name"):
        ...   # nobody else holds it; released on exit, on an exception and when the process dies

The lock is an `fcntl.flock` on the lock file, so the kernel drops it when the holder's process
ends in any way (kill -9 included): a crashed run never leaves a stale lock behind, and no pid
check or timeout is needed. The file holds the holder's pid, command line and start time, which
is what a refused second process reports. Lock files are never deleted: unlinking a lock file
while another process has it open would let a third process lock a new file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

from d2vcli.errors import UserError


class LockError(UserError):
    """Another process holds the lock; the message names it and the ways out."""


def _holder_text(fd: int) -> str:
    """'pid N (command) since TIME' from a lock file's contents, as well as it can be read."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        # The holder has locked the file but not yet written its details (a moment's window).
        return "another process"
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {info['pid']}{where} ({info.get('command', '?')}) since {info.get('started', '?')}"


@contextlib.contextmanager
def hold(path: Path, what: str, advice: str = "wait for it to finish") -> Iterator[Path]:
    """Hold an exclusive lock on `path` (created if needed) for the `with` block.

    Raises LockError at once, without waiting, when another process holds it: "<what> is locked
    by pid N (<command>) since <time>; <advice>".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockError(
                f"{what} is locked by {_holder_text(fd)}; {advice} (lock file {path})."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or "python",
                "started": datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        try:
            yield path
        finally:
            # Emptied so a later reader never reports a finished process as the holder.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_waiting(path: Path, what: str, wait_s: float) -> Iterator[None]:
    """`hold`, but wait up to `wait_s` seconds for a holder that keeps the lock for a moment only
    (a shared file's read-and-maybe-write); LockError after that."""
    deadline = time.monotonic() + wait_s
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(hold(path, what))
                break
            except LockError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield
