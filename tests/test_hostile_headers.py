"""A request header list that purerpc's parser chokes on fails its stream, not the server.

purerpc's ``RequestReceived`` parser keeps a repeated header as a list, and then calls
``str`` methods on it: a second ``content-type`` or ``:path`` raised AttributeError out of
the server's core, which nothing between the core and the server's nursery caught, so one
request from any client with a certificate (any role) ended the whole server. So did a
``grpc-timeout`` too large for a ``timedelta`` (OverflowError).
"""

from __future__ import annotations

import h2.events
import pytest
import trio
from google.protobuf import wrappers_pb2 as w

from tests.grpc_support import Pki, RawClient, make_pki, running_server
from tests.wire.helpers import END_HEADERS, END_STREAM, HEADERS, ConnectionPair, frame, literal
from trio_worker._net._transport import CallContext, UnaryMethod
from trio_worker._wire._h2server import BadRequest

ECHO = "/test.Test/Echo"
_REQUEST = [
    (":method", "POST"),
    (":scheme", "https"),
    (":path", ECHO),
    (":authority", "localhost"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
]


@pytest.mark.parametrize(
    "repeated",
    [
        ("content-type", "application/grpc"),
        (":path", ECHO),
        (":authority", "localhost"),
        ("grpc-timeout", "1S"),
        ("grpc-timeout", "99999999999999H"),  # alone: a timedelta past its range
        ("grpc-encoding", "identity"),
        ("user-agent", "x"),
    ],
)
def test_a_repeated_request_header_fails_its_stream_only(repeated: tuple[str, str]) -> None:
    pair = ConnectionPair()
    fields = [*_REQUEST, repeated]
    if repeated[1] == "99999999999999H":
        fields = [*_REQUEST[:-1], repeated, _REQUEST[-1]]  # once, not repeated
    block = b"".join(literal(n, v) for n, v in fields)
    events = pair.to_server(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
    kinds = [type(e) for e in events]
    # Refused as malformed, or (where purerpc copes) taken as it parses it: never raised.
    assert BadRequest in kinds or kinds[0].__name__ == "RequestReceived"
    pair.client.send_headers(3, _REQUEST, end_stream=True)
    later = pair.to_server(pair.client.data_to_send())
    assert type(later[0]).__name__ == "RequestReceived"  # the connection goes on


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def echo(request: w.StringValue, ctx: CallContext) -> w.StringValue:
    return request


def _refused(client: RawClient, stream_id: int) -> bool:
    """The stream was reset, the connection ended, or the call got its status."""
    for event in client.events:
        if isinstance(event, h2.events.ConnectionTerminated):
            return True
        if isinstance(event, h2.events.StreamReset) and event.stream_id == stream_id:
            return True
    return client.status(stream_id) is not None


async def _still_served(pki: Pki, port: int) -> None:
    """A new connection's call is answered OK."""
    async with RawClient.connect(pki, port) as good:
        payload = w.StringValue(value="still here").SerializeToString()
        stream_id = await good.start(ECHO, payload)
        with trio.fail_after(10):
            await good.until(lambda: good.status(stream_id) is not None)
        assert good.status(stream_id) == 0


async def test_a_repeated_content_type_does_not_end_the_server(pki: Pki) -> None:
    methods = {ECHO: UnaryMethod(w.StringValue, w.StringValue, echo)}
    async with running_server(pki, methods) as r:
        async with RawClient.connect(pki, r.port) as bad:
            payload = w.StringValue(value="x").SerializeToString()
            stream_id = await bad.start(
                ECHO, payload, headers=[("content-type", "application/grpc")]
            )
            with trio.fail_after(10):
                await bad.until(lambda: _refused(bad, stream_id))
            assert bad.status(stream_id) != 0
        # The server is still there for everyone else.
        await _still_served(pki, r.port)


async def test_an_unexpected_error_in_one_connection_ends_that_connection_only(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: a bug that one peer's bytes reach closes its connection, not the server.

    The fault is injected (the first connection's read handling raises, as the purerpc parser
    bug above did); every other connection must still be served.
    """
    from trio_worker._net import _transport

    original = _transport._Connection._after_read
    faults = [RuntimeError("injected: a bug reached by one peer's bytes")]

    def after_read(self: _transport._Connection) -> None:
        if faults:
            raise faults.pop()
        original(self)

    monkeypatch.setattr(_transport._Connection, "_after_read", after_read)
    methods = {ECHO: UnaryMethod(w.StringValue, w.StringValue, echo)}
    async with running_server(pki, methods) as r:
        async with RawClient.connect(pki, r.port) as bad:
            payload = w.StringValue(value="x").SerializeToString()
            stream_id = await bad.start(ECHO, payload)
            with trio.fail_after(10), pytest.raises((EOFError, trio.BrokenResourceError)):
                await bad.until(lambda: False)  # the server closes this connection
            assert bad.status(stream_id) is None
        assert not faults
        assert r.server.stats.connections_failed == 1
        await _still_served(pki, r.port)
