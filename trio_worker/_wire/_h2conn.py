"""purerpc's sans-I/O gRPC-over-HTTP/2 layer, with its server-side gaps closed.

We reuse purerpc's ``GRPCConnection``: it drives h2, parses request headers (path,
``grpc-timeout``, metadata), splits DATA into length-prefixed messages with a size cap
(``MessageReadBuffer``) and formats response headers and trailers. What it does wrong for a
server that must outlive misbehaving clients is fixed here and in ``_h2server`` (the server's
own half, which no client loads), by subclassing, and only there:

* a RST_STREAM or a GOAWAY from the client vanished (``_stream_reset`` returned nothing):
  we turn both into events, so the transport can cancel the handlers concerned;
* a malformed request header, an oversized or undecodable message raised out of
  ``receive_data`` and took the whole connection down: they become per-stream events;
* received data was acknowledged only once a whole message had been read, so partial
  messages on several streams could exhaust the connection window and deadlock it: we
  acknowledge at once (what we keep per stream is bounded by the message size cap anyway);
  except that on a stream of requests (bidirectional streaming) the stream's own window is
  handed back only while none of its messages waits for the handler (``message_taken``),
  so a client that sends faster than the handler reads is held to one window; the
  connection's window is still handed back at once, so the other streams go on;
* it let clients send compressed messages that it inflated without a bound: we never
  decompress (the transport refuses a ``grpc-encoding`` other than identity);
* h2 treats one stream over SETTINGS_MAX_CONCURRENT_STREAMS as a connection error; RFC 9113
  §5.1.2 lets it be a stream error, which keeps the client's other calls alive: h2's check is
  disabled and the transport refuses the stream itself;
* h2 3.x allows nothing to be sent after a GOAWAY, so a graceful drain (GOAWAY, then finish
  the streams in flight) needs the frame written beside its state machine.

Speed-ups where a small RPC spends much of its time: a client repeats the same header
block for every call of a method once its headers are in the dynamic table, so decoded
blocks are cached while that table is unchanged, and the server parses each distinct
request header list once (h2 hands it bytes; ``_parse_request``); our own response headers
and OK trailers are constant, so they are encoded once, as literals that leave the dynamic
table alone (valid whatever it holds), and the server writes them beside h2's state
machines (``send_header_block``) rather than through h2's per-call header handling.

purerpc and h2 are untyped: ``Any`` stays inside this module and the types it returns.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
from hyperframe.frame import (  # type: ignore[import-untyped]
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    WindowUpdateFrame,
)
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = [
    "FLOOD_BUDGET",
    "FLOOD_EARN",
    "FLOOD_REFILL",
    "MAX_CONTINUATIONS",
    "MAX_HEADER_BLOCK",
    "MAX_MESSAGE",
    "MAX_SIZE_UPDATES",
    "MAX_UNSENT_CONTROL",
    "PROTOCOL_ERRORS",
    "BoundedDecoder",
    "FrameGate",
    "PeerMisbehaved",
    "Pieces",
    "WireGRPCConnection",
    "WireH2Connection",
    "h2_config",
    "hpack_literal",
]


#: A frame header, as hyperframe packs it: 24-bit length, type, flags, stream id.
_FRAME_HEADER: Final = struct.Struct(">HBBBL")
#: Pieces of DATA payloads at least this large are kept by reference until written, not
#: copied into the output buffer: a TLS record's worth (smaller ones would make records
#: smaller than the peer's reads are worth).
_BY_REFERENCE: Final = 16 * 1024
_FRAME_HEADER_SIZE: Final = 9

# --- bounds against a hostile peer (both ends) ------------------------------------------

#: Largest encoded header block (HEADERS + CONTINUATION) we read: a gRPC call's headers are
#: a few hundred bytes, and 64 KiB is four times the decoded-size cap (h2 alone allowed 64
#: CONTINUATIONs of a whole frame each: 64 MiB of HPACK to decode on the event loop).
MAX_HEADER_BLOCK: Final = 64 * 1024
#: Most CONTINUATION frames after one HEADERS: honest peers send none or one.
MAX_CONTINUATIONS: Final = 8
#: Most dynamic-table size updates at the start of a block: RFC 7541 §4.2 allows two, and
#: each costs a Python loop in hpack (8 MiB of 1-byte updates stalled a server 16 s).
MAX_SIZE_UPDATES: Final = 2
#: Largest header block the decoder cache keeps, so the cache is bounded by
#: ``64 * MAX_CACHED_BLOCK`` bytes of peer input (it once kept whole 4 MiB blocks as keys).
MAX_CACHED_BLOCK: Final = 512
#: Unsent replies to the peer's PING and SETTINGS beyond which the reader stops reading
#: until they are written (a peer that floods PINGs and never reads queued 63 MiB of ACKs).
MAX_UNSENT_CONTROL: Final = 64 * 1024
#: Frames that make no progress (PING, SETTINGS, WINDOW_UPDATE, RST_STREAM, PRIORITY,
#: GOAWAY, empty DATA, unknown types) a peer may send in a burst before GOAWAY
#: ENHANCE_YOUR_CALM: each costs us a parse and often a reply, and 100,000 of them are a
#: flood (CVE-2019-9512/9515/9518), while an honest peer sends a few per call.
FLOOD_BUDGET: Final = 1000
#: What each HEADERS frame (ours or the peer's) and each DATA or PING frame of ours earns
#: back: an honest peer answers our DATA with at most a stream and a connection
#: WINDOW_UPDATE and a BDP PING (grpc-go), and a call it cancels costs one RST_STREAM.
FLOOD_EARN: Final = 4
#: What the budget earns back per second whatever happens, so that keepalive PINGs on a
#: quiet connection (ours: one per 10 s while a call waits) never use it up.
FLOOD_REFILL: Final = 10.0
#: Largest gRPC message either end takes: a List page is filled up to it, and a request
#: over it is refused; a guard against a peer's garbage lengths as much as a size.
MAX_MESSAGE: Final = 4 * 1024 * 1024
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x9
_FLAG_ACK, _FLAG_END_STREAM, _FLAG_END_HEADERS, _FLAG_PADDED = 0x1, 0x1, 0x4, 0x8
#: Whole frames are handed to h2 in batches of at most this many bytes: h2's own frame
#: buffer copies what follows each frame it takes (quadratic for a 1 MiB frame arriving
#: in 16 KiB TLS records), so records are gathered here and h2 sees whole frames only.
_FEED_BYTES: Final = 64 * 1024
_CLIENT_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class PeerMisbehaved(Exception):
    """The peer broke one of our bounds: the connection ends with GOAWAY(``error_code``)."""

    def __init__(self, error_code: int, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason


#: What the core raises for a peer that breaks HTTP/2, gRPC framing or one of our bounds:
#: the connection is over (a GOAWAY is queued: h2's, or ours through ``calm_down``, but
#: for a header that is not UTF-8, which h2 decodes on the client), and the drivers turn
#: it into a lost connection.
PROTOCOL_ERRORS: Final = (
    h2.exceptions.ProtocolError,
    GRPCProtocolError,
    PeerMisbehaved,
    UnicodeDecodeError,
)

#: HTTP/2 error codes we send (RFC 9113 §7).
PROTOCOL_ERROR: Final = 0x1
FRAME_SIZE_ERROR: Final = 0x6
ENHANCE_YOUR_CALM: Final = 0xB


class FrameGate:
    """Received bytes → batches of whole frames for h2, checked against our bounds first.

    Sans-I/O and shared by both ends. It enforces the frame size we advertised, the
    encoded size and frame count of a header block (as soon as a frame header announces
    them, before its payload is buffered), and the flood budget (frames that make no
    progress, see :data:`FLOOD_BUDGET`; earned back by our own frames through
    :meth:`earn` and by time through ``clock``); it counts the replies the peer's PING
    and SETTINGS will cost us (``control_owed``), so the driver can stop reading a peer
    that sends them without reading.
    """

    __slots__ = (
        "_block",
        "_buf",
        "_clock",
        "_continuations",
        "_flood",
        "_flood_at",
        "_in_block",
        "_preface",
        "control_owed",
        "max_frame",
    )

    def __init__(
        self, max_frame: int, *, server: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        # A server first receives the client's connection preface (not a frame): passed
        # to h2 as it comes, which checks it.
        self._preface = len(_CLIENT_PREFACE) if server else 0
        self._in_block = False
        self._block = 0  # encoded bytes of the header block being received
        self._continuations = 0
        self._clock = clock
        self._flood = float(FLOOD_BUDGET)  # what is left of the flood budget...
        self._flood_at = clock()  # ...as of then
        #: bytes of PING/SETTINGS acknowledgements the peer's frames will make us send
        self.control_owed = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed over (at most one frame plus a record)."""
        return len(self._buf)

    def earn(self, frames: int) -> None:
        """We sent ``frames`` frames an honest peer may answer (HEADERS, DATA, PING)."""
        flood = self._flood + frames * FLOOD_EARN
        self._flood = flood if flood < FLOOD_BUDGET else FLOOD_BUDGET

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Take ``data``; return the whole frames now complete, in batches. Raises
        :class:`PeerMisbehaved` when a frame breaks a bound."""
        batches: list[bytes] = []
        if self._preface:
            head = bytes(data[: self._preface])
            self._preface -= len(head)
            batches.append(head)
            data = data[len(head) :]
        buf = self._buf
        buf += data
        start = end = 0
        size = len(buf)
        while size - end >= _FRAME_HEADER_SIZE:
            length = (buf[end] << 16) | (buf[end + 1] << 8) | buf[end + 2]
            kind, flags = buf[end + 3], buf[end + 4]
            if length > self.max_frame or kind in (_HEADERS, _CONTINUATION):
                self._check(length, kind)  # (nothing else to check of other frames)
            frame_end = end + _FRAME_HEADER_SIZE + length
            if frame_end > size:
                break
            if kind == _DATA:
                # DATA with no payload (padding aside) makes no progress.
                if flags & _FLAG_PADDED and length:
                    length -= 1 + buf[end + _FRAME_HEADER_SIZE]
                if length <= 0:
                    self._spend()
            elif kind != _HEADERS and kind != _CONTINUATION:
                self._spend()
                self._account(kind, flags)
            else:
                self._account_block(length, kind, flags)
            if end > start and frame_end - start > _FEED_BYTES:
                batches.append(bytes(buf[start:end]))
                start = end
            end = frame_end
        if end > start:
            batches.append(bytes(buf[start:end]))
        if end:
            del buf[:end]
        return batches

    def _check(self, length: int, kind: int) -> None:
        if length > self.max_frame:
            raise PeerMisbehaved(
                FRAME_SIZE_ERROR, f"frame of {length} bytes, over the {self.max_frame} advertised"
            )
        if kind in (_HEADERS, _CONTINUATION):
            block = length + (self._block if kind == _CONTINUATION else 0)
            if block > MAX_HEADER_BLOCK:
                raise PeerMisbehaved(
                    ENHANCE_YOUR_CALM, f"header block over {MAX_HEADER_BLOCK} bytes"
                )
            if kind == _CONTINUATION and self._continuations >= MAX_CONTINUATIONS:
                raise PeerMisbehaved(
                    ENHANCE_YOUR_CALM, f"more than {MAX_CONTINUATIONS} CONTINUATION frames"
                )

    def _spend(self) -> None:
        """One frame that makes no progress: from the budget, topped up by time first."""
        flood = self._flood - 1
        if flood < FLOOD_BUDGET - 1:
            now = self._clock()
            flood += (now - self._flood_at) * FLOOD_REFILL
            self._flood_at = now
            if flood > FLOOD_BUDGET - 1:
                flood = FLOOD_BUDGET - 1
            if flood < 0:
                raise PeerMisbehaved(
                    ENHANCE_YOUR_CALM, f"over {FLOOD_BUDGET} frames that make no progress"
                )
        else:
            self._flood_at = self._clock()
        self._flood = flood

    def _account_block(self, length: int, kind: int, flags: int) -> None:
        """Count a complete HEADERS or CONTINUATION frame (once)."""
        if kind == _HEADERS:
            self._block, self._continuations = length, 0
            self.earn(1)  # a call opened, answered or ended: progress
        else:
            self._block += length
            self._continuations += 1
        self._in_block = not flags & _FLAG_END_HEADERS

    def _account(self, kind: int, flags: int) -> None:
        """Count the reply a complete PING or SETTINGS frame will cost us (once)."""
        if kind == _PING and not flags & _FLAG_ACK:
            self.control_owed += _FRAME_HEADER_SIZE + 8
        elif kind == _SETTINGS and not flags & _FLAG_ACK:
            self.control_owed += _FRAME_HEADER_SIZE


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1 integer, its first byte OR-ed with ``first``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _hpack_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return hpack_int(len(raw), 7) + raw


def hpack_literal(name: str, value: str, static_index: int = 0) -> bytes:
    """Literal header field without indexing (RFC 7541 §6.2.2), no Huffman: it leaves the
    dynamic table alone, so a block of these is valid whatever the table holds. The name
    is ``static_index`` in the static table when given."""
    if static_index:
        return hpack_int(static_index, 4) + _hpack_string(value)
    return b"\x00" + _hpack_string(name) + _hpack_string(value)


def _leading_size_updates(data: bytes | bytearray | memoryview) -> int:
    """How many dynamic-table size updates (``001xxxxx``) open an HPACK block."""
    count = pos = 0
    size = len(data)
    while pos < size and data[pos] & 0xE0 == 0x20:
        count += 1
        if count > MAX_SIZE_UPDATES:
            return count
        prefix_full = data[pos] & 0x1F == 0x1F
        pos += 1
        if prefix_full:  # the integer goes on while the high bit is set
            while pos < size and data[pos] & 0x80:
                pos += 1
            pos += 1
    return count


class BoundedDecoder(hpack.Decoder):  # type: ignore[misc]
    """hpack's decoder with bounded work per block, remembering small blocks whose decoding
    left the dynamic table unchanged.

    A block over :data:`MAX_HEADER_BLOCK` or opening with more than
    :data:`MAX_SIZE_UPDATES` table-size updates is refused before hpack sees it (h2 then
    ends the connection with COMPRESSION_ERROR). The same bytes decode to the same headers
    as long as the table is the same. Any change to it (an entry added, evictions, a
    resize) empties the cache; holding the table's front entry makes "same front object,
    same length, same size" a sound test for that. Only blocks up to
    :data:`MAX_CACHED_BLOCK` are kept, so the cache holds at most 32 KiB of peer bytes.
    """

    _MAX_ENTRIES = 64

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple[bytes, bool], tuple[Any, ...]] = {}
        self._state: tuple[Any, ...] = ()

    def _table_state(self) -> tuple[Any, ...]:
        table = self.header_table
        entries = table.dynamic_entries
        front = entries[0] if entries else None
        return (front, len(entries), table.maxsize, self.max_header_list_size)

    def decode(self, data: Any, raw: bool = False) -> list[Any]:
        if len(data) > MAX_HEADER_BLOCK:
            raise hpack.HPACKDecodingError(f"header block over {MAX_HEADER_BLOCK} bytes")
        if _leading_size_updates(data) > MAX_SIZE_UPDATES:
            raise hpack.HPACKDecodingError("more than two table size updates in one block")
        if len(data) > MAX_CACHED_BLOCK:
            decoded: list[Any] = super().decode(data, raw)
            return decoded
        state = self._table_state()
        known = self._state
        if not known or state[0] is not known[0] or state[1:] != known[1:]:
            self._cache.clear()
            self._state = state
        key = (bytes(data), raw)
        hit = self._cache.get(key)
        if hit is not None:
            return list(hit)
        headers: list[Any] = super().decode(data, raw)
        after = self._table_state()
        unchanged = after[0] is state[0] and after[1:] == state[1:]
        if unchanged and len(self._cache) < self._MAX_ENTRIES:
            self._cache[key] = tuple(headers)
        return headers


class Pieces:
    """Bytes given as pieces: a DATA frame's payload (or a serialized gRPC message) that
    is appended to the connection's output one piece after another, in place of one
    ``bytes`` object that would first have to be joined. Bulk output (a log's block
    framed as messages) is then copied once before TLS, into the output buffer."""

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: Sequence[bytes | memoryview], size: int | None = None) -> None:
        self.pieces = pieces
        #: their total length (given when the caller knows it)
        self.size = sum(len(piece) for piece in pieces) if size is None else size

    def __len__(self) -> int:
        return self.size

    def cut(self, start: int, length: int) -> Pieces:
        """The ``length`` bytes from ``start``, as views of the pieces (no copy)."""
        out: list[bytes | memoryview] = []
        stop = start + length
        at = 0
        for piece in self.pieces:
            end = at + len(piece)
            if min(end, stop) > max(at, start):  # (an empty piece never is)
                if start <= at and end <= stop:
                    out.append(piece)
                else:
                    out.append(memoryview(piece)[max(start - at, 0) : min(stop, end) - at])
            at = end
            if at >= stop:
                break
        return Pieces(out, length)

    def join(self) -> bytes:
        return b"".join(self.pieces)


def h2_config(*, client_side: bool) -> h2.config.H2Configuration:
    """h2's configuration for both ends: our own headers are built well formed, and the
    peer's are parsed by purerpc anyway, so h2's re-checking of both is skipped. The
    server takes request headers as bytes and decodes them itself (``_request_received``:
    once per distinct header list, not once per call)."""
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding="utf-8" if client_side else None,
        validate_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        normalize_outbound_headers=False,
    )


class WireH2Connection(h2.connection.H2Connection):  # type: ignore[misc]
    """h2's connection as both ends use it: DATA serialized with one copy, output handed
    over without a copy, and a WINDOW_UPDATE for a stream h2 has already forgotten ignored.

    RFC 9113 §5.1 lets WINDOW_UPDATE arrive "for a short period" after a stream ended. h2
    accepts it while the closed stream is still in its table, but forgets closed streams
    whenever it counts open ones, and then treats a late WINDOW_UPDATE as a connection
    error (GOAWAY STREAM_CLOSED): under load (the peer consuming our last DATA while we
    open or accept the next stream) every call on the connection failed at once.
    """

    _data_to_send: bytearray
    #: Output before ``_data_to_send``, in order: earlier buffers, and large pieces of DATA
    #: payloads kept by reference (:meth:`segments_to_send`).
    _segments: list[bytes | bytearray | memoryview] | None = None
    _segments_size = 0
    #: The gate of the connection's received frames: our own frames earn its flood budget.
    gate: FrameGate | None = None

    def _receive_window_update_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        if frame.stream_id and frame.stream_id not in self.streams:
            outbound = self._stream_id_is_outbound(frame.stream_id)
            highest = (
                self.highest_outbound_stream_id if outbound else self.highest_inbound_stream_id
            )
            if frame.stream_id <= highest and frame.window_increment >= 1:
                self.state_machine.process_input(h2.connection.ConnectionInputs.RECV_WINDOW_UPDATE)
                return [], []
        frames, events = super()._receive_window_update_frame(frame)
        return frames, events

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        """Append frames to the output buffer, DATA frames copied once.

        h2 serializes every frame (hyperframe copies the payload twice), joins them (a
        third copy) and appends the result (a fourth). For bulk output those copies cost
        more than the TLS encryption: a plain DATA frame's header is packed here and its
        payload appended as is (a :class:`Pieces` payload piece by piece).
        """
        if not frames:
            return
        buffer: bytearray = self._data_to_send
        answerable = 0  # frames an honest peer may answer (see FLOOD_EARN)
        for frame in frames:
            kind = type(frame)
            if kind is DataFrame or kind is HeadersFrame:
                answerable += 1
            elif kind is PingFrame:
                answerable += "ACK" not in frame.flags
            if kind is DataFrame and "PADDED" not in frame.flags:
                data = frame.data
                length = len(data)
                frame.body_len = length
                buffer += _FRAME_HEADER.pack(
                    (length >> 8) & 0xFFFF,
                    length & 0xFF,
                    0x0,
                    0x1 if "END_STREAM" in frame.flags else 0x0,
                    frame.stream_id & 0x7FFFFFFF,
                )
                if type(data) is Pieces:
                    for piece in data.pieces:
                        if len(piece) < _BY_REFERENCE:
                            buffer += piece
                            continue
                        # Kept as it is, after what is buffered so far: the TLS layer
                        # encrypts it from where it lies (no copy of bulk output here).
                        segments = self._segments
                        if segments is None:
                            segments = self._segments = []
                        if buffer:
                            segments.append(buffer)
                            self._segments_size += len(buffer)
                            buffer = self._data_to_send = bytearray()
                        segments.append(piece)
                        self._segments_size += len(piece)
                else:
                    buffer += data
            else:
                buffer += frame.serialize()
        gate = self.gate
        if answerable and gate is not None:
            gate.earn(answerable)

    def data_to_send(self, amount: int | None = None) -> bytes | bytearray:
        """Hand over the whole output as one buffer: without copying it (h2 and purerpc
        copy) unless large pieces were kept by reference (then they are joined)."""
        if self._segments:
            data = b"".join(self.segments_to_send())
            if amount is None:
                return data
            self._data_to_send = bytearray(data[amount:])
            return data[:amount]
        if amount is not None:
            return bytes(super().data_to_send(amount))
        buffer: bytearray = self._data_to_send
        self._data_to_send = bytearray()
        return buffer

    def segments_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Hand over the whole output, in order, as the buffers it lies in: bulk DATA
        payloads are not copied into one buffer before TLS encrypts them."""
        segments = self._segments or []
        self._segments = None
        self._segments_size = 0
        if self._data_to_send:
            segments.append(self._data_to_send)
            self._data_to_send = bytearray()
        return segments

    def clear_outbound_data_buffer(self) -> None:
        self._segments = None
        self._segments_size = 0
        self._data_to_send = bytearray()

    def acknowledge_connection_data(self, size: int) -> None:
        """Hand ``size`` received bytes back to the connection's window only.

        ``acknowledge_received_data`` does the connection and the stream together; this is
        its first half (the same window manager, so WINDOW_UPDATEs are batched alike).
        """
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            frame = WindowUpdateFrame(0)
            frame.window_increment = increment
            self._prepare_for_sending([frame])

    def acknowledge_stream_data(self, size: int, stream_id: int) -> None:
        """Hand ``size`` received bytes back to one stream's window only (the second half)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(size))

    @property
    def outbound_buffered(self) -> int:
        """Bytes serialized but not yet taken by ``data_to_send``/``segments_to_send``."""
        return len(self._data_to_send) + self._segments_size


_HANDLERS: Final[dict[type[Any], str]] = {
    h2.events.RequestReceived: "_request_received",
    h2.events.ResponseReceived: "_response_received",
    h2.events.TrailersReceived: "_trailers_received",
    h2.events.InformationalResponseReceived: "_informational_response_received",
    h2.events.DataReceived: "_data_received",
    h2.events.WindowUpdated: "_window_updated",
    h2.events.RemoteSettingsChanged: "_remote_settings_changed",
    h2.events.PingAcknowledged: "_ping_acknowledged",
    h2.events.StreamEnded: "_stream_ended",
    h2.events.StreamReset: "_stream_reset",
    h2.events.PushedStreamReceived: "_push_stream_received",
    h2.events.SettingsAcknowledged: "_settings_acknowledged",
    h2.events.PriorityUpdated: "_priority_updated",
    h2.events.ConnectionTerminated: "_connection_terminated",
    h2.events.AlternativeServiceAvailable: "_alternative_service_available",
    h2.events.UnknownFrameReceived: "_unknown_frame_received",
}


class WireGRPCConnection(GRPCConnection):  # type: ignore[misc]
    """purerpc's ``GRPCConnection`` as both cores use it: bytes go in through the
    :class:`FrameGate` (whole frames, bounds checked first), and a broken bound is answered
    with GOAWAY. Subclasses set ``h2_connection``, then call :meth:`_open_gate`."""

    gate: FrameGate
    h2_connection: WireH2Connection

    def _open_gate(self, max_frame: int, *, server: bool, clock: Callable[[], float]) -> None:
        self.gate = FrameGate(max_frame, server=server, clock=clock)
        self.h2_connection.gate = self.gate  # our own frames earn its flood budget

    def receive_frames(self, data: bytes | bytearray) -> list[Any]:
        """``receive_data`` through the :class:`FrameGate`: whole frames only, bounds
        checked first. Raises :class:`PeerMisbehaved` (then call :meth:`calm_down`) or
        h2's ProtocolError (h2 has queued its GOAWAY)."""
        events: list[Any] = []
        for batch in self.gate.feed(data):
            events.extend(self.receive_data(batch))
        return events

    def receive_data(self, data: bytes) -> list[Any]:
        """purerpc's ``receive_data``, its handler found by the event's type in one lookup
        rather than a chain of up to 17 ``isinstance`` tests per event (five events a
        unary call). A type not in the table (none today: h2's events have no subclasses)
        goes through purerpc's chain."""
        grpc_events: list[Any] = []
        for event in self.h2_connection.receive_data(data):
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                grpc_events.extend(getattr(self, handler)(event))
            else:
                grpc_events.extend(self._dispatch_subclass(event))
        return grpc_events

    def _dispatch_subclass(self, event: Any) -> list[Any]:
        for kind, handler in _HANDLERS.items():
            if isinstance(event, kind):
                result: list[Any] = getattr(self, handler)(event)
                return result
        return []

    def calm_down(self, error: PeerMisbehaved) -> None:
        """Queue GOAWAY with the error of a broken bound; nothing more is read."""
        h2c = self.h2_connection
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=h2c.highest_inbound_stream_id,
            error_code=error.error_code,
            additional_data=error.reason.encode()[:128],
        )
        h2c._data_to_send += frame.serialize()
