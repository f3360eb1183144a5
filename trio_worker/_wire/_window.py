"""Inbound flow control, one design for both ends: a stream's window follows its consumer.

Received DATA goes back to the *connection's* window at once: the connection window is not
what bounds memory, and a stream whose consumer stalls must not starve the others. It goes
back to the *stream's* window (h2 then sends WINDOW_UPDATE) only while at most
``hold_above`` bytes of that stream's received messages wait for their consumer, and
otherwise as the consumer takes them. The peer can send at most one stream window beyond
what is held back, so a stream never buffers more than ``hold_above`` + one window + one
message (a partial one, bounded by the message cap), however slow its consumer.

The server holds a stream of requests with ``hold_above=0``: nothing goes back while a
request waits for the handler, so a client sending faster than the handler reads is held
to one window. The client holds each response stream with ``ACK_BELOW`` (512 KiB): output
keeps flowing while its consumer is a little behind. A message counts with its 5-byte
prefix, so empty messages are held back too.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final

__all__ = ["MESSAGE_OVERHEAD", "MESSAGE_PREFIX", "StreamWindow"]

#: A gRPC message's prefix: compressed flag, length.
MESSAGE_PREFIX: Final = struct.Struct(">BI")
#: What a message costs the window beyond its payload: that prefix.
MESSAGE_OVERHEAD: Final = MESSAGE_PREFIX.size


class StreamWindow:
    """One stream's received bytes not yet handed back to its window, and what of its
    messages waits for the consumer. Each method returns the bytes to hand back to the
    stream's window now (``acknowledge_stream_data``), 0 for none."""

    __slots__ = ("hold_above", "owed", "waiting")

    def __init__(self, hold_above: int) -> None:
        self.hold_above = hold_above
        #: flow-controlled bytes received and not yet handed back to the stream's window
        self.owed = 0
        #: bytes (with prefixes) of complete messages the consumer has not taken
        self.waiting = 0

    def received(self, flow: int, delivered: int = 0) -> int:
        """``flow`` bytes arrived, completing messages of ``delivered`` bytes (prefixes
        included)."""
        self.owed += flow
        self.waiting += delivered
        return self._release()

    def taken(self, size: int) -> int:
        """The consumer took a message of ``size`` bytes (its prefix included)."""
        self.waiting = max(0, self.waiting - size)
        return self._release()

    def _release(self) -> int:
        owed = self.owed
        if owed and self.waiting <= self.hold_above:
            self.owed = 0
            return owed
        return 0
