"""An HTTP/2 peer and our server core, bytes handed over in memory (no sockets, no trio).

As h11's ``ConnectionPair``: ``pair.client`` is h2's own client-side ``H2Connection`` (an
honest peer, or a hostile one writing frames by hand with :func:`frame`), ``pair.server``
our ``GRPCServerConnection``. ``pair.to_server(...)`` feeds the server core and returns its
events; ``pair.to_client()`` moves the server's output to the client and returns the
client's events.
"""

from __future__ import annotations

import struct
from typing import Any

import h2.config
import h2.connection
import h2.events

from trio_worker._wire._h2conn import hpack_int
from trio_worker._wire._h2server import GRPCServerConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, CONTINUATION = 0x1, 0x3, 0x4, 0x6, 0x7, 0x9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, kind, flags, stream_id) + payload


def literal(name: str, value: str) -> bytes:
    """A header field as a literal without indexing: blocks stay independent."""
    n, v = name.encode(), value.encode()
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


def request_block(method: str = "/test.Service/Unary", *extra: tuple[str, str]) -> bytes:
    """``request_headers`` as one hand-written HPACK block (literals only)."""
    fields = [*request_headers(method), *extra]
    return b"".join(literal(n, v) for n, v in fields)


def grpc_frame(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def request_headers(method: str = "/test.Service/Unary", timeout: str | None = None) -> list[Any]:
    headers = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", method),
        (":authority", "localhost"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ]
    if timeout is not None:
        headers.append(("grpc-timeout", timeout))
    return headers


class ConnectionPair:
    """A client H2Connection and our server core, connected in memory."""

    def __init__(self, *, max_frame_size: int = 1024 * 1024, **settings: Any) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        config: dict[str, Any] = {
            "max_message_length": 4 * 1024 * 1024,
            "max_concurrent_streams": 100,
            "initial_window_size": 1024 * 1024,
            "connection_window_size": 16 * 1024 * 1024,
            "max_frame_size": max_frame_size,
            "max_header_list_size": 16 * 1024,
        }
        config.update(settings)
        self.server = GRPCServerConnection(**config)
        self.server.initiate_connection()
        self.client.initiate_connection()
        self.to_server(self.client.data_to_send())
        self.to_client()
        self.to_server(self.client.data_to_send())  # the client's SETTINGS ACK

    def to_server(self, data: bytes) -> list[Any]:
        return self.server.receive_frames(data)

    def server_output(self) -> bytes:
        return bytes(self.server.h2_connection.data_to_send())

    def to_client(self) -> list[Any]:
        return list(self.client.receive_data(self.server_output()))

    def goaway_code(self) -> int | None:
        """The error code of a GOAWAY the server queued, if any."""
        for event in self.to_client():
            if isinstance(event, h2.events.ConnectionTerminated):
                return int(event.error_code)
        return None


class CorePair:
    """Our client core and our server core, connected in memory (h11's ConnectionPair)."""

    def __init__(self, clock: Any = None, **settings: Any) -> None:
        from trio_worker._wire._client import GRPCClientConnection

        config: dict[str, Any] = {
            "max_message_length": 4 * 1024 * 1024,
            "max_concurrent_streams": 100,
            "initial_window_size": 1024 * 1024,
            "connection_window_size": 16 * 1024 * 1024,
            "max_frame_size": 1024 * 1024,
            "max_header_list_size": 16 * 1024,
        }
        config.update(settings)
        if clock is not None:
            config["clock"] = clock
        self.client = GRPCClientConnection() if clock is None else GRPCClientConnection(clock=clock)
        self.server = GRPCServerConnection(**config)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()

    def to_server(self) -> list[Any]:
        return self.server.receive_frames(bytes(self.client.h2_connection.data_to_send()))

    def to_client(self) -> list[Any]:
        return list(self.client.receive_data(bytes(self.server.h2_connection.data_to_send())))

    def call(self, path: str, payload: bytes, timeout: float | None = None) -> int:
        """Open a call from the client: headers, one message, END_STREAM."""
        from trio_worker._wire._client import request_headers, with_timeout

        h2c = self.client.h2_connection
        stream_id = int(h2c.get_next_available_stream_id())
        headers = request_headers(path, "localhost:50051")
        if timeout is not None:
            headers = with_timeout(headers, timeout)
        h2c.send_headers(stream_id, headers, end_stream=False)
        h2c.send_data(stream_id, grpc_frame(payload), end_stream=True)
        return stream_id


DATA, PRIORITY, WINDOW_UPDATE = 0x0, 0x2, 0x8
RESPONSE_BLOCK = literal(":status", "200") + literal("content-type", "application/grpc+proto")


class HostileServer:
    """Our client core, and a server written frame by frame (h2's own server would refuse
    to misbehave): ``to_client(frames)`` feeds the client core and returns its events."""

    def __init__(self, clock: Any = None) -> None:
        from trio_worker._wire._client import GRPCClientConnection

        self.client = GRPCClientConnection() if clock is None else GRPCClientConnection(clock=clock)
        self.client.initiate_connection()
        self.client_output()  # the preface and our SETTINGS
        self.to_client(frame(SETTINGS, 0, 0))
        self.client_output()  # the SETTINGS ACK

    def open_call(self, path: str = "/trioworker.v1.Worker/Status") -> int:
        """A request from the client: headers, one empty message, END_STREAM."""
        from trio_worker._wire._client import request_headers

        h2c = self.client.h2_connection
        stream_id = int(h2c.get_next_available_stream_id())
        h2c.send_headers(stream_id, request_headers(path, "localhost:50051"))
        h2c.send_data(stream_id, grpc_frame(b""), end_stream=True)
        self.client_output()
        return stream_id

    def to_client(self, data: bytes) -> list[Any]:
        return self.client.receive_frames(data)

    def client_output(self) -> bytes:
        return bytes(self.client.h2_connection.data_to_send())

    def goaway_code(self) -> int | None:
        """The error code of the last GOAWAY the client queued, if any."""
        data, code = self.client_output(), None
        while data:
            length = int.from_bytes(data[:3], "big")
            if data[3] == GOAWAY:
                code = int.from_bytes(data[13:17], "big")
            data = data[9 + length :]
        return code
