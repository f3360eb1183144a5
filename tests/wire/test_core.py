"""The server's sans-I/O core against an in-memory client: calls, errors and every bound."""

from __future__ import annotations

import itertools
import struct
import tracemalloc

import h2.errors
import h2.events
import h2.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError

from tests.wire.helpers import (
    ACK,
    CONTINUATION,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    ConnectionPair,
    frame,
    grpc_frame,
    hpack_int,
    request_block,
    request_headers,
)
from trio_worker import JobNotFound
from trio_worker._error_codes import exception_from, status_of
from trio_worker._wire._h2conn import (
    FLOOD_BUDGET,
    MAX_CACHED_BLOCK,
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    MAX_UNSENT_CONTROL,
    BoundedDecoder,
    FrameGate,
    PeerMisbehaved,
)
from trio_worker._wire._h2server import (
    MAX_BUFFERED_REQUESTS,
    MAX_CLIENT_BUFFERED_REQUESTS,
    RESET_BUDGET,
    ClientRequests,
    RequestTooLarge,
    StreamReset,
)
from trio_worker._wire._status import DETAILS_HEADER, details_from_header

ENHANCE_YOUR_CALM = 0xB


def test_a_unary_call_and_its_error_details_cross_in_memory() -> None:
    pair = ConnectionPair()
    pair.client.send_headers(1, request_headers(timeout="5S"))
    pair.client.send_data(1, grpc_frame(b"\x0a\x01x"), end_stream=True)
    events = pair.to_server(pair.client.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds == [RequestReceived, MessageReceived, RequestEnded]
    assert events[0].timeout.total_seconds() == 5
    assert events[1].data == b"\x0a\x01x"

    wire = status_of(JobNotFound("x"))
    pair.server.send_status(1, wire.code, wire.message, wire.details, headers=False)
    ended = [e for e in pair.to_client() if isinstance(e, h2.events.ResponseReceived)]
    trailers = dict(ended[0].headers)
    assert trailers["grpc-status"] == "5"
    details = details_from_header(trailers[DETAILS_HEADER])
    error = exception_from(int(trailers["grpc-status"]), trailers["grpc-message"], details)
    assert isinstance(error, JobNotFound)
    assert error.job_id == "x"


def test_a_reset_from_the_client_is_an_event() -> None:
    pair = ConnectionPair()
    pair.client.send_headers(1, request_headers())
    pair.to_server(pair.client.data_to_send())
    pair.client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    events = pair.to_server(pair.client.data_to_send())
    assert events == [StreamReset(1, int(h2.errors.ErrorCodes.CANCEL))]


def test_a_header_block_over_the_bound_is_refused_from_its_frame_header() -> None:
    pair = ConnectionPair()
    # Only the 9-byte frame header: refused before a byte of its payload is buffered.
    header = frame(HEADERS, 0, 1, b"\0" * (MAX_HEADER_BLOCK + 1))[:9]
    with pytest.raises(PeerMisbehaved) as info:
        pair.to_server(header)
    assert info.value.error_code == ENHANCE_YOUR_CALM


def test_headers_plus_continuations_over_the_encoded_bound_are_refused() -> None:
    pair = ConnectionPair()
    piece = MAX_HEADER_BLOCK // 4
    data = frame(HEADERS, 0, 1, b"\x20" * piece)
    data += b"".join(frame(CONTINUATION, 0, 1, b"\x20" * piece) for _ in range(3))
    with pytest.raises(PeerMisbehaved):
        pair.to_server(data + frame(CONTINUATION, 0, 1, b"\x20" * piece)[:9])


def test_too_many_continuation_frames_are_refused() -> None:
    pair = ConnectionPair()
    data = frame(HEADERS, 0, 1, request_block()[:4])
    data += b"".join(frame(CONTINUATION, 0, 1, b"") for _ in range(MAX_CONTINUATIONS))
    pair.to_server(data)  # still within the bound
    with pytest.raises(PeerMisbehaved):
        pair.to_server(frame(CONTINUATION, END_HEADERS, 1, b""))


def test_a_flood_of_table_size_updates_ends_the_connection() -> None:
    pair = ConnectionPair()
    block = b"\x20" * 1000 + request_block()
    with pytest.raises(h2.exceptions.ProtocolError):
        pair.to_server(frame(HEADERS, END_HEADERS, 1, block))
    assert pair.goaway_code() == h2.errors.ErrorCodes.PROTOCOL_ERROR  # h2's choice


def test_two_table_size_updates_are_allowed() -> None:
    pair = ConnectionPair()
    block = b"\x20\x3f\xe1\x1f" + request_block()  # size 0, then size 4096
    events = pair.to_server(frame(HEADERS, END_HEADERS, 1, block))
    assert [type(e) for e in events] == [RequestReceived]


def test_a_header_list_that_decodes_over_the_bound_is_refused() -> None:
    """Within the encoded bound (64 KiB) but over the decoded one (16 KiB here): one long
    literal value."""
    pair = ConnectionPair(max_header_list_size=16 * 1024)
    block = request_block("/test.Service/Unary", ("x-big", "v" * (17 * 1024)))
    assert len(block) < MAX_HEADER_BLOCK
    with pytest.raises((h2.exceptions.ProtocolError, PeerMisbehaved)):
        pair.to_server(frame(HEADERS, END_HEADERS, 1, block))
    assert pair.goaway_code() is not None


def test_a_small_block_that_expands_through_the_table_is_refused() -> None:
    """Decoded size is bounded, not only encoded size: a 1 KiB header entered in the dynamic
    table once, then named again by a 1-byte index, 40 times in a 100-byte block."""
    pair = ConnectionPair(max_header_list_size=16 * 1024)
    name, value = b"x-pad", b"v" * 1024
    # Literal with incremental indexing, new name (0x40), then 40 times "indexed field 62".
    entry = b"\x40" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value
    block = request_block() + entry + b"\xbe" * 40
    assert len(block) < 2 * 1024
    with pytest.raises((h2.exceptions.ProtocolError, PeerMisbehaved)):
        pair.to_server(frame(HEADERS, END_HEADERS, 1, block))
    assert pair.goaway_code() is not None


def test_a_frame_over_the_advertised_size_is_refused() -> None:
    pair = ConnectionPair(max_frame_size=16384)
    with pytest.raises(PeerMisbehaved) as info:
        pair.to_server(frame(0x0, 0, 1, b"\0" * 16385)[:9])
    assert info.value.error_code == 0x6  # FRAME_SIZE_ERROR


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    pair = ConnectionPair()
    block = request_block()
    error: PeerMisbehaved | None = None
    sent = 0
    while sent < 10 * RESET_BUDGET and error is None:
        stream_id = 1 + 2 * sent
        batch = frame(HEADERS, END_HEADERS, stream_id, block)
        batch += frame(RST_STREAM, 0, stream_id, struct.pack(">L", 8))
        sent += 1
        try:
            pair.to_server(batch)
        except PeerMisbehaved as exc:
            error = exc
    assert error is not None
    assert sent == RESET_BUDGET + 1
    pair.server.calm_down(error)
    assert pair.goaway_code() == ENHANCE_YOUR_CALM


def test_calls_that_finish_earn_resets_back() -> None:
    pair = ConnectionPair()
    block = request_block()
    for i in range(3 * RESET_BUDGET):
        stream_id = 1 + 2 * i
        pair.to_server(frame(HEADERS, END_HEADERS, stream_id, block))
        pair.to_server(frame(RST_STREAM, 0, stream_id, struct.pack(">L", 8)))
        pair.server.call_finished()  # as if a normal call ended in between


def test_pings_count_what_they_will_cost_us() -> None:
    # A clock that leaps an hour per look: the flood budget is always full again.
    gate = FrameGate(16384, server=False, clock=itertools.count(0, 3600).__next__)
    ping = frame(PING, 0, 0, b"12345678")
    gate.feed(ping * (MAX_UNSENT_CONTROL // 17 + 1))
    assert gate.control_owed > MAX_UNSENT_CONTROL
    owed = gate.control_owed
    gate.feed(frame(PING, ACK, 0, b"12345678") + frame(SETTINGS, ACK, 0))
    assert gate.control_owed == owed  # acknowledgements cost us nothing


def test_the_gate_hands_over_whole_frames_across_records() -> None:
    gate = FrameGate(1 << 20, server=False)
    frames = frame(0x0, END_STREAM, 1, b"a" * 100_000) + frame(PING, 0, 0, b"12345678")
    out = b""
    for i in range(0, len(frames), 16384):
        out += b"".join(gate.feed(frames[i : i + 16384]))
    assert out == frames
    assert gate.buffered == 0


def test_the_decoder_cache_keeps_no_big_blocks() -> None:
    decoder = BoundedDecoder()
    blocks = [request_block("/a.B/C", ("x-pad", f"{i:04d}" + "p" * 4000)) for i in range(64)]
    assert all(len(b) > MAX_CACHED_BLOCK for b in blocks)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for block in blocks:
            decoder.decode(block)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 64 * 1024  # not the 64 blocks (256 KiB) as cache keys


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10),  # frame type
            st.integers(0, 255),  # flags
            st.integers(0, 9),  # stream id
            st.binary(max_size=64),
        ),
        max_size=30,
    ),
    st.lists(st.integers(0, 4000), max_size=5),
)
def test_random_frames_raise_only_protocol_errors(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int]
) -> None:
    """Random and mutated frames: only the core's own protocol errors escape, and what the
    gate buffers stays within one frame."""
    pair = ConnectionPair(max_frame_size=16384)
    good = frame(HEADERS, END_HEADERS, 1, request_block())
    data = good + b"".join(frame(k, f, s, p) for k, f, s, p in frames)
    data = bytearray(data)
    for cut in cuts:  # flip some bytes
        if cut < len(data):
            data[cut] ^= 0x5A
    try:
        for i in range(0, len(data), 7):
            pair.to_server(bytes(data[i : i + 7]))
            assert pair.server.gate.buffered <= 16384 + 9 + 7
            assert 0 <= pair.server.buffered_requests <= MAX_BUFFERED_REQUESTS
    except (h2.exceptions.ProtocolError, GRPCProtocolError, PeerMisbehaved):
        pass


def test_a_late_window_update_for_a_forgotten_stream_is_ignored() -> None:
    """The STREAM_CLOSED GOAWAY under load: the client's WINDOW_UPDATE for a call that just
    ended arrived after h2 had forgotten the stream, and ended the whole connection."""
    pair = ConnectionPair()
    pair.client.send_headers(1, request_headers())
    pair.client.send_data(1, grpc_frame(b""), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    pair.server.start_response(1, "+proto")
    pair.server.h2_connection.send_data(1, grpc_frame(b"x" * 1000))
    pair.server.send_status(1, 0, "", None, headers=True)
    pair.to_client()
    # The next call makes h2 count (and forget) closed streams...
    pair.client.send_headers(3, request_headers())
    pair.to_server(pair.client.data_to_send())
    assert 1 not in pair.server.h2_connection.streams
    # ...then the client hands back the window of the first call's DATA.
    events = pair.to_server(frame(0x8, 0, 1, struct.pack(">L", 1000)))
    assert events == []
    assert pair.goaway_code() is None


def test_closed_streams_among_many_are_forgotten_once_they_have_doubled() -> None:
    """With 64 streams or more, closed ones are forgotten when the streams have doubled
    (not at every request's HEADERS: that looked at every stream, quadratic with 1,000
    of them); a late WINDOW_UPDATE for one closed and not forgotten yet is ignored."""
    pair = ConnectionPair()
    h2c = pair.server.h2_connection

    def answered_calls(ids: range) -> None:
        for stream_id in ids:
            pair.client.send_headers(stream_id, request_headers(), end_stream=True)
            pair.to_server(pair.client.data_to_send())
            pair.server.start_response(stream_id, "+proto")
            pair.server.send_status(stream_id, 0, "", None, headers=True)
            pair.to_client()

    for stream_id in range(1, 129, 2):  # 64 calls open at once
        pair.client.send_headers(stream_id, request_headers(), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    for stream_id in range(1, 129, 2):
        pair.server.start_response(stream_id, "+proto")
        pair.server.send_status(stream_id, 0, "", None, headers=True)
    pair.to_client()
    answered_calls(range(129, 131, 2))
    assert 1 in h2c.streams  # closed, kept until the streams double
    assert pair.to_server(frame(0x8, 0, 1, struct.pack(">L", 1000))) == []
    answered_calls(range(131, 253, 2))
    assert len(h2c.streams) == 126
    answered_calls(range(253, 255, 2))
    assert list(h2c.streams) == [253]
    assert pair.to_server(frame(0x8, 0, 1, struct.pack(">L", 1000))) == []
    assert pair.goaway_code() is None


def test_partial_requests_on_many_streams_are_bounded_per_connection() -> None:
    """Each stream may hold a message short of the 4 MiB cap, but the connection holds at
    most MAX_BUFFERED_REQUESTS of them: the stream that goes over is refused."""
    pair = ConnectionPair()
    piece = b"\0" * 16384
    refused: list[int] = []
    for stream_id in (1, 3, 5, 7):
        pair.client.send_headers(stream_id, request_headers())
        pair.to_server(pair.client.data_to_send())
        pair.client.send_data(stream_id, struct.pack(">BI", 0, 4 * 1024 * 1024 - 1))
        for _ in range((3 * 1024 * 1024) // len(piece)):
            pair.client.send_data(stream_id, piece)
            events = pair.to_server(pair.client.data_to_send())
            refused += [e.stream_id for e in events if isinstance(e, RequestTooLarge)]
            pair.to_client()  # the window updates
            assert pair.server.buffered_requests <= MAX_BUFFERED_REQUESTS
            if stream_id in refused:
                break
    assert refused == [5, 7]
    for stream_id in (1, 3):
        pair.client.reset_stream(stream_id)
    pair.to_server(pair.client.data_to_send())
    assert pair.server.buffered_requests == 0


def _partial_request(pair: ConnectionPair, stream_id: int, size: int) -> list[int]:
    """Open ``stream_id`` and send ``size`` bytes of a message announced as 4 MiB, never
    ending it; returns the streams the server refused meanwhile."""
    piece = b"\0" * 16384
    refused: list[int] = []
    pair.client.send_headers(stream_id, request_headers())
    pair.to_server(pair.client.data_to_send())
    pair.client.send_data(stream_id, struct.pack(">BI", 0, 4 * 1024 * 1024 - 1))
    for _ in range(size // len(piece)):
        pair.client.send_data(stream_id, piece)
        events = pair.to_server(pair.client.data_to_send())
        refused += [e.stream_id for e in events if isinstance(e, RequestTooLarge)]
        pair.to_client()  # the window updates
        if stream_id in refused:
            break
    return refused


def test_partial_requests_on_many_connections_are_bounded_per_client() -> None:
    """One client's connections each stay within MAX_BUFFERED_REQUESTS, and together
    within their ``ClientRequests``: the stream that takes them over is refused, whichever
    connection it is on; a connection that ends gives its bytes back."""
    shared = ClientRequests()
    per_connection = MAX_BUFFERED_REQUESTS - 1024 * 1024  # each connection stays under its own
    pairs = []
    refused: list[tuple[int, int]] = []
    for n in range(MAX_CLIENT_BUFFERED_REQUESTS // per_connection + 2):
        pair = ConnectionPair()
        pair.server.share_client_requests(shared)
        pairs.append(pair)
        for stream_id in (1, 3):
            refused += [(n, s) for s in _partial_request(pair, stream_id, per_connection // 2)]
        assert shared.held == sum(p.server.buffered_requests for p in pairs)
        assert shared.held <= MAX_CLIENT_BUFFERED_REQUESTS + 16384 + 5
    full = MAX_CLIENT_BUFFERED_REQUESTS // per_connection
    assert refused
    assert refused[0][0] == full
    assert all(p.server.buffered_requests <= MAX_BUFFERED_REQUESTS for p in pairs)
    # A connection that ends leaves room for another of the same client.
    pairs[0].server.release_client()
    assert shared.connections == len(pairs) - 1
    assert shared.held == sum(p.server.buffered_requests for p in pairs[1:])
    pair = ConnectionPair()
    pair.server.share_client_requests(shared)
    assert _partial_request(pair, 1, per_connection // 2) == []


def test_untaken_messages_of_streams_of_requests_count_for_their_client() -> None:
    """probe_hostile attach-stdin: a stream of requests whose handler takes nothing (an
    Attach to a job that reads no stdin) holds its window's messages. One client's
    connections together hold at most their ``ClientRequests``; a message the handler
    takes frees its bytes."""
    shared = ClientRequests(total=4 * 1024 * 1024)
    message = grpc_frame(b"\0" * (64 * 1024 - 5))
    pairs = []
    refused: list[int] = []
    for n in range(6):
        pair = ConnectionPair(streams_requests=lambda path: True)
        pair.server.share_client_requests(shared)
        pairs.append(pair)
        pair.client.send_headers(1, request_headers())
        for _ in range(15):  # within the stream's 1 MiB window
            pair.client.send_data(1, message)
            events = pair.to_server(pair.client.data_to_send())
            refused += [n for e in events if isinstance(e, RequestTooLarge)]
        assert shared.held <= shared.total + len(message)
    assert refused == [4, 5]  # 4 connections of 15 messages fit in 4 MiB, the 5th goes over
    held = shared.held
    for _ in range(15):
        pairs[0].server.message_taken(1)
    assert shared.held == held - 15 * (64 * 1024 - 5)
    for pair in pairs:
        pair.server.release_client()
    assert (shared.held, shared.connections) == (0, 0)


@pytest.mark.parametrize(
    "flood",
    [
        frame(PING, 0, 0, b"12345678"),
        frame(SETTINGS, 0, 0),
        frame(0x8, 0, 0, struct.pack(">L", 1)),  # WINDOW_UPDATE
        frame(RST_STREAM, 0, 1, struct.pack(">L", 8)),  # on a stream already reset
    ],
    ids=["PING", "SETTINGS", "WINDOW_UPDATE", "RST_STREAM"],
)
def test_a_client_flooding_frames_that_make_no_progress_is_told_to_calm_down(
    flood: bytes,
) -> None:
    pair = ConnectionPair(clock=lambda: 0.0)
    pair.to_server(frame(HEADERS, END_HEADERS, 1, request_block()))
    pair.to_server(frame(RST_STREAM, 0, 1, struct.pack(">L", 8)))
    sent = 0
    error: PeerMisbehaved | None = None
    while error is None and sent < 100 * FLOOD_BUDGET:
        sent += 1
        try:
            pair.to_server(flood)
        except PeerMisbehaved as exc:
            error = exc
        pair.server_output()  # replies are written: only the budget stops it
    assert error is not None
    assert error.error_code == ENHANCE_YOUR_CALM
    assert sent <= FLOOD_BUDGET + 8
    pair.server.calm_down(error)
    assert pair.goaway_code() == ENHANCE_YOUR_CALM
