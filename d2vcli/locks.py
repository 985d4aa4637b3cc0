"""Advisory locks on files that one d2v process at a time may write (a run directory, a split's
manifests, the workspace's letter dictionary, lm/).

    from d2vcli.locks import hold
    with hold(ws.data_dir / ".train.lock", "prepare of split train"):
        ...  # write the split's files

`hold` takes an `fcntl.flock` on the lock file without waiting: a second process gets a
`LockError` naming the holder instead of silently interleaving its writes. The kernel releases
the lock when the holder exits or is killed, so a crash never leaves a stale lock on a local
disk. The file itself stays (unlinking it would race with a process that has just opened it);
while held it records the holder's pid, command and start time for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from d2vcli.errors import UserError


class LockError(UserError):
    """Another process holds the lock; the message names it and what to do."""


def _holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def hold(path: Path, what: str) -> Iterator[Path]:
    """Hold the lock at `path` for the block; `what` says what it protects, for the other process's error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder(fd)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"])) if "since" in h else "?"
            raise LockError(
                f"cannot start the {what}: {path} is locked by pid {h.get('pid', '?')} on {h.get('host', '?')} "
                f"({h.get('command', 'unknown command')}) since {since}; wait for it to finish or, if that "
                f"process is gone (a lock on a network filesystem can outlive it), delete {path}"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(
            [Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python",
            "what": what, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        try:
            yield path
        finally:
            # Cleared while still held, so a later reader never sees a finished holder's details.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
