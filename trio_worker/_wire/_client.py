"""The client's sans-I/O core: purerpc's ``GRPCConnection`` on h2, client side.

Bytes in, events out, no trio: request headers pre-encoded once per method (``grpc-timeout``
from the caller's deadline), the response's headers and trailers (with their status
details) and DATA as events, RST_STREAM and GOAWAY as events too. The trio driver is
``trio_worker.client``; the server's core is ``_h2server``, and both stand on ``_h2conn``'s
h2 base, bounds and HPACK helpers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import h2.errors
import h2.events
import h2.settings
import hpack
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import ResponseEnded, ResponseReceived, WindowUpdated
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError
from purerpc.grpclib.headers import HeaderDict
from purerpc.grpclib.status import Status

from .. import __version__
from ._h2conn import (
    MAX_MESSAGE,
    PROTOCOL_ERROR,
    BoundedDecoder,
    PeerMisbehaved,
    WireGRPCConnection,
    WireH2Connection,
    h2_config,
    hpack_literal,
)
from ._status import DETAILS_HEADER, StatusCode, bound_text, details_from_header
from ._window import MESSAGE_PREFIX

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final

USER_AGENT: Final = f"trio-worker/{__version__} purerpc"
#: The receive window we advertise for each stream: what the server may send beyond what
#: the consumer has made room for.
STREAM_WINDOW: Final = 1024 * 1024
#: The connection window is not what bounds memory (stream windows are), so it is as large
#: as HTTP/2 allows: a stream whose consumer stalls never starves the others.
CONNECTION_WINDOW: Final = 2**31 - 1
#: Largest frame we accept: whole output chunks arrive in one frame.
MAX_FRAME: Final = 1024 * 1024
#: Largest decoded response header list (headers or trailers): a server's are a few
#: hundred bytes, with a status message of at most 1 KiB and details of a few hundred.
MAX_HEADER_LIST: Final = 64 * 1024


def grpc_timeout(seconds: float) -> str:
    """A grpc-timeout value: at most 8 digits, in the finest unit that fits."""
    seconds = max(seconds, 0.0)
    for unit, scale in (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60)):
        value = math.ceil(seconds * scale)
        if value <= 99_999_999:
            return f"{value}{unit}"
    return f"{min(math.ceil(seconds / 3600), 99_999_999)}H"


# --- the sans-I/O layer: purerpc's GRPCConnection, client side ---------------------------


class ResponseData:
    """DATA on a stream: raw bytes and their flow-controlled length (with padding)."""

    __slots__ = ("data", "flow", "stream_id")

    def __init__(self, stream_id: int, data: bytes, flow: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow = flow


class StreamEnded:
    """END_STREAM on a stream (after trailers, or without them: a broken response)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamResetByPeer:
    """The server reset a stream (RST_STREAM)."""

    __slots__ = ("error_code", "stream_id")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class GoAwayReceived:
    """The server sent GOAWAY: streams above ``last_stream_id`` were never processed.
    ``reason``: its debug data, printable and at most 200 characters (the server's words,
    e.g. why it refused the connection), empty if none."""

    __slots__ = ("error_code", "last_stream_id", "reason")

    def __init__(self, error_code: int, last_stream_id: int, reason: str = "") -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.reason = reason


class BadResponse:
    """Response headers or trailers that are not gRPC: that call fails, the others go on."""

    __slots__ = ("reason", "stream_id")

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


class MessageRefused(Exception):
    """A response message we will not read: the call fails with ``code``, the others go on."""

    def __init__(self, code: StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MessageReader:
    """One stream's DATA → its length-prefixed gRPC messages, each at most
    :data:`MAX_MESSAGE` bytes (so a partial message holds at most that much).

    A message that lies whole in a DATA payload and makes most of it is kept as a view of
    it (no copy; a view pins at most twice its size); smaller ones are copied, and messages
    spanning frames are assembled in ``partial``.
    """

    __slots__ = ("messages", "partial", "queued")

    def __init__(self) -> None:
        self.messages: deque[bytes | memoryview] = deque()
        #: bytes of complete messages not taken yet
        self.queued = 0
        self.partial = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received that the consumer has not taken."""
        return self.queued + len(self.partial)

    def feed(self, data: bytes) -> None:
        """Split ``data`` into messages; raises :class:`MessageRefused` on a prefix we will
        not read (compressed, or over :data:`MAX_MESSAGE`)."""
        buf = self.partial
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data
        total = len(source)
        pos = 0
        view = memoryview(source)
        try:
            while total - pos >= 5:
                compressed, length = MESSAGE_PREFIX.unpack_from(source, pos)
                if compressed:
                    raise MessageRefused(
                        StatusCode.INTERNAL, "the server sent a compressed message"
                    )
                if length > MAX_MESSAGE:
                    raise MessageRefused(
                        StatusCode.RESOURCE_EXHAUSTED,
                        f"response message of {length} bytes is over {MAX_MESSAGE}",
                    )
                end = pos + 5 + length
                if end > total:
                    break
                if source is buf or 2 * length < total:  # buf is trimmed below
                    self.messages.append(bytes(view[pos + 5 : end]))
                else:
                    self.messages.append(view[pos + 5 : end])
                self.queued += length
                pos = end
            if source is not buf and pos < total:
                self.partial = bytearray(view[pos:])
        finally:
            view.release()
        if source is buf and pos:
            del buf[:pos]

    def take(self) -> bytes | memoryview:
        message = self.messages.popleft()
        self.queued -= len(message)
        return message

    def clear(self) -> None:
        """Drop what is buffered (the call failed)."""
        self.messages.clear()
        self.queued = 0
        self.partial = bytearray()


class RequestHeaders(list[tuple[str, str]]):
    """A request's header list together with its HPACK block, encoded once per method."""

    block: bytes


def request_headers(path: str, authority: str) -> RequestHeaders:
    headers = RequestHeaders(
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc+proto"),
            ("user-agent", USER_AGENT),
        ]
    )
    headers.block = (
        b"\x83"  # static entry 3, ":method: POST"
        + b"\x87"  # static entry 7, ":scheme: https"
        + hpack_literal(":path", path, 4)
        + hpack_literal(":authority", authority, 1)
        + hpack_literal("te", "trailers")
        + hpack_literal("content-type", "application/grpc+proto", 31)
        + hpack_literal("user-agent", USER_AGENT, 58)
    )
    return headers


def with_timeout(base: RequestHeaders, timeout: float) -> RequestHeaders:
    value = grpc_timeout(timeout)
    headers = RequestHeaders([*base, ("grpc-timeout", value)])
    headers.block = base.block + hpack_literal("grpc-timeout", value)
    return headers


class RequestEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder, handing out our pre-encoded request blocks (hpack spends more time
    on a request's headers than everything else the client does for a small call)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        # A pending table size change must lead the next block: let hpack write that one.
        if type(headers) is RequestHeaders and not self.header_table.resized:
            return headers.block
        return bytes(super().encode(headers, huffman))


class ClientH2Connection(WireH2Connection):
    """h2's connection, kept usable after a GOAWAY and handing out output without a copy.

    h2 3.x closes its state machine on GOAWAY and drops unsent output, after which it would
    refuse the WINDOW_UPDATEs the streams the server is still finishing need (a graceful
    drain). We only stop opening streams on this connection.
    """

    _data_to_send: bytearray

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class GRPCClientConnection(WireGRPCConnection):
    """purerpc's ``GRPCConnection`` for a client, with our settings and complete events.

    purerpc's version raises out of ``receive_data`` on a malformed response (losing the
    other events of that read), drops RST_STREAM and GOAWAY, and reassembles messages in a
    buffer it acknowledges by itself; messages (:class:`MessageReader`) and flow control
    are the driver's here. The server's frames go through the same gate and bounds as a
    client's do on the server (``receive_frames``; :meth:`calm_down` on a broken one).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` (seconds) refills the flood budget."""
        # Not super().__init__(): it builds a plain H2Connection with purerpc's settings.
        self.config = GRPCConfiguration(
            client_side=True, user_agent=USER_AGENT, max_message_length=MAX_MESSAGE
        )
        h2c = ClientH2Connection(h2_config(client_side=True))
        h2c.encoder = RequestEncoder()
        h2c.decoder = BoundedDecoder()  # the server repeats its header blocks
        h2c.decoder.max_header_list_size = MAX_HEADER_LIST
        codes = h2.settings.SettingCodes
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                # MAX_CONCURRENT_STREAMS is left unlimited although the server opens no
                # streams: h2 checks it before noticing that HEADERS are for a stream we
                # reset (trailers crossing our RST_STREAM), and 0 would kill the connection.
                codes.ENABLE_PUSH: 0,
                codes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                codes.MAX_FRAME_SIZE: MAX_FRAME,
                codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        h2c.max_inbound_frame_size = MAX_FRAME
        self.h2_connection: ClientH2Connection = h2c
        self.message_read_buffers: dict[int, Any] = {}
        self.settings_received = False
        self._open_gate(MAX_FRAME, server=False, clock=clock)

    def initiate_connection(self) -> None:
        h2c = self.h2_connection
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - int(h2c.inbound_flow_control_window))

    def _request_received(self, event: Any) -> list[Any]:
        # HEADERS on a stream the server opened (even id): servers push nothing here.
        raise PeerMisbehaved(PROTOCOL_ERROR, f"the server opened stream {event.stream_id}")

    def _response_received(self, event: Any) -> list[Any]:
        headers = HeaderDict(event.headers)
        stream_id: int = event.stream_id
        try:
            received = ResponseReceived.parse_from_stream_id_and_headers_destructive(
                stream_id, headers
            )
            if event.stream_ended:  # trailers-only: the status is in these headers
                return [received, response_ended(stream_id, event.headers, headers)]
        except (GRPCProtocolError, KeyError, ValueError, TypeError) as exc:
            return [BadResponse(stream_id, f"not a gRPC response ({exc})")]
        return [received]

    def _trailers_received(self, event: Any) -> list[Any]:
        try:
            return [response_ended(event.stream_id, event.headers, HeaderDict(event.headers))]
        except (GRPCProtocolError, KeyError, ValueError, TypeError) as exc:
            return [BadResponse(event.stream_id, f"malformed trailers ({exc})")]

    def _data_received(self, event: Any) -> list[Any]:
        return [ResponseData(event.stream_id, event.data, event.flow_controlled_length)]

    def _stream_ended(self, event: Any) -> list[Any]:
        return [StreamEnded(event.stream_id)]

    def _stream_reset(self, event: Any) -> list[Any]:
        return [StreamResetByPeer(event.stream_id, int(event.error_code))]

    def _connection_terminated(self, event: Any) -> list[Any]:
        data = (event.additional_data or b"")[:200].decode("utf-8", "replace")
        reason = "".join(c for c in data if c.isprintable())
        return [GoAwayReceived(int(event.error_code), int(event.last_stream_id), reason)]

    def _remote_settings_changed(self, event: Any) -> list[Any]:
        self.settings_received = True
        return [WindowUpdated(stream_id=0, delta=1)]


#: Highest grpc-status we take from a server (gRPC's codes end at 16; a few more are left
#: for codes of the future): a peer's 4,000-digit number is not a status.
_MAX_STATUS_CODE: Final = 63


def response_ended(stream_id: int, raw: list[tuple[str, str]], headers: HeaderDict) -> Any:
    """ResponseEnded, with ``details``: the raw ``grpc-status-details-bin`` (purerpc drops
    every ``grpc-`` header it does not know)."""
    ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(stream_id, headers)
    code = int(ended.status.int_value)
    if not 0 <= code <= _MAX_STATUS_CODE:
        raise ValueError(f"grpc-status {bound_text(str(code), 32)} is not a status code")
    # The message is only for people and ends up in an exception: cut to what we send.
    ended.status = Status(code, bound_text(str(ended.status.status_message)))
    ended.details = None
    for name, value in raw:
        if name == DETAILS_HEADER:
            ended.details = details_from_header(value)
            break
    return ended
