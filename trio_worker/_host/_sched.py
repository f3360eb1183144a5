"""The event loop's thread asks the kernel for short turns on the CPU.

A reply waits for the loop thread, and during a Start burst the loop thread waited for a
CPU: 1-3 ms of the slowest Statuses, on 2 cores shared by the places' refill (in the
kernel: inodes, cgroup mkdir and rmdir, the seed's clone3), seeds that exec, the jobs
and the clients (ARCHITECTURE.md, "The loop during a Start burst"). The fair scheduler
(EEVDF, Linux 6.6) lets a task that just got the CPU keep it for its whole slice (1.4
ms here); since 6.12 a thread may ask for a shorter one (``sched_attr.sched_runtime``),
and a woken thread with a shorter slice than the running one ends that protection.
Its share of the CPU is what it was: a short slice means shorter turns, sooner, not more
of them; no privilege is needed, and no other thread or process is changed.

Only the loop's thread, and nothing it starts: ``SCHED_FLAG_RESET_ON_FORK`` gives the
threads and processes made after it (workers, the refill, seeds, jobs, helpers) the
default slice. Taken only where the thread runs the default policy at nice 0 or above
with no such flag (an administrator's choice stays: from a negative nice the flag would
reset the jobs' nice too); undone on exit as far as the host allows (clearing the flag
needs ``CAP_SYS_NICE``; left set, it only gives new threads the default slice).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator

__all__ = ["LOOP_SLICE_NS", "loop_slice", "slice_of"]

_log = logging.getLogger("trio_worker.server")

#: The loop thread's slice while serving: about one loop step (a Status is read,
#: answered and written in ~0.35-0.5 ms of CPU). The kernel's floor is 0.1 ms.
LOOP_SLICE_NS = 300_000

_SCHED_FLAG_RESET_ON_FORK = 0x01
#: sched_setattr and sched_getattr by machine (not in Python's os module).
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}

_libc = ctypes.CDLL(None, use_errno=True)


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("policy", ctypes.c_uint32),
        ("flags", ctypes.c_uint64),
        ("nice", ctypes.c_int32),
        ("priority", ctypes.c_uint32),
        ("runtime", ctypes.c_uint64),  # a fair thread's slice, in ns (0: the default)
        ("deadline", ctypes.c_uint64),
        ("period", ctypes.c_uint64),
        ("util_min", ctypes.c_uint32),
        ("util_max", ctypes.c_uint32),
    ]


def _numbers() -> tuple[int, int] | None:
    return _SYSCALLS.get(os.uname().machine)


def _get(tid: int = 0) -> _SchedAttr:
    numbers = _numbers()
    if numbers is None:
        raise OSError(0, "no sched_getattr number for this machine")
    attr = _SchedAttr()
    if _libc.syscall(numbers[1], tid, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return attr


def _set(nice: int, slice_ns: int, flags: int) -> None:
    numbers = _numbers()
    if numbers is None:
        raise OSError(0, "no sched_setattr number for this machine")
    attr = _SchedAttr(
        size=ctypes.sizeof(_SchedAttr),
        policy=os.SCHED_OTHER,
        flags=flags,
        nice=nice,
        runtime=slice_ns,
    )
    if _libc.syscall(numbers[0], 0, ctypes.byref(attr), 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def slice_of(tid: int = 0) -> int:
    """The slice, in ns, the kernel gives thread ``tid`` (0: the calling thread)."""
    return int(_get(tid).runtime)


@contextlib.contextmanager
def loop_slice(slice_ns: int = LOOP_SLICE_NS) -> Iterator[bool]:
    """While open, the calling thread's slice is ``slice_ns`` and the threads and
    processes it makes get the default. Yields whether it took (False: left as it was)."""
    try:
        before = _get()
    except OSError:
        yield False
        return
    if (
        before.policy != os.SCHED_OTHER
        or before.flags & _SCHED_FLAG_RESET_ON_FORK
        or before.nice < 0
    ):
        yield False
        return
    try:
        _set(before.nice, slice_ns, _SCHED_FLAG_RESET_ON_FORK)
        took = _get().runtime == slice_ns  # (before 6.12 the kernel ignores it)
    except OSError as exc:
        _log.debug("the event loop keeps the kernel's slice: %s", exc.strerror)
        yield False
        return
    try:
        yield took
    finally:
        try:
            _set(before.nice, 0, 0)
        except OSError:  # (clearing the flag needs CAP_SYS_NICE)
            with contextlib.suppress(OSError):
                _set(before.nice, 0, _SCHED_FLAG_RESET_ON_FORK)
