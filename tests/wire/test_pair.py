"""Our client core ⇄ our server core, bytes handed over in memory: no sockets, no trio."""

from __future__ import annotations

import struct

import h2.errors
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    ResponseReceived,
)

from tests.wire.helpers import CorePair, grpc_frame
from trio_worker import InvalidRequest, JobNotFound
from trio_worker._error_codes import exception_from, status_of
from trio_worker._wire._client import (
    GoAwayReceived,
    ResponseData,
    StreamEnded,
    StreamResetByPeer,
)
from trio_worker._wire._h2server import StreamReset


def messages(data: bytes) -> list[bytes]:
    out = []
    while data:
        _, length = struct.unpack(">BI", data[:5])
        out.append(data[5 : 5 + length])
        data = data[5 + length :]
    return out


def respond(pair: CorePair, stream_id: int, *payloads: bytes) -> None:
    pair.server.start_response(stream_id, "+proto")
    for payload in payloads:
        pair.server.h2_connection.send_data(stream_id, grpc_frame(payload))
    pair.server.send_status(stream_id, 0, "", None, headers=True)


def test_a_unary_call() -> None:
    pair = CorePair()
    stream_id = pair.call("/trioworker.v1.Worker/Status", b"\x0a\x02id", timeout=2.5)
    events = pair.to_server()
    assert [type(e) for e in events] == [RequestReceived, MessageReceived, RequestEnded]
    assert events[0].method_name == "Status"
    assert 2.4 < events[0].timeout.total_seconds() <= 2.5  # the deadline, as grpc-timeout
    respond(pair, stream_id, b"answer")
    events = pair.to_client()
    assert [type(e) for e in events] == [ResponseReceived, ResponseData, ResponseEnded, StreamEnded]
    assert messages(events[1].data) == [b"answer"]
    assert events[2].status.int_value == 0


def test_a_stream_of_responses() -> None:
    pair = CorePair()
    stream_id = pair.call("/trioworker.v1.Worker/Output", b"")
    pair.to_server()
    respond(pair, stream_id, b"one", b"two", b"three")
    data = b"".join(e.data for e in pair.to_client() if isinstance(e, ResponseData))
    assert messages(data) == [b"one", b"two", b"three"]


def test_errors_cross_as_reasons_not_text() -> None:
    pair = CorePair()
    for exc in (JobNotFound("01ABC"), InvalidRequest("limits.cpus", "must be > 0")):
        stream_id = pair.call("/trioworker.v1.Worker/Status", b"")
        pair.to_server()
        wire = status_of(exc)
        pair.server.send_status(stream_id, wire.code, "(not read)", wire.details, headers=False)
        ended = [e for e in pair.to_client() if isinstance(e, ResponseEnded)]
        status = ended[0].status
        again = exception_from(status.int_value, status.status_message, ended[0].details)
        assert type(again) is type(exc)
        assert str(again) == str(exc)


def test_a_cancelled_call_reaches_the_server_as_a_reset() -> None:
    pair = CorePair()
    stream_id = pair.call("/trioworker.v1.Worker/Wait", b"")
    pair.to_server()
    pair.client.h2_connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
    assert pair.to_server() == [StreamReset(stream_id, int(h2.errors.ErrorCodes.CANCEL))]


def test_a_server_reset_reaches_the_client() -> None:
    pair = CorePair()
    stream_id = pair.call("/trioworker.v1.Worker/Wait", b"")
    pair.to_server()
    pair.server.h2_connection.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
    events = pair.to_client()
    assert [(type(e), e.stream_id) for e in events] == [(StreamResetByPeer, stream_id)]


def test_a_graceful_goaway_lets_calls_in_flight_finish() -> None:
    pair = CorePair()
    first = pair.call("/trioworker.v1.Worker/Wait", b"")
    pair.to_server()
    pair.server.h2_connection.send_graceful_goaway(first)
    events = pair.to_client()
    assert [(type(e), e.last_stream_id) for e in events] == [(GoAwayReceived, first)]
    respond(pair, first, b"done")  # the call in flight still ends normally
    assert any(isinstance(e, ResponseEnded) for e in pair.to_client())


def test_the_server_sends_no_more_than_the_clients_window() -> None:
    pair = CorePair()
    stream_id = pair.call("/trioworker.v1.Worker/Output", b"")
    pair.to_server()
    h2s = pair.server.h2_connection
    window = int(h2s.local_flow_control_window(stream_id))
    assert window == 1024 * 1024  # what the client advertises per stream
    pair.server.start_response(stream_id, "+proto")
    sent = 600 * 1024  # over half the window: h2 batches smaller WINDOW_UPDATEs
    h2s.send_data(stream_id, b"x" * sent)
    assert int(h2s.local_flow_control_window(stream_id)) == window - sent
    received = sum(e.flow for e in pair.to_client() if isinstance(e, ResponseData))
    assert received == sent
    # Until the client hands the bytes back, the server's window stays short by them.
    pair.to_server()
    assert int(h2s.local_flow_control_window(stream_id)) == window - sent
    pair.client.h2_connection.acknowledge_received_data(received, stream_id)
    pair.to_server()
    assert int(h2s.local_flow_control_window(stream_id)) == window
