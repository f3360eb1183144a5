"""One budget for the output a server connection's streams hold before the socket takes it.

What a stream holds is the message serialized and not yet queued (waiting for window or for
room in the send buffer) and what its log reader has read ahead from disk and not handed
out. Without a common bound each stream held up to a message and a disk block (about
1.3 MiB; 32 streams: ~55 MiB of RSS measured, ``tools/probe_hostile.py
small-window-spread``). Here they share :data:`OUTPUT_BUDGET`; once it is held, a stream
goes on in steps of :data:`MIN_STEP` (a smaller chunk, a smaller disk read) rather than
waiting for another stream's client to read: HTTP/2 keeps streams independent, and so do
we. A connection then holds at most ``OUTPUT_BUDGET + streams * 2 * MIN_STEP`` here.

One client's connections together hold at most :data:`CLIENT_OUTPUT_BUDGET` in full steps
(:class:`ClientOutput`, shared by the budgets of its connections): beyond it each of its
streams goes on in :data:`LEAN_STEP` steps, still without waiting for the others. Without it
a client's 4,096 stalled streams (128 connections) pinned 64 KiB each, 1 GiB by the
arithmetic (``tools/probe_hostile.py many-windows``: 289 MiB of RSS measured); now at most
``CLIENT_OUTPUT_BUDGET + MAX_STEP + streams * 2 * LEAN_STEP`` (129 MiB at 4,096 streams).

Plain bookkeeping, no trio: the transport counts messages in and out (:attr:`unsent`), a
reader keeps its :class:`OutputShare`'s ``held`` (it is the ``ReadBudget`` of
``_jobs._output``).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLIENT_OUTPUT_BUDGET",
    "LEAN_STEP",
    "MIN_STEP",
    "OUTPUT_BUDGET",
    "ClientOutput",
    "OutputBudget",
    "OutputShare",
]

#: Output one connection's streams may hold between them (serialized messages not yet
#: queued, disk read-ahead): four disk blocks, so a few lagging followers on one connection
#: still read whole blocks (replay and follow read 1 MiB at a time).
OUTPUT_BUDGET: Final = 4 * 1024 * 1024
#: The step of a stream once the budget is held: small enough that 1,024 of them cost little,
#: large enough that a thread round trip per step stays cheap (a slow client's pace).
MIN_STEP: Final = 64 * 1024
#: The largest step: a disk block of the output log.
MAX_STEP: Final = 1024 * 1024
#: Output all one client's connections may hold in full steps (as the 32 MiB of requests,
#: ``MAX_CLIENT_BUFFERED_REQUESTS``): 64 MiB, sixteen connections' whole budgets, so a
#: client's followers on many channels read as before.
CLIENT_OUTPUT_BUDGET: Final = 64 * 1024 * 1024
#: A stream's step while its client holds more than that: what each of thousands of stalled
#: streams keeps, and a live stream of the same client still moves (in smaller reads).
LEAN_STEP: Final = 8 * 1024


class ClientOutput:
    """What one client's connections' output budgets hold together. Plain bookkeeping:
    each :class:`OutputBudget` adds its changes; the transport keeps one per client while
    it has connections."""

    __slots__ = ("held", "total")

    def __init__(self, total: int = CLIENT_OUTPUT_BUDGET) -> None:
        self.total = total
        self.held = 0


class OutputBudget:
    """A connection's output budget; one :class:`OutputShare` per stream that reads."""

    __slots__ = ("_client", "_read_ahead", "_unsent", "total")

    def __init__(self, total: int = OUTPUT_BUDGET, client: ClientOutput | None = None) -> None:
        self.total = total
        self._client = client  # its client's connections' budgets together, if counted
        self._unsent = 0
        #: what the open shares hold, kept as they change: a sum over the shares on every
        #: step cost O(streams), quadratic for a connection of 1,000 streams
        self._read_ahead = 0

    @property
    def unsent(self) -> int:
        """Bytes of messages serialized and not yet queued to h2 (the transport counts)."""
        return self._unsent

    @unsent.setter
    def unsent(self, value: int) -> None:
        if self._client is not None:
            self._client.held += value - self._unsent
        self._unsent = value

    def _add_read_ahead(self, change: int) -> None:
        self._read_ahead += change
        if self._client is not None:
            self._client.held += change

    def share(self) -> OutputShare:
        """A stream's share: what its reader holds counts from now until ``close``."""
        return OutputShare(self)

    @property
    def held(self) -> int:
        return self.unsent + self._read_ahead

    def step(self) -> int:
        """The most bytes one more chunk or disk read may take now."""
        client = self._client
        if client is not None and client.held >= client.total:
            return LEAN_STEP
        free = self.total - self.held
        if free < MIN_STEP:
            return MIN_STEP
        if client is not None:
            free = min(free, max(client.total - client.held, MIN_STEP))
        return min(free, MAX_STEP)


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
            self._budget._add_read_ahead(value - self._held)
        self._held = value

    def step(self) -> int:
        return MIN_STEP if self._budget is None else self._budget.step()

    def close(self) -> None:
        """The stream is over: what it held is gone with it."""
        if self._budget is not None:
            self._budget._add_read_ahead(-self._held)
            self._budget = None
