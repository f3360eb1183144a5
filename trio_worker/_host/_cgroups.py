"""Cgroup drivers: per-job limits, whole-tree kill, OOM and usage reporting.

``detect()`` probes the host once at start and returns one of three drivers:

* ``V2Driver`` — a pure unified hierarchy (``cgroup.controllers`` at the root):
  ``cpu.max``, ``memory.max``/``memory.swap.max``, ``io.max``, ``pids.max``,
  ``cgroup.kill``, ``memory.events``, ``memory.peak``, ``cpu.stat``.
* ``V1Driver`` — legacy or hybrid hierarchies (one mount per controller):
  ``cpu.cfs_quota_us``, ``memory.limit_in_bytes``/``memory.memsw.limit_in_bytes``,
  ``blkio.throttle.*_bps_device``, ``pids.max``, ``memory.oom_control``,
  ``cpuacct.usage``, freezer for kill; plus the v2 mount at ``unified/`` (when
  there is one) for tracking, ``cgroup.kill`` and ``cpu.stat``. A job is only in
  the hierarchies it needs: memory, cpu (scheduled apart from the server), and
  those of the limits it asks for (cpuacct too where the unified group has no
  ``cpu.stat``: no unified mount, or Linux before 4.20; the freezer where it has
  no ``cgroup.kill``): each one costs every place a mkdir, an open, a
  ``cgroup.procs`` write and an rmdir. ``every_hierarchy=True`` puts every job in
  every hierarchy (ARCHITECTURE.md, "What a place costs the server").
* ``NoDriver`` — no usable cgroups (not root, read-only, none mounted): jobs
  without limits still run, a job asking for one is refused (``Unenforceable``).

Layout: one parent group for the server (``parent``, created under the server's
own cgroup in each hierarchy, so the server's own limits and delegation are
respected), one child ``job-<id>`` per job, created before the job runs and
joined by the job's process between fork and exec. An ended job's group that is
as new may serve a later job (``recycle``): it keeps its first job's name.

Driver-level failures raise ``Unenforceable`` (the host cannot do it) or
``CgroupError`` (a cgroup file operation failed); never a bare OSError.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import signal
import stat
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

import trio

from .._errors import InvalidRequest, TrioWorkerError, Unenforceable
from .._limits import CPU_PERIOD_US
from .._model import Limits, Usage
from . import _cplace

__all__ = [
    "CGROUP_ROOT",
    "CgroupDriver",
    "CgroupError",
    "Inotify",
    "JobCgroup",
    "NoDriver",
    "V1Driver",
    "V2Driver",
    "block_device_for",
    "cpu_quota_us",
    "detect",
    "remove_groups",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
_JOB_PREFIX = "job-"
_JOB_ID = re.compile(r"[0-9A-Za-z_.-]{1,128}")
_REMOVE_TIMEOUT = 1.0
_FREEZE_TIMEOUT = 1.0
_LEFTOVER_TIMEOUT = 2.0
_IN_MODIFY = 0x2
_IN_MOVED_FROM = 0x40
_IN_DELETE = 0x200
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
#: ``struct inotify_event`` before its name: wd, mask, cookie, len.
_INOTIFY_EVENT = struct.Struct("iIII")
#: A v1 memory group's limits (``memory_capped``).
_V1_MEMORY = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class CgroupError(TrioWorkerError):
    """A cgroup file operation failed; the job using it must fail, not the server."""

    def __init__(self, message: str, *, path: Path | None = None, errno_: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno_


class _Unusable(Exception):
    """No hierarchy can be used at all (internal: turns into a NoDriver)."""

    def __init__(self, reason: str, missing: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.missing = dict(missing or {})


# -- small file helpers ----------------------------------------------------------


def _write(path: Path, value: str) -> None:
    """Write one value the way ``echo value > path`` would; CgroupError on failure."""
    try:
        # O_CREAT is a no-op on cgroupfs (the files exist) and lets the driver run
        # against a plain directory tree laid out like one, in tests.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise CgroupError(
            f"cannot write {value!r} to {path}: {exc.strerror}", path=path, errno_=exc.errno
        ) from None


def _read(path: str | os.PathLike[str]) -> str | None:
    """The file's text, or None if it does not exist (group gone, feature absent).

    Raw ``os`` calls, not ``Path.read_text``: a job's end reads a few of these on the
    event loop, and the text layer costs ~3x the system calls (37 against 13 us). The
    end's reads take ``str`` paths: a ``Path`` join costs more than the read (~3 us).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = chunk = os.read(fd, 4096)
            while chunk:
                chunk = os.read(fd, 65536)
                data += chunk
        finally:
            os.close(fd)
        return data.decode()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CgroupError(
            f"cannot read {path}: {exc.strerror}", path=Path(path), errno_=exc.errno
        ) from None


def _read_small(path: str) -> str | None:
    """``_read`` of a file whose whole text one ``show`` makes, well under 4 KiB (the
    end's ``cgroup.events``, ``memory.oom_control``, usage counters): one read, not two.

    A seq_file fills a read with its records up to the end or up to the first record
    that does not fit; such a file is one record, so a short read is all of it. (Not
    for files of many records: ``cgroup.procs`` stops short at a pid that does not fit.)
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise CgroupError(
            f"cannot read {path}: {exc.strerror}", path=Path(path), errno_=exc.errno
        ) from None
    return data.decode() if len(data) < 4096 else _read(path)


def _keyed(text: str | None, key: str) -> int | None:
    """The value of ``key`` in a ``key value`` per line file (memory.events, cpu.stat)."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _own_cgroups() -> dict[str, str]:
    """Controller name (or "unified") -> this process's cgroup path in that hierarchy."""
    own: dict[str, str] = {}
    text = _read(Path("/proc/self/cgroup")) or ""
    for line in text.splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and not controllers:
            own["unified"] = path
        for name in controllers.split(","):
            if name:
                own[name.removeprefix("name=")] = path
    return own


def _under(root: Path, relative: str) -> Path:
    return root / relative.strip("/") if relative.strip("/") else root


#: A v1 memory limit at or above this is none (the kernel's "unlimited" is 2**63 - 4096).
_V1_UNLIMITED = 1 << 62


def _above_the_jobs(directory: Path, mount: Path, server: Path) -> Iterator[Path]:
    """``directory`` and its parents up to the server's own group or the hierarchy's
    root, neither included: the groups that hold the jobs and not the server."""
    while directory != mount and not server.is_relative_to(directory):
        yield directory
        directory = directory.parent


def _memory_capped(directory: Path, mount: Path, server: Path, files: Sequence[str]) -> Path | None:
    """The first of ``directory`` and its parents (up to the server's own group or the
    hierarchy's root, neither included) whose memory limit ``files`` set a limit."""
    for group in _above_the_jobs(directory, mount, server):
        for name in files:
            text = (_read(f"{group}/{name}") or "max").strip()  # (missing: none)
            if text != "max" and not (text.isdigit() and int(text) >= _V1_UNLIMITED):
                return group
    return None


def _memory_limit_files(
    directory: Path, mount: Path, server: Path, files: Sequence[str]
) -> list[Path]:
    """The files ``_memory_capped`` reads that exist."""
    return [
        group / name
        for group in _above_the_jobs(directory, mount, server)
        for name in files
        if (group / name).exists()
    ]


# -- which block device --------------------------------------------------------


def _unescape(field_: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def block_device_for(
    directory: str | os.PathLike[str],
    *,
    mountinfo: Path = Path("/proc/self/mountinfo"),
    sysfs: Path = Path("/sys"),
    _depth: int = 0,
) -> tuple[int, int]:
    """The ``(major, minor)`` the IO limits of a job working in ``directory`` apply to.

    That is the *whole disk* holding the file system ``directory`` is on (for
    device-mapper, md and loop devices: that device itself), because:

    * the job's own files live there, so this is the IO it is asked to limit;
    * blk-throttle (v1 ``blkio.throttle.*``) and ``io.max`` (v2) are configured
      per disk: the kernel refuses a partition's major:minor (ENODEV/EINVAL),
      and throttles a partition's IO at its disk anyway. So a job limited on
      ``sda2`` is limited for all of ``sda`` (every partition), and IO to any
      other disk is not limited.

    How: ``st_dev`` of the directory; if that is an anonymous device (major 0:
    overlayfs, btrfs subvolumes, tmpfs...), the mount in ``mountinfo`` with
    that device is looked up — a ``/dev/...`` source is used as is, an overlay
    is followed to its upper (written) directory; then a partition is replaced
    by its disk via ``/sys/dev/block/M:m/partition``. Raises ``Unenforceable``
    naming the directory when no block device is behind it (tmpfs, NFS, ...).
    """
    path = os.path.realpath(directory)
    try:
        st_dev = os.stat(path).st_dev
    except OSError as exc:
        raise Unenforceable(f"io limit: cannot stat {path}: {exc.strerror}") from None
    major, minor = os.major(st_dev), os.minor(st_dev)
    if major == 0:
        if _depth > 4:
            raise Unenforceable(f"io limit: cannot find the block device behind {path}")
        major, minor = _backing_device(path, major, minor, mountinfo, sysfs, _depth)
    node = sysfs / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        raise Unenforceable(
            f"io limit: {path} is on device {major}:{minor}, which is not a block device"
        )
    if (node / "partition").exists():
        try:
            disk = (node.resolve().parent / "dev").read_text().strip()
            major, minor = (int(x) for x in disk.split(":"))
        except (OSError, ValueError) as exc:
            raise Unenforceable(
                f"io limit: cannot find the disk of partition {major}:{minor} under {path}: {exc}"
            ) from None
    return major, minor


def _backing_device(
    path: str, major: int, minor: int, mountinfo: Path, sysfs: Path, depth: int
) -> tuple[int, int]:
    best: tuple[str, str, str, str] | None = None
    for line in (_read(mountinfo) or "").splitlines():
        parts = line.split()
        sep = parts.index("-")
        if parts[2] != f"{major}:{minor}":
            continue
        mount_point = _unescape(parts[4])
        fstype, source, options = parts[sep + 1], _unescape(parts[sep + 2]), parts[sep + 3]
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= len(best[0])):
            best = (mount_point, fstype, source, options)
    if best is None:
        raise Unenforceable(f"io limit: no mount found for {path} (device {major}:{minor})")
    _, fstype, source, options = best
    if source.startswith("/dev/"):
        try:
            st = os.stat(source)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            return os.major(st.st_rdev), os.minor(st.st_rdev)
    if fstype == "overlay":
        opts = dict(o.partition("=")[::2] for o in options.split(","))
        layer = opts.get("upperdir") or opts.get("lowerdir", "").split(":")[0]
        if layer:
            return block_device_for(layer, mountinfo=mountinfo, sysfs=sysfs, _depth=depth + 1)
    raise Unenforceable(
        f"io limit: {path} is on {fstype} ({source}), which is not backed by a block device"
    )


# -- job groups ----------------------------------------------------------------


class Inotify:
    """An inotify fd watching files for modification (``cgroup.events``; a memory
    limit's file: cgroupfs, like any file system, notes a ``write`` to it), and
    ``parents`` for the removal or rename of the children named: a removed group's
    files give their watches no notice on cgroupfs (no IN_DELETE_SELF, no IN_IGNORED),
    its parent does. That parent may hold other groups (other servers' parents beside
    ours, in a group they share): their comings and goings are no news (``drain``)."""

    def __init__(self, *paths: Path, parents: Mapping[Path, Iterable[str]] | None = None) -> None:
        fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd = fd
        #: (path, mask, watch descriptor) of each watch (``watching``).
        self._watches: list[tuple[bytes, int, int]] = []
        #: A parent's watch descriptor -> the names of the children it is watched for.
        self._children: dict[int, frozenset[bytes]] = {}
        try:
            for parent, names in (
                parents or {}
            ).items():  # (first: a removal after a file's watch is heard)
                wd = self._add(parent, _IN_DELETE | _IN_MOVED_FROM)
                self._children[wd] = frozenset(os.fsencode(name) for name in names)
            for path in paths:
                self._add(path, _IN_MODIFY)
        except OSError:
            os.close(fd)
            raise

    def _add(self, path: Path, mask: int) -> int:
        raw = os.fsencode(path)
        wd: int = _libc.inotify_add_watch(self.fd, raw, mask)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
        self._watches.append((raw, mask, wd))
        return wd

    def watching(self) -> bool:
        """Whether each path still names the file it watches (blocking). Watching a
        watched file again gives its watch descriptor back; a path gone, or made again
        (a new inode), does not."""
        return all(
            _libc.inotify_add_watch(self.fd, raw, mask) == wd for raw, mask, wd in self._watches
        )

    def drain(self) -> bool:
        """Read every event queued; whether one is news: a watched file modified, a
        watched child of a parent removed or renamed, a watch gone (its parent removed),
        or events lost (a full queue)."""
        news = False
        try:
            while data := os.read(self.fd, 4096):
                news = news or self._news(data)
        except BlockingIOError:
            pass
        return news

    def _news(self, data: bytes) -> bool:
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _INOTIFY_EVENT.unpack_from(data, offset)
            offset += _INOTIFY_EVENT.size
            name = data[offset : offset + length].rstrip(b"\0")
            offset += length
            children = self._children.get(wd)
            if mask & (_IN_Q_OVERFLOW | _IN_IGNORED) or children is None or name in children:
                return True
        return False

    def close(self) -> None:
        os.close(self.fd)


class JobCgroup(ABC):
    """One job's group, in every hierarchy the driver uses.

    Order of use: ``open_join()`` for the spawned child to join; then
    ``kill()``, ``await wait_empty()``, ``oom_killed()``/``usage()``, ``remove()``.
    """

    #: Whether the host tracks the job at all (False only for NoDriver's groups).
    tracked = True

    # Every running job holds one: its paths are made when used, not kept (a
    # ``Path`` per hierarchy was ~2.8 KiB per job on a hybrid host).
    __slots__ = ("_cpu_base", "job_id", "killed", "limited")

    def __init__(self, job_id: str) -> None:
        #: The job the group is for now (a recycled group keeps the name of the first).
        self.job_id = job_id
        #: Limits were written to it (``CgroupDriver.create``, ``configure``): never recycled.
        self.limited = False
        #: A worker thread was sent to ``kill`` it (``_jobs._job.kill``): never recycled.
        #: The job can end before that thread freezes and signals the group (its process
        #: group's SIGKILL went first), and a later job's seed would be there by then.
        self.killed = False
        #: Its CPU time (us) when it was recycled for this job (``CgroupDriver.recycle``):
        #: the job's usage counts from there.
        self._cpu_base = 0

    @property
    @abstractmethod
    def dirs(self) -> tuple[Path, ...]:
        """The job's directory in each hierarchy, one per distinct mount."""

    @property
    def _events_file(self) -> str | None:
        """v2 ``cgroup.events`` (populated 0/1) when there is a v2 group to watch."""
        return None

    @property
    def _events(self) -> Path | None:
        events = self._events_file
        return None if events is None else Path(events)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.job_id} {[str(d) for d in self.dirs]}>"

    @property
    def path(self) -> Path | None:
        return self.dirs[0] if self.dirs else None

    @property
    def _v2_dir(self) -> Path | None:
        """The group's v2 directory (the spawn clones the child into it), if any."""
        return None

    def open_join(self) -> list[int]:
        """Open what a spawned child joins the group by, one fd per ``dirs``: a v1
        hierarchy's ``cgroup.procs`` (the child writes "0" to it), the v2 group's
        directory (``_host._spawn`` clones the child into it: no write, which would
        wait for an RCU grace period).

        The caller closes them once the child has exec'd. OSError as ``open`` raises it.
        """
        fds: list[int] = []
        try:
            for directory, procs in self.joins():
                if procs:
                    fds.append(os.open(f"{directory}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
                else:
                    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
                    fds.append(os.open(directory, flags))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def joins(self) -> list[tuple[str, bool]]:
        """What ``open_join`` opens, per ``dirs``: the directory, and whether by its
        ``cgroup.procs`` (True) or as the directory itself (False: the v2 group).

        Paths made here, not kept: a running job would hold them (~0.9 KiB on a
        hybrid host) for one use.
        """
        v2 = self._v2_dir
        return [(str(directory), directory != v2) for directory in self.dirs]

    def texts(self) -> list[str]:
        """``dirs`` as text (what the removal's one call takes)."""
        return [str(directory) for directory in self.dirs]

    def pids(self) -> list[int]:
        """Every process in the group (and its subgroups), in the server's pid space."""
        found: set[int] = set()
        for directory in self.dirs:
            for sub, _, _ in os.walk(directory):
                for line in (_read(Path(sub) / "cgroup.procs") or "").split():
                    found.add(int(line))
        return sorted(found)

    def is_empty(self) -> bool:
        """True once no process is left in the group."""
        events = self._events_file
        if events is not None:
            text = _read_small(events)
            if text is None:
                return True
            return _keyed(text, "populated") == 0
        return not self.pids()

    async def wait_empty(self) -> None:
        """Return once the group is empty.

        With a v2 group (pure v2, or the unified mount of a hybrid host) this
        sleeps on inotify on ``cgroup.events`` — no polling. Pure v1 has no
        such event for non-root cgroups (only the global release agent), so
        there it polls with a backoff from 5 ms to 100 ms.
        """
        if self.is_empty():
            # The common case once the main process is gone: no inotify
            # instance at all (closing one costs an RCU grace period, ~10 ms).
            await trio.lowlevel.checkpoint()
            return
        if self._events is not None and self._events.exists():
            watch = Inotify(self._events)
            try:
                while not self.is_empty():
                    await trio.lowlevel.wait_readable(watch.fd)
                    watch.drain()
            finally:
                watch.close()
            return
        delay = 0.005
        while not self.is_empty():
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def wait_empty_sync(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds for the group to empty (for start-up)."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while not self.is_empty():
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return True

    @abstractmethod
    def kill(self) -> None:
        """SIGKILL every process in the group, escapees from the process group included."""

    @abstractmethod
    def oom_killed(self) -> bool:
        """True if the kernel's OOM killer killed a process in this group."""

    @abstractmethod
    def usage(self) -> Usage | None:
        """CPU seconds and peak memory, as far as the host accounts them."""

    def remove(self) -> None:
        """Remove the group everywhere; call after the job ended and was reaped.

        Subgroups the job made are removed first. A group whose last
        processes are still exiting is EBUSY for a moment: retried for up to 1 s.
        """
        deadline = time.monotonic() + _REMOVE_TIMEOUT
        delay = 0.002
        for directory in self.dirs:
            while True:
                try:
                    _rmtree_cgroup(directory)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise CgroupError(
                            f"cannot remove cgroup {exc.filename or directory}: {exc.strerror}",
                            path=directory,
                            errno_=exc.errno,
                        ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _signal_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@functools.lru_cache(maxsize=64)
def _realpath(directory: Path) -> str:
    """Which hierarchy a parent directory is in (co-mounted controllers share one).

    Cached: the parents are fixed for a driver's life, and resolving them
    for every job cost more than the rest of creating its groups.
    """
    return os.path.realpath(directory)


def remove_groups(groups: Sequence[JobCgroup]) -> list[JobCgroup]:
    """Remove ended jobs' groups (reaped, as for ``remove``), every hierarchy's
    directory of each, in one call with the GIL released (``_cplace.remove_dirs``):
    the refill's thread removed them one rmdir at a time from Python, holding the
    GIL between each two. Returns the groups that need ``remove`` (a group that
    still has subgroups, or processes still leaving: what ``remove`` handles);
    the others are gone.
    """
    dirs: list[bytes] = []
    owner: list[JobCgroup] = []
    for group in groups:
        for directory in group.texts():
            dirs.append(os.fsencode(directory))  # (a name from argv may not be UTF-8)
            owner.append(group)
    if not dirs:
        return []
    left: list[JobCgroup] = []
    for index, _ in _cplace.remove_dirs(dirs):
        group = owner[index]
        if not left or left[-1] is not group:
            left.append(group)
    return left


def _rmtree_cgroup(directory: Path) -> None:
    """rmdir a cgroup and its subgroups, deepest first (their files go with them).

    The group alone first: most jobs make no subgroups, and listing a group
    (dozens of files per hierarchy) cost more than the rmdir itself.
    """
    try:
        os.rmdir(directory)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # subgroups, or processes leaving
            raise
    for sub, dirnames, _ in os.walk(directory, topdown=False):
        for name in dirnames:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(os.path.join(sub, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)


def _freeze_and_kill(state: Path, job: JobCgroup, *, v2: bool) -> None:
    """Freeze, SIGKILL everything, thaw: nothing can fork while being killed.

    Signals to frozen tasks are delivered when they thaw, so every process
    dies and none had the chance to make a new one in between.
    """
    _write(state, "1" if v2 else "FROZEN")
    try:
        deadline = time.monotonic() + _FREEZE_TIMEOUT
        while time.monotonic() < deadline:
            if v2:
                if _keyed(_read(state.parent / "cgroup.events"), "frozen") == 1:
                    break
            elif (_read(state) or "").strip() == "FROZEN":
                break
            time.sleep(0.001)
        job._signal_all()
    finally:
        _write(state, "0" if v2 else "THAWED")


class V2JobCgroup(JobCgroup):
    """A job's group in a cgroup v2 hierarchy."""

    __slots__ = ("_has_kill", "dir")

    def __init__(self, job_id: str, directory: Path, *, has_kill: bool) -> None:
        super().__init__(job_id)
        self.dir = directory
        self._has_kill = has_kill

    @property
    def dirs(self) -> tuple[Path, ...]:
        return (self.dir,)

    @property
    def _v2_dir(self) -> Path | None:
        return self.dir

    @property
    def _events_file(self) -> str | None:
        return f"{self.dir}/cgroup.events"

    def kill(self) -> None:
        """``cgroup.kill`` (Linux 5.14+), else freeze via ``cgroup.freeze`` and SIGKILL."""
        if not self.dir.exists():
            return
        if self._has_kill:
            _write(self.dir / "cgroup.kill", "1")
        elif (self.dir / "cgroup.freeze").exists():
            _freeze_and_kill(self.dir / "cgroup.freeze", self, v2=True)
        else:
            self._signal_all()

    def oom_killed(self) -> bool:
        return (_keyed(_read_small(f"{self.dir}/memory.events"), "oom_kill") or 0) > 0

    def usage(self) -> Usage | None:
        usec = _keyed(_read_small(f"{self.dir}/cpu.stat"), "usage_usec")
        peak_text = _read_small(f"{self.dir}/memory.peak")
        if usec is None and peak_text is None:
            return None
        peak = int(peak_text) if peak_text and peak_text.strip().isdigit() else 0
        cpu = max(0, usec - self._cpu_base) if usec is not None else 0
        return Usage(cpu_seconds=cpu / 1e6, memory_peak_bytes=peak)


class V1JobCgroup(JobCgroup):
    """A job's groups in cgroup v1 hierarchies (and the unified mount, if any).

    Only in the hierarchies it needs (``V1Driver.hierarchies_for``): each one is a
    mkdir, an open, a ``cgroup.procs`` write in the child and an rmdir per job.
    """

    __slots__ = ("_homes", "_joined", "_name", "_parents", "_unified_parent")

    def __init__(
        self,
        job_id: str,
        name: str,
        parents: Mapping[str, Path],
        unified_parent: Path | None,
        *,
        joined: Sequence[str],
        homes: Mapping[str, str],
    ) -> None:
        """The group ``name`` under each of the driver's ``parents`` (controller ->
        its parent group; shared, not copied) whose hierarchy is ``joined``, and
        under ``unified_parent``. ``joined``: the hierarchies the job is in, each
        named by one of its controllers (co-mounted ones share a directory);
        ``homes``: controller -> that name for its hierarchy (shared)."""
        super().__init__(job_id)
        self._name = name
        self._parents = parents
        self._unified_parent = unified_parent
        self._joined = joined
        self._homes = homes

    @property
    def joined(self) -> Sequence[str]:
        """The v1 hierarchies the job is in, each named by one of its controllers."""
        return self._joined

    @property
    def name(self) -> str:
        """The group's directory name in each hierarchy (``job-<id>`` of the job it
        was made for: a recycled group keeps it)."""
        return self._name

    @property
    def controllers(self) -> dict[str, Path]:
        """The job's directory for each controller it is under."""
        return {
            c: p / self._name for c, p in self._parents.items() if self._homes[c] in self._joined
        }

    @property
    def unified(self) -> Path | None:
        """The job's group on the unified mount (tracking, ``cgroup.kill``), if any."""
        return None if self._unified_parent is None else self._unified_parent / self._name

    @property
    def dirs(self) -> tuple[Path, ...]:
        dirs = [self._parents[c] / self._name for c in self._joined]
        if self._unified_parent is not None:
            dirs.append(self._unified_parent / self._name)
        return tuple(dirs)

    # ``joins`` and ``texts`` without a ``Path`` per hierarchy (~5 us each): the
    # refill's thread asks them of every place, holding the GIL.

    def joins(self) -> list[tuple[str, bool]]:
        joins = [(f"{self._parents[c]}/{self._name}", True) for c in self._joined]
        if self._unified_parent is not None:
            joins.append((f"{self._unified_parent}/{self._name}", False))
        return joins

    def texts(self) -> list[str]:
        return [directory for directory, _ in self.joins()]

    @property
    def _events_file(self) -> str | None:
        parent = self._unified_parent
        return None if parent is None else f"{parent}/{self._name}/cgroup.events"

    @property
    def _v2_dir(self) -> Path | None:
        return self.unified

    def _controller(self, name: str) -> Path | None:
        directory = self._controller_dir(name)
        return None if directory is None else Path(directory)

    def _controller_dir(self, name: str) -> str | None:
        """The job's directory for controller ``name`` as text (the end's reads)."""
        parent = self._parents.get(name)
        if parent is None or self._homes[name] not in self._joined:
            return None
        return f"{parent}/{self._name}"

    def kill(self) -> None:
        """``cgroup.kill`` of the unified mount if any, then freeze, SIGKILL all, thaw."""
        unified = self.unified
        if unified is not None and (unified / "cgroup.kill").exists():
            # The kernel kills every task of the group, forks in flight
            # included: nothing left for the freezer to do.
            _write(unified / "cgroup.kill", "1")
            return
        freezer = self._controller("freezer")
        if freezer is not None and freezer.exists():
            _freeze_and_kill(freezer / "freezer.state", self, v2=False)
        else:
            # No freezer: kill in rounds, catching what was forked meanwhile.
            for _ in range(10):
                if not self.pids():
                    break
                self._signal_all()
                time.sleep(0.005)

    def oom_killed(self) -> bool:
        memory = self._controller_dir("memory")
        if memory is None:
            return False
        kills = _keyed(_read_small(f"{memory}/memory.oom_control"), "oom_kill")
        if kills is not None:
            return kills > 0
        # Before Linux 4.13 there is no counter: hitting the limit is the best hint.
        failcnt = _read(f"{memory}/memory.failcnt")
        return bool(failcnt and int(failcnt) > 0)

    def usage(self) -> Usage | None:
        cpu: float | None = None
        peak = 0
        cpuacct = self._controller_dir("cpuacct")
        if cpuacct is not None:
            text = _read_small(f"{cpuacct}/cpuacct.usage")
            if text is not None:
                cpu = int(text) / 1e9
        unified = self._unified_parent
        if cpu is None and unified is not None:
            usec = _keyed(_read_small(f"{unified}/{self._name}/cpu.stat"), "usage_usec")
            cpu = None if usec is None else max(0, usec - self._cpu_base) / 1e6
        memory = self._controller_dir("memory")
        if memory is not None:
            text = _read_small(f"{memory}/memory.max_usage_in_bytes")
            peak = int(text) if text is not None else 0
        if cpu is None and memory is None:
            return None
        return Usage(cpu_seconds=cpu or 0.0, memory_peak_bytes=peak)


class _NullJobCgroup(JobCgroup):
    """What NoDriver hands out: nothing tracked, nothing to kill, nothing to remove."""

    tracked = False

    __slots__ = ()

    @property
    def dirs(self) -> tuple[Path, ...]:
        return ()

    def kill(self) -> None:
        pass

    def oom_killed(self) -> bool:
        return False

    def usage(self) -> Usage | None:
        return None

    def is_empty(self) -> bool:
        return True


# -- drivers -------------------------------------------------------------------

_WHAT = {
    "cpus": ("cpu limit", "cpu"),
    "memory_bytes": ("memory limit", "memory"),
    "io_read_bps": ("io read limit", "io"),
    "io_write_bps": ("io write limit", "io"),
    "pids": ("pids limit", "pids"),
}


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise InvalidRequest("id", f"{job_id!r} cannot name a cgroup")


class CgroupDriver(ABC):
    """Creates, limits and cleans up the per-job groups under the server's parent."""

    #: "v2", "v1" or "none".
    name: str

    def __init__(self) -> None:
        #: Controller ("cpu", "memory", "io", "pids") -> why it cannot be used.
        self.missing: dict[str, str] = {}

    def _controller_name(self, generic: str) -> str:
        return generic

    def limit_problems(self, limits: Limits) -> list[str]:
        """Why this host cannot enforce ``limits``: one line per missing controller.

        ``_host._enforce.check_enforceable`` is the one place that turns these
        (and the namespaces' problems) into ``Unenforceable``.
        """
        problems: list[str] = []
        if not limits.any:
            return problems  # (every plain Start: no controller needed)
        seen: set[str] = set()
        for f in fields(Limits):
            if not getattr(limits, f.name):
                continue
            label, generic = _WHAT[f.name]
            controller = self._controller_name(generic)
            if controller in self.missing and controller not in seen:
                seen.add(controller)
                problems.append(
                    f"{label} needs a writable {controller} cgroup controller "
                    f"({self.missing[controller]})"
                )
        return problems

    def check(self, limits: Limits) -> None:
        """Raise ``Unenforceable`` naming every requested limit this host lacks."""
        if problems := self.limit_problems(limits):
            raise Unenforceable("; ".join(problems))

    def create(
        self,
        job_id: str,
        limits: Limits,
        *,
        cwd: str | os.PathLike[str] | None = None,
        extra_tasks: int = 0,
    ) -> JobCgroup:
        """Make the job's group with ``limits`` applied, before the job runs.

        ``cwd`` picks the disk for IO limits (``block_device_for``; the server's
        cwd if None). ``extra_tasks`` is added to ``pids.max`` for helper
        processes that are not the job's (``_isolation.helper_tasks``).
        Raises ``Unenforceable``, ``InvalidRequest`` or ``CgroupError``.
        """
        self.check(limits)
        device = _io_device(limits, cwd)
        group = self.make(job_id, limits)
        group.limited = limits.any
        try:
            self._apply(group, limits, device, extra_tasks)
        except BaseException:
            _rmdir_quietly(group.dirs)
            raise
        return group

    def configure(
        self,
        group: JobCgroup,
        limits: Limits,
        *,
        cwd: str | os.PathLike[str] | None = None,
        extra_tasks: int = 0,
    ) -> JobCgroup:
        """Apply ``limits`` to a group ``make`` made ahead of need (still empty), and
        return the group to use: ``group``, or (v1) ``group`` in more hierarchies
        when the limits need controllers it is not under (their ``cgroup.procs``
        are then to be opened too).

        As ``create`` does; on failure the group may hold some of the limits:
        remove it, do not reuse it (what this call added is removed already).
        """
        self.check(limits)
        device = _io_device(limits, cwd)
        wider = self._widen(group, limits)
        group.limited = wider.limited = group.limited or limits.any
        try:
            self._apply(wider, limits, device, extra_tasks)
        except BaseException:
            if wider is not group:
                _rmdir_quietly(d for d in wider.dirs if d not in group.dirs)
            raise
        return wider

    @abstractmethod
    def make(self, job_id: str, limits: Limits | None = None) -> JobCgroup:
        """Make the job's group, without limits yet (``CgroupError`` if it cannot),
        in what ``limits`` will need (v1: which hierarchies)."""

    def planned(self, job_id: str) -> JobCgroup:
        """The group ``make(job_id)`` would make, not made: its caller makes the
        directories (``_place.make_place``, with the job's place in one call)."""
        return self.job(job_id)

    def _widen(self, group: JobCgroup, limits: Limits) -> JobCgroup:
        """``group`` made ready for ``limits``' controllers (v1 makes directories)."""
        return group

    def recycle(self, groups: Sequence[JobCgroup]) -> list[JobCgroup | None]:
        """In a worker thread: ended jobs' groups (reaped, as for ``remove``) made ready
        for new jobs instead of removed, in one call with the GIL released
        (``_cplace.recycle``). For each, the group to use (the same directories; its
        counters reset, or read as the next job's baseline), or None where it cannot be
        (limits were written to it, it has processes or subgroups, is frozen, saw an
        OOM kill, still holds more memory than a new group could, or this host's
        groups cannot be reset, or a thread was sent to kill it: then remove it). See
        ARCHITECTURE.md, "Why groups are recycled".

        The group is the same object: the ended job no longer reads it (``Job.usage``
        gives its final usage, ``kill`` does nothing once it has ended)."""
        ops = self._recycle_ops
        recycled: list[JobCgroup | None] = [None] * len(groups)
        if ops is None:
            return recycled
        names: list[bytes] = []
        which: list[int] = []
        for index, group in enumerate(groups):
            name = None if group.limited or group.killed else self._recyclable(group)
            if name is not None:
                names.append(name)
                which.append(index)
        base = 1 if self._recycle_reads_cpu else 0
        checks = self._recycle_checks
        for index, values in zip(which, _cplace.recycle(ops, names), strict=True):
            # (A knob its job wrote, a limit: no new group's then. See ``_V1_KNOBS``.)
            if values is not None and all(
                check(value) for check, value in zip(checks, values[base:], strict=True)
            ):
                group = recycled[index] = groups[index]
                group._cpu_base = values[0] if base else 0
        return recycled

    #: ``recycle``'s operations on a group, but its name (each path is head + name +
    #: tail), made once; None where groups cannot be recycled.
    _recycle_ops: list[_Template] | None = None
    #: Whether the first value ``_recycle_ops`` read is the group's CPU time (the next
    #: job's baseline), and what each value read after it must be to recycle the group.
    _recycle_reads_cpu = False
    _recycle_checks: tuple[Callable[[int], bool], ...] = ()

    def _recyclable(self, group: JobCgroup) -> bytes | None:
        """The group's name if ``_recycle_ops`` apply to it (a job without limits')."""
        return None

    @abstractmethod
    def _apply(
        self,
        group: JobCgroup,
        limits: Limits,
        device: tuple[int, int] | None,
        extra_tasks: int,
    ) -> None:
        """Write ``limits`` to the group's files (checked by the caller)."""

    @abstractmethod
    def job(self, job_id: str) -> JobCgroup:
        """The (existing) group of ``job_id``, for kill/remove without creating it."""

    @abstractmethod
    def _parent_dirs(self) -> list[Path]: ...

    def parent_dirs(self) -> list[Path]:
        """The server's parent group in each hierarchy (the reaper's whole reach)."""
        return self._parent_dirs()

    def summary(self) -> str:
        """One line for the server's log at start: the hierarchy that holds the jobs' groups,
        where, and which limits this host cannot enforce."""
        where = ", ".join(str(p) for p in self._parent_dirs()) or "-"
        text = f"cgroups: {self.name}, the jobs' groups under {where}"
        if self.missing:
            text += "; cannot limit: " + "; ".join(
                f"{controller} ({why})" for controller, why in sorted(self.missing.items())
            )
        return text

    def memory_capped(self) -> Path | None:
        """A memory limit on a group that holds the jobs but not the server (the jobs'
        parent, or a group between it and the server's own), by its directory; None if
        there is none. The seeds' guard (``_jobs._launch``): a seed shares the server's
        memory, so the OOM killer of such a group scores it at the server's RSS, and
        killing it kills every process of that memory: the server."""
        return None

    def memory_limit_files(self) -> list[Path]:
        """The files ``memory_capped`` reads (those that exist): a write to one of them
        is when a cap may appear (``_jobs._launch``'s watch)."""
        return []

    def cleanup_leftovers(self) -> list[str]:
        """Kill and remove job groups an earlier run left behind; return their job ids.

        Meant for start-up, before any job of this run exists. Raises
        ``CgroupError`` (after trying them all) if some could not be removed.
        """
        ids: set[str] = set()
        for parent in self._parent_dirs():
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith(_JOB_PREFIX) and entry.is_dir(follow_symlinks=False):
                    ids.add(entry.name.removeprefix(_JOB_PREFIX))
        failures: list[str] = []
        for job_id in sorted(ids):
            group = self.job(job_id)
            try:
                group.kill()
                group.wait_empty_sync(_LEFTOVER_TIMEOUT)
                group.remove()
            except CgroupError as exc:
                failures.append(str(exc))
        if failures:
            raise CgroupError("leftover job cgroups remain: " + "; ".join(failures))
        return sorted(ids)

    def close(self) -> None:
        """Remove the server's parent groups if they are empty (best effort)."""
        for parent in self._parent_dirs():
            with contextlib.suppress(OSError):
                os.rmdir(parent)

    @property
    def tracks(self) -> bool:
        """True if jobs get a group (so ``kill`` reaches escapees)."""
        return True


class V2Driver(CgroupDriver):
    """cgroup v2: one unified hierarchy, controllers enabled down the tree."""

    name = "v2"
    _WANTED = ("cpu", "memory", "io", "pids")

    def __init__(self, root: Path, parent: str, base: str) -> None:
        super().__init__()
        self.root = root
        base_dir = _under(root, base)
        self.parent_dir = base_dir / parent
        try:
            self.parent_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _Unusable(f"cannot create {self.parent_dir}: {exc.strerror}") from None
        if not os.access(self.parent_dir, os.W_OK):
            raise _Unusable(f"{self.parent_dir} is not writable")
        # Each level from our own group down to the parent must pass the
        # controllers on, or the job groups below have no limit files.
        level = base_dir
        self._enable(level)
        for part in Path(parent).parts:
            level = level / part
            self._enable(level)
        #: cgroup.kill (5.14+): a job's group is killed in one write.
        self._has_kill = (self.parent_dir / "cgroup.kill").exists()
        self._server_dir = _under(root, _own_cgroups().get("unified", "/"))
        # With the memory controller, no recycling: ``memory.peak`` is reset by a write
        # for the writer's descriptor only (Linux 6.12+), not for the end's read.
        # Nor with cpu, io or pids: a job may write limits to its own group (a root job
        # can), and their unset values are not numbers to check ("max", empty).
        if {"memory", "cpu", "io", "pids"} <= self.missing.keys():
            head = os.fsencode(self.parent_dir) + b"/"
            self._recycle_ops = [
                (_NO_SUBGROUPS, head, b"", b"", 0),
                (_AT_MOST, head, b"/cgroup.events", b"populated", 0),
                (_AT_MOST, head, b"/cgroup.events", b"frozen", 0),
                (_READ, head, b"/cpu.stat", b"usage_usec", 0),
            ]
            self._recycle_reads_cpu = True

    def _enable(self, level: Path) -> None:
        available = set((_read(level / "cgroup.controllers") or "").split())
        enabled = set((_read(level / "cgroup.subtree_control") or "").split())
        for name in self._WANTED:
            if name in self.missing:
                continue
            if name not in available:
                listed = " ".join(sorted(available)) or "none"
                self.missing[name] = (
                    f"cgroup v2: {level}/cgroup.controllers does not offer it (it lists: {listed})"
                )
            elif name not in enabled:
                try:
                    _write(level / "cgroup.subtree_control", f"+{name}")
                except CgroupError as exc:
                    hint = ""
                    if exc.errno == errno.EBUSY:
                        hint = (
                            "; processes live in that group (v2's no-internal-processes "
                            "rule): run the server in a leaf of a delegated subtree"
                        )
                    self.missing[name] = f"cgroup v2: cannot enable it in {level}: {exc}{hint}"

    def _parent_dirs(self) -> list[Path]:
        return [self.parent_dir]

    def memory_capped(self) -> Path | None:
        if "memory" in self.missing:
            return None
        return _memory_capped(self.parent_dir, self.root, self._server_dir, ("memory.max",))

    def memory_limit_files(self) -> list[Path]:
        if "memory" in self.missing:
            return []
        return _memory_limit_files(self.parent_dir, self.root, self._server_dir, ("memory.max",))

    def job(self, job_id: str) -> JobCgroup:
        _check_job_id(job_id)
        return V2JobCgroup(
            job_id, self.parent_dir / f"{_JOB_PREFIX}{job_id}", has_kill=self._has_kill
        )

    def _recyclable(self, group: JobCgroup) -> bytes | None:
        if not isinstance(group, V2JobCgroup) or group.dir.parent != self.parent_dir:
            return None
        return os.fsencode(group.dir.name)

    def make(self, job_id: str, limits: Limits | None = None) -> JobCgroup:
        group = self.job(job_id)
        _mkdir(group.dirs[0])
        return group

    def _apply(
        self,
        group: JobCgroup,
        limits: Limits,
        device: tuple[int, int] | None,
        extra_tasks: int,
    ) -> None:
        directory = group.dirs[0]
        if limits.cpus:
            _write(directory / "cpu.max", f"{cpu_quota_us(limits.cpus)} {CPU_PERIOD_US}")
        if limits.memory_bytes:
            _write(directory / "memory.max", str(limits.memory_bytes))
            if (self.parent_dir / "memory.swap.max").exists():
                _write(directory / "memory.swap.max", "0")
            if (self.parent_dir / "memory.oom.group").exists():
                # OOM kills the job as a unit, not just its biggest process.
                _write(directory / "memory.oom.group", "1")
        if device is not None:
            rbps = limits.io_read_bps or "max"
            wbps = limits.io_write_bps or "max"
            _write(directory / "io.max", f"{device[0]}:{device[1]} rbps={rbps} wbps={wbps}")
        if limits.pids:
            _write(directory / "pids.max", str(limits.pids + extra_tasks))


class V1Driver(CgroupDriver):
    """cgroup v1 (legacy or hybrid): a mount per controller under ``root``."""

    name = "v1"
    #: Hierarchy -> a file its non-root groups have (proves the controller is there).
    _PROBES = {
        "cpu": "cpu.cfs_quota_us",
        "cpuacct": "cpuacct.usage",
        "memory": "memory.limit_in_bytes",
        "blkio": "blkio.throttle.write_bps_device",
        "pids": "pids.max",
        "freezer": "freezer.state",
    }

    def __init__(
        self,
        root: Path,
        parent: str,
        base: str | None,
        *,
        use_unified: bool = True,
        own: Mapping[str, str] | None = None,
        every_hierarchy: bool = False,
    ) -> None:
        """``every_hierarchy``: every job joins every hierarchy (as before: 7 directories
        a job on a hybrid host); False: only what it needs (``hierarchies_for``; see
        ARCHITECTURE.md, "What a place costs the server")."""
        super().__init__()
        self.root = root
        own = _own_cgroups() if own is None else own
        self.parents: dict[str, Path] = {}
        for name, probe in self._PROBES.items():
            mount = root / name
            if not (mount / "cgroup.procs").exists():
                self.missing[name] = f"cgroup v1: no {name} hierarchy mounted at {mount}"
                continue
            parent_dir = _under(mount, base if base is not None else own.get(name, "/")) / parent
            try:
                parent_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self.missing[name] = f"cgroup v1: cannot create {parent_dir}: {exc.strerror}"
                continue
            if not os.access(parent_dir, os.W_OK):
                self.missing[name] = f"cgroup v1: {parent_dir} is not writable"
            elif not (parent_dir / probe).exists():
                self.missing[name] = f"cgroup v1: {parent_dir} has no {probe}"
            else:
                self.parents[name] = parent_dir
        self.unified: Path | None = None
        unified = root / "unified"
        if use_unified and (unified / "cgroup.procs").exists():
            parent_dir = _under(unified, base if base is not None else own.get("unified", "/"))
            parent_dir = parent_dir / parent
            try:
                parent_dir.mkdir(parents=True, exist_ok=True)
                self.unified = parent_dir
            except OSError:
                pass
        if not self.parents and self.unified is None:
            missing = {("io" if k == "blkio" else k): v for k, v in self.missing.items()}
            raise _Unusable(f"no usable cgroup hierarchy under {root}", missing)
        # One directory per mount (co-mounted controllers share one), found once.
        by_mount: dict[str, str] = {}
        for name, parent_dir in self.parents.items():
            by_mount.setdefault(_realpath(parent_dir), name)
        self._distinct = tuple(by_mount.values())
        #: Controller -> the name ``_distinct`` gives its hierarchy.
        self._homes = {name: by_mount[_realpath(d)] for name, d in self.parents.items()}
        #: Hierarchy lists by (cpu, io, pids) limits asked: shared by the jobs.
        self._joined: dict[tuple[bool, bool, bool], tuple[str, ...]] = {}
        # What every job needs, measured as the bulk of a Start's cgroup work (a
        # mkdir, an open, the child's write and an rmdir per hierarchy): memory
        # (peak usage, OOM); with the unified mount its group tracks the job, kills
        # it (``cgroup.kill``) and counts its CPU (``cpu.stat``), else cpuacct and
        # the freezer do. Limits add their controllers (``hierarchies_for``).
        kills = self.unified is not None and (self.unified / "cgroup.kill").exists()
        # (A unified group without the cpu controller has cpu.stat from Linux 4.20 on.)
        counts_cpu = self.unified is not None and (self.unified / "cpu.stat").exists()
        # And cpu: a job scheduled in a group of its own, not in the server's (where
        # the clone would leave it; with the server in the root cpu group that is the
        # server's session's autogroup, whose one share the jobs then took from the
        # server on a busy host: sequential Starts measured at half the rate).
        always = {"memory", "cpu"}
        if not counts_cpu:
            always.add("cpuacct")
        if not kills:
            always.add("freezer")
        self._base = frozenset(self._homes[c] for c in always if c in self._homes)
        if every_hierarchy or (not self._base and self.unified is None):
            # (Else nothing would track the job: every hierarchy there is.)
            self._base = frozenset(self._distinct)
        self._memsw = (
            "memory" in self.parents
            and (self.parents["memory"] / "memory.memsw.limit_in_bytes").exists()
        )
        self._server_memory = _under(root / "memory", own.get("memory", "/"))
        #: ``recycle``'s operations on a group, but its name (``_plan_recycling``).
        self._recycle_ops = self._plan_recycling()

    def _controller_name(self, generic: str) -> str:
        return "blkio" if generic == "io" else generic

    def _parent_dirs(self) -> list[Path]:
        return list(self.parents.values()) + ([self.unified] if self.unified else [])

    def memory_capped(self) -> Path | None:
        parent = self.parents.get("memory")
        if parent is None:
            return None
        return _memory_capped(parent, self.root / "memory", self._server_memory, _V1_MEMORY)

    def memory_limit_files(self) -> list[Path]:
        parent = self.parents.get("memory")
        if parent is None:
            return []
        return _memory_limit_files(parent, self.root / "memory", self._server_memory, _V1_MEMORY)

    def hierarchies_for(self, limits: Limits | None) -> tuple[str, ...]:
        """The hierarchies a job with ``limits`` joins (see ``__init__``), in mount order."""
        limits = limits or Limits()
        io = bool(limits.io_read_bps or limits.io_write_bps)
        key = (bool(limits.cpus), io, bool(limits.pids))
        joined = self._joined.get(key)
        if joined is None:
            wanted = set(self._base)
            for asked, controller in zip(key, ("cpu", "blkio", "pids"), strict=True):
                if asked and controller in self._homes:
                    wanted.add(self._homes[controller])
            joined = self._joined[key] = tuple(h for h in self._distinct if h in wanted)
        return joined

    def _group(self, job_id: str, joined: Sequence[str], name: str | None = None) -> V1JobCgroup:
        _check_job_id(job_id)
        return V1JobCgroup(
            job_id,
            f"{_JOB_PREFIX}{job_id}" if name is None else name,
            self.parents,
            self.unified,
            joined=joined,
            homes=self._homes,
        )

    def job(self, job_id: str) -> JobCgroup:
        # Which hierarchies an existing group is in is not known here: all of them
        # (kill and remove skip the directories that do not exist).
        return self._group(job_id, self._distinct)

    def planned(self, job_id: str) -> JobCgroup:
        return self._group(job_id, self.hierarchies_for(None))

    def make(self, job_id: str, limits: Limits | None = None) -> JobCgroup:
        group = self._group(job_id, self.hierarchies_for(limits))
        made: list[Path] = []
        try:
            for directory in group.dirs:
                _mkdir(directory)
                made.append(directory)
        except BaseException:
            _rmdir_quietly(made)
            raise
        return group

    def _widen(self, group: JobCgroup, limits: Limits) -> JobCgroup:
        assert isinstance(group, V1JobCgroup)
        joined = self.hierarchies_for(limits)
        if set(joined) <= set(group.joined):
            return group
        wider = self._group(group.job_id, joined, group.name)
        wider._cpu_base = group._cpu_base
        made: list[Path] = []
        try:
            for directory in wider.dirs:
                if directory not in group.dirs:
                    _mkdir(directory)
                    made.append(directory)
        except BaseException:
            _rmdir_quietly(made)
            raise
        return wider

    def _recyclable(self, group: JobCgroup) -> bytes | None:
        # Only a group in what a job without limits is in (and with the unified mount
        # to say it is empty and thawed: ``_plan_recycling``).
        if not isinstance(group, V1JobCgroup) or tuple(group.joined) != self.hierarchies_for(None):
            return None
        return group.name.encode()

    def _plan_recycling(self) -> list[_Template] | None:
        """``recycle``'s operations on a group of a job without limits, its name left
        out (each path is head + name + tail); None if such groups cannot be recycled
        here. Made once: the same for every group."""
        unified = self.unified
        if unified is None:
            return None
        here = os.fsencode(unified) + b"/"
        ops: list[_Template] = [
            (_NO_SUBGROUPS, here, b"", b"", 0),
            (_AT_MOST, here, b"/cgroup.events", b"populated", 0),
            (_AT_MOST, here, b"/cgroup.events", b"frozen", 0),
        ]
        joined = self.hierarchies_for(None)
        if not any(self._homes.get("cpuacct") == h for h in joined):
            ops.append((_READ, here, b"/cpu.stat", b"usage_usec", 0))
            self._recycle_reads_cpu = True
        checks: list[Callable[[int], bool]] = []
        for hierarchy in joined:
            head = os.fsencode(self.parents[hierarchy]) + b"/"
            ops.append((_NO_SUBGROUPS, head, b"", b"", 0))
            controllers = {c for c, home in self._homes.items() if home == hierarchy}
            if controllers & {"freezer", "pids", "blkio"}:
                # (freezer: its state is not a number, not worth it on such old hosts;
                # pids, blkio: their unset limits are not numbers to check, and a job
                # without limits is not in them.)
                return None
            # A job may have written limits to its own group (a root job can: a script
            # that limits itself), which a later job would then run under: each knob a
            # group is made with must hold a new group's value (``_V1_KNOBS``).
            for controller in sorted(controllers):
                for name, key, check in _V1_KNOBS.get(controller, ()):
                    if not (self.parents[hierarchy] / name).exists():
                        continue  # (optional: swap accounting, newer kernels' knobs)
                    tail = b"/" + name.encode()
                    if check is None:
                        ops.append((_AT_MOST, head, tail, key, 0))
                    else:
                        ops.append((_READ, head, tail, key, 0))
                        checks.append(check)
            if "memory" in controllers:
                ops += [
                    (_AT_MOST, head, b"/memory.oom_control", b"oom_kill", 0),
                    (_AT_MOST, head, b"/memory.usage_in_bytes", b"", _residue()),
                    (_WRITE, head, b"/memory.max_usage_in_bytes", b"0", 0),
                ]
            if "cpuacct" in controllers:
                ops.append((_WRITE, head, b"/cpuacct.usage", b"0", 0))
        self._recycle_checks = tuple(checks)
        return ops

    def _apply(
        self,
        group: JobCgroup,
        limits: Limits,
        device: tuple[int, int] | None,
        extra_tasks: int,
    ) -> None:
        assert isinstance(group, V1JobCgroup)
        c = group.controllers
        if limits.cpus:
            _write(c["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(c["cpu"] / "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpus)))
        if limits.memory_bytes:
            _write(c["memory"] / "memory.limit_in_bytes", str(limits.memory_bytes))
            if self._memsw:
                # memory+swap == memory: the job cannot swap its way past the limit.
                _write(c["memory"] / "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        if device is not None:
            for name, value in (("read", limits.io_read_bps), ("write", limits.io_write_bps)):
                if value:
                    _write(
                        c["blkio"] / f"blkio.throttle.{name}_bps_device",
                        f"{device[0]}:{device[1]} {value}",
                    )
        if limits.pids:
            _write(c["pids"] / "pids.max", str(limits.pids + extra_tasks))


class NoDriver(CgroupDriver):
    """No usable cgroups: jobs run untracked, and any limit is refused."""

    name = "none"

    def __init__(self, reason: str, missing: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.reason = reason
        for controller in ("cpu", "memory", "io", "pids"):
            why = (missing or {}).get(controller, reason)
            self.missing[controller] = f"no usable cgroups on this host: {why}"

    @property
    def tracks(self) -> bool:
        return False

    def summary(self) -> str:
        return (
            f"no usable cgroups ({self.reason}): jobs are not tracked by cgroup, "
            "and every limit is refused"
        )

    def _parent_dirs(self) -> list[Path]:
        return []

    def job(self, job_id: str) -> JobCgroup:
        return _NullJobCgroup(job_id)

    def make(self, job_id: str, limits: Limits | None = None) -> JobCgroup:
        return _NullJobCgroup(job_id)

    def _apply(
        self,
        group: JobCgroup,
        limits: Limits,
        device: tuple[int, int] | None,
        extra_tasks: int,
    ) -> None:
        pass  # ``check`` refused every limit already


def _io_device(limits: Limits, cwd: str | os.PathLike[str] | None) -> tuple[int, int] | None:
    """The disk IO limits apply to (``block_device_for``), if the job asks for any."""
    if not (limits.io_read_bps or limits.io_write_bps):
        return None
    return block_device_for(cwd if cwd is not None else os.getcwd())


#: ``_cplace.recycle``'s operations: (kind, head, tail, key, value), on the file head +
#: a group's name + tail.
_Template = tuple[int, bytes, bytes, bytes, int]

#: A v1 group's writable knobs, by controller, and what a new group holds: (file, key
#: ("" for the whole file), None for "at most 0", else a check of the value read).
_UNLIMITED = 1 << 62  # (a v1 memory limit's "none": the largest page-aligned number)
_V1_KNOBS: dict[str, tuple[tuple[str, bytes, Callable[[int], bool] | None], ...]] = {
    "memory": (
        ("memory.limit_in_bytes", b"", lambda v: v >= _UNLIMITED),
        ("memory.soft_limit_in_bytes", b"", lambda v: v >= _UNLIMITED),
        ("memory.memsw.limit_in_bytes", b"", lambda v: v >= _UNLIMITED),
        ("memory.kmem.tcp.limit_in_bytes", b"", lambda v: v >= _UNLIMITED),
        ("memory.oom_control", b"oom_kill_disable", None),
        ("memory.move_charge_at_immigrate", b"", None),
    ),
    "cpu": (
        ("cpu.cfs_quota_us", b"", lambda v: v == -1),
        ("cpu.cfs_period_us", b"", lambda v: v == 100_000),
        ("cpu.shares", b"", lambda v: v == 1024),
        ("cpu.rt_runtime_us", b"", None),
        ("cpu.cfs_burst_us", b"", None),
        ("cpu.idle", b"", None),
    ),
}
_NO_SUBGROUPS, _AT_MOST, _WRITE, _READ = range(4)


@functools.cache
def _residue() -> int:
    """The most memory a recycled v1 group may still be charged with (its reset peak
    starts there): what the kernel may hold charged ahead for a group, per CPU (a
    charge batch of 64 pages: a new group's first charge takes one too), and a few
    pages of kernel objects its last process left, freed a moment later (seen: 5
    pages past two batches, cache and rss 0, after a Python job; 1 in 6 such groups
    was removed for it). More is the last job's (page cache, a tmpfs file): that
    group is removed instead."""
    page = os.sysconf("SC_PAGE_SIZE")
    return (64 * (os.cpu_count() or 1) + 16) * page


def _mkdir(directory: Path) -> None:
    try:
        directory.mkdir()
    except OSError as exc:
        raise CgroupError(
            f"cannot create cgroup {directory}: {exc.strerror}",
            path=directory,
            errno_=exc.errno,
        ) from None


def _rmdir_quietly(dirs: Iterable[Path]) -> None:
    for directory in dirs:
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _check_parent(parent: str) -> None:
    parts = Path(parent).parts
    if not parent or Path(parent).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ValueError(f"parent must be a relative cgroup name, got {parent!r}")


def detect(
    parent: str = "trio-worker",
    *,
    root: Path = CGROUP_ROOT,
    base: str | None = None,
    use_unified: bool = True,
    every_hierarchy: bool = False,
) -> CgroupDriver:
    """Probe the host and return the driver to use, creating the server's parent group.

    ``parent`` is created under ``base`` in each hierarchy; ``base`` defaults to
    this process's own cgroup there (``/proc/self/cgroup``), so the jobs stay
    inside whatever limits and delegation the server itself was given. Pass
    ``base="/"`` to put the parent at the top of the hierarchy instead.
    A v1 job is only in the hierarchies it needs (``every_hierarchy=True``: in every
    one; see ``V1Driver``). ``use_unified=False`` ignores a hybrid host's v2 mount (the
    v1 freezer then does all killing). Never raises for an unusable host: that is a NoDriver.
    """
    _check_parent(parent)
    try:
        if (root / "cgroup.controllers").is_file():
            own = base if base is not None else _own_cgroups().get("unified", "/")
            return V2Driver(root, parent, own)
        hierarchies = [*V1Driver._PROBES, "unified"]
        if any((root / name / "cgroup.procs").exists() for name in hierarchies):
            return V1Driver(
                root, parent, base, use_unified=use_unified, every_hierarchy=every_hierarchy
            )
    except _Unusable as exc:
        return NoDriver(str(exc), exc.missing)
    except CgroupError as exc:
        return NoDriver(str(exc))
    return NoDriver(f"no cgroup file system at {root}")


def cpu_quota_us(cpus: float) -> int:
    """The CFS quota (per ``CPU_PERIOD_US``) that ``cpus`` CPUs means."""
    return max(1000, round(cpus * CPU_PERIOD_US))
