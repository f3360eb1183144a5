"""Turns of the event loop: which ready work runs first.

During a Start burst the loop runs one piece of work after another; a Status (answered
in its connection's reader, in one step) waits for whatever runs before it. Work that
is not a reply, such as a Start's later pieces or a job's end, lets what the next poll
finds run first (``Turns.let_io_first``). ARCHITECTURE.md, "The loop during a Start burst".
"""

from __future__ import annotations

from collections.abc import Callable

import trio

__all__ = ["Turns", "let_io_first"]


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


class Turns:
    """``let_io_first`` for one supervisor, skipped when no input waits.

    ``input_waiting`` (set by the server: its connections' sockets, polled without
    waiting, and the bytes its readers hold) says whether a Status could be waiting to
    be read or handled. When none is, the two turns of the loop would let no reply go
    first, and a Start's path would pay them anyway (three pairs per Start + Wait, ~30
    us of the loop each). None (a library's supervisor): every piece takes its turns.
    """

    __slots__ = ("input_waiting",)

    def __init__(self) -> None:
        self.input_waiting: Callable[[], bool] | None = None

    async def let_io_first(self) -> None:
        """``let_io_first``, or nothing (no schedule point) when no input waits."""
        waiting = self.input_waiting
        if waiting is None or waiting():
            await trio.lowlevel.cancel_shielded_checkpoint()
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def let_io_first_after_checkpoint(self) -> None:
        """A checkpoint (a cancel point), then a second turn if input waits."""
        await trio.lowlevel.checkpoint()
        waiting = self.input_waiting
        if waiting is None or waiting():
            await trio.lowlevel.cancel_shielded_checkpoint()
