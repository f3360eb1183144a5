"""The server's side of the wire core: purerpc's ``GRPCConnection`` for one server connection.

Apart from ``_h2conn`` (what both ends share: h2's connection, the frame gate, the bounds,
HPACK helpers) so that a client, which never needs it, does not load it: a short command
of the command line pays for every module and class it imports (``_h2conn``'s theory of
operation covers both).

Its events, besides purerpc's (``RequestReceived``, ``MessageReceived``, ``RequestEnded``):
a stream reset, a GOAWAY, and the requests refused per stream rather than for the whole
connection.

A unary call's frames (HEADERS opening a stream, its DATA, the WINDOW_UPDATEs that follow
the reply, and the client's PINGs) are read here rather than by h2's frame reader
(``_receive_batch``, ``_take``): h2's state machines, windows and HPACK decoder are driven
beside it, and every other frame, state and error goes to h2 as it came. The request's
read cost more in h2's frame objects, flag sets and events than in what it decides.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h2.stream
import hpack
from h2.connection import AllowedStreamIDs, ConnectionState, _decode_headers
from h2.stream import H2StreamStateMachine, StreamClosedBy, StreamState
from h2.windows import WindowManager
from hyperframe.frame import GoAwayFrame  # type: ignore[import-untyped]
from purerpc.grpclib.buffers import MessageReadBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived, WindowUpdated
from purerpc.grpclib.exceptions import MessageTooLargeError
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError
from purerpc.grpclib.headers import HeaderDict

from ._h2conn import (
    _DATA,
    _FLAG_ACK,
    _FLAG_END_HEADERS,
    _FLAG_END_STREAM,
    _FLAG_PADDED,
    _FRAME_HEADER,
    _HANDLERS,
    _HEADERS,
    _PING,
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
    "MAX_CLIENT_BUFFERED_REQUESTS",
    "MAX_HUFFMAN_VALUE",
    "RESET_BUDGET",
    "BadMessage",
    "BadRequest",
    "ClientRequests",
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
#: The same bytes of all one client's connections together (``ClientRequests``, shared by
#: the cores of one identity's connections): without it, one client's 200 connections
#: each at MAX_BUFFERED_REQUESTS pinned 1.6 GiB (``tools/probe_hostile.py many-partial``).
MAX_CLIENT_BUFFERED_REQUESTS: Final = 32 * 1024 * 1024


class ClientRequests:
    """Request bytes held for one client across its connections' cores: each core adds
    what it holds (``GRPCServerConnection.client_requests``) and takes it all back when its
    connection ends (``release_client``). Plain bookkeeping, no locking: one event loop."""

    __slots__ = ("connections", "held", "total")

    def __init__(self, total: int = MAX_CLIENT_BUFFERED_REQUESTS) -> None:
        self.total = total
        self.held = 0
        #: cores sharing it (the transport drops it when none is left)
        self.connections = 0


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


#: What ``send_unary_reply`` writes before a unary answer's message (the HEADERS frame
#: with ``_REPLY_HEADERS``, the DATA frame's header, the message's gRPC prefix) and after
#: it (the frame of ``_OK_TRAILERS``), each packed in one call. (Both blocks are shorter
#: than 256 bytes: the high part of their frame length is 0.)
_REPLY_HEAD: Final = struct.Struct(f">HBBBL{len(_REPLY_HEADERS)}sHBBBLBI")
_REPLY_TAIL: Final = struct.Struct(f">HBBBL{len(_OK_TRAILERS)}s")
_WINDOW_UPDATE: Final = 0x8
_FLAG_PRIORITY: Final = 0x20
_LARGEST_WINDOW: Final = 2**31 - 1
_INCREMENT: Final = struct.Struct(">L")
_SERVER_OPEN: Final = ConnectionState.SERVER_OPEN
_OPEN: Final = StreamState.OPEN
_HALF_CLOSED_REMOTE: Final = StreamState.HALF_CLOSED_REMOTE
_CLOSED: Final = StreamState.CLOSED
#: Stream states where h2 takes a WINDOW_UPDATE into the stream's window (with an event).
_WINDOW_STATES: Final = frozenset(
    (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL, StreamState.HALF_CLOSED_REMOTE)
)
#: What the receive fast path hands its dispatch, frame by frame beside h2's events:
#: ``(_TOOK_HEADERS, stream_id, headers, ended)``, ``(_TOOK_DATA, stream_id, data, ended)``,
#: ``(_TOOK_WINDOW, stream_id, increment)``.
_TOOK_HEADERS, _TOOK_DATA, _TOOK_WINDOW = 0, 1, 2
#: A PING's ACK frame header (8 bytes of data, ACK, stream 0).
_PING_ACK: Final = _FRAME_HEADER.pack(0, 8, _PING, _FLAG_ACK, 0)
#: HEADERS flags the fast path reads: only END_HEADERS of these may be set.
_FAST_HEADER_FLAGS: Final = _FLAG_END_HEADERS | _FLAG_PADDED | _FLAG_PRIORITY


def _informational(headers: list[tuple[bytes, bytes]]) -> bool:
    """h2's ``is_informational_response`` for a header list of bytes (the server's): a
    ``:status`` among the leading pseudo-headers that starts with 1."""
    for name, value in headers:
        if not name.startswith(b":"):
            return False
        if name == b":status":
            return value.startswith(b"1")
    return False


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


#: Closed streams are forgotten (``open_inbound_streams``) at every request's HEADERS while
#: a connection has fewer streams than this; from then on once they have doubled.
_SWEEP_FLOOR: Final = 64


class ServerH2Connection(WireH2Connection):
    """h2's connection with the stream cap left to the transport and a graceful GOAWAY."""

    #: ``open_inbound_streams`` forgets closed streams once there are this many
    _sweep_at = 0

    @property
    def open_inbound_streams(self) -> int:
        """Report no open streams, so that h2 never raises TooManyStreamsError.

        h2 only reads this to enforce MAX_CONCURRENT_STREAMS, as a connection error; the
        transport refuses excess streams one by one instead. What h2's count does
        besides counting still happens here, as it does it: closed streams are
        forgotten, in order, and how each closed is remembered (``_closed_streams``).
        (h2's ``_open_streams`` asks two properties of every stream, one an enum
        comparison: twice the cost, on every request's HEADERS.) Only once the streams
        have doubled since the last time, when there are 64 or more: each time costs one
        look per stream, and with 1,000 streams on a connection one per request's HEADERS
        was quadratic (0.5 ms a request). A closed stream not forgotten yet is one h2 kept
        until the next request's HEADERS too.
        """
        streams = self.streams
        if _SWEEP_FLOOR <= len(streams) < self._sweep_at:
            return 0
        closed = [key for key, stream in streams.items() if stream.state_machine.state is _CLOSED]
        if closed:
            forgotten = self._closed_streams
            for key in closed:
                forgotten[key] = streams.pop(key).state_machine.stream_closed_by
        self._sweep_at = 2 * len(streams)
        return 0

    def open_request_stream(self, stream_id: int, ended: bool) -> h2.stream.H2Stream:
        """``_begin_new_stream`` for a request's new stream (odd, above every stream the
        client opened: the caller checked both), then its state machine set as
        ``request_received`` (and END_STREAM's ``recv_end_stream`` when ``ended``) set it
        from IDLE: the same objects with the same attributes, made without h2's three
        constructors, settings look-ups and no-op logging (a request's HEADERS cost
        more there than in what h2 decides)."""
        machine = object.__new__(H2StreamStateMachine)
        machine.state = _HALF_CLOSED_REMOTE if ended else _OPEN
        machine.stream_id = stream_id
        machine.client = False
        machine.headers_sent = None
        machine.trailers_sent = None
        machine.headers_received = True
        machine.trailers_received = None
        machine.stream_closed_by = None
        window = object.__new__(WindowManager)
        size = self.local_settings.initial_window_size
        window.max_window_size = size
        window.current_window_size = size
        window._bytes_processed = 0
        stream: h2.stream.H2Stream = object.__new__(h2.stream.H2Stream)
        stream.state_machine = machine
        stream.stream_id = stream_id
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        stream.request_method = None
        stream.outbound_flow_control_window = self.remote_settings.initial_window_size
        stream._inbound_window_manager = window
        stream._expected_content_length = None
        stream._actual_content_length = 0
        stream._authority = None
        stream.config = self.config
        stream.max_inbound_frame_size = self.max_inbound_frame_size
        self.streams[stream_id] = stream
        self.highest_inbound_stream_id = stream_id
        return stream

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
        # Both inputs change nothing in the states of a unary reply (SERVER_OPEN,
        # HALF_CLOSED_REMOTE): the state machines run only outside them.
        if self.state_machine.state is not _SERVER_OPEN:
            self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_DATA)
        if stream.state_machine.state is not _HALF_CLOSED_REMOTE:
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
        if self.state_machine.state is not _SERVER_OPEN:  # (a no-op in SERVER_OPEN)
            self.state_machine.process_input(h2.connection.ConnectionInputs.SEND_HEADERS)
        stream = self._get_stream_by_id(stream_id)
        machine = stream.state_machine
        if (
            machine.state is _HALF_CLOSED_REMOTE
            and machine.client is False
            and not machine.trailers_sent
        ):
            # A unary reply (the request has ended): what SEND_HEADERS' response_sent and
            # SEND_END_STREAM's send_end_stream do there, without their event objects.
            if machine.headers_sent:
                machine.trailers_sent = True
            else:
                machine.headers_sent = True
            if end_stream:
                machine.state = _CLOSED
                machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
        else:
            machine.process_input(h2.stream.StreamInputs.SEND_HEADERS)
            if end_stream:
                machine.process_input(h2.stream.StreamInputs.SEND_END_STREAM)
        if not end_stream and machine.trailers_sent:
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

    #: Whether a unary call's frames are read here rather than by h2 (``_take``); off,
    #: every frame goes through h2 and purerpc (the tests compare the two).
    fast_receive = True

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
        #: what all the client's connections hold (set once its identity is known)
        self.client_requests: ClientRequests | None = None

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

    def send_unary_reply(self, stream_id: int, message: bytes) -> bool:
        """A unary call's whole OK answer in one step: its HEADERS, ``message`` (serialized,
        without its gRPC prefix) in one DATA frame, and the OK trailers, then the
        request's collection dropped. The same bytes, state transitions, window
        accounting and flood budget as ``start_response``, ``send_whole_data`` and
        ``send_status`` one after the other and ``drop_request`` after them, with one
        look-up of the stream instead of one per step, where a unary answer stands: the
        request ended (HALF_CLOSED_REMOTE), nothing sent yet, the connection SERVER_OPEN,
        no table size change pending, the windows and the peer's frame size room for the
        message. Returns False, having changed nothing, anywhere else: then the caller
        takes the steps one by one (which raise as h2 does)."""
        h2c = self.h2_connection
        stream = h2c.streams.get(stream_id)
        if stream is None or h2c.encoder.header_table.resized:
            return False
        machine = stream.state_machine
        size = MESSAGE_OVERHEAD + len(message)
        if (
            machine.state is not _HALF_CLOSED_REMOTE
            or machine.client is not False
            or machine.headers_sent
            or machine.trailers_sent
            or h2c.state_machine.state is not _SERVER_OPEN
            or size > stream.outbound_flow_control_window
            or size > h2c.outbound_flow_control_window
            or size > h2c.max_outbound_frame_size
        ):
            return False
        # What SEND_HEADERS' response_sent, then the trailers' and SEND_END_STREAM's
        # send_end_stream do in HALF_CLOSED_REMOTE (see send_header_block).
        machine.headers_sent = True
        machine.trailers_sent = True
        machine.state = _CLOSED
        machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
        stream.request_method = None
        stream.outbound_flow_control_window -= size
        h2c.outbound_flow_control_window -= size
        out = h2c._data_to_send
        stream_id &= 0x7FFFFFFF
        out += _REPLY_HEAD.pack(
            0,
            len(_REPLY_HEADERS),
            _HEADERS,
            _FLAG_END_HEADERS,
            stream_id,
            _REPLY_HEADERS,
            (size >> 8) & 0xFFFF,
            size & 0xFF,
            _DATA,
            0,
            stream_id,
            0,
            size - MESSAGE_OVERHEAD,
        )
        out += message
        out += _REPLY_TAIL.pack(
            0,
            len(_OK_TRAILERS),
            _HEADERS,
            _FLAG_END_HEADERS | _FLAG_END_STREAM,
            stream_id,
            _OK_TRAILERS,
        )
        if h2c.gate is not None:
            h2c.gate.earn(3)
        self.drop_request(stream_id)
        return True

    def initiate_connection(self) -> None:
        """Send our SETTINGS and open the connection window to its configured size."""
        h2c = self.h2_connection
        h2c.initiate_connection()
        delta = self._connection_window_size - int(h2c.inbound_flow_control_window)
        if delta > 0:
            h2c.increment_flow_control_window(delta)

    # -- receiving: a unary call's frames without h2's frame objects and events --------

    def receive_frames(self, data: bytes | bytearray) -> list[Any]:
        """``receive_data`` through the :class:`FrameGate`, each batch of whole frames
        through :meth:`_receive_batch` once h2 has read the client's preface."""
        if not self.fast_receive or self.h2_connection.incoming_buffer._preamble_len:
            return super().receive_frames(data)
        events: list[Any] = []
        for batch in self.gate.feed(data):
            events.extend(self._receive_batch(batch))
        return events

    def _receive_batch(self, batch: bytes) -> list[Any]:
        """One batch of whole frames: h2's ``receive_data`` and purerpc's dispatch, with the
        frames of the common case taken here (:meth:`_take`), all others by h2.

        The frames are read in order; a run of frames that are not taken goes to h2's
        ``receive_data`` as it stands, before the next frame is looked at, so h2 sees the
        same frames in the same states as without this path. As in h2, the handlers of a
        batch's events run once every frame of the batch has been read (they acknowledge
        data, which changes windows and output).
        """
        h2c = self.h2_connection
        incoming = h2c.incoming_buffer
        connection = h2c.state_machine
        unpack = _FRAME_HEADER.unpack_from
        received: list[Any] = []  # h2's events and the records of taken frames, in order
        size = len(batch)
        pos = slow = 0
        while pos < size:
            high, low, kind, flags, stream_id = unpack(batch, pos)
            length = (high << 8) | low
            end = pos + 9 + length
            if (
                (kind == _DATA and not flags & _FLAG_PADDED)
                or (kind == _HEADERS and flags & _FAST_HEADER_FLAGS == _FLAG_END_HEADERS)
                or (kind == _WINDOW_UPDATE and length == 4)
                or (kind == _PING and length == 8 and not flags and not stream_id & 0x7FFFFFFF)
            ):
                if slow < pos:
                    received.extend(h2c.receive_data(batch[slow:pos]))
                    slow = pos
                if (
                    connection.state is _SERVER_OPEN
                    and not incoming._headers_buffer
                    and self._take(
                        received, kind, flags, stream_id & 0x7FFFFFFF, batch, pos + 9, end
                    )
                ):
                    slow = end
            pos = end
        if slow < size:
            received.extend(h2c.receive_data(batch[slow:]))
        return self._dispatch(received)

    def _take(
        self,
        received: list[Any],
        kind: int,
        flags: int,
        stream_id: int,
        batch: bytes,
        start: int,
        end: int,
    ) -> bool:
        """Read one frame as h2 would, when it is one of the common case: HEADERS that
        open a new stream (END_HEADERS, no padding or priority), DATA on an open stream
        (no padding), a WINDOW_UPDATE that h2 takes without an error, a PING to answer
        (a client's keepalive or bandwidth probe: grpcio sends them). Returns False for
        any other frame or state, having changed nothing that h2 reading the frame would
        not change the same way (it counts open streams first too); the frame then goes
        to h2.

        Driven as h2 drives them: the connection's and the stream's state machines (the
        connection's inputs here are no-ops in SERVER_OPEN), the HPACK decoder, the
        flow-control windows and content length, h2's exceptions and its GOAWAY on a
        connection error. Left out: h2's frame objects, its events, and its header
        processing (all of it turned off in ``h2_config``).
        """
        h2c = self.h2_connection
        try:
            if kind == _DATA:
                stream = h2c.streams.get(stream_id)
                if stream is None or stream.state_machine.state is not _OPEN:
                    return False
                length = end - start
                h2c._inbound_flow_control_window_manager.window_consumed(length)
                stream._inbound_window_manager.window_consumed(length)
                ended = bool(flags & _FLAG_END_STREAM)
                stream._track_content_length(length, ended)
                if ended:
                    stream.state_machine.state = _HALF_CLOSED_REMOTE
                received.append((_TOOK_DATA, stream_id, batch[start:end], ended))
                return True
            if kind == _HEADERS:
                if not stream_id & 1 or stream_id <= h2c.highest_inbound_stream_id:
                    return False
                if h2c.open_inbound_streams + 1 > h2c.local_settings.max_concurrent_streams:
                    return False  # h2 raises TooManyStreamsError
                headers = _decode_headers(h2c.decoder, batch[start:end])
                ended = bool(flags & _FLAG_END_STREAM)
                if _informational(headers):  # h2 refuses it
                    stream = h2c._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
                    frames, events = stream.receive_headers(headers, ended, None)
                    h2c._prepare_for_sending(frames)
                    received.extend(events)
                    return True
                stream = h2c.open_request_stream(stream_id, ended)
                stream._initialize_content_length(headers)
                received.append((_TOOK_HEADERS, stream_id, headers, ended))
                return True
            if kind == _PING:
                # A PING to answer (not an ACK): h2's _receive_ping_frame in SERVER_OPEN,
                # its ACK with the same data serialized as hyperframe does (an ACK earns
                # nothing of the flood budget).
                payload = batch[start:end]
                h2c._data_to_send += _PING_ACK + payload
                event = h2.events.PingReceived()
                event.ping_data = payload
                received.append(event)
                return True
            (increment,) = _INCREMENT.unpack_from(batch, start)
            if not stream_id:
                window = h2c.outbound_flow_control_window + increment
                if not 1 <= increment <= _LARGEST_WINDOW or window > _LARGEST_WINDOW:
                    return False  # h2 raises
                h2c.outbound_flow_control_window = window
                received.append((_TOOK_WINDOW, 0, increment))
                return True
            stream = h2c.streams.get(stream_id)
            if stream is None:
                # WireH2Connection's: a late one for a stream h2 has forgotten, ignored.
                return bool(
                    stream_id & 1 and stream_id <= h2c.highest_inbound_stream_id and increment
                )
            if not 1 <= increment <= _LARGEST_WINDOW:
                return False
            state = stream.state_machine.state
            if state is _CLOSED:
                return True  # h2 allows it, and changes nothing
            window = stream.outbound_flow_control_window + increment
            if state not in _WINDOW_STATES or window > _LARGEST_WINDOW:
                return False  # h2 resets the stream, or refuses the frame
            stream.outbound_flow_control_window = window
            received.append((_TOOK_WINDOW, stream_id, increment))
            return True
        except h2.exceptions.ProtocolError as exc:
            h2c._terminate_connection(exc.error_code)  # as h2's receive_data does
            raise

    def _dispatch(self, received: list[Any]) -> list[Any]:
        """purerpc's events of h2's events and the fast path's records, in order."""
        events: list[Any] = []
        count = len(received)
        skip = -1  # records up to this one are done (a unary request's DATA and between)
        for at, item in enumerate(received):
            if at <= skip:
                continue
            if type(item) is tuple:
                took, stream_id = item[0], item[1]
                if took == _TOOK_WINDOW:
                    events.append(WindowUpdated(stream_id=stream_id, delta=item[2]))
                    continue
                if took == _TOOK_HEADERS:
                    # Its DATA next, or after WINDOW_UPDATEs (grpcio sends the stream's
                    # between the two): their events stay where they came.
                    last = at + 1
                    while (
                        not item[3]
                        and last < count
                        and type(received[last]) is tuple
                        and received[last][0] == _TOOK_WINDOW
                    ):
                        last += 1
                    if not item[3] and last < count:
                        after = received[last]
                        mark = len(events) + 1
                        if (
                            type(after) is tuple
                            and after[0] == _TOOK_DATA
                            and after[1] == stream_id
                            and after[3]
                            and self._on_unary(events, stream_id, item[2], after[2])
                        ):
                            if last > at + 1:
                                events[mark:mark] = [
                                    WindowUpdated(stream_id=window[1], delta=window[2])
                                    for window in received[at + 1 : last]
                                ]
                            skip = last
                            continue
                    events.extend(self._on_request(stream_id, item[2], item[3]))
                else:
                    data = item[2]
                    events.extend(self._on_data(stream_id, data, len(data), item[3]))
                if item[3]:
                    events.extend(self._on_stream_ended(stream_id))
                continue
            handler = _HANDLERS.get(type(item))
            if handler is not None:
                events.extend(getattr(self, handler)(item))
            else:
                events.extend(self._dispatch_subclass(item))
        return events

    def _on_unary(self, events: list[Any], stream_id: int, raw: list[Any], data: bytes) -> bool:
        """A request's HEADERS and its one DATA frame, ending the stream and holding one
        whole message (a unary request, read by the fast path): the events and the
        bookkeeping of ``_on_request``, ``_on_data`` and ``_on_stream_ended`` one after
        the other, without what those do for a request that is not whole (the buffers
        and holds it would make only to drop them at once). Returns False, having
        changed nothing but the parsed-request cache, for anything else: a request that
        does not parse, a stream of requests, a message not whole or over the cap, or a
        connection holding too many request bytes (then those three run)."""
        size = len(data)
        if (
            size < MESSAGE_OVERHEAD
            or data[0]
            or int.from_bytes(data[1:5], "big") != size - MESSAGE_OVERHEAD
            or size - MESSAGE_OVERHEAD > self.config.max_message_length
            or self._over_requests()
        ):
            return False
        try:
            request = self._parse_request(stream_id, raw)
        except Exception:
            return False
        streams_requests = self._streams_requests
        if streams_requests is not None and streams_requests(
            f"/{request.service_name}/{request.method_name}"
        ):
            return False
        # The stream's last DATA: only the connection's window matters (as in _on_data).
        self.h2_connection.acknowledge_connection_data(size)
        events.append(request)
        events.append(MessageReceived(stream_id, data[MESSAGE_OVERHEAD:], size))
        events.append(RequestEnded(stream_id))
        return True

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
        return self._on_request(event.stream_id, event.headers, bool(event.stream_ended))

    def _on_request(self, stream_id: int, raw: list[Any], ended: bool) -> list[Any]:
        """A request's header list (h2's ``RequestReceived``, or the fast path's)."""
        try:
            request = self._parse_request(stream_id, raw)
        except Exception as exc:
            # Whatever a hostile header list makes purerpc's parser raise fails this
            # stream only: it keeps a repeated header as a list and calls str methods on
            # it (a second content-type or :path raised AttributeError, which ended the
            # whole server), besides its ProtocolError, KeyError, ValueError, TypeError...
            return [BadRequest(stream_id, f"{type(exc).__name__}: {exc}")]
        if ended:
            # No message at all; the transport answers it (purerpc raised here).
            return [request, RequestEnded(stream_id)]
        # Collecting, nothing buffered yet: the buffer is made by the first DATA that is
        # not one whole message (see _on_data).
        self.message_read_buffers[stream_id] = None
        streams_requests = self._streams_requests
        if streams_requests is not None and streams_requests(
            f"/{request.service_name}/{request.method_name}"
        ):
            self._held[stream_id] = StreamWindow(hold_above=0)
            self._untaken[stream_id] = deque()
        return [request]

    def _data_received(self, event: Any) -> list[Any]:
        ended = event.stream_ended is not None
        return self._on_data(event.stream_id, event.data, event.flow_controlled_length, ended)

    def _on_data(self, stream_id: int, data: bytes, length: int, ended: bool) -> list[Any]:
        """A DATA frame's payload (``length`` counts its padding too)."""
        held = self._held.get(stream_id)
        if length:
            if held is None and not ended:
                self.h2_connection.acknowledge_received_data(length, stream_id)
            else:  # held, or the stream's last DATA (its window matters no more)
                self.h2_connection.acknowledge_connection_data(length)
        buffers = self.message_read_buffers
        if stream_id not in buffers:  # answered or refused already: drop what is still coming
            return []
        buffer = buffers[stream_id]
        size = len(data)
        messages: Any
        if (
            buffer is None
            and held is None
            and size >= MESSAGE_OVERHEAD
            and not data[0]
            and int.from_bytes(data[1:5], "big") == size - MESSAGE_OVERHEAD
            and size - MESSAGE_OVERHEAD <= self.config.max_message_length
        ):
            # One whole uncompressed message and nothing buffered before it (a unary
            # request): what purerpc's buffer would make of it, without the buffer.
            messages = [(data[MESSAGE_OVERHEAD:], length)]
        else:
            if buffer is None:
                # Encoding None: never decompress (an unbounded inflate); the transport
                # refuses requests that announce a grpc-encoding.
                buffer = buffers[stream_id] = MessageReadBuffer(
                    None, self.config.max_message_length
                )
            try:
                buffer.data_received(data, length)
            except MessageTooLargeError as exc:
                self.drop_request(stream_id)
                return [RequestTooLarge(stream_id, str(exc))]
            except GRPCProtocolError as exc:
                self.drop_request(stream_id)
                return [BadMessage(stream_id, str(exc))]
            self._hold(stream_id, size)
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
        if self._over_requests():
            self.drop_request(stream_id)
            if self.buffered_requests > MAX_BUFFERED_REQUESTS:
                reason = f"over the connection's {MAX_BUFFERED_REQUESTS} request bytes"
            else:
                reason = f"over the client's {MAX_CLIENT_BUFFERED_REQUESTS} request bytes"
            return [RequestTooLarge(stream_id, reason)]
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
        return self._on_stream_ended(event.stream_id)

    def _on_stream_ended(self, stream_id: int) -> list[Any]:
        self.message_read_buffers.pop(stream_id, None)
        self._held.pop(stream_id, None)
        if stream_id not in self._untaken:  # else counted out as they are taken
            self._forget(stream_id)
        return [RequestEnded(stream_id)]

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

    def _over_requests(self) -> bool:
        """Whether this connection, or all its client's together, hold too many request
        bytes (``MAX_BUFFERED_REQUESTS``, ``ClientRequests.total``)."""
        if self.buffered_requests > MAX_BUFFERED_REQUESTS:
            return True
        shared = self.client_requests
        return shared is not None and shared.held > shared.total

    def share_client_requests(self, shared: ClientRequests) -> None:
        """Count this connection's request bytes in its client's ``shared`` too."""
        shared.held += self.buffered_requests
        shared.connections += 1
        self.client_requests = shared

    def release_client(self) -> None:
        """The connection is over: its request bytes leave its client's count."""
        shared = self.client_requests
        if shared is not None:
            shared.held -= self.buffered_requests
            shared.connections -= 1
            self.client_requests = None

    def _hold(self, stream_id: int, delta: int) -> None:
        held = self._buffered.get(stream_id, 0) + delta
        self.buffered_requests += delta
        shared = self.client_requests
        if shared is not None:
            shared.held += delta
        if held > 0:
            self._buffered[stream_id] = held
        else:
            self._buffered.pop(stream_id, None)

    def _forget(self, stream_id: int) -> None:
        """Count a stream's request bytes out: the stream is over, or its call is."""
        held = self._buffered.pop(stream_id, 0)
        self.buffered_requests -= held
        shared = self.client_requests
        if shared is not None:
            shared.held -= held
        self._untaken.pop(stream_id, None)
