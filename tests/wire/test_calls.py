"""A client connection's calls (``_wire._calls``), without sockets: the client core's events
filed to the calls they concern, as both client drivers use them."""

from __future__ import annotations

import struct

from tests.wire.helpers import (
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    RESPONSE_BLOCK,
    RST_STREAM,
    HostileServer,
    frame,
    grpc_frame,
)
from trio_worker._wire._calls import (
    ACK_BELOW,
    CallFailed,
    CallTable,
    ClientCall,
    Unprocessed,
)
from trio_worker._wire._status import StatusCode

REFUSED_STREAM = 0x7


def table_with(server: HostileServer, count: int) -> tuple[CallTable[ClientCall], list[ClientCall]]:
    table = CallTable[ClientCall](server.client.h2_connection)
    calls = [ClientCall(server.open_call()) for _ in range(count)]
    for call in calls:
        table.add(call)
    return table, calls


def feed(server: HostileServer, table: CallTable[ClientCall], data: bytes) -> None:
    for event in server.to_client(data):
        table.on_event(event)


def test_a_response_stream_window_follows_its_consumer() -> None:
    server = HostileServer()
    table, (call,) = table_with(server, 1)
    sid = call.stream_id
    feed(server, table, frame(HEADERS, END_HEADERS, sid, RESPONSE_BLOCK))
    message = b"x" * (300 * 1024)
    for _ in range(3):
        feed(server, table, frame(DATA, 0, sid, grpc_frame(message)))
    assert len(call.messages) == 3
    # Over ACK_BELOW bytes wait for the consumer: the rest of the stream's window is held.
    assert call.window.waiting > ACK_BELOW
    held = call.window.owed
    assert held > 0
    taken = 0
    while call.messages:
        got, release = call.take_message()
        taken += len(got)
        table.release(call, release)
    assert taken == 3 * len(message)
    assert call.window.owed == 0  # all handed back once the consumer caught up


def test_goaway_ends_only_the_calls_the_server_never_saw() -> None:
    server = HostileServer()
    table, (seen, unseen) = table_with(server, 2)
    feed(server, table, frame(GOAWAY, 0, 0, struct.pack(">LL", seen.stream_id, 0)))
    assert table.goaway
    assert unseen.done
    assert isinstance(unseen.error, Unprocessed)
    assert not seen.done
    assert list(table.calls) == [seen.stream_id]


def test_a_refused_stream_is_resource_exhausted_and_the_others_go_on() -> None:
    server = HostileServer()
    table, (refused, other) = table_with(server, 2)
    feed(server, table, frame(RST_STREAM, 0, refused.stream_id, struct.pack(">L", REFUSED_STREAM)))
    assert refused.done
    assert isinstance(refused.error, CallFailed)
    assert refused.error.code == StatusCode.RESOURCE_EXHAUSTED
    assert not other.done


def test_losing_the_connection_ends_every_call() -> None:
    server = HostileServer()
    table, calls = table_with(server, 3)
    assert table.end_all(lambda: ConnectionError("gone")) == 3
    assert not table.calls
    assert all(call.done and isinstance(call.error, ConnectionError) for call in calls)
