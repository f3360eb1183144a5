"""The state directory: its layout, and the lock that gives it one server at a time.

Layout (``StateDir`` properties name each part)::

    STATE_DIR/            0700 when we create it; an existing one is never chmod-ed, and
                          one that others may write to is refused (see ``check_private``)
      lock                flock()ed by the running server; holds its pid for humans
      jobs.db             the job store (SQLite, WAL: also jobs.db-wal, jobs.db-shm), 0600
                          (SQLite gives -wal and -shm the mode of jobs.db)
      jobs.db-reserve     RESERVE_BYTES of the disk for the store's commit that finds it
                          full (``_store``), 0600; gone while given up
      ends                ended jobs' ends until their records commit (``_endnotes``), 0600
      jobs/<id>/          one job's output.log + output.idx (+ output.start if capped),
                          made with the directory at its first output: a job that
                          prints nothing has none (an isolated one, an empty one)
      ready/              an earlier version's places made ahead; removed at start
      pki/                the development PKI (CA, server and client certificates)

Two servers on one directory would each recover the other's running jobs as
LOST and kill them, so the second refuses to start. The lock is ``flock``: the
kernel drops it when the holder's last descriptor closes — also when it is
SIGKILLed — so a crashed server never leaves a stale lock behind. (A child it
cloned just before dying, a seed or a spawn before its exec, holds a copy for a
moment: a holder that is gone is waited for, up to ``_ORPHAN_WAIT``.) The lock
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
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .._errors import StateDirError

__all__ = ["END_NOTES", "StateDir", "check_private", "private_file"]

#: Ended jobs' ends until their records commit (``_endnotes``).
END_NOTES = "ends"

#: How long to wait for a holder that has just locked to write its pid.
_PID_WAIT = 0.5
#: How long a dead holder's lock may outlive it: a child it cloned just before
#: dying holds a copy of the descriptor until the child first runs (a moment,
#: or longer on a loaded machine).
_ORPHAN_WAIT = 5.0


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
        #: The directory we locked (``missing`` compares the path's with it).
        self._identity: tuple[int, int] | None = None
        with contextlib.suppress(OSError):
            info = os.stat(path)
            self._identity = (info.st_dev, info.st_ino)
        #: The reapers the previous holder left (pid, start time), if it noted any:
        #: they may still be killing that server's jobs, and must be let finish.
        self.previous_reapers: list[tuple[int, int]] = []

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Create ``path`` (0700) if missing and lock it, or raise ``StateDirError``.

        An existing directory is used as it is, or refused if it is open to
        others (``check_private``). Blocking but quick (a few syscalls):
        call it before starting the event loop or through ``trio.to_thread``.
        """
        directory = check_private(path)
        lock_path = directory / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot open the lock file {lock_path}: {exc}") from exc
        holder = None
        try:
            locked = _take(fd, 0.0)
            if not locked:
                holder = _read_pid(fd)
                # A holder that is gone left its lock to a child cloned just before
                # it died (a seed, or a spawn before its exec): that copy of the
                # descriptor is closed by the child's first instructions.
                if holder is not None and _gone(holder):
                    locked = _take(fd, _ORPHAN_WAIT)
        except OSError as exc:
            os.close(fd)
            raise StateDirError(f"cannot lock {lock_path}: {exc}") from exc
        if not locked:
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "a process whose pid is not known"
            raise StateDirError(
                f"state directory {directory} is in use by another trio-worker server ({who}); "
                "stop it or choose another --state-dir"
            ) from None
        previous = _read_reapers(fd)
        try:
            # Only now that we hold the lock may we replace the previous holder's pid;
            # write then truncate, so a reader never finds the file empty.
            data = f"{os.getpid()}\n".encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        except OSError as exc:
            os.close(fd)
            raise StateDirError(f"cannot write the lock file {lock_path}: {exc}") from exc
        state = cls(directory, fd)
        state.previous_reapers = previous
        try:
            private_file(state.db_path, create=True)
            for side in ("-wal", "-shm"):
                private_file(Path(f"{state.db_path}{side}"), create=False)
        except BaseException:
            state.release()
            raise
        return state

    def note_reapers(self, reapers: Sequence[tuple[int, int]]) -> None:
        """Write our reapers' pids and start times under ours, for the next holder.

        If this server dies, its reapers kill its jobs; a server that takes the
        directory over meanwhile waits for them (``previous_reapers``) before
        starting jobs of its own, so a reaper never meets them.
        """
        if self._fd is None:
            return
        lines = [f"{self._pid}\n", *(f"reaper {pid} {start}\n" for pid, start in reapers)]
        data = "".join(lines).encode()
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))

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

    def missing(self) -> str | None:
        """What happened to the directory while we hold it, if it is no longer there: its
        lock file deleted (``rm -rf``: the server's open files live on, nameless), or its
        path gone or naming another directory (moved or replaced). None while all is well.
        A few syscalls (blocking on a hung network file system: call it in a thread)."""
        if self._fd is None:
            return None
        try:
            if os.fstat(self._fd).st_nlink == 0:
                return "was deleted"
            info = os.stat(self.path)
        except FileNotFoundError:
            return "was moved or deleted"
        except OSError:
            return None  # (cannot tell: say nothing rather than something wrong)
        if self._identity is not None and (info.st_dev, info.st_ino) != self._identity:
            return "was replaced by another directory"
        return None

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
        """One directory per job id that wrote output, holding ``output.log`` and
        ``output.idx``."""
        return self.path / "jobs"

    @property
    def pki_dir(self) -> Path:
        """The development PKI the server creates when no certificates are given."""
        return self.path / "pki"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id


def check_private(path: str | os.PathLike[str]) -> Path:
    """The state directory, created 0700 if missing, or ``StateDirError`` in one line.

    The one place that decides whether a directory is fit to hold job output,
    keys and the job database. An existing directory's mode is never changed
    (it may be shared on purpose, or not ours to change); one that someone
    other than its owner could write to (group- or world-writable, e.g. a 1777
    one), or that another user owns, is refused with what to do instead:
    whoever can write to it could replace the files the server trusts.
    """
    directory = Path(path).absolute()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:
        raise StateDirError(f"cannot use state directory {directory}: {exc.strerror}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state directory {directory} is not a directory")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        who = "others" if mode & 0o002 else "its group"
        raise StateDirError(
            f"state directory {directory} is writable by {who}"
            f" (mode {mode:04o}); use a directory only you can write to, e.g. a new one"
            f" (it is created 0700), or run chmod go-w {directory} if it is yours"
        )
    if info.st_uid != os.geteuid():
        raise StateDirError(
            f"state directory {directory} belongs to uid {info.st_uid}, not to this user"
            f" (uid {os.geteuid()}); use a directory of your own"
        )
    return directory


def private_file(path: Path, *, create: bool) -> None:
    """Make ``path`` a 0600 file of ours: create it so (if ``create``), or tighten it.

    Files in the state directory are ours (we checked who may write there), so
    a looser mode left by an older version is narrowed, never widened.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    try:
        if info is None:
            if create:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
                os.close(os.open(path, flags, 0o600))
        elif stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, 0o600)
        # (Anything else there is refused by whoever opens it, naming it.)
    except OSError as exc:
        raise StateDirError(f"cannot make {path} a private (0600) file: {exc.strerror}") from exc


def _take(fd: int, wait: float) -> bool:
    """Lock ``fd``, trying for up to ``wait`` seconds; False if someone else holds it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        else:
            return True


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie has: its descriptors are closed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            fields = stat_file.read().rpartition(b")")[2].split()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return fields[:1] in ([b"Z"], [b"X"])


def _read_reapers(fd: int) -> list[tuple[int, int]]:
    """The reapers a previous holder noted (``note_reapers``)."""
    try:
        lines = os.pread(fd, 256, 0).decode("ascii", "replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines[1:]:
        match line.split():
            case ["reaper", pid, start] if pid.isdigit() and start.isdigit():
                found.append((int(pid), int(start)))
    return found


def _read_pid(fd: int) -> int | None:
    """The pid the holder wrote; it may be a moment late right after locking."""
    deadline = time.monotonic() + _PID_WAIT
    while True:
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").partition("\n")[0].strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)
