"""A client connection's calls, sans-I/O, for both client drivers (trio's ``_net/_channel``
and the blocking ``_net/_blocking``): each call's response messages (the core's
``MessageReader``), its stream window (``_window``: handed back while at most ``ACK_BELOW``
bytes wait for the caller) and how it ended, in the exceptions the drivers raise to their
callers; :class:`CallTable` files the client core's events to the calls they concern.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress

import h2.errors
import h2.exceptions
from purerpc.grpclib.events import ResponseEnded, ResponseReceived

from ._client import (
    BadResponse,
    GoAwayReceived,
    MessageReader,
    MessageRefused,
    ResponseData,
    StreamEnded,
    StreamResetByPeer,
)
from ._h2conn import WireH2Connection
from ._status import StatusCode
from ._window import MESSAGE_OVERHEAD, StreamWindow

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final, Generic, TypeVar

    C = TypeVar("C", bound="ClientCall")
else:
    C = None

    class Generic:
        """``typing.Generic`` as ``CallTable`` needs it at run time: a base whose
        subscription (``CallTable[BlockingCall]``) is the class itself."""

        __slots__ = ()

        def __class_getitem__(cls, item: object) -> type:
            return cls


__all__ = [
    "ACK_BELOW",
    "PING_AFTER",
    "PING_TIMEOUT",
    "CallFailed",
    "CallTable",
    "ClientCall",
    "Unprocessed",
    "ended_status",
    "reset_failure",
]

#: Received data goes back to a response stream's window at once while at most this many
#: bytes of its messages wait for the caller; beyond it, as the caller takes them.
ACK_BELOW: Final = 512 * 1024
#: While calls wait, a client pings a connection silent this long...
PING_AFTER: Final = 10.0
#: ...and gives it up when nothing at all arrives this long after the ping: a server that
#: vanished without a FIN cannot hang a call.
PING_TIMEOUT: Final = 10.0


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


class CallTable(Generic[C]):
    """A client connection's calls by stream id: the core's events filed to the calls they
    concern, and what ending a call does to its stream. The drivers add their waiting."""

    __slots__ = ("_h2", "calls", "goaway", "goaway_reason")

    def __init__(self, h2c: WireH2Connection) -> None:
        self._h2 = h2c
        self.calls: dict[int, C] = {}
        #: the server sent GOAWAY: no new streams here
        self.goaway = False
        #: the words of a GOAWAY that was not a graceful one (NO_ERROR), if it had any
        self.goaway_reason = ""

    def on_event(self, event: Any) -> C | None:
        """File one event; returns the call it concerns (fed, or ended), None for the
        connection's own events and for calls no longer here."""
        kind = type(event)
        if kind is ResponseData and event.flow:
            # The connection's window goes back at once (``_window``), whoever the DATA
            # was for (a call reset by us included).
            self._h2.acknowledge_connection_data(event.flow)
        elif kind is GoAwayReceived:
            self.goaway = True
            if event.error_code and event.reason:
                self.goaway_reason = event.reason
            for unseen in [c for c in self.calls.values() if c.stream_id > event.last_stream_id]:
                self.end(unseen, error=Unprocessed())
            return None
        call = self.calls.get(getattr(event, "stream_id", 0))
        if call is None:
            return None
        if kind is ResponseData:
            try:
                self.release(call, call.data_received(event.data, event.flow))
            except MessageRefused as exc:
                self.fail(call, CallFailed(exc.code, exc.reason))
        elif kind is ResponseEnded:
            self.end(call, status=ended_status(event))
        elif kind is ResponseReceived:
            if event.message_encoding not in (None, "identity"):
                reason = f"the server used grpc-encoding {event.message_encoding}"
                self.fail(call, CallFailed(StatusCode.INTERNAL, reason))
        elif kind is StreamEnded:  # END_STREAM without trailers
            self.end(call, error=CallFailed(StatusCode.INTERNAL, "the server sent no status"))
        elif kind is StreamResetByPeer:
            self.end(call, error=reset_failure(event.error_code))
        elif kind is BadResponse:
            self.fail(call, CallFailed(StatusCode.INTERNAL, event.reason))
        else:
            return None
        return call

    def add(self, call: C) -> None:
        self.calls[call.stream_id] = call

    def end(
        self,
        call: C,
        *,
        status: tuple[int, str, bytes | None] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The call is over: its outcome delivered, its slot freed."""
        self.calls.pop(call.stream_id, None)
        call.finish(status, error)

    def fail(self, call: C, error: BaseException) -> None:
        """End a call the server has not ended (a response we cannot read, a caller who
        gave up): its stream is reset and what it buffered dropped."""
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(call.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.end(call, error=error)
        call.clear()

    def end_all(self, error: Callable[[], BaseException]) -> int:
        """The connection is lost: every call ends with ``error()``; how many there were."""
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            call.finish(error=error())
        return len(calls)

    def take(self, call: C) -> tuple[bytes | memoryview | None, bool] | None:
        """What the caller of ``call`` gets now: (its next message, whether window went
        back with it: output to write), (None, False) once it is over (raising what ended
        it, unless OK), or None when it must wait for more."""
        if call.messages:
            message, release = call.take_message()
            self.release(call, release)
            return message, bool(release)
        if call.done:
            call.outcome()
            return None, False
        return None

    def release(self, call: C, size: int) -> None:
        """Hand ``size`` received bytes back to the call's stream window (h2 sends
        WINDOW_UPDATE in batches)."""
        if size:
            self._h2.acknowledge_stream_data(size, call.stream_id)
