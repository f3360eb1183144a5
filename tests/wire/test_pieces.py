"""``Pieces``: a DATA payload given as pieces, cut into frames without copying."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_worker._wire._h2conn import Pieces


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
