"""A client that breaks one of the wire's bounds is told why (GOAWAY) and then cut off: the
server closes the connection at once, whether or not the client reads. Honest clients, whose
WINDOW_UPDATEs and PINGs follow our DATA, never meet the flood budget."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import h2.events
import pytest
import trio
import trio.testing
from google.protobuf import wrappers_pb2 as w

from tests.grpc_support import Pki, RawClient, make_pki, running_server
from trio_worker._net._transport import CallContext, StreamMethod, UnaryMethod
from trio_worker._wire._h2conn import FLOOD_BUDGET, FLOOD_REFILL
from trio_worker._wire._h2server import (
    MAX_BUFFERED_REQUESTS,
    MAX_CLIENT_BUFFERED_REQUESTS,
    RESET_BUDGET,
)

ECHO = "/test.Test/Echo"
SMALL = "/test.Test/Small"
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def echo(request: w.StringValue, ctx: CallContext) -> w.StringValue:
    return request


async def small(request: w.Int32Value, ctx: CallContext) -> AsyncIterator[w.BytesValue]:
    message = w.BytesValue(value=b"x" * 16384)
    for _ in range(request.value):
        yield message


METHODS = {
    ECHO: UnaryMethod(w.StringValue, w.StringValue, echo),
    SMALL: StreamMethod(w.Int32Value, w.BytesValue, small),
}


def raw_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBL", n >> 8, n & 0xFF, kind, flags, stream_id) + payload


async def read_to_the_end(client: RawClient) -> None:
    with trio.fail_after(10):
        while await client.pump():
            pass


def goaway_codes(client: RawClient) -> list[int]:
    return [
        int(e.error_code) for e in client.events if isinstance(e, h2.events.ConnectionTerminated)
    ]


async def test_a_ping_flood_gets_goaway_and_the_connection_closed(pki: Pki) -> None:
    async with running_server(pki, METHODS) as r, RawClient.connect(pki, r.port) as client:
        pings = raw_frame(0x6, 0, 0, b"12345678") * (3 * FLOOD_BUDGET)
        await client.stream.send_all(pings)
        await read_to_the_end(client)
        assert goaway_codes(client) == [ENHANCE_YOUR_CALM]


async def test_rapid_reset_gets_goaway_and_the_connection_closed_while_it_goes_on(
    pki: Pki,
) -> None:
    """The attacker never stops writing and never reads: the server still closes."""
    async with running_server(pki, METHODS) as r, RawClient.connect(pki, r.port) as client:

        async def attack() -> None:
            stream_id = 1
            h2c = client.h2
            try:
                for _ in range(20 * RESET_BUDGET):
                    h2c.send_headers(
                        stream_id,
                        [
                            (":method", "POST"),
                            (":scheme", "https"),
                            (":path", ECHO),
                            (":authority", "localhost"),
                            ("te", "trailers"),
                            ("content-type", "application/grpc"),
                        ],
                    )
                    h2c.reset_stream(stream_id)
                    await client.flush()
                    stream_id += 2
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            raise AssertionError("the server never cut the connection off")

        with trio.fail_after(20):
            await attack()


async def test_a_client_acknowledging_every_read_never_meets_the_flood_budget(pki: Pki) -> None:
    """A client with the default 64 KiB windows hands back what it reads at once: one
    WINDOW_UPDATE or two for every 32 KiB, several times the budget over the stream, each
    earned back by the DATA that caused it (grpcio sends far fewer)."""
    count = 4 * FLOOD_BUDGET  # 16 KiB each: 64 MiB
    async with running_server(pki, METHODS) as r, RawClient.connect(pki, r.port) as client:
        stream_id = await client.start(SMALL, w.Int32Value(value=count).SerializeToString())
        with trio.fail_after(60):
            while client.status(stream_id) is None:
                assert await client.pump()
        assert client.status(stream_id) == 0
        assert goaway_codes(client) == []
        assert len(client.data[stream_id]) == count * (
            5 + 4 + 16384
        )  # prefix, tag and length, bytes


async def test_the_flood_budget_refills_by_the_loop_clock(
    pki: Pki, mock_clock: trio.testing.MockClock
) -> None:
    """Two bursts of PINGs, each 90% of the budget, with the loop's clock moved on between
    them by the time the budget takes to refill: the connection stays. By the wall clock
    (a second or so) the second burst would be over the budget."""
    mock_clock.rate = 1.0  # timeouts as usual; jump() adds time on top
    burst = FLOOD_BUDGET * 9 // 10
    pings = raw_frame(0x6, 0, 0, b"12345678") * burst
    async with running_server(pki, METHODS) as r, RawClient.connect(pki, r.port) as client:

        def acks() -> int:
            return sum(isinstance(e, h2.events.PingAckReceived) for e in client.events)

        for n in (1, 2):
            await client.stream.send_all(pings)
            with trio.fail_after(30):
                await client.until(lambda: acks() >= n * burst)  # noqa: B023
            mock_clock.jump(burst / FLOOD_REFILL + 1)
        stream_id = await client.start(ECHO, w.StringValue(value="still here").SerializeToString())
        with trio.fail_after(30):
            await client.until(lambda: client.status(stream_id) is not None)
        assert client.status(stream_id) == 0
        assert goaway_codes(client) == []


async def _partial_echoes(client: RawClient, streams: int, size: int) -> list[int]:
    """``streams`` Echo calls, each a message announced as 4 MiB of which ``size`` bytes
    come (raw DATA frames; the server hands back windows of partial messages) and never
    the rest."""
    ids = []
    for _ in range(streams):
        stream_id = await client.start(ECHO, None, end=False)
        ids.append(stream_id)
        data = raw_frame(0x0, 0, stream_id, struct.pack(">BI", 0, 4 * 1024 * 1024 - 1))
        piece = raw_frame(0x0, 0, stream_id, b"\0" * 16384)
        await client.stream.send_all(data + piece * (size // 16384))
    return ids


async def test_one_clients_partial_requests_are_bounded_across_its_connections(
    pki: Pki,
) -> None:
    """tools/probe_hostile.py many-partial: each connection stays within its own bound
    (MAX_BUFFERED_REQUESTS), yet 200 of them pinned 1.6 GiB. Together they hold at most
    MAX_CLIENT_BUFFERED_REQUESTS: the call that goes over gets RESOURCE_EXHAUSTED, and
    the bytes of a connection that ends are the client's again."""
    size = MAX_BUFFERED_REQUESTS // 2 - 64 * 1024  # two streams: under a connection's bound
    full = MAX_CLIENT_BUFFERED_REQUESTS // (2 * size)
    async with running_server(pki, METHODS) as r, AsyncExitStack() as stack:
        clients = []
        for _ in range(full + 1):
            client = await stack.enter_async_context(RawClient.connect(pki, r.port))
            clients.append((client, await _partial_echoes(client, 2, size)))
        last, (_first_id, second_id) = clients[-1]
        with trio.fail_after(10):
            await last.until(lambda: second_id in last.trailers)
        assert last.trailers[second_id]["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
        assert "client's" in last.trailers[second_id]["grpc-message"]
        for client, ids in clients[:-1]:  # within the bound: still collecting
            with trio.move_on_after(0.2):
                while await client.pump():
                    pass
            assert not any(i in client.trailers for i in ids)
            assert goaway_codes(client) == []
        # One connection gone: its bytes are free for another connection's call.
        shared = next(iter(r.server.client_requests.values()))
        held = shared.held
        await clients[0][0].stream.aclose()
        with trio.fail_after(10):
            await trio.testing.wait_all_tasks_blocked()
        assert shared.held <= held - 2 * size
        client = await stack.enter_async_context(RawClient.connect(pki, r.port))
        (stream_id,) = await _partial_echoes(client, 1, size)
        with trio.move_on_after(0.5):
            while await client.pump():
                pass
        assert stream_id not in client.trailers
    assert r.server.client_requests == {}
