"""One budget for the output a server connection's streams hold before the socket takes it.

What a stream holds is the message serialized and not yet queued (waiting for window or for
room in the send buffer) and what its log reader has read ahead from disk and not handed
out. Without a common bound each stream held up to a message and a disk block (about
1.3 MiB; 32 streams: ~55 MiB of RSS measured, ``tools/probe_hostile.py
small-window-spread``). Here they share :data:`OUTPUT_BUDGET`; once it is held, a stream
goes on in steps of :data:`MIN_STEP` (a smaller chunk, a smaller disk read) rather than
waiting for another stream's client to read: HTTP/2 keeps streams independent, and so do
we. A connection then holds at most ``OUTPUT_BUDGET + streams * 2 * MIN_STEP`` here.

Plain bookkeeping, no trio: the transport counts messages in and out (:attr:`unsent`), a
reader keeps its :class:`OutputShare`'s ``held`` (it is the ``ReadBudget`` of
``_jobs._output``).
"""

from __future__ import annotations

from typing import Final

__all__ = ["MIN_STEP", "OUTPUT_BUDGET", "OutputBudget", "OutputShare"]

#: Output one connection's streams may hold between them (serialized messages not yet
#: queued, disk read-ahead): four disk blocks, so a few lagging followers on one connection
#: still read whole blocks (replay and follow read 1 MiB at a time).
OUTPUT_BUDGET: Final = 4 * 1024 * 1024
#: The step of a stream once the budget is held: small enough that 1,024 of them cost little,
#: large enough that a thread round trip per step stays cheap (a slow client's pace).
MIN_STEP: Final = 64 * 1024
#: The largest step: a disk block of the output log.
MAX_STEP: Final = 1024 * 1024


class OutputBudget:
    """A connection's output budget; one :class:`OutputShare` per stream that reads."""

    __slots__ = ("_read_ahead", "total", "unsent")

    def __init__(self, total: int = OUTPUT_BUDGET) -> None:
        self.total = total
        #: bytes of messages serialized and not yet queued to h2 (the transport counts)
        self.unsent = 0
        #: what the open shares hold, kept as they change: a sum over the shares on every
        #: step cost O(streams), quadratic for a connection of 1,000 streams
        self._read_ahead = 0

    def share(self) -> OutputShare:
        """A stream's share: what its reader holds counts from now until ``close``."""
        return OutputShare(self)

    @property
    def held(self) -> int:
        return self.unsent + self._read_ahead

    def step(self) -> int:
        """The most bytes one more chunk or disk read may take now."""
        free = self.total - self.held
        return MIN_STEP if free < MIN_STEP else min(free, MAX_STEP)


class OutputShare:
    """One stream's part of an :class:`OutputBudget` (a ``_jobs._output.ReadBudget``)."""

    __slots__ = ("_budget", "_held")

    def __init__(self, budget: OutputBudget | None) -> None:
        self._budget = budget  # None once closed
        self._held = 0

    @property
    def held(self) -> int:
        """Bytes the stream's reader read ahead and has not handed out."""
        return self._held

    @held.setter
    def held(self, value: int) -> None:
        if self._budget is not None:
            self._budget._read_ahead += value - self._held
        self._held = value

    def step(self) -> int:
        return MIN_STEP if self._budget is None else self._budget.step()

    def close(self) -> None:
        """The stream is over: what it held is gone with it."""
        if self._budget is not None:
            self._budget._read_ahead -= self._held
            self._budget = None
