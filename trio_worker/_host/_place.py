"""A job's place, made in one call that lets the GIL go (``_cplace.c``).

A place is its groups with what its process joins them by (``JobCgroup.open_join``),
and a directory with files in it if asked for (the launcher's places have none: a job's
directory and log files come with its first output, see ``_jobs._output``). Made from
Python, that was ~20 system calls with the GIL taken back between each two, in the
thread that makes places ahead of need while the event loop serves calls: the loop had
to win the GIL back after each of its own system calls. Here the paths are made in
Python and the system calls all run in C.

This module knows directories, files and cgroups, nothing of jobs.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from pathlib import Path

from . import _cplace
from ._cgroups import CgroupError, JobCgroup

__all__ = ["PlaceError", "Step", "make_place"]


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
    directory: Path | None, files: Sequence[tuple[str, bytes | None]], group: JobCgroup
) -> list[int]:
    """Make ``directory`` (0700, unless None: then no ``files``) with ``files`` in it
    (each 0600, with its bytes written, or empty for None: a failed write is ignored,
    the file stays), then ``group``'s directories (as ``CgroupDriver.make``, which must
    not have made them), and return ``group.open_join()``'s descriptors. ``PlaceError``
    if any step fails, with nothing left behind."""
    joins = group.joins()
    made = _cplace.make_place(
        b"" if directory is None else os.fsencode(directory),
        [os.fsencode(name) for name, _ in files],
        [content for _, content in files],
        [os.fsencode(d) for d, _ in joins],
        [procs for _, procs in joins],
    )
    if isinstance(made, tuple):
        step, errno, path = made
        raise PlaceError(Step(step), errno, os.fsdecode(path))
    return made
