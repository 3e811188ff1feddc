"""One run per run folder: an advisory lock held for the whole run.

Two ``xmc train`` (or two ``--resume``) into one folder would overwrite each other's checkpoints and
read each other's half-written models. The first takes an exclusive ``flock`` on ``<run>/.lock``
and writes who holds it; a second fails at once with a message naming the holder. The operating
system drops the lock when its process ends, however it ends (``kill -9`` included), so a stale lock
never blocks a ``--resume``. On systems without ``fcntl`` (Windows) the folder is not locked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class RunBusyError(ValueError):
    """Another process holds the run folder."""


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` exclusively, or raises :class:`RunBusyError`."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunBusyError(
                f"{self.path.parent} is in use by another xmc run ({holder}): wait for it to end, "
                "or choose another --run-dir"
            ) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}: {holder['command']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "a process that is still starting"
