"""The state directory: its layout, and the lock that gives it one server at a time.

Layout (``StateDir`` properties name each part)::

    STATE_DIR/            0700: it holds job output and the development PKI's keys
      lock                flock()ed by the running server; holds its pid for humans
      jobs.db             the job store (SQLite, WAL: also jobs.db-wal, jobs.db-shm)
      jobs/<id>/          one job's output.log + output.idx
      pki/                the development PKI (CA, server and client certificates)

Two servers on one directory would each recover the other's running jobs as
LOST and kill them, so the second refuses to start. The lock is ``flock``: the
kernel drops it when the holder's last descriptor closes — also when it is
SIGKILLed — so a crashed server never leaves a stale lock behind. The lock
file itself is never deleted: unlinking it would let a third process lock a
fresh inode while the second still holds the old one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .._errors import StateDirError

__all__ = ["StateDir"]

#: How long to wait for a holder that has just locked to write its pid.
_PID_WAIT = 0.5


class StateDir:
    """An opened, locked state directory. Get one with ``StateDir.open(path)``.

    Keep it for the life of the server (the lock lives as long as the object's
    descriptor); ``release`` or leaving the ``with`` block gives it up.
    """

    def __init__(self, path: Path, fd: int) -> None:
        """Use ``open``: this only wraps a directory that is already locked."""
        self.path = path
        self._fd: int | None = fd
        self._pid = os.getpid()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Create ``path`` (0700) if missing and lock it, or raise ``StateDirError``.

        An existing directory open to group or others is tightened to 0700: it
        holds private keys and job output. Blocking but quick (a few syscalls):
        call it before starting the event loop or through ``trio.to_thread``.
        """
        directory = Path(path).absolute()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.stat()
            if not stat.S_ISDIR(info.st_mode):
                raise StateDirError(f"state directory {directory} is not a directory")
            if stat.S_IMODE(info.st_mode) & 0o077:
                directory.chmod(0o700)
        except StateDirError:
            raise
        except OSError as exc:
            raise StateDirError(f"cannot use state directory {directory}: {exc}") from exc
        lock_path = directory / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot open the lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise StateDirError(f"cannot lock {lock_path}: {exc}") from exc
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "a process whose pid is not known"
            raise StateDirError(
                f"state directory {directory} is in use by another trio-worker server ({who}); "
                "stop it or choose another --state-dir"
            ) from None
        try:
            # Only now that we hold the lock may we replace the previous holder's pid;
            # write then truncate, so a reader never finds the file empty.
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            os.close(fd)
            raise StateDirError(f"cannot write the lock file {lock_path}: {exc}") from exc
        return cls(directory, fd)

    def release(self) -> None:
        """Give the directory up; idempotent. The lock file stays (see module doc)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if os.getpid() == self._pid:  # a forked child must not erase its parent's pid
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten StateDir must not keep the directory locked (nor leak the fd).
        if getattr(self, "_fd", None) is not None:
            self.release()

    # -- layout ----------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path / "lock"

    @property
    def db_path(self) -> Path:
        """The job store: ``jobs.db`` (plus SQLite's ``-wal``/``-shm`` beside it)."""
        return self.path / "jobs.db"

    @property
    def jobs_dir(self) -> Path:
        """One directory per job id, holding ``output.log`` and ``output.idx``."""
        return self.path / "jobs"

    @property
    def pki_dir(self) -> Path:
        """The development PKI the server creates when no certificates are given."""
        return self.path / "pki"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote; it may be a moment late right after locking."""
    deadline = time.monotonic() + _PID_WAIT
    while True:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
