"""A worker thread's round trip for the supervisor's own blocking calls.

``trio.to_thread.run_sync`` through the same thread cache, without what the store's
commits and the places' refill do not use, and paid for in both threads on every call:
a limiter (each of them runs one call at a time), a copy of the context,
``from_thread``'s plumbing, and naming the OS thread for the call and back (two ctypes
calls in the worker). A round trip of nothing: the loop's part 50 -> 23 us, the
worker's 17 -> 9 us (ARCHITECTURE.md, "What a job's records cost").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar, cast

import trio

if TYPE_CHECKING:
    import outcome  # (trio's own dependency)

__all__ = ["in_thread"]

_T = TypeVar("_T")


async def in_thread(fn: Callable[[], _T]) -> _T:
    """``fn()`` in one of trio's cached worker threads: its result, once it returned.

    Not cancellable (its callers shield it): it returns when ``fn`` did. No thread to be
    had raises ``RuntimeError`` here, as ``to_thread`` does.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver)
    return cast(_T, await trio.lowlevel.wait_task_rescheduled(_not_now))


def _not_now(raise_cancel: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
