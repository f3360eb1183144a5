"""The one inbound flow-control design (``_wire._window``): a stream's window follows its
consumer, on both ends."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_worker._wire._window import MESSAGE_OVERHEAD, StreamWindow

Op = tuple[str, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("recv"), st.integers(0, 70_000), st.integers(0, 3)),
        st.tuples(st.just("take"), st.integers(0, 0), st.integers(0, 0)),
    ),
    max_size=60,
)


@given(st.sampled_from([0, 1024, 512 * 1024]), ops)
def test_window_is_held_exactly_while_too_much_waits(hold_above: int, script: list[Op]) -> None:
    window = StreamWindow(hold_above)
    received = released = 0
    untaken: list[int] = []  # sizes of delivered messages, prefix included
    for kind, flow, messages in script:
        if kind == "recv":
            sizes = [MESSAGE_OVERHEAD + flow // (messages + 1)] * messages
            untaken += sizes
            received += flow
            released += window.received(flow, sum(sizes))
        elif untaken:
            released += window.taken(untaken.pop(0))
        # Nothing is lost or made up, and bytes are held back only while more than
        # hold_above bytes of messages wait for the consumer.
        assert released + window.owed == received
        assert window.waiting == sum(untaken)
        assert window.owed == 0 or window.waiting > hold_above


def test_empty_messages_are_held_too() -> None:
    window = StreamWindow(hold_above=0)
    assert window.received(5, MESSAGE_OVERHEAD) == 0  # one empty message waits
    assert window.received(5, MESSAGE_OVERHEAD) == 0
    assert window.taken(MESSAGE_OVERHEAD) == 0  # one still waits
    assert window.taken(MESSAGE_OVERHEAD) == 10  # none waits: all goes back
