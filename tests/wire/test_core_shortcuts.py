"""The server core's shortcuts on a unary call's path give what h2 and purerpc give.

Request header lists are parsed once per distinct list (and decoded by us, not h2); a
reply's headers and OK trailers are written as ready-made blocks beside h2's state
machines (``send_header_block``). Each test compares with h2/purerpc's own path or checks
a bound.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import h2.events
import h2.exceptions
import h2.settings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import MessageReceived, RequestReceived
from purerpc.grpclib.headers import HeaderDict

from tests.wire.helpers import (
    END_HEADERS,
    HEADERS,
    ConnectionPair,
    frame,
    grpc_frame,
    request_block,
    request_headers,
)
from trio_worker._wire._h2conn import _HANDLERS
from trio_worker._wire._h2server import (
    MAX_CACHED_REQUEST,
    MAX_CACHED_REQUESTS,
    BadRequest,
    ServerH2Connection,
)

_FIELDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
#: Values h2's client sends as they are (it strips whitespace at the ends).
_VALUES = st.text(
    alphabet=st.characters(
        min_codepoint=0x21, max_codepoint=0x2FF, blacklist_categories=("Cc", "Zs")
    ),
    max_size=40,
)


def _reference(headers: list[tuple[str, str]]) -> dict[str, Any]:
    """purerpc's own parse of ``headers``, as the core parsed them before the cache."""
    parsed = RequestReceived.parse_from_stream_id_and_headers_destructive(1, HeaderDict(headers))
    return {k: v for k, v in vars(parsed).items() if k != "stream_id"}


@settings(max_examples=60, deadline=None)
@given(
    metadata=st.lists(
        st.tuples(_FIELDS.filter(lambda n: not n.startswith("grpc-")), _VALUES), max_size=4
    ),
    timeout=st.none() | st.sampled_from(["5S", "100m", "29999u", "1H", "7n"]),
)
def test_a_request_header_list_parses_as_purerpc_parses_it_every_time(
    metadata: list[tuple[str, str]], timeout: str | None
) -> None:
    pair = ConnectionPair()
    headers = [*request_headers(timeout=timeout), *metadata]
    seen = []
    for stream_id in (1, 3, 5):  # parsed, then twice from the cache (when small enough)
        pair.client.send_headers(stream_id, headers)
        events = pair.to_server(pair.client.data_to_send())
        assert [type(e) for e in events] == [RequestReceived]
        assert events[0].stream_id == stream_id
        seen.append({k: v for k, v in vars(events[0]).items() if k != "stream_id"})
    assert seen == [_reference(headers)] * 3


def test_a_request_header_that_is_not_utf8_fails_its_stream_only() -> None:
    # h2 decoded it and raised UnicodeDecodeError out of the core: the server died.
    pair = ConnectionPair()
    block = request_block() + b"\x00\x05x-bad\x02\xff\xfe"  # a literal, not UTF-8
    events = pair.to_server(frame(HEADERS, END_HEADERS, 1, block))
    assert [type(e) for e in events] == [BadRequest]
    assert "UnicodeDecodeError" in events[0].reason
    pair.client.send_headers(3, request_headers(), end_stream=True)
    events = pair.to_server(pair.client.data_to_send())
    assert type(events[0]) is RequestReceived


def test_the_parsed_request_cache_is_bounded_in_lists_and_bytes() -> None:
    pair = ConnectionPair()
    cache = pair.server._requests
    stream_id = 1
    for n in range(MAX_CACHED_REQUESTS * 3):
        pair.client.send_headers(stream_id, [*request_headers(), ("x-n", str(n))])
        pair.to_server(pair.client.data_to_send())
        stream_id += 2
        assert 0 < len(cache) <= MAX_CACHED_REQUESTS
    cache.clear()
    pair.client.send_headers(stream_id, [*request_headers(), ("x-big", "v" * MAX_CACHED_REQUEST)])
    events = pair.to_server(pair.client.data_to_send())
    assert events[0].custom_metadata == (("x-big", "v" * MAX_CACHED_REQUEST),)
    assert not cache  # parsed, not kept
    assert MAX_CACHED_REQUEST * MAX_CACHED_REQUESTS <= 8 * 1024


def _answer(pair: ConnectionPair, stream_id: int, *, ready_made: bool) -> bytes:
    """A whole OK response on ``stream_id``: the shortcut, or h2's own send_headers."""
    server = pair.server
    if ready_made:
        server.start_response(stream_id, "+proto")
        server.h2_connection.send_data(stream_id, grpc_frame(b"\x0a\x01x"))
        server.send_status(stream_id, 0, "", None, headers=True)
    else:
        h2c = server.h2_connection
        reply = [(":status", "200"), ("content-type", "application/grpc+proto")]
        h2c.send_headers(stream_id, reply)
        h2c.send_data(stream_id, grpc_frame(b"\x0a\x01x"))
        h2c.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
    return pair.server_output()


def _machine(pair: ConnectionPair, stream_id: int) -> tuple[Any, ...]:
    h2c = pair.server.h2_connection
    stream = h2c.streams[stream_id]
    m = stream.state_machine
    return (
        h2c.state_machine.state,
        m.state,
        m.client,
        m.headers_sent,
        m.trailers_sent,
        m.headers_received,
        m.trailers_received,
        m.stream_closed_by,
        stream.request_method,
        stream.outbound_flow_control_window,
        h2c.outbound_flow_control_window,
        stream.closed,
    )


@pytest.mark.parametrize("request_ended", [True, False])
def test_ready_made_reply_blocks_are_the_bytes_and_states_h2_makes(request_ended: bool) -> None:
    # The request ended (a unary call: the state machines are set directly) or still
    # open (a stream of requests: h2's state machines run).
    outputs, states = [], []
    for ready_made in (True, False):
        pair = ConnectionPair()
        pair.client.send_headers(1, request_headers())
        pair.client.send_data(1, grpc_frame(b"\x0a\x01x"), end_stream=request_ended)
        pair.to_server(pair.client.data_to_send())
        pair.server_output()  # the window updates
        outputs.append(_answer(pair, 1, ready_made=ready_made))
        states.append(_machine(pair, 1))
        events = list(pair.client.receive_data(outputs[-1]))
        kinds = [type(e) for e in events]
        assert kinds == [
            h2.events.ResponseReceived,
            h2.events.DataReceived,
            h2.events.TrailersReceived,
            h2.events.StreamEnded,
        ]
    assert outputs[0] == outputs[1]
    assert states[0] == states[1]
    assert states[0][-1] is request_ended  # closed once both sides ended


def test_trailers_without_end_stream_raise_as_h2_does() -> None:
    raised, states = [], []
    for ready_made in (True, False):
        pair = ConnectionPair()
        pair.client.send_headers(1, request_headers())
        pair.client.send_data(1, grpc_frame(b"\x0a\x01x"), end_stream=True)
        pair.to_server(pair.client.data_to_send())
        pair.server.start_response(1, "+proto")
        h2c = pair.server.h2_connection
        send = (
            functools.partial(h2c.send_header_block, 1, b"\x88", end_stream=False)
            if ready_made
            else functools.partial(h2c.send_headers, 1, [("grpc-status", "0")], end_stream=False)
        )
        with pytest.raises(h2.exceptions.ProtocolError) as caught:
            send()
        raised.append(type(caught.value))
        states.append(_machine(pair, 1))
    assert raised[0] == raised[1]
    assert states[0] == states[1]


def test_a_ready_made_block_on_a_closed_stream_raises_as_h2_does() -> None:
    pair = ConnectionPair()
    pair.client.send_headers(1, request_headers(), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    _answer(pair, 1, ready_made=True)
    with pytest.raises(h2.exceptions.StreamClosedError):
        pair.server.h2_connection.send_header_block(1, b"\x88", end_stream=True)
    with pytest.raises(h2.exceptions.ProtocolError):  # never opened
        pair.server.h2_connection.send_header_block(7, b"\x88", end_stream=True)


def test_a_table_size_change_from_the_client_leads_the_next_block() -> None:
    # The encoder must then write the size update first: h2's path, not the shortcut.
    pair = ConnectionPair()
    pair.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 256})
    pair.client.send_headers(1, request_headers())
    pair.client.send_data(1, grpc_frame(b""), end_stream=True)
    events = pair.to_server(pair.client.data_to_send())
    assert MessageReceived in [type(e) for e in events]
    pair.server_output()
    assert not pair.server.h2_connection.send_header_block(1, b"\x88", end_stream=False)
    output = _answer(pair, 1, ready_made=True)
    assert output[9] & 0xE0 == 0x20  # the first block opens with a size update
    events = list(pair.client.receive_data(output))
    assert isinstance(events[0], h2.events.ResponseReceived)
    assert dict(events[0].headers)[":status"] == "200"  # the client decodes to str
    assert isinstance(events[2], h2.events.TrailersReceived)


def test_the_event_table_is_purerpcs_chain() -> None:
    # receive_data looks handlers up by type: the same pairs, in the same order, as
    # purerpc's isinstance chain (a purerpc upgrade that changes it fails here).
    source = inspect.getsource(GRPCConnection.receive_data)
    chain = re.findall(
        r"isinstance\(event, h2\.events\.(\w+)\):\s+grpc_events\.extend\(self\.(\w+)\(", source
    )
    assert len(chain) == 16
    assert [(kind.__name__, handler) for kind, handler in _HANDLERS.items()] == chain


def test_an_event_of_a_subclass_still_finds_its_handler() -> None:
    class Late(h2.events.WindowUpdated):  # type: ignore[misc]
        pass

    pair = ConnectionPair()
    event = Late()
    event.stream_id, event.delta = 0, 10
    assert [type(e).__name__ for e in pair.server._dispatch_subclass(event)] == ["WindowUpdated"]


def _opened(**settings: Any) -> ConnectionPair:
    pair = ConnectionPair(**settings)
    pair.client.send_headers(1, request_headers())
    pair.client.send_data(1, grpc_frame(b"\x0a\x01x"), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    pair.server_output()
    pair.server.start_response(1, "+proto")
    pair.server_output()
    return pair


def test_a_whole_data_frame_is_what_h2_sends_with_the_same_windows() -> None:
    outputs, windows = [], []
    for shortcut in (True, False):
        pair = _opened()
        h2c = pair.server.h2_connection
        payload = grpc_frame(b"\x0a\x03abc" * 50)
        if shortcut:
            h2c.send_whole_data(1, payload)
        else:
            h2c.send_data(1, payload)
        outputs.append(pair.server_output())
        stream = h2c.streams[1]
        windows.append(
            (
                h2c.outbound_flow_control_window,
                stream.outbound_flow_control_window,
                stream.state_machine.state,
            )
        )
        events = list(pair.client.receive_data(outputs[-1]))
        assert [type(e) for e in events] == [h2.events.DataReceived]
    assert outputs[0] == outputs[1]
    assert windows[0] == windows[1]


def test_a_whole_data_frame_over_the_window_or_on_a_closed_stream_raises_as_h2_does() -> None:
    pair = _opened()
    h2c = pair.server.h2_connection
    too_big = b"x" * (h2c.local_flow_control_window(1) + 1)
    with pytest.raises(h2.exceptions.FlowControlError):
        h2c.send_whole_data(1, too_big)
    pair.server.send_status(1, 0, "", None, headers=True)
    with pytest.raises(h2.exceptions.StreamClosedError):
        h2c.send_whole_data(1, b"late")


def _server_state(pair: ConnectionPair, stream_id: int) -> tuple[Any, ...]:
    """What a reply may change: the stream's machine and windows, the core's bookkeeping
    of the request, the flood budget."""
    core = pair.server
    return (
        *_machine(pair, stream_id),
        stream_id in core.message_read_buffers,
        stream_id in core._buffered,
        core.buffered_requests,
        core.gate._flood,
    )


@settings(max_examples=40, deadline=None)
@given(
    message=st.binary(max_size=300),
    spent=st.integers(0, 40),
    window=st.none() | st.integers(0, 400),
)
def test_a_unary_reply_in_one_step_is_the_steps_bytes_and_states(
    message: bytes, spent: int, window: int | None
) -> None:
    # send_unary_reply against start_response, send_whole_data, send_status and
    # drop_request, on a stream whose request ended; a flood budget partly spent, and a
    # window the message may not fit (then it declines, changing nothing).
    outputs, states, took = [], [], []
    for one_step in (True, False):
        pair = ConnectionPair()
        if window is not None:
            pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
            pair.to_server(pair.client.data_to_send())
        pair.client.send_headers(1, request_headers())
        pair.client.send_data(1, grpc_frame(b"\x0a\x01x"), end_stream=True)
        pair.to_server(pair.client.data_to_send())
        pair.server_output()
        pair.server.gate._flood -= spent
        core, h2c = pair.server, pair.server.h2_connection
        before = _server_state(pair, 1)
        if one_step:
            ok = core.send_unary_reply(1, message)
            took.append(ok)
            if not ok:
                assert _server_state(pair, 1) == before
                assert pair.server_output() == b""
                assert len(grpc_frame(message)) > h2c.local_flow_control_window(1)
                return
        else:
            core.start_response(1, "+proto")
            h2c.send_whole_data(1, grpc_frame(message))
            core.send_status(1, 0, "", None, headers=True)
            core.drop_request(1)
        outputs.append(pair.server_output())
        states.append(_server_state(pair, 1))
        events = list(pair.client.receive_data(outputs[-1]))
        assert [type(e) for e in events] == [
            h2.events.ResponseReceived,
            h2.events.DataReceived,
            h2.events.TrailersReceived,
            h2.events.StreamEnded,
        ]
    assert took == [True]
    assert outputs[0] == outputs[1]
    assert states[0] == states[1]


def test_a_unary_reply_in_one_step_declines_where_it_does_not_stand() -> None:
    # The request not ended, headers already sent, a table size change pending, an
    # unknown stream, a closed one: nothing changes, the steps take over.
    pair = ConnectionPair()
    pair.client.send_headers(1, request_headers())
    pair.client.send_data(1, grpc_frame(b"\x0a\x01x"))
    pair.to_server(pair.client.data_to_send())
    pair.server_output()
    before = _server_state(pair, 1)
    assert not pair.server.send_unary_reply(1, b"x")  # the request goes on
    assert not pair.server.send_unary_reply(7, b"x")  # never opened
    assert _server_state(pair, 1) == before
    assert pair.server_output() == b""
    pair.client.send_data(1, b"", end_stream=True)
    pair.to_server(pair.client.data_to_send())
    pair.server.start_response(1, "+proto")
    pair.server_output()
    before = _server_state(pair, 1)
    assert not pair.server.send_unary_reply(1, b"x")  # headers already sent
    assert _server_state(pair, 1) == before
    pair.server.send_status(1, 0, "", None, headers=True)
    assert not pair.server.send_unary_reply(1, b"x")  # closed
    resized = ConnectionPair()
    resized.client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 256})
    resized.client.send_headers(1, request_headers())
    resized.client.send_data(1, grpc_frame(b""), end_stream=True)
    resized.to_server(resized.client.data_to_send())
    resized.server_output()
    assert not resized.server.send_unary_reply(1, b"x")  # the size update must lead
    assert resized.server_output() == b""


class _H2Counting(ServerH2Connection):
    """The server's h2 connection counting open streams with h2's own ``_open_streams``."""

    @property
    def open_inbound_streams(self) -> int:
        self._open_streams(1)
        return 0


@settings(max_examples=60, deadline=None)
@given(
    fates=st.lists(
        st.sampled_from(["open", "ended", "answered", "reset", "refused", "answered-open"]),
        max_size=12,
    )
)
def test_counting_open_streams_forgets_closed_ones_as_h2_does(fates: list[str]) -> None:
    # The server's open_inbound_streams against h2's own _open_streams, counted at every
    # request's HEADERS and once more at the end: the same streams forgotten, in the
    # same order, remembered as closed the same way, and the same output.
    results: list[list[Any]] = [[], []]
    for ours in (True, False):
        pair = ConnectionPair()
        core, h2c = pair.server, pair.server.h2_connection
        if not ours:
            h2c.__class__ = _H2Counting
        for n, fate in enumerate(fates):
            stream_id = 1 + 2 * n
            pair.client.send_headers(stream_id, request_headers(), end_stream=fate != "open")
            pair.to_server(pair.client.data_to_send())
            if fate.startswith("answered"):
                core.start_response(stream_id, "+proto")
                core.send_status(stream_id, 0, "", None, headers=True)
            elif fate == "reset":
                pair.client.reset_stream(stream_id)
                pair.to_server(pair.client.data_to_send())
            elif fate == "refused":
                h2c.reset_stream(stream_id, 7)
            pair.to_client()
            results[ours].append((list(h2c.streams), list(h2c._closed_streams.items())))
        assert h2c.open_inbound_streams == 0
        results[ours].append(
            (list(h2c.streams), list(h2c._closed_streams.items()), pair.server_output())
        )
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"103")],
        [(b":status", b"200")],
        [(b":method", b"POST"), (b":status", b"100")],
        [(b":method", b"POST"), (b"x", b"y"), (b":status", b"100")],
        [(b"x", b"1"), (b":status", b"100")],
        [(b":path", b"/a")],
        [],
    ],
)
def test_the_informational_test_is_h2s(headers: list[tuple[bytes, bytes]]) -> None:
    from h2.utilities import is_informational_response

    from trio_worker._wire._h2server import _informational

    assert _informational(headers) is bool(is_informational_response(headers))
