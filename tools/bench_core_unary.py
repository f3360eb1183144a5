"""CPU of one unary call through the server's sans-I/O core, without sockets, TLS or trio.

    PYTHONPATH=<tree> python tools/bench_core_unary.py [--calls 2000] [--repeat 7]

An h2 client sends what grpcio sends for a Status, in grpcio's order (HEADERS with its
usual headers, which HPACK indexes after the first call; a WINDOW_UPDATE for the stream;
one DATA with END_STREAM; a WINDOW_UPDATE for the connection); the core parses it and
answers as the transport does for a SyncUnaryMethod (reply headers, one message, OK
trailers: in one step where the core has ``send_unary_reply``, unless ``--steps``).
Prints the thread CPU per call of the request's parsing, each part of the reply, and the
whole (best of ``--repeat`` runs: the machine may be shared). Give each tree its own PYTHONPATH to
compare them. Asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import h2.config
import h2.connection
from purerpc.grpclib.events import RequestReceived

from trio_worker._wire._h2server import GRPCServerConnection
from trio_worker._wire._window import MESSAGE_PREFIX

_HEADERS = [
    (":method", "POST"),
    (":scheme", "https"),
    (":path", "/trioworker.v1.Worker/Status"),
    (":authority", "localhost"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
    ("grpc-timeout", "29999933u"),
]
_REQUEST = b"\x0a\x1a" + b"0" * 26
_REPLY = b"\x0a\x1a" + b"0" * 26 + b"\x10\x02" + b"y" * 60


def _pair() -> tuple[h2.connection.H2Connection, GRPCServerConnection]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = GRPCServerConnection(
        max_message_length=4 << 20,
        max_concurrent_streams=32,
        initial_window_size=1 << 20,
        connection_window_size=16 << 20,
        max_frame_size=1 << 20,
        max_header_list_size=16 << 10,
    )
    server.initiate_connection()
    client.initiate_connection()
    server.receive_frames(client.data_to_send())
    client.receive_data(bytes(server.h2_connection.data_to_send()))
    server.receive_frames(client.data_to_send())
    return client, server


def _request(client: h2.connection.H2Connection, stream_id: int) -> bytes:
    # In grpcio's order: the stream's WINDOW_UPDATE between the HEADERS and the DATA.
    client.send_headers(stream_id, _HEADERS)
    client.increment_flow_control_window(5, stream_id=stream_id)
    client.send_data(stream_id, MESSAGE_PREFIX.pack(0, len(_REQUEST)) + _REQUEST, end_stream=True)
    client.increment_flow_control_window(109)
    return bytes(client.data_to_send())


def _run(calls: int, *, steps: bool) -> list[float]:
    client, server = _pair()
    fused = not steps and hasattr(server, "send_unary_reply")
    h2c: Any = server.h2_connection
    totals = [0, 0, 0, 0]
    clock = time.thread_time_ns
    warm = 10
    for i in range(warm + calls):
        record = _request(client, 1 + 2 * i)  # (not timed)
        t0 = clock()
        stream_id = 0
        for event in server.receive_frames(record):
            if type(event) is RequestReceived:
                stream_id = event.stream_id
        t1 = clock()
        if fused:
            server.send_unary_reply(stream_id, _REPLY)
            server.call_finished()
            reply = bytes(h2c.data_to_send())
            t3 = t2 = clock()
            client.receive_data(reply)  # (not timed)
            if i >= warm:
                for k, value in enumerate((t1 - t0, t2 - t1, 0, t3 - t0)):
                    totals[k] += value
            continue
        server.start_response(stream_id, "+proto")
        message = MESSAGE_PREFIX.pack(0, len(_REPLY)) + _REPLY
        send = getattr(h2c, "send_whole_data", h2c.send_data)
        send(stream_id, message)
        t2 = clock()
        server.send_status(stream_id, 0, "", None, headers=True)
        server.drop_request(stream_id)
        server.call_finished()
        reply = bytes(h2c.data_to_send())
        t3 = clock()
        client.receive_data(reply)  # (not timed)
        if i >= warm:
            for k, value in enumerate((t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                totals[k] += value
    return [total / calls / 1e3 for total in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--steps",
        action="store_true",
        help="reply in steps (headers, message, trailers) where the core has the one-step"
        " send_unary_reply",
    )
    args = parser.parse_args()
    runs = [_run(args.calls, steps=args.steps) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r[3])
    if best[2]:
        text = "reply headers + message {1:.1f}, trailers {2:.1f}"
    else:
        text = "reply in one step {1:.1f}"
    print(("per call, thread CPU (us): request {0:.1f}, " + text + ", whole {3:.1f}").format(*best))


if __name__ == "__main__":
    main()
