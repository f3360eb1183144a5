"""Ctrl-P Ctrl-Q detection over typed bytes split across reads: a model test."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_worker.cli._interactive import DetachKeys

#: Bytes where the detach keys hide: mostly Ctrl-P, Ctrl-Q and a plain byte.
typed = st.lists(st.sampled_from([b"\x10", b"\x11", b"a", b"\x10\x11", b"xy"]), max_size=30)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


@given(typed, st.lists(st.integers(min_value=0), max_size=10))
def test_detach_keys_however_the_bytes_are_split(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    keys = DetachKeys()
    sent = b""
    detached = False
    for piece in split(data, cuts):
        out, detached = keys.feed(piece)
        sent += out
        if detached:
            break
    if not detached:
        sent += keys.flush()
    at = data.find(b"\x10\x11")
    if at >= 0:
        # Everything before the sequence went to the job, nothing of it or after it.
        assert detached
        assert sent == data[:at]
    else:
        assert not detached
        assert sent == data  # nothing lost, nothing added, in order


def test_a_lone_ctrl_p_is_held_until_the_next_byte() -> None:
    keys = DetachKeys()
    assert keys.feed(b"ab\x10") == (b"ab", False)
    assert keys.feed(b"c") == (b"\x10c", False)
    assert keys.feed(b"\x10") == (b"", False)
    assert keys.feed(b"\x11rest") == (b"", True)
