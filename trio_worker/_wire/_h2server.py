"""The server's side of the wire core: purerpc's ``GRPCConnection`` for one server connection.

Apart from ``_h2conn`` (what both ends share: h2's connection, the frame gate, the bounds,
HPACK helpers) so that a client, which never needs it, does not load it: a short command
of the command line pays for every module and class it imports (``_h2conn``'s theory of
operation covers both).

Its events, besides purerpc's (``RequestReceived``, ``MessageReceived``, ``RequestEnded``):
a stream reset, a GOAWAY, and the requests refused per stream rather than for the whole
connection.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import h2.connection
import h2.exceptions
import h2.settings
import h2.stream
import hpack
from hyperframe.frame import GoAwayFrame  # type: ignore[import-untyped]
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError
from purerpc.grpclib.headers import HeaderDict

from ._h2conn import (
    _DATA,
    _FLAG_END_HEADERS,
    _FLAG_END_STREAM,
    _FRAME_HEADER,
    _HEADERS,
    ENHANCE_YOUR_CALM,
    BoundedDecoder,
    PeerMisbehaved,
    WireGRPCConnection,
    WireH2Connection,
    h2_config,
    hpack_literal,
)
from ._status import status_trailers
from ._window import MESSAGE_OVERHEAD, StreamWindow

__all__ = [
    "MAX_BUFFERED_REQUESTS",
    "MAX_CACHED_REQUEST",
    "MAX_CACHED_REQUESTS",
    "MAX_HUFFMAN_VALUE",
    "RESET_BUDGET",
    "BadMessage",
    "BadRequest",
    "GRPCServerConnection",
    "PeerGoAway",
    "RequestTooLarge",
    "ServerH2Connection",
    "StreamReset",
]


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The client reset a stream (RST_STREAM): nobody is listening for its answer."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class PeerGoAway:
    """The client sent GOAWAY; h2 3.x then refuses to send anything more."""

    error_code: int


@dataclass(frozen=True, slots=True)
class BadRequest:
    """The request headers are not a gRPC request (bad path, method, te, timeout...)."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestTooLarge:
    """A request message announced a length over the cap; its body is being dropped."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class BadMessage:
    """A request message cannot be framed (e.g. compressed without an encoding)."""

    stream_id: int
    reason: str


# --- bounds against a hostile client ------------------------------------------------

#: Largest request header list (names and values, bytes) the server keeps parsed, and how
#: many such lists one connection keeps: a bound of 8 KiB of peer bytes per connection.
MAX_CACHED_REQUEST: Final = 512
MAX_CACHED_REQUESTS: Final = 16
#: Streams a peer may reset before we answer them; each call that ends normally earns one
#: back (rapid reset, CVE-2023-44487: 100,000 HEADERS + RST_STREAM pairs cost 12.8 s CPU).
RESET_BUDGET: Final = 1000
#: Bytes of request messages one connection may hold before handlers take them (partial
#: messages, and a stream of requests' messages not yet taken): without it, 100 streams
#: each 4 MiB short of a whole message pinned 400 MiB, all acknowledged at once.
MAX_BUFFERED_REQUESTS: Final = 8 * 1024 * 1024


_GRPC_CONTENT_TYPE: Final = "application/grpc+proto"
_STATUS_200 = b"\x88"  # static table entry 8: ":status: 200"
_CONTENT_TYPE = 31  # static table entry 31: "content-type"
#: Header lists we send on every call, pre-encoded (see GRPCConnection.start_response and
#: end_response; the transport always uses content type suffix "+proto").
_PROTO_SUFFIX: Final = "+proto"
#: A response's headers (``:status`` 200, our content type) and the trailers of an OK call,
#: encoded once: what ``send_header_block`` writes for nearly every call.
_REPLY_HEADERS: Final = _STATUS_200 + hpack_literal(
    "content-type", _GRPC_CONTENT_TYPE, _CONTENT_TYPE
)
_OK_TRAILERS: Final = hpack_literal("grpc-status", "0")
_CONSTANT_BLOCKS: dict[tuple[tuple[str, str], ...], bytes] = {
    ((":status", "200"), ("content-type", _GRPC_CONTENT_TYPE)): _REPLY_HEADERS,
    (("grpc-status", "0"),): _OK_TRAILERS,
}


#: Header values longer than this are sent without Huffman coding: hpack 3.0's Huffman
#: encoder is quadratic in the value's length (a 512 KiB grpc-message took 33 s), and a
#: long value is rare enough that the bytes saved do not matter.
MAX_HUFFMAN_VALUE: Final = 256


class _CachingEncoder(hpack.Encoder):  # type: ignore[misc]
    """hpack's encoder, returning our constant header blocks ready-made."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        # A pending table size change must lead the next block: let hpack write it.
        if not self.header_table.resized and type(headers) is list:
            block = _CONSTANT_BLOCKS.get(tuple(headers))
            if block is not None:
                return block
        if huffman and any(len(value) > MAX_HUFFMAN_VALUE for _, value in headers):
            huffman = False
        return bytes(super().encode(headers, huffman))


class ServerH2Connection(WireH2Connection):
    """h2's connection with the stream cap left to the transport and a graceful GOAWAY."""

    @property
    def open_inbound_streams(self) -> int:
        """Report no open streams, so that h2 never raises TooManyStreamsError.

        h2 only reads this to enforce MAX_CONCURRENT_STREAMS, as a connection error; the
        transport refuses excess streams one by one instead. Counting still runs: it is
        where h2 forgets closed streams.
        """
        self._open_streams(int(not self.config.client_side))
        return 0

    def send_graceful_goaway(self, last_stream_id: int) -> None:
        """Queue GOAWAY(NO_ERROR) without closing h2's state machine.

        ``close_connection`` would move h2 to CLOSED, after which the streams in flight
        could send nothing more; a drain must let them finish.
        """
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=0)
        self._data_to_send += frame.serialize()

    def send_whole_data(self, stream_id: int, data: bytes) -> None:
        """``send_data`` of one DATA frame, no END_STREAM, no padding (a unary response's
        message): the same checks, state transitions and window accounting as h2's, the
        same bytes out, without its frame objects. Raises as ``send_data`` does."""
        size = len(data)
        stream = self._get_stream_by_id(stream_id)
        if (
            size > self.outbound_flow_control_window
            or size > stream.outbound_flow_control_window
            or size > self.max_outbound_frame_size
        ):
            self.send_data(stream_id, data)  # h2 raises FlowControlError or FrameTooLargeError
            return
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(h2.stream.StreamInputs.SEND_DATA)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        self._data_to_send += _FRAME_HEADER.pack(
            (size >> 8) & 0xFFFF, size & 0xFF, _DATA, 0, stream_id & 0x7FFFFFFF
        )
        self._data_to_send += data
        if self.gate is not None:
            self.gate.earn(1)

    def send_header_block(self, stream_id: int, block: bytes, *, end_stream: bool) -> bool:
        """``send_headers`` for a response header block we encoded once (``_REPLY_HEADERS``,
        ``_OK_TRAILERS``): the same state transitions of the connection and the stream,
        in the same order, and the same bytes out, without h2's per-call work (header
        list checks, the informational test, frame objects, the encoder). Returns False,
        sending nothing, while a table size change must lead the next block (then
        ``send_headers``, whose encoder writes it). Raises as ``send_headers`` does for a
        stream that is closed or unknown.

        Sound only for blocks of literals that leave the dynamic table alone, shorter
        than the smallest frame size (16,384), with ``:status`` 200 (not informational).
        """
        if self.encoder.header_table.resized:
            return False
        self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream = self._get_stream_by_id(stream_id)
        machine = stream.state_machine
        machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
        if end_stream:
            machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        elif machine.trailers_sent:
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
        stream.request_method = None  # as send_headers leaves it for a response
        length = len(block)
        self._data_to_send += _FRAME_HEADER.pack(
            (length >> 8) & 0xFFFF,
            length & 0xFF,
            _HEADERS,
            _FLAG_END_HEADERS | (_FLAG_END_STREAM if end_stream else 0),
            stream_id & 0x7FFFFFFF,
        )
        self._data_to_send += block
        if self.gate is not None:
            self.gate.earn(1)
        return True


#: purerpc's handler of each h2 event type, in the order of its ``receive_data`` chain.


class GRPCServerConnection(WireGRPCConnection):
    """purerpc's ``GRPCConnection`` for one server connection, with our settings."""

    def __init__(
        self,
        *,
        max_message_length: int,
        max_concurrent_streams: int,
        initial_window_size: int,
        connection_window_size: int,
        max_frame_size: int,
        max_header_list_size: int,
        streams_requests: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``streams_requests(path)`` tells whether the method at ``path`` takes a stream
        of requests, whose stream window then follows its handler (``message_taken``);
        ``clock`` (seconds) refills the flood budget."""
        # Not super().__init__(): it builds a plain H2Connection with purerpc's fixed
        # settings (65536 streams, a 1 GiB connection window, 16 MiB frames).
        self.config = GRPCConfiguration(client_side=False, max_message_length=max_message_length)
        h2c = ServerH2Connection(h2_config(client_side=False))
        codes = h2.settings.SettingCodes
        h2c.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                codes.INITIAL_WINDOW_SIZE: initial_window_size,
                codes.MAX_FRAME_SIZE: max_frame_size,
                codes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            },
        )
        h2c.max_inbound_frame_size = max_frame_size
        h2c.encoder = _CachingEncoder()
        h2c.decoder = BoundedDecoder()
        h2c.decoder.max_header_list_size = max_header_list_size
        self.h2_connection: ServerH2Connection = h2c
        self.message_read_buffers: dict[int, Any] = {}
        self._connection_window_size = connection_window_size
        self._streams_requests = streams_requests
        # Streams of requests: their windows follow their handlers (``_window``).
        self._held: dict[int, StreamWindow] = {}
        self._reset_budget = RESET_BUDGET
        # Parsed request header lists (see _parse_request).
        self._requests: dict[tuple[Any, ...], RequestReceived] = {}
        self._open_gate(max_frame_size, server=True, clock=clock)
        # Request bytes held per stream (see MAX_BUFFERED_REQUESTS), their sum, and the
        # sizes of a stream of requests' messages not yet taken, oldest first.
        self._buffered: dict[int, int] = {}
        self.buffered_requests = 0
        self._untaken: dict[int, deque[int]] = {}

    def send_status(
        self, stream_id: int, code: int, message: str, details: bytes | None, *, headers: bool
    ) -> None:
        """End a call: trailers with its status, or a trailers-only response when no
        headers were sent yet (``headers``). The message is bounded; ``details`` is a
        serialized ``google.rpc.Status`` (see ``_status``)."""
        h2c = self.h2_connection
        if (
            code == 0
            and headers
            and not message
            and not details
            and h2c.send_header_block(stream_id, _OK_TRAILERS, end_stream=True)
        ):
            return
        fields = status_trailers(code, message, details)
        if not headers:
            fields = [(":status", "200"), ("content-type", _GRPC_CONTENT_TYPE), *fields]
        h2c.send_headers(stream_id, fields, end_stream=True)

    def start_response(
        self, stream_id: int, content_type_suffix: str = "", custom_metadata: Any = ()
    ) -> None:
        """A response's headers: ready-made for ours (``+proto``, no metadata)."""
        if (
            content_type_suffix == _PROTO_SUFFIX
            and not custom_metadata
            and self.h2_connection.send_header_block(stream_id, _REPLY_HEADERS, end_stream=False)
        ):
            return
        super().start_response(stream_id, content_type_suffix, custom_metadata)

    def initiate_connection(self) -> None:
        """Send our SETTINGS and open the connection window to its configured size."""
        h2c = self.h2_connection
        h2c.initiate_connection()
        delta = self._connection_window_size - int(h2c.inbound_flow_control_window)
        if delta > 0:
            h2c.increment_flow_control_window(delta)

    def _parse_request(self, stream_id: int, raw: list[Any]) -> RequestReceived:
        """The request of a header list (raw bytes pairs, as h2 hands them to the server).

        A client repeats the same list for every call of a method (grpcio and grpc-go
        send the same ``grpc-timeout`` too, for the same deadline): parsed once, then
        copied. The lists are compared by value, so the result never depends on the HPACK
        table; only lists of at most :data:`MAX_CACHED_REQUEST` bytes are kept, at most
        :data:`MAX_CACHED_REQUESTS` of them (then the cache starts over): about 8 KiB of
        peer bytes per connection. Raises what purerpc's parser raises, and
        ``UnicodeDecodeError`` for a header that is not UTF-8.
        """
        key = tuple(raw)
        known = self._requests.get(key)
        if known is None:
            headers = [(name.decode("utf-8"), value.decode("utf-8")) for name, value in raw]
            known = RequestReceived.parse_from_stream_id_and_headers_destructive(
                0, HeaderDict(headers)
            )
            if sum(len(name) + len(value) for name, value in raw) <= MAX_CACHED_REQUEST:
                if len(self._requests) >= MAX_CACHED_REQUESTS:
                    self._requests.clear()
                self._requests[key] = known
        request: RequestReceived = object.__new__(RequestReceived)
        request.__dict__.update(known.__dict__)
        request.stream_id = stream_id
        return request

    def _request_received(self, event: Any) -> list[Any]:
        stream_id: int = event.stream_id
        try:
            request = self._parse_request(stream_id, event.headers)
        except Exception as exc:
            # Whatever a hostile header list makes purerpc's parser raise fails this
            # stream only: it keeps a repeated header as a list and calls str methods on
            # it (a second content-type or :path raised AttributeError, which ended the
            # whole server), besides its ProtocolError, KeyError, ValueError, TypeError...
            return [BadRequest(stream_id, f"{type(exc).__name__}: {exc}")]
        if event.stream_ended:
            # No message at all; the transport answers it (purerpc raised here).
            return [request, RequestEnded(stream_id)]
        # Encoding None: never decompress (an unbounded inflate); the transport refuses
        # requests that announce a grpc-encoding.
        self.message_read_buffers[stream_id] = MessageReadBuffer(
            None, self.config.max_message_length
        )
        streams_requests = self._streams_requests
        if streams_requests is not None and streams_requests(
            f"/{request.service_name}/{request.method_name}"
        ):
            self._held[stream_id] = StreamWindow(hold_above=0)
            self._untaken[stream_id] = deque()
        return [request]

    def _data_received(self, event: Any) -> list[Any]:
        stream_id: int = event.stream_id
        length: int = event.flow_controlled_length
        held = self._held.get(stream_id)
        if length:
            if held is None and event.stream_ended is None:
                self.h2_connection.acknowledge_received_data(length, stream_id)
            else:  # held, or the stream's last DATA (its window matters no more)
                self.h2_connection.acknowledge_connection_data(length)
        buffer = self.message_read_buffers.get(stream_id)
        if buffer is None:  # answered or refused already: drop what is still coming
            return []
        try:
            buffer.data_received(event.data, length)
        except MessageTooLargeError as exc:
            self.drop_request(stream_id)
            return [RequestTooLarge(stream_id, str(exc))]
        except GRPCProtocolError as exc:
            self.drop_request(stream_id)
            return [BadMessage(stream_id, str(exc))]
        self._hold(stream_id, len(event.data))
        messages = buffer.read_all_complete_messages_flowcontrol()
        if messages:
            sizes = [len(message) for message, _ in messages]
            # The 5-byte prefixes are gone; a unary request goes to its call at once.
            kept = self._untaken.get(stream_id)
            if kept is not None:
                kept.extend(sizes)
                self._hold(stream_id, -5 * len(sizes))
            else:
                self._hold(stream_id, -sum(sizes) - 5 * len(sizes))
        if self.buffered_requests > MAX_BUFFERED_REQUESTS:
            self.drop_request(stream_id)
            limit = MAX_BUFFERED_REQUESTS
            return [RequestTooLarge(stream_id, f"over the connection's {limit} request bytes")]
        if held is not None:
            delivered = sum(len(message) for message, _ in messages)
            self._release(
                stream_id, held.received(length, delivered + MESSAGE_OVERHEAD * len(messages))
            )
        return [MessageReceived(stream_id, message, flow) for message, flow in messages]

    def message_taken(self, stream_id: int) -> None:
        """A stream of requests' handler took one delivered message: once none is left
        waiting, hand what was received back to the stream's window."""
        kept = self._untaken.get(stream_id)
        if not kept:
            return
        size = kept.popleft()
        self._hold(stream_id, -size)
        held = self._held.get(stream_id)
        if held is not None:
            self._release(stream_id, held.taken(size + MESSAGE_OVERHEAD))

    def _release(self, stream_id: int, size: int) -> None:
        if size:
            self.h2_connection.acknowledge_stream_data(size, stream_id)

    def _stream_ended(self, event: Any) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        self._held.pop(event.stream_id, None)
        if event.stream_id not in self._untaken:  # else counted out as they are taken
            self._forget(event.stream_id)
        return [RequestEnded(event.stream_id)]

    def _stream_reset(self, event: Any) -> list[Any]:
        self.message_read_buffers.pop(event.stream_id, None)
        self._held.pop(event.stream_id, None)
        self._forget(event.stream_id)
        self._reset_budget -= 1
        if self._reset_budget < 0:
            raise PeerMisbehaved(ENHANCE_YOUR_CALM, "too many streams reset by the peer")
        return [StreamReset(event.stream_id, int(event.error_code))]

    def call_finished(self) -> None:
        """A call ended without a reset by the peer: it earns one reset back."""
        if self._reset_budget < RESET_BUDGET:
            self._reset_budget += 1

    def _connection_terminated(self, event: Any) -> list[Any]:
        return [PeerGoAway(int(event.error_code))]

    def drop_request(self, stream_id: int) -> None:
        """Stop collecting a stream's request: what still arrives is acknowledged and dropped."""
        self.message_read_buffers.pop(stream_id, None)
        self._held.pop(stream_id, None)
        self._forget(stream_id)

    def _hold(self, stream_id: int, delta: int) -> None:
        held = self._buffered.get(stream_id, 0) + delta
        self.buffered_requests += delta
        if held > 0:
            self._buffered[stream_id] = held
        else:
            self._buffered.pop(stream_id, None)

    def _forget(self, stream_id: int) -> None:
        """Count a stream's request bytes out: the stream is over, or its call is."""
        self.buffered_requests -= self._buffered.pop(stream_id, 0)
        self._untaken.pop(stream_id, None)
