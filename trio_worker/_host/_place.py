"""A job's place, made in one call that lets the GIL go (``_cplace.c``).

A place is its groups with what its process joins them by (``JobCgroup.open_join``),
and a directory with files in it if asked for (the launcher's places have none: a job's
directory and log files come with its first output, see ``_jobs._output``). Made from
Python, that was ~20 system calls with the GIL taken back between each two, in the
thread that makes places ahead of need while the event loop serves calls: the loop had
to win the GIL back after each of its own system calls. Here the paths are made in
Python and the system calls all run in C. ``make_seeded_place`` plants the place's seed
(``_spawn.Seed``) in the same call.

This module knows directories, files, cgroups and seeds, nothing of jobs.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import _cplace, _cspawn
from ._cgroups import CgroupError, JobCgroup
from ._spawn import Seed

__all__ = ["PlaceError", "Sown", "Step", "make_place", "make_seeded_place"]


class Step(enum.IntEnum):
    """Which step of ``make_place`` failed (mirrors ``_cplace.c``)."""

    DIRECTORY = 1
    FILE = 2
    CGROUP = 3
    JOIN = 4


class PlaceError(OSError):
    """``make_place`` failed at ``step``; nothing it made is left."""

    def __init__(self, step: Step, errno: int, filename: str) -> None:
        super().__init__(errno, os.strerror(errno), filename)
        self.step = step

    def cgroup_error(self) -> CgroupError:
        """The failure as the cgroup driver says it (``make`` or ``open_join``)."""
        verb = "create cgroup" if self.step is Step.CGROUP else "open"
        return CgroupError(
            f"cannot {verb} {self.filename}: {self.strerror}",
            path=Path(self.filename),
            errno_=self.errno,
        )


def make_place(
    directory: Path | None,
    files: Sequence[tuple[str, bytes | None]],
    group: JobCgroup,
    *,
    recycled: bool = False,
) -> list[int]:
    """Make ``directory`` (0700, unless None: then no ``files``) with ``files`` in it
    (each 0600, with its bytes written, or empty for None: a failed write is ignored,
    the file stays), then ``group``'s directories (as ``CgroupDriver.make``, which must
    not have made them; not if ``recycled``: they exist, ``CgroupDriver.recycle``'s),
    and return ``group.open_join()``'s descriptors. ``PlaceError`` if any step fails,
    with nothing left behind (but a recycled group, as it was)."""
    made = _make(directory, files, group, None, recycled)
    assert isinstance(made, list)
    return made


@dataclass(frozen=True, slots=True)
class Sown:
    """A place's seed, planted with it: the seed and the read ends of its stdout and
    stderr pipes."""

    seed: Seed
    stdout: int
    stderr: int
    #: When it started (/proc/PID/stat's clock ticks, as ``_jobs._store``'s
    #: ``process_start_time`` reads them), or None if unknown.
    start_time: int | None


def make_seeded_place(
    directory: Path | None,
    files: Sequence[tuple[str, bytes | None]],
    group: JobCgroup,
    *,
    nofile_soft: int | None,
    pipe_sizes: Sequence[int],
    recycled: bool = False,
) -> tuple[list[int], Sown | OSError]:
    """``make_place``, and in the same call (the GIL let go once) the place's seed
    (``Seed.plant``'s, with /dev/null as stdin and a pipe for each of stdout and
    stderr, sized by the first of ``pipe_sizes`` the kernel takes).

    Returns (no descriptors, the seed): it joined the groups. Or, with no seed, (the
    groups' descriptors, the ``OSError`` that says why: its filename names the step,
    ``clone3`` for the clone); the place is made all the same. ``PlaceError`` as
    ``make_place``'s."""
    if not _cspawn.HAVE_SEED:  # another architecture
        fds = make_place(directory, files, group, recycled=recycled)
        return fds, OSError(_errno.ENOSYS, "seeds are not built for this machine", "clone3")
    seed = (-1 if nofile_soft is None else nofile_soft, tuple(pipe_sizes))
    made = _make(directory, files, group, seed, recycled)
    assert isinstance(made, tuple)
    fds, planted = made
    if isinstance(planted, OSError):
        return fds, planted
    c, pidfd, stdout, stderr, start_time = planted
    return fds, Sown(Seed(c, pidfd), stdout, stderr, start_time)


def _make(
    directory: Path | None,
    files: Sequence[tuple[str, bytes | None]],
    group: JobCgroup,
    seed: tuple[int, tuple[int, ...]] | None,
    recycled: bool,
) -> list[int] | tuple[list[int], _cplace.Planted | OSError]:
    joins = group.joins()
    made = _cplace.make_place(
        b"" if directory is None else os.fsencode(directory),
        [os.fsencode(name) for name, _ in files],
        [content for _, content in files],
        [os.fsencode(d) for d, _ in joins],
        [procs for _, procs in joins],
        seed,
        recycled,
    )
    if isinstance(made, tuple) and isinstance(made[0], int):
        step, errno, path = made
        raise PlaceError(Step(step), errno, os.fsdecode(path))
    return made
