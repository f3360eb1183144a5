"""A client call's state, sans-I/O, for both client drivers (trio's ``_net/_channel`` and
the blocking ``_net/_blocking``): its response messages (the core's ``MessageReader``), its
stream window (``_window``: handed back while under ``ACK_BELOW`` bytes wait for the
caller), and how it ended, in the exceptions the drivers raise to their callers.
"""

from __future__ import annotations

from typing import Any, Final

import h2.errors

from ._client import MessageReader
from ._status import StatusCode
from ._window import MESSAGE_OVERHEAD, StreamWindow

__all__ = [
    "ACK_BELOW",
    "CallFailed",
    "ClientCall",
    "Unprocessed",
    "ended_status",
    "reset_failure",
]

#: Received data goes back to a response stream's window at once while at most this many
#: bytes of its messages wait for the caller; beyond it, as the caller takes them.
ACK_BELOW: Final = 512 * 1024


class Unprocessed(Exception):
    """The server never processed this call (GOAWAY below its id, or it could not be sent
    on this connection any more): safe to send again on another connection."""


class CallFailed(Exception):
    """The call ended with a non-OK gRPC status (ours, for a response we cannot read)."""

    def __init__(self, code: int, message: str, details: bytes | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = details


class ClientCall(MessageReader):
    """One call's stream: its response messages as they arrive, its window, its end."""

    __slots__ = ("done", "error", "status", "stream_id", "window")

    def __init__(self, stream_id: int) -> None:
        super().__init__()
        self.stream_id = stream_id
        self.window = StreamWindow(ACK_BELOW)
        #: nothing more will arrive
        self.done = False
        self.status: tuple[int, str, bytes | None] | None = None
        self.error: BaseException | None = None

    def data_received(self, data: bytes, flow: int) -> int:
        """One DATA payload (``flow`` flow-controlled bytes); returns the bytes to hand
        back to the stream's window now. Raises ``MessageRefused``."""
        queued, count = self.queued, len(self.messages)
        self.feed(data)
        delivered = self.queued - queued + MESSAGE_OVERHEAD * (len(self.messages) - count)
        return self.window.received(flow, delivered)

    def take_message(self) -> tuple[bytes | memoryview, int]:
        """The next message, and the bytes to hand back to the stream's window now."""
        message = self.take()
        return message, self.window.taken(len(message) + MESSAGE_OVERHEAD)

    def finish(
        self,
        status: tuple[int, str, bytes | None] | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """Record how the call ended (the first end wins); False if it had ended already."""
        if self.done:
            return False
        self.done = True
        self.status = status
        self.error = error
        return True

    def outcome(self) -> None:
        """Raise what ended the call, unless it was OK."""
        if self.error is not None:
            raise self.error
        assert self.status is not None
        code, message, details = self.status
        if code != StatusCode.OK:
            raise CallFailed(code, message, details)


def ended_status(event: Any) -> tuple[int, str, bytes | None]:
    """A ``ResponseEnded``'s status: (code, message, serialized details or None)."""
    status = event.status
    return int(status.int_value), str(status.status_message), event.details


def reset_failure(code: int) -> CallFailed:
    """What a RST_STREAM from the server means for the call."""
    if code == h2.errors.ErrorCodes.REFUSED_STREAM:
        return CallFailed(
            StatusCode.RESOURCE_EXHAUSTED, "the server refused the call (too many calls)"
        )
    if code == h2.errors.ErrorCodes.CANCEL:
        return CallFailed(StatusCode.CANCELLED, "the server cancelled the call")
    try:
        name = h2.errors.ErrorCodes(code).name
    except ValueError:
        name = str(code)
    return CallFailed(StatusCode.INTERNAL, f"the server reset the call ({name})")
