"""One dpvoip per state folder: an OS lock held for the life of the process.

Two instances on one state folder would share its spool, its old-monitor state and its
embedded PostgreSQL; the second used to fail on the spool and, on its way out, stop the
first one's database. The lock is taken before anything else is touched, so a second start
refuses at once and changes nothing.

It is ``flock`` on ``<state_dir>/dpvoip.lock``: the kernel drops it when the process ends
however it ends (SIGKILL included), so a killed instance never leaves a stale lock; the
file itself stays and only carries the holder's pid, for the refusal's message. ``flock``
(not ``lockf``) because its lock belongs to the open file, not to the process: twistd's
fork into the background keeps it, and reading the file elsewhere in the process cannot
drop it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import IO

from twisted.application.service import Service

LOCK_NAME = "dpvoip.lock"


class AlreadyRunning(Exception):
    """Another process holds the state folder's lock."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        self.folder = folder
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(f"another dpvoip ({who}) is running on this state folder {folder}")


class StateFolderError(Exception):
    """The state folder or its lock file cannot be made or opened."""


class InstanceLock:
    """The held lock of one state folder; ``acquire`` makes one or raises."""

    def __init__(self, folder: Path, handle: IO[str]) -> None:
        self.folder = folder
        self._handle: IO[str] | None = handle

    @classmethod
    def acquire(cls, folder: Path) -> InstanceLock:
        """Lock ``folder`` (made if missing) for this process, or raise ``AlreadyRunning``
        naming the holder. Nothing else in the folder is touched."""
        folder = folder.absolute()
        path = folder / LOCK_NAME
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Opened without truncating: the holder's pid must survive a refused attempt.
            handle = open(path, "a+", encoding="ascii")  # noqa: SIM115 (held for life)
        except OSError as error:
            raise StateFolderError(
                f"cannot open the state folder's lock {path}: {error.strerror}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AlreadyRunning(folder, holder_pid(folder)) from None
        except OSError as error:
            handle.close()
            raise StateFolderError(
                f"cannot lock the state folder's lock {path}: {error.strerror}") from None
        lock = cls(folder, handle)
        lock.write_pid()
        return lock

    @property
    def held(self) -> bool:
        return self._handle is not None

    def write_pid(self) -> None:
        """Write this process's pid (again after twistd forked into the background)."""
        if self._handle is None:
            return
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"{os.getpid()}\n")
        self._handle.flush()

    def release(self) -> None:
        """Unlock (the in-process tests stop a daemon and build another on its folder)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def holder_pid(folder: Path) -> int | None:
    """The pid the lock's holder wrote (None while it has not written it yet)."""
    try:
        text = (folder / LOCK_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


class InstanceLockService(Service):
    """The lock as the first service: it writes the pid of the process that runs (after a
    fork into the background) and is released last, after the embedded PostgreSQL has
    stopped."""

    name = "state folder lock"

    def __init__(self, lock: InstanceLock) -> None:
        self.lock = lock

    def startService(self) -> None:
        super().startService()
        self.lock.write_pid()

    def stopService(self) -> None:
        super().stopService()
        self.lock.release()


def lock_or_exit(folder: Path) -> InstanceLock:
    """The state folder's lock, or exit 1 with one line (nothing has been touched): the
    entry points' refusal of a second dpvoip on one state folder."""
    try:
        return InstanceLock.acquire(folder)
    except (AlreadyRunning, StateFolderError) as error:
        sys.stderr.write(f"dpvoip: {error}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
