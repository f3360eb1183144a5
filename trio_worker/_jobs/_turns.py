"""Turns of the event loop: which ready work runs first.

During a Start burst the loop runs one piece of work after another; a Status (answered
in its connection's reader, in one step) waits for whatever runs before it. Work that
is not a reply, such as a Start's later pieces or a job's end, lets what the next poll
finds run first (``let_io_first``). ARCHITECTURE.md, "The loop during a Start burst".
"""

from __future__ import annotations

import trio

__all__ = ["let_io_first"]


async def let_io_first() -> None:
    """Two schedule points and no cancel point: the tasks that the loop's next poll
    for I/O wakes run before the rest of this task's work.

    The tasks ready at once run as one batch, in either order (trio reverses half of
    them): after one yield, the rest would run before a Status that just arrived
    half the time; after the second, never. A Start's loop work comes in pieces of
    ~0.2-0.4 ms, and a Status queued behind them waits for one piece at most.
    """
    await trio.lowlevel.cancel_shielded_checkpoint()
    await trio.lowlevel.cancel_shielded_checkpoint()
