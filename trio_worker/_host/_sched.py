"""The event loop's thread ahead of the server's other work on the CPU.

A reply waits for the loop thread, and the loop thread waited for the CPU: during a
Start burst on 2 cores it shares them with the places' refill, the store's thread, the
jobs, and the clients it wakes (a reply's TLS write woke the client, which preempted
the loop on its CPU: 43 us of CPU took 336 us of wall). At nice -5 (weight 3121 against
1024) the kernel lets the loop run on when it wakes another task and puts it back on a
CPU sooner when it wakes. Only the loop's thread: ``SCHED_RESET_ON_FORK`` gives the
threads and processes it makes (workers, the refill, seeds, jobs, helpers) nice 0.

Taken only where the thread runs at nice 0 with the default policy (an administrator's
choice stays) and the host lets it (``CAP_SYS_NICE`` or ``RLIMIT_NICE``); undone on exit.
Threads do not inherit a lower priority here: a worker holding the GIL is never below
the loop's other work (a refill thread at ``SCHED_IDLE`` was tried: the loop then
waited for the GIL behind a thread that waited for a CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["LOOP_NICE", "loop_ahead"]

_log = logging.getLogger("trio_worker.server")

#: The loop thread's nice value while serving.
LOOP_NICE = -5


@contextlib.contextmanager
def loop_ahead(nice: int = LOOP_NICE) -> Iterator[bool]:
    """While open, the calling thread runs at ``nice`` and what it starts at 0.
    Yields whether it took (False: left as it was)."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, 0)  # (Linux: the calling thread)
        policy = os.sched_getscheduler(0)
    except OSError:
        yield False
        return
    if before != 0 or policy != os.SCHED_OTHER:
        yield False
        return
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (clearing the flag may need the privilege)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        _log.debug("the event loop keeps its priority: %s", exc.strerror)
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, before)
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
