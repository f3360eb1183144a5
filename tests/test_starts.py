"""``ClientStarts``: one connection of a client starts calls at a time, the others in the
order they asked; whoever leaves (done, cancelled, over) hands the turn on."""

from __future__ import annotations

import trio
import trio.testing

from trio_worker._net._starts import ClientStarts


async def test_the_turn_is_handed_on_in_the_order_asked() -> None:
    starts = ClientStarts()
    a, b, c = object(), object(), object()
    assert starts.take(a)
    assert starts.take(a)  # held, taken again
    got: list[object] = []

    async def wait(connection: object) -> None:
        await starts.wait(connection)
        got.append(connection)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, b)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, c)
        await trio.testing.wait_all_tasks_blocked()
        assert not starts.take(b)
        assert not starts.take(c)
        starts.give_up(a)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b]
        assert starts.holder is b
        assert not starts.take(a)  # handed to b, not free for whoever asks
        starts.give_up(b)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [b, c]
    starts.give_up(c)
    assert starts.holder is None
    assert starts.take(a)


async def _wait_in(
    starts: ClientStarts, connection: object, scope: trio.CancelScope, got: list[object]
) -> None:
    with scope:
        await starts.wait(connection)
        got.append(connection)


async def test_a_connection_that_leaves_the_line_is_skipped() -> None:
    starts = ClientStarts()
    a, b, c = object(), object(), object()
    assert starts.take(a)
    got: list[object] = []
    scope_b = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_in, starts, b, scope_b, got)
        nursery.start_soon(_wait_in, starts, c, trio.CancelScope(), got)
        await trio.testing.wait_all_tasks_blocked()
        starts.give_up(b)  # b's connection is over: out of the line (it held nothing)
        scope_b.cancel()  # and its reader is cancelled
        await trio.testing.wait_all_tasks_blocked()
        starts.give_up(a)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [c]
        assert starts.holder is c
        starts.give_up(c)
    assert starts.holder is None


async def test_a_wait_cancelled_as_the_turn_comes_hands_it_on() -> None:
    starts = ClientStarts()
    a, b, c = object(), object(), object()
    assert starts.take(a)
    got: list[object] = []
    scope_b = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_wait_in, starts, b, scope_b, got)
        await trio.testing.wait_all_tasks_blocked()  # (b in line first)
        nursery.start_soon(_wait_in, starts, c, trio.CancelScope(), got)
        await trio.testing.wait_all_tasks_blocked()
        scope_b.cancel()  # b's wait is cancelled, but it has not run yet...
        starts.give_up(a)  # ...when the turn is handed to it (still in line)
        assert starts.holder is b
        await trio.testing.wait_all_tasks_blocked()
        assert got == [c]  # b, cancelled, handed it on
        assert starts.holder is c
        starts.give_up(c)
    assert starts.holder is None
    assert starts.take(a)
