"""The client's sans-I/O core: purerpc's ``GRPCConnection`` on h2, client side.

Bytes in, events out, no trio: request headers pre-encoded once per method (``grpc-timeout``
from the caller's deadline), the response's headers and trailers (with their status
details) and DATA as events, RST_STREAM and GOAWAY as events too. The trio driver is
``trio_worker.client``; the server's core is ``_h2conn``, whose h2 base, bounds and HPACK
helpers this one shares.
"""

from __future__ import annotations

import math
from typing import Any, Final

import h2.errors
import h2.events
import h2.settings
import hpack
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import ResponseEnded, ResponseReceived, WindowUpdated
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError
from purerpc.grpclib.headers import HeaderDict

from .. import __version__
from ._h2conn import (
    BoundedDecoder,
    FrameGate,
    WireGRPCConnection,
    WireH2Connection,
    h2_config,
    hpack_literal,
)
from ._status import DETAILS_HEADER, details_from_header

USER_AGENT: Final = f"trio-worker/{__version__} purerpc"
#: The receive window we advertise for each stream: what the server may send beyond what
#: the consumer has made room for.
STREAM_WINDOW: Final = 1024 * 1024
#: The connection window is not what bounds memory (stream windows are), so it is as large
#: as HTTP/2 allows: a stream whose consumer stalls never starves the others.
CONNECTION_WINDOW: Final = 2**31 - 1
#: Largest frame we accept: whole output chunks arrive in one frame.
MAX_FRAME: Final = 1024 * 1024
#: Largest response message (a List of very many jobs); a guard against garbage lengths.
MAX_MESSAGE: Final = 64 * 1024 * 1024
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
    """The server sent GOAWAY: streams above ``last_stream_id`` were never processed."""

    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


class BadResponse:
    """Response headers or trailers that are not gRPC: that call fails, the others go on."""

    __slots__ = ("reason", "stream_id")

    def __init__(self, stream_id: int, reason: str) -> None:
        self.stream_id = stream_id
        self.reason = reason


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
    buffer it acknowledges by itself; messages and flow control are the transport's here.
    """

    def __init__(self) -> None:
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
        self.gate = FrameGate(MAX_FRAME, server=False)

    def initiate_connection(self) -> None:
        h2c = self.h2_connection
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - int(h2c.inbound_flow_control_window))

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
        return [GoAwayReceived(int(event.error_code), int(event.last_stream_id))]

    def _remote_settings_changed(self, event: Any) -> list[Any]:
        self.settings_received = True
        return [WindowUpdated(stream_id=0, delta=1)]


def response_ended(stream_id: int, raw: list[tuple[str, str]], headers: HeaderDict) -> Any:
    """ResponseEnded, with ``details``: the raw ``grpc-status-details-bin`` (purerpc drops
    every ``grpc-`` header it does not know)."""
    ended = ResponseEnded.parse_from_stream_id_and_headers_destructive(stream_id, headers)
    ended.details = None
    for name, value in raw:
        if name == DETAILS_HEADER:
            ended.details = details_from_header(value)
            break
    return ended
