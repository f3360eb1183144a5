"""Whose turn it is to handle a read among one client's connections.

A connection starts the calls one read brought ``MAX_CALLS_PER_TURN`` per turn of the loop
(``_transport._Connection._start_calls``), but a client may hold 128 connections: if each
started its share in the same turn, one turn would run 2,048 calls' first steps and every
other client's call would wait for all of them (a bystander's Status waited 0.2-0.26 s
when such a client opened 4,096 streams at once). Parsing what it read is ~3 ms for 32
streams too, and the 128 reads come in the same poll for I/O. So one connection of a
client handles a read at a time, from its parsing to its last call started, and keeps
the turn until the loop has polled again; the others wait in the order they asked.
Another client's connections have turns of their own and never wait for this one's.
"""

from __future__ import annotations

from collections import deque
from typing import final

import trio

__all__ = ["ClientStarts"]


@final
class ClientStarts:
    """The turn to handle a read, held by one connection of a client at a time (FIFO).

    A connection takes the turn before it parses what it read (``take``: at once if it
    is free and nobody waits), keeps it across the shares of calls it starts, and gives
    it up once all its new calls are started and the loop has polled for I/O again, or
    when it is over (``give_up``), handing it to the first in line. One event loop, no
    locking.
    """

    __slots__ = ("_waiting", "connections", "holder")

    def __init__(self) -> None:
        self.holder: object | None = None
        self._waiting: deque[tuple[object, trio.Event]] = deque()
        #: connections of the client that share it (the server drops it at 0)
        self.connections = 0

    def take(self, connection: object) -> bool:
        """Whether ``connection`` may handle its read now: it holds the turn, or takes
        it free (nobody waits then: ``give_up`` hands it to the first in line)."""
        if self.holder is None:
            self.holder = connection
        return self.holder is connection

    async def wait(self, connection: object) -> None:
        """Until ``connection`` holds the turn (it asked after those already waiting)."""
        if self.take(connection):
            await trio.lowlevel.checkpoint()
            return
        handed = trio.Event()
        entry = (connection, handed)
        self._waiting.append(entry)
        try:
            await handed.wait()
        except BaseException:
            if self.holder is connection:  # handed over just as it was cancelled
                self.give_up(connection)
            elif entry in self._waiting:  # (not if its connection gave up meanwhile)
                self._waiting.remove(entry)
            raise

    def give_up(self, connection: object) -> None:
        """``connection`` is done with its read (or over): the next in line holds it.
        A connection that does not hold the turn leaves the line."""
        if self.holder is not connection:
            for entry in self._waiting:
                if entry[0] is connection:
                    self._waiting.remove(entry)
                    break
            return
        self.holder = None
        if self._waiting:
            following, handed = self._waiting.popleft()
            self.holder = following
            handed.set()
