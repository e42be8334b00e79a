"""An exclusive lock on a run's output directory, so that two runs never write into the same one.

The lock is ``DIR/.upop.lock``: an ``fcntl.flock`` held for as long as the run lives (the kernel releases it when
the process dies, however it dies), and the owner's pid, host and start time written into the file for the message a
second run gets. Where the file system refuses flock, the pid and host decide: a lock of a process that no longer
exists on this host is stale and taken over; one of another host is respected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from upop.errors import UPopError

LOCK_FILE = ".upop.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """``acquire()`` or raise UPopError naming the run that holds ``directory``; ``release()`` removes the lock."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _refuse(self, owner: dict) -> UPopError:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        since = f", started {owner['started']}" if owner.get("started") else ""
        return UPopError(
            f"another upop run ({who}{since}) is writing to {self.path.parent}; wait for it to finish or choose "
            "another --output-dir"
        )

    def acquire(self) -> None:
        for _ in range(10):
            fd = self._try()
            try:  # the holder may have removed the file between our open and our flock: lock the file that is there
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    self.fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)
        raise UPopError(f"cannot lock {self.path}: it keeps being replaced by another process")

    def _try(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise self._refuse(self._owner()) from None
            # no flock on this file system: decide by the recorded owner
            owner = self._owner()
            here = owner.get("host") == socket.gethostname()
            if owner.get("pid") and (not here or _alive(int(owner["pid"]))) and owner.get("pid") != os.getpid():
                os.close(fd)
                raise self._refuse(owner) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # closing releases the flock
            self.fd = None
