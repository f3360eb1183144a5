"""``Pieces``: a DATA payload given as pieces, cut into frames without copying."""

from __future__ import annotations

import os

import h2.events
import h2.settings
from hypothesis import given
from hypothesis import strategies as st

from trio_worker._wire._h2conn import Pieces

from .helpers import ConnectionPair, request_headers


@given(
    st.lists(st.binary(max_size=40), max_size=6),
    st.data(),
)
def test_a_cut_is_the_same_bytes_as_a_slice(parts: list[bytes], data: st.DataObject) -> None:
    pieces = Pieces(parts)
    whole = b"".join(parts)
    assert len(pieces) == len(whole)
    start = data.draw(st.integers(0, len(whole)))
    length = data.draw(st.integers(0, len(whole) - start))
    cut = pieces.cut(start, length)
    assert len(cut) == length
    assert cut.join() == whole[start : start + length]
    assert all(len(piece) for piece in cut.pieces)  # no empty pieces


def test_whole_pieces_are_kept_as_they_are() -> None:
    a, b, c = b"head", bytes(1000), b"tail"
    cut = Pieces([a, b, c]).cut(4, 1000)
    assert cut.pieces == [b]
    assert cut.pieces[0] is b


def _pair() -> ConnectionPair:
    """A pair whose client takes frames of 64 KiB."""
    pair = ConnectionPair()
    pair.client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 65536})
    pair.to_server(pair.client.data_to_send())
    pair.to_client()
    return pair


def test_large_pieces_leave_by_reference_in_order_with_the_frames_around_them() -> None:
    """A piece of 16 KiB or more is handed to the TLS layer as it is, not copied into the
    output buffer; what was queued before and after it keeps its place."""
    pair = _pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, request_headers(), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    pair.server.start_response(sid, "+proto")
    h2c = pair.server.h2_connection
    big = os.urandom(40_000)
    h2c.send_data(sid, Pieces([b"head", big, b"tail"]))
    h2c.ping(b"12345678")
    h2c.send_data(sid, Pieces([memoryview(big)[:20_000]]))
    size = h2c.outbound_buffered
    segments = h2c.segments_to_send()
    assert any(segment is big for segment in segments)
    assert sum(len(segment) for segment in segments) == size
    assert h2c.outbound_buffered == 0
    events = pair.client.receive_data(b"".join(segments))
    kinds = [type(event) for event in events]
    ping = kinds.index(h2.events.PingReceived)
    data = [event.data for event in events if isinstance(event, h2.events.DataReceived)]
    assert b"".join(data) == b"head" + big + b"tail" + big[:20_000]
    assert h2.events.DataReceived in kinds[:ping]
    assert h2.events.DataReceived in kinds[ping:]


def test_output_with_large_pieces_joins_for_a_single_buffer() -> None:
    """``data_to_send`` (the blocking client's driver) still gets all of it, in order."""
    pair = _pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, request_headers(), end_stream=True)
    pair.to_server(pair.client.data_to_send())
    pair.server.start_response(sid, "+proto")
    h2c = pair.server.h2_connection
    big = bytes(range(256)) * 100
    h2c.send_data(sid, Pieces([big, b"x"]))
    h2c.ping(b"abcdefgh")
    events = pair.client.receive_data(bytes(h2c.data_to_send()))
    data = [event.data for event in events if isinstance(event, h2.events.DataReceived)]
    assert b"".join(data) == big + b"x"
    assert any(isinstance(event, h2.events.PingReceived) for event in events)
