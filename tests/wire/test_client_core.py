"""The client's sans-I/O core against a hostile server: every bound holds on this side too."""

from __future__ import annotations

import base64
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import h2.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from purerpc.grpclib.events import ResponseEnded, ResponseReceived

from tests.wire.helpers import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PRIORITY,
    RESPONSE_BLOCK,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    CorePair,
    HostileServer,
    frame,
    grpc_frame,
    literal,
)
from trio_worker._wire._client import (
    MAX_FRAME,
    MAX_HEADER_LIST,
    BadResponse,
    MessageReader,
    MessageRefused,
    ResponseData,
)
from trio_worker._wire._h2conn import (
    FLOOD_BUDGET,
    FLOOD_REFILL,
    MAX_CACHED_BLOCK,
    MAX_CONTINUATIONS,
    MAX_HEADER_BLOCK,
    MAX_MESSAGE,
    PROTOCOL_ERRORS,
    PeerMisbehaved,
)
from trio_worker._wire._status import (
    MAX_MESSAGE_BYTES,
    StatusCode,
    decode_details,
    encode_details,
)

ENHANCE_YOUR_CALM = 0xB


def frozen() -> float:
    return 0.0


def respond_headers(server: HostileServer, stream_id: int) -> None:
    assert [
        type(e) for e in server.to_client(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_BLOCK))
    ] == [ResponseReceived]


def trailers(server: HostileServer, stream_id: int, block: bytes) -> list[Any]:
    return server.to_client(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, block))


# --- header blocks -------------------------------------------------------------------------


def test_a_header_block_from_the_server_over_the_bound_is_refused_from_its_frame_header() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    header = frame(HEADERS, 0, stream_id, b"\0" * (MAX_HEADER_BLOCK + 1))[:9]
    with pytest.raises(PeerMisbehaved) as info:
        server.to_client(header)
    assert info.value.error_code == ENHANCE_YOUR_CALM
    server.client.calm_down(info.value)
    assert server.goaway_code() == ENHANCE_YOUR_CALM


def test_too_many_continuations_from_the_server_are_refused() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    data = frame(HEADERS, 0, stream_id, RESPONSE_BLOCK[:3])
    data += b"".join(frame(CONTINUATION, 0, stream_id, b"") for _ in range(MAX_CONTINUATIONS))
    server.to_client(data)  # still within the bound
    with pytest.raises(PeerMisbehaved):
        server.to_client(frame(CONTINUATION, END_HEADERS, stream_id, b""))


def test_table_size_updates_from_the_server_are_bounded() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    with pytest.raises(h2.exceptions.ProtocolError):
        server.to_client(frame(HEADERS, END_HEADERS, stream_id, b"\x20" * 1000 + RESPONSE_BLOCK))


def test_a_frame_over_the_size_the_client_advertised_is_refused() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    with pytest.raises(PeerMisbehaved) as info:
        server.to_client(frame(DATA, 0, stream_id, b"\0" * (MAX_FRAME + 1))[:9])
    assert info.value.error_code == 0x6  # FRAME_SIZE_ERROR


def test_trailers_that_decode_over_the_bound_end_the_connection() -> None:
    """A small block can decode large: one 4 KiB entry added to the table, then referenced
    once per byte."""
    server = HostileServer()
    stream_id = server.open_call()
    respond_headers(server, stream_id)
    value = b"v" * 4000
    entry = b"\x40\x05x-big" + b"\x7f" + bytes([0x80 | ((4000 - 127) & 0x7F), (4000 - 127) >> 7])
    entry += value
    refs = MAX_HEADER_LIST // 4000 + 2
    block = entry + bytes([0x80 | 62]) * refs  # 62: the first dynamic entry
    assert len(block) < MAX_HEADER_BLOCK
    with pytest.raises(h2.exceptions.ProtocolError) as info:
        trailers(server, stream_id, block)
    assert info.value.error_code == ENHANCE_YOUR_CALM  # h2's DenialOfServiceError


def test_the_client_caches_no_big_header_blocks() -> None:
    server = HostileServer()
    blocks = []
    for i in range(64):
        pad = literal("x-pad", f"{i:04d}" + "p" * 4000)
        blocks.append(literal("grpc-status", "0") + pad)
    assert all(len(b) > MAX_CACHED_BLOCK for b in blocks)
    stream_ids = [server.open_call() for _ in range(64)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for stream_id, block in zip(stream_ids, blocks, strict=True):
            respond_headers(server, stream_id)
            assert any(isinstance(e, ResponseEnded) for e in trailers(server, stream_id, block))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 128 * 1024  # not the 64 blocks (256 KiB) as cache keys


# --- trailers, status message and details ------------------------------------------------


def test_a_long_status_message_from_the_server_is_cut() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    block = literal(":status", "200") + literal("content-type", "application/grpc")
    block += literal("grpc-status", "13") + literal("grpc-message", "m" * 40_000)
    (ended,) = [e for e in trailers(server, stream_id, block) if isinstance(e, ResponseEnded)]
    assert ended.status.int_value == 13
    assert len(ended.status.status_message.encode()) <= MAX_MESSAGE_BYTES


def test_a_status_code_that_is_no_status_fails_that_call_only() -> None:
    server = HostileServer()
    stream_id = server.open_call()
    respond_headers(server, stream_id)
    kinds = [type(e) for e in trailers(server, stream_id, literal("grpc-status", "9" * 4000))]
    assert BadResponse in kinds
    assert ResponseEnded not in kinds


def test_status_details_over_the_bound_are_ignored() -> None:
    big = encode_details(StatusCode.NOT_FOUND, "x", "JOB_NOT_FOUND", {"id": "a"})
    big += b"\x12" + b"\x80\x80\x01" + b"\0" * 16384  # one more (unknown) 16 KiB field
    assert decode_details(big) is None
    server = HostileServer()
    stream_id = server.open_call()
    respond_headers(server, stream_id)
    value = base64.b64encode(big).decode()
    block = literal("grpc-status", "5") + literal("grpc-status-details-bin", value)
    (ended,) = [e for e in trailers(server, stream_id, block) if isinstance(e, ResponseEnded)]
    assert decode_details(ended.details) is None


def test_detail_values_from_the_server_are_bounded() -> None:
    from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

    status = status_pb2.Status(code=5, message="x")
    info = error_details_pb2.ErrorInfo(reason="JOB_NOT_FOUND", domain="trioworker.v1")
    info.metadata["id"] = "i" * 10_000
    status.details.add().Pack(info)
    details = decode_details(status.SerializeToString())
    assert details is not None
    assert details.reason == "JOB_NOT_FOUND"
    assert len(details.metadata["id"].encode()) <= 256


# --- received messages ---------------------------------------------------------------------


def test_a_message_over_the_bound_is_refused_from_its_prefix() -> None:
    reader = MessageReader()
    with pytest.raises(MessageRefused) as info:
        reader.feed(struct.pack(">BI", 0, MAX_MESSAGE + 1))
    assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
    assert reader.buffered == 0


def test_a_compressed_message_is_refused() -> None:
    with pytest.raises(MessageRefused) as info:
        MessageReader().feed(struct.pack(">BI", 1, 3) + b"abc")
    assert info.value.code == StatusCode.INTERNAL


def test_messages_are_reassembled_across_frames() -> None:
    reader = MessageReader()
    data = grpc_frame(b"a" * 100_000) + grpc_frame(b"b") + grpc_frame(b"c" * 10)[:7]
    for i in range(0, len(data), 16384):
        reader.feed(data[i : i + 16384])
    assert [bytes(reader.take()) for _ in range(2)] == [b"a" * 100_000, b"b"]
    assert reader.buffered == 7
    reader.feed(grpc_frame(b"c" * 10)[7:])
    assert bytes(reader.take()) == b"c" * 10
    assert reader.buffered == 0


def test_a_message_just_under_the_bound_is_read() -> None:
    reader = MessageReader()
    data = grpc_frame(b"x" * MAX_MESSAGE)
    for i in range(0, len(data), MAX_FRAME):
        reader.feed(data[i : i + MAX_FRAME])
        assert reader.buffered <= MAX_MESSAGE + 5
    assert len(reader.take()) == MAX_MESSAGE


# --- floods --------------------------------------------------------------------------------


FLOODS: dict[str, Callable[[int], bytes]] = {
    "RST_STREAM": lambda s: frame(RST_STREAM, 0, s, struct.pack(">L", 8)),
    "PING": lambda s: frame(PING, 0, 0, b"12345678"),
    "PING ACK": lambda s: frame(PING, ACK, 0, b"12345678"),
    "SETTINGS": lambda s: frame(SETTINGS, 0, 0),
    "empty DATA": lambda s: frame(DATA, 0, s),
    "WINDOW_UPDATE": lambda s: frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)),
    "PRIORITY": lambda s: frame(PRIORITY, 0, s, struct.pack(">LB", 0, 16)),
    "unknown type": lambda s: frame(0x42, 0, 0, b"?"),
}


@pytest.mark.parametrize("kind", list(FLOODS))
def test_a_server_flooding_frames_that_make_no_progress_is_told_to_calm_down(kind: str) -> None:
    server = HostileServer(clock=frozen)
    stream_id = server.open_call()
    respond_headers(server, stream_id)
    make = FLOODS[kind]
    sent = 0

    def flood() -> None:
        nonlocal sent
        while sent < 100 * FLOOD_BUDGET:
            sent += 1
            server.to_client(make(stream_id))
            server.client_output()  # replies are written: only the budget stops it

    with pytest.raises(PeerMisbehaved) as info:
        flood()
    assert info.value.error_code == ENHANCE_YOUR_CALM
    assert sent <= FLOOD_BUDGET + 16  # our HEADERS and DATA earned a little back
    server.client.calm_down(info.value)
    assert server.goaway_code() == ENHANCE_YOUR_CALM


def test_keepalive_pings_on_a_quiet_connection_never_use_the_budget_up() -> None:
    now = [0.0]
    server = HostileServer(clock=lambda: now[0])
    server.open_call("/trioworker.v1.Worker/Wait")
    for _ in range(10 * FLOOD_BUDGET):  # about 28 hours of one PING per 10 s
        now[0] += 10.0
        server.to_client(frame(PING, 0, 0, b"keepaliv"))
        server.client_output()


def test_the_budget_refills_with_time_only_at_its_rate() -> None:
    now = [0.0]
    server = HostileServer(clock=lambda: now[0])
    ping = frame(PING, 0, 0, b"12345678")
    server.to_client(ping * (FLOOD_BUDGET - 8))
    now[0] += 1.0  # one second: FLOOD_REFILL more
    with pytest.raises(PeerMisbehaved):
        server.to_client(ping * (int(FLOOD_REFILL) + 16))


def test_an_honest_stream_of_output_never_trips_either_end() -> None:
    """The server streams 20 * FLOOD_BUDGET small DATA frames; the client hands each back
    (stream and connection WINDOW_UPDATEs) and the server PINGs now and then."""
    pair = CorePair(clock=frozen)
    stream_id = pair.call("/trioworker.v1.Worker/Output", b"")
    pair.to_server()
    pair.server.start_response(stream_id, "+proto")
    h2s, h2c = pair.server.h2_connection, pair.client.h2_connection
    for i in range(20 * FLOOD_BUDGET):
        h2s.send_data(stream_id, grpc_frame(b"x" * 100))
        if i % 10 == 0:
            h2s.ping(b"bdp-ping")
        for event in pair.to_client():
            if isinstance(event, ResponseData):
                h2c.acknowledge_received_data(event.flow, stream_id)
        h2c._data_to_send += frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", 1))
        pair.to_server()
    pair.server.send_status(stream_id, 0, "", None, headers=True)
    assert any(isinstance(e, ResponseEnded) for e in pair.to_client())


# --- random and mutated frames from a hostile server ---------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 10),  # frame type
            st.integers(0, 255),  # flags
            st.sampled_from([0, 1, 3, 5, 2]),  # stream id: ours, unopened, even
            st.one_of(
                st.binary(max_size=64),
                st.sampled_from(
                    [
                        RESPONSE_BLOCK,
                        literal("grpc-status", "0"),
                        literal("grpc-status", "3") + literal("grpc-message", "%" * 3000),
                        grpc_frame(b"ok"),
                        struct.pack(">BI", 0, MAX_MESSAGE),
                        struct.pack(">BI", 0, 2**32 - 1),
                        struct.pack(">L", 2**31 - 1),
                    ]
                ),
            ),
        ),
        max_size=40,
    ),
    st.lists(st.integers(0, 4000), max_size=5),
    st.integers(1, 40),
)
def test_random_frames_from_a_server_raise_only_protocol_errors(
    frames: list[tuple[int, int, int, bytes]], cuts: list[int], record: int
) -> None:
    """Only the core's own protocol errors escape (the client's driver turns them into
    ConnectionFailed); a call's failure stays that call's; what is held stays bounded."""
    server = HostileServer(clock=frozen)
    calls = [server.open_call(), server.open_call()]  # streams 1 and 3
    readers = {stream_id: MessageReader() for stream_id in calls}
    data = bytearray(b"".join(frame(k, f, s, p) for k, f, s, p in frames))
    for cut in cuts:  # flip some bytes
        if cut < len(data):
            data[cut] ^= 0x5A
    try:
        for i in range(0, len(data), record):
            for event in server.to_client(bytes(data[i : i + record])):
                if isinstance(event, ResponseData) and event.stream_id in readers:
                    reader = readers[event.stream_id]
                    try:
                        reader.feed(event.data)
                    except MessageRefused:
                        del readers[event.stream_id]
                        continue
                    assert reader.buffered <= MAX_MESSAGE + 5
                elif isinstance(event, ResponseEnded):
                    assert 0 <= event.status.int_value <= 63
                    assert len(event.status.status_message.encode()) <= MAX_MESSAGE_BYTES
            server.client_output()
            assert server.client.gate.buffered <= MAX_FRAME + 9 + record
    except PROTOCOL_ERRORS:
        pass


def test_a_response_header_that_is_not_utf8_is_a_protocol_error() -> None:
    # h2 decodes the server's headers as UTF-8: its UnicodeDecodeError escaped the core
    # and the drivers, which turn only protocol errors into a lost connection.
    server = HostileServer()
    stream_id = server.open_call()
    block = literal(":status", "200") + b"\x00\x05x-bad\x02\xff\xfe"
    with pytest.raises(PROTOCOL_ERRORS):
        server.to_client(frame(HEADERS, END_HEADERS, stream_id, block))
