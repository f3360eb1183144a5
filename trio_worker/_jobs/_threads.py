"""A call in one of trio's cached worker threads, without ``trio.to_thread``'s extras.

``trio.to_thread.run_sync`` costs each call a capacity limiter, a copy of the context,
``from_thread``'s plumbing, and the naming of the OS thread for the call and back (two
ctypes calls in the worker). The calls the server makes per job (the store's commits, the
places' refill) use none of it, and paid for it in both threads: a round trip of nothing
cost the loop 50 us and the worker 17 us that way, 23 and 9 us this way (load 8). Same
threads (``trio.lowlevel.start_thread_soon``: trio's thread cache), same delivery of the
result (``run_sync_soon``).
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

    Not cancellable (its callers shield it): it returns when ``fn`` did. A thread that
    cannot be started raises ``RuntimeError`` here, as ``to_thread`` does.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[_T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver)
    return cast(_T, await trio.lowlevel.wait_task_rescheduled(_not_now))


def _not_now(raise_cancel: Callable[[], NoReturn]) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
