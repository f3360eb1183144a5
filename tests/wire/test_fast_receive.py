"""The server core's receive fast path gives what h2 gives, frame sequence by frame sequence.

``GRPCServerConnection._take`` reads a unary call's frames (HEADERS opening a stream, DATA,
WINDOW_UPDATE) itself and drives h2's state beside it; every other frame, state and error
is h2's. Two cores, one with the fast path and one without, are fed the same bytes, cut
the same way: honest calls, and hostile sequences (frames on closed, unknown or even
streams, bad flags and padding, flow-control and content-length violations, HPACK
garbage, header blocks split by CONTINUATION and interrupted, informational headers,
window overflows, replies interleaved). After every read both must give the same events,
or the same exception with the same GOAWAY; the same bytes to send; the same state of
h2's connection, streams, windows and HPACK table, and of the core's own bookkeeping.
"""

from __future__ import annotations

import itertools
import re
import struct
from typing import Any

import h2.connection
import h2.exceptions
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire.helpers import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    grpc_frame,
    request_headers,
)
from trio_worker._wire._h2conn import PROTOCOL_ERRORS
from trio_worker._wire._h2server import GRPCServerConnection

PADDED, PRIORITY_FLAG = 0x8, 0x20


def _core(fast: bool) -> GRPCServerConnection:
    core = GRPCServerConnection(
        max_message_length=64,
        max_concurrent_streams=100,
        initial_window_size=200,  # small: DATA runs over a stream's window
        connection_window_size=70_000,
        max_frame_size=16_384,
        max_header_list_size=400,  # small: a header list runs over it
        clock=lambda: 0.0,
    )
    core.fast_receive = fast
    core.initiate_connection()
    return core


def _stream_state(stream: Any) -> tuple[Any, ...]:
    """Every attribute of h2's stream, its state machine and its window manager (the
    fast path makes streams without h2's constructors: a missing or extra one shows)."""
    own = {
        key: value
        for key, value in vars(stream).items()
        if key not in ("state_machine", "_inbound_window_manager", "config")
    }
    return (
        vars(stream.state_machine),
        vars(stream._inbound_window_manager),
        own,
        type(stream.config).__name__,
    )


def _state(core: GRPCServerConnection) -> dict[str, Any]:
    h2c = core.h2_connection
    window = h2c._inbound_flow_control_window_manager
    table = h2c.decoder.header_table
    return {
        "connection": h2c.state_machine.state,
        "highest": (h2c.highest_inbound_stream_id, h2c.highest_outbound_stream_id),
        "windows": (
            h2c.outbound_flow_control_window,
            window.current_window_size,
            window.max_window_size,
            window._bytes_processed,
        ),
        "streams": {sid: _stream_state(s) for sid, s in h2c.streams.items()},
        "closed": dict(h2c._closed_streams),
        "incoming": (
            h2c.incoming_buffer.data,
            [(f.stream_id, bytes(f.data)) for f in h2c.incoming_buffer._headers_buffer],
        ),
        "hpack": (list(table.dynamic_entries), table.maxsize, table._current_size),
        "remote": dict(h2c.remote_settings),
        "buffers": sorted(core.message_read_buffers),
        "buffered": (dict(core._buffered), core.buffered_requests),
        "held": sorted(core._held),
        "untaken": {k: list(v) for k, v in core._untaken.items()},
        "resets": core._reset_budget,
        "gate": (core.gate._flood, core.gate.control_owed, core.gate.buffered),
    }


def _event(event: Any) -> tuple[Any, ...]:
    fields = (
        vars(event)
        if hasattr(event, "__dict__")
        else {name: getattr(event, name) for name in event.__slots__}
    )
    return (type(event).__name__, sorted((k, repr(v)) for k, v in fields.items()))


def _outcome(core: GRPCServerConnection, data: bytes) -> tuple[Any, ...]:
    try:
        result: Any = [_event(e) for e in core.receive_frames(data)]
    except PROTOCOL_ERRORS as exc:
        reason = re.sub(r" at 0x[0-9a-f]+", "", str(exc))  # hpack names a memoryview
        result = ("raised", type(exc).__name__, reason, getattr(exc, "error_code", None))
        # The rest of a batch h2 failed on stays in its buffer, never read: without the
        # fast path a batch goes to h2 whole, with it in runs. Nothing reads it again.
        core.h2_connection.incoming_buffer.data = b""
    return result, bytes(core.h2_connection.data_to_send()), _state(core)


def _reply(core: GRPCServerConnection, stream_id: int) -> tuple[Any, ...]:
    """Answer a call as the transport does (headers, one message, OK trailers): the core
    with the fast path through the reply's shortcuts too, the other through h2 alone."""
    h2c = core.h2_connection
    try:
        if core.fast_receive:
            core.start_response(stream_id, "+proto")
            h2c.send_whole_data(stream_id, grpc_frame(b"ok"))
            core.send_status(stream_id, 0, "", None, headers=True)
        else:
            h2c.send_headers(
                stream_id, [(":status", "200"), ("content-type", "application/grpc+proto")]
            )
            h2c.send_data(stream_id, grpc_frame(b"ok"))
            h2c.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        core.drop_request(stream_id)
        core.call_finished()
        result: Any = "answered"
    except h2.exceptions.ProtocolError:
        # On a stream never opened the shortcuts raise NoSuchStreamError where h2, about
        # to open it, counts open streams (forgetting closed ones) and raises
        # ProtocolError: the same class to the transport, which catches both, and the
        # same forgetting at the next count. Counted here on both sides alike.
        result = "raised"
        h2c._open_streams(1)
    return result, bytes(h2c.data_to_send()), _state(core)


_STREAMS = st.sampled_from(["next", "last", "old", "even", "zero", "far"])
_WINDOW_INCREMENTS = st.sampled_from([0, 1, 5, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**30])

_OPS = st.one_of(
    st.tuples(
        st.just("headers"),
        _STREAMS,
        st.booleans(),  # END_STREAM
        st.sampled_from(
            [
                "plain",
                "plain",
                "plain",
                "padded",
                "priority",
                "split",
                "unfinished",
                "informational",
                "content-length",
                "bad-content-length",
                "garbage",
                "oversized",
                "indexed",
                "size-update",
            ]
        ),
    ),
    st.tuples(
        st.just("data"),
        _STREAMS,
        st.booleans(),  # END_STREAM
        st.booleans(),  # PADDED
        st.sampled_from(["message", "message", "empty", "partial", "compressed", "large", "big"]),
    ),
    st.tuples(
        st.just("window"),
        st.sampled_from(["zero", "zero", "last", "old", "far", "even"]),
        _WINDOW_INCREMENTS,
    ),
    st.tuples(
        st.just("frame"),
        st.sampled_from(
            [
                "ping",
                "ping-ack",
                "settings",
                "settings-ack",
                "rst",
                "priority",
                "goaway",
                "unknown",
                "continuation",
                "short-window",
                "long-window",
            ]
        ),
        _STREAMS,
    ),
    st.tuples(st.just("reply"), st.sampled_from(["last", "old"])),
    st.tuples(st.just("cut"), st.integers(0, 120)),
)


class _Client:
    """Writes the bytes of a generated sequence (an HPACK encoder of its own)."""

    def __init__(self) -> None:
        self.encoder = hpack.Encoder()
        self.next_id = 1
        self.opened: list[int] = []

    def stream(self, choice: str) -> int:
        if choice == "next":
            sid = self.next_id
            self.next_id += 2
            self.opened.append(sid)
            return sid
        if choice == "last":
            return self.opened[-1] if self.opened else 1
        if choice == "old":
            return self.opened[0] if self.opened else 3
        if choice == "even":
            return 2
        if choice == "zero":
            return 0
        return self.next_id + 40  # "far": never opened

    def headers(self, sid: int, end: bool, variant: str) -> bytes:
        flags = END_HEADERS | (END_STREAM if end else 0)
        fields = request_headers("/test.Service/Unary", timeout="5S")
        if variant == "informational":
            fields = [(":status", "100"), *fields]
        elif variant == "content-length":
            fields = [*fields, ("content-length", "7")]
        elif variant == "bad-content-length":
            fields = [*fields, ("content-length", "x")]
        elif variant == "oversized":
            fields = [*fields, ("x-big", "v" * 500)]
        if variant == "garbage":
            block = b"\xff\xff\xff\xff\x0f"
        elif variant == "indexed":
            block = b"\xbf\x7f"  # an index far past the table
        elif variant == "size-update":
            block = b"\x3f\xe1\x1f" + self.encoder.encode(fields)
        else:
            block = self.encoder.encode(fields)
        if variant == "padded":
            return frame(HEADERS, flags | PADDED, sid, b"\x02" + block + b"\x00\x00")
        if variant == "priority":
            return frame(HEADERS, flags | PRIORITY_FLAG, sid, b"\x00\x00\x00\x00\x10" + block)
        if variant in ("split", "unfinished"):
            head = frame(HEADERS, flags & ~END_HEADERS, sid, block[:3])
            if variant == "unfinished":
                return head
            return head + frame(CONTINUATION, END_HEADERS, sid, block[3:])
        return frame(HEADERS, flags, sid, block)

    def data(self, sid: int, end: bool, padded: bool, kind: str) -> bytes:
        payload = {
            "message": grpc_frame(b"\x0a\x03abc"),
            "empty": b"",
            "partial": grpc_frame(b"0123456789")[:8],
            "compressed": b"\x01" + grpc_frame(b"zz")[1:],
            "large": grpc_frame(b"L" * 100),  # over max_message_length
            "big": grpc_frame(b"B" * 40) * 6,  # over the stream's window
        }[kind]
        flags = END_STREAM if end else 0
        if padded:
            return frame(DATA, flags | PADDED, sid, b"\x03" + payload + b"\x00" * 3)
        return frame(DATA, flags, sid, payload)


def _bytes_of(op: tuple[Any, ...], client: _Client) -> bytes:
    kind = op[0]
    if kind == "headers":
        return client.headers(client.stream(op[1]), op[2], op[3])
    if kind == "data":
        return client.data(client.stream(op[1]), op[2], op[3], op[4])
    if kind == "window":
        return frame(WINDOW_UPDATE, 0, client.stream(op[1]), struct.pack(">L", op[2]))
    sid = client.stream(op[2])
    return {
        "ping": frame(PING, 0, 0, b"12345678"),
        "ping-ack": frame(PING, 1, 0, b"12345678"),
        "settings": frame(SETTINGS, 0, 0, struct.pack(">HL", 4, 100)),
        "settings-ack": frame(SETTINGS, 1, 0),
        "rst": frame(RST_STREAM, 0, sid, struct.pack(">L", 8)),
        "priority": frame(PRIORITY, 0, sid, b"\x00\x00\x00\x00\x10"),
        "goaway": frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0)),
        "unknown": frame(0x4A, 0, sid, b"??"),
        "continuation": frame(CONTINUATION, END_HEADERS, sid, b"\x82"),
        "short-window": frame(WINDOW_UPDATE, 0, sid, b"\x00\x01"),
        "long-window": frame(WINDOW_UPDATE, 0, sid, b"\x00\x00\x00\x01\x00"),
    }[op[1]]


def _run(ops: list[tuple[Any, ...]], *, opened: bool = True) -> int:
    """Feed ``ops`` to both cores; assert they agree at every step. Returns the steps.

    ``opened``: a first call goes before them, so the connection has left IDLE (until
    then every frame is h2's)."""
    slow, fast = _core(False), _core(True)
    assert bytes(slow.h2_connection.data_to_send()) == bytes(fast.h2_connection.data_to_send())
    opening = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    opening.initiate_connection()
    pending = bytearray(PREFACE + bytes(opening.data_to_send())[len(PREFACE) :])
    pending += frame(SETTINGS, 1, 0)  # our SETTINGS acknowledged
    client = _Client()
    steps = 0
    if opened:
        ops = [
            ("headers", "next", False, "plain"),
            ("data", "last", True, False, "message"),
            ("cut", 1000),
            *ops,
        ]

    def feed(data: bytes) -> bool:
        nonlocal steps
        steps += 1
        expected = _outcome(slow, data)
        assert _outcome(fast, data) == expected
        return not isinstance(expected[0], tuple)  # False: the connection is over

    for op in ops:
        if op[0] == "cut":  # feed what is pending, cut at a point
            at = min(op[1], len(pending))
            if not feed(bytes(pending[:at])):
                return steps
            del pending[:at]
            continue
        if op[0] == "reply":
            if pending and not feed(bytes(pending)):
                return steps
            pending.clear()
            sid = client.stream(op[1])
            assert _reply(fast, sid) == _reply(slow, sid)
            continue
        pending += _bytes_of(op, client)
    if pending:
        feed(bytes(pending))
    return steps


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(_OPS, max_size=30))
def test_the_fast_path_and_h2_agree_on_any_frame_sequence(ops: list[tuple[Any, ...]]) -> None:
    _run(ops)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_OPS, max_size=12))
def test_they_agree_from_the_connections_first_frame(ops: list[tuple[Any, ...]]) -> None:
    _run(ops, opened=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(
        st.tuples(
            st.booleans(),
            st.sampled_from(["message", "empty", "partial"]),
            st.booleans(),
            st.sampled_from([(), ("last",), ("zero",), ("last", "zero")]),
        ),
        min_size=1,
        max_size=12,
    ),
    cuts=st.lists(st.integers(0, 60), max_size=12),
)
def test_honest_calls_cut_anywhere_agree(
    calls: list[tuple[bool, str, bool, tuple[str, ...]]], cuts: list[int]
) -> None:
    ops: list[tuple[Any, ...]] = []
    for (split, payload, answer, windows), cut in zip(
        calls, [*cuts, *[0] * len(calls)], strict=False
    ):
        ops.append(("headers", "next", False, "split" if split else "plain"))
        # WINDOW_UPDATEs between a request's HEADERS and its DATA, as grpcio sends them.
        ops.extend(("window", stream, 7) for stream in windows)
        ops.append(("data", "last", True, False, payload))
        ops.append(("cut", cut))
        if answer:
            ops.append(("reply", "last"))
            ops.append(("window", "last", 5))
            ops.append(("window", "zero", 100))
    _run(ops)


@pytest.mark.parametrize(
    "ops",
    [
        # A DATA frame over the stream's window: FLOW_CONTROL_ERROR, as h2 says.
        [("headers", "next", False, "plain"), ("data", "last", False, False, "big")],
        # A second HEADERS on an open stream, then an even stream: h2's errors.
        [("headers", "next", False, "plain"), ("headers", "last", False, "plain")],
        [("headers", "even", True, "plain")],
        # A header block interrupted by a DATA frame.
        [("headers", "next", False, "unfinished"), ("data", "last", True, False, "message")],
        # The content length broken.
        [("headers", "next", False, "content-length"), ("data", "last", True, False, "message")],
        # Window overflow on the connection and on a stream.
        [("window", "zero", 2**31 - 1)],
        [("headers", "next", False, "plain"), ("window", "last", 2**31 - 1)],
    ],
)
def test_named_hostile_sequences_agree(ops: list[tuple[Any, ...]]) -> None:
    assert _run(ops) >= 1


def test_a_unary_call_never_reaches_h2s_frame_reader() -> None:
    # The point of the path: an honest call's frames are all taken (h2's receive_data,
    # its frame buffer and frame objects, is not called at all) once the connection is
    # open (h2's state machine leaves IDLE on the first HEADERS, which h2 reads).
    core = _core(True)
    opening = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    opening.initiate_connection()
    core.receive_frames(bytes(opening.data_to_send()) + frame(SETTINGS, 1, 0))
    core.h2_connection.data_to_send()
    calls = []
    real = core.h2_connection.receive_data
    core.h2_connection.receive_data = lambda data: calls.append(data) or real(data)
    client = _Client()
    for call in range(4):
        if call == 1:
            calls.clear()
        sid = client.stream("next")
        record = client.headers(sid, False, "plain") + client.data(sid, True, False, "message")
        events = core.receive_frames(record)
        assert [type(e).__name__ for e in events] == [
            "RequestReceived",
            "MessageReceived",
            "RequestEnded",
        ]
        _reply(core, sid)
        core.receive_frames(
            frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", 10))
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 10))
        )
    assert calls == []


def test_a_unary_call_in_grpcios_frame_order_is_dispatched_at_once() -> None:
    # grpcio sends a stream's WINDOW_UPDATE between the request's HEADERS and its DATA
    # (and the connection's after it): the request is still taken whole (``_on_unary``,
    # not the three handlers and purerpc's buffers), and the window events stay where
    # their frames came.
    core = _core(True)
    opening = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    opening.initiate_connection()
    core.receive_frames(bytes(opening.data_to_send()) + frame(SETTINGS, 1, 0))
    core.h2_connection.data_to_send()
    client = _Client()
    handled: list[str] = []
    for name in ("_on_request", "_on_data", "_on_stream_ended"):
        real = getattr(core, name)
        setattr(core, name, lambda *a, _n=name, _r=real: handled.append(_n) or _r(*a))
    for call in range(3):
        handled.clear()
        sid = client.stream("next")
        record = (
            client.headers(sid, False, "plain")
            + frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", 10))
            + client.data(sid, True, False, "message")
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 10))
        )
        events = core.receive_frames(record)
        assert [type(e).__name__ for e in events] == [
            "RequestReceived",
            "WindowUpdated",
            "MessageReceived",
            "RequestEnded",
            "WindowUpdated",
        ]
        assert [(e.stream_id, e.delta) for e in events if type(e).__name__ == "WindowUpdated"] == [
            (sid, 10),
            (0, 10),
        ]
        # (h2 reads the first HEADERS: the connection leaves IDLE there)
        assert handled == ([] if call else ["_on_request", "_on_data", "_on_stream_ended"])
        _reply(core, sid)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(
        st.tuples(st.sampled_from([0, 0, 0, 1]), st.binary(max_size=70)), min_size=1, max_size=3
    ),
    cuts=st.lists(st.integers(1, 220), max_size=4),
)
def test_request_messages_are_what_purerpcs_buffer_makes(
    messages: list[tuple[int, bytes]], cuts: list[int]
) -> None:
    # A whole message in one DATA frame skips purerpc's MessageReadBuffer; anything else
    # (split, several, compressed, over the cap) goes through it. Same events either way.
    from purerpc.grpclib.buffers import MessageReadBuffer
    from purerpc.grpclib.exceptions import MessageTooLargeError
    from purerpc.grpclib.exceptions import ProtocolError as GRPCProtocolError

    body = b"".join(struct.pack(">BI", flag, len(p)) + p for flag, p in messages)
    points = sorted({0, len(body), *(c for c in cuts if c < len(body))})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)] or [b""]

    reference: list[tuple[Any, ...]] = []
    buffer = MessageReadBuffer(None, 64)
    for chunk in chunks:
        try:
            buffer.data_received(chunk, len(chunk))
        except MessageTooLargeError:
            reference.append(("RequestTooLarge",))
            break
        except GRPCProtocolError:
            reference.append(("BadMessage",))
            break
        reference.extend(("MessageReceived", m, f) for m, f in buffer._messages)
        buffer._messages.clear()

    core = _core(True)
    opening = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    opening.initiate_connection()
    core.receive_frames(bytes(opening.data_to_send()) + frame(SETTINGS, 1, 0))
    client = _Client()
    for _ in range(2):  # the first call opens the connection (h2 reads its HEADERS)
        sid = client.stream("next")
        record = client.headers(sid, False, "plain")
        for i, chunk in enumerate(chunks):
            record += frame(DATA, END_STREAM if i == len(chunks) - 1 else 0, sid, chunk)
        got = []
        for event in core.receive_frames(record):
            name = type(event).__name__
            if name == "MessageReceived":
                got.append((name, event.data, event.flow_controlled_length))
            elif name in ("RequestTooLarge", "BadMessage"):
                got.append((name,))
        assert got == reference
