"""A client that breaks one of the wire's bounds is told why (GOAWAY) and then cut off: the
server closes the connection at once, whether or not the client reads."""

from __future__ import annotations

import struct

import h2.events
import pytest
import trio
from google.protobuf import wrappers_pb2 as w

from tests.grpc_support import Pki, RawClient, make_pki, running_server
from trio_worker._net._transport import CallContext, UnaryMethod
from trio_worker._wire._h2conn import FLOOD_BUDGET, RESET_BUDGET

ECHO = "/test.Test/Echo"
ENHANCE_YOUR_CALM = 0xB


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def echo(request: w.StringValue, ctx: CallContext) -> w.StringValue:
    return request


METHODS = {ECHO: UnaryMethod(echo, w.StringValue, w.StringValue)}


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
