"""Both clients (trio's, and the blocking one of the short CLI commands) against a hostile
server over real TLS: a broken bound ends the connection with our GOAWAY and the caller's
``ConnectionFailed``; a refused message fails its call only."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio

from tests.wire.helpers import (
    DATA,
    END_HEADERS,
    GOAWAY,
    HEADERS,
    PING,
    RESPONSE_BLOCK,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    literal,
)
from trio_worker import ConnectionFailed, TrioWorkerError, pki
from trio_worker._blocking_client import connect_blocking
from trio_worker._net import _blocking
from trio_worker._tls import client_context, server_context
from trio_worker._wire._h2conn import FLOOD_BUDGET, FLOOD_REFILL, MAX_MESSAGE
from trio_worker.client import connect

ENHANCE_YOUR_CALM = 0xB
PREFACE_SIZE = 24

Script = Callable[[trio.SSLStream[trio.SocketStream], int], Awaitable[None]]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> pki.DevPki:
    return pki.ensure_dev_pki(tmp_path_factory.mktemp("state"))


def frames_of(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream id, payload) of each whole frame in ``data`` (after the preface)."""
    out = []
    data = data[PREFACE_SIZE:]
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        stream_id = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        out.append((data[3], stream_id, data[9 : 9 + length]))
        data = data[9 + length :]
    return out


JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


async def call_status(dev: pki.DevPki, port: int, client: str) -> BaseException | None:
    """One Status call with the trio client or the blocking one (the short CLI commands')."""
    addr, files = f"127.0.0.1:{port}", {"ca": dev.ca.cert, "cert": dev.client.cert}
    try:
        if client == "trio":
            async with connect(addr, key=dev.client.key, **files) as worker:
                await worker.status(JOB)
        else:

            def blocking() -> None:
                with connect_blocking(addr, key=dev.client.key, **files) as worker:
                    worker.status(JOB)

            await trio.to_thread.run_sync(blocking)
    except TrioWorkerError as exc:
        return exc
    return None


async def serve_script(
    dev: pki.DevPki,
    script: Script,
    client: str = "trio",
    on_receive: Callable[[bytes], None] | None = None,
    seconds: float = 10.0,
) -> tuple[BaseException | None, bytes]:
    """Run one call (``status``) against a server that answers with ``script``; return
    what the call raised and every byte the client sent (also shown to ``on_receive``
    as it comes, for a script that waits for the client). The call has ``seconds``."""
    ctx = server_context(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key)
    received = bytearray()
    request = trio.Event()

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        async def read() -> None:
            try:
                while data := await stream.receive_some(65536):
                    received.extend(data)
                    if on_receive is not None:
                        on_receive(bytes(received))
                    if any(kind == HEADERS for kind, _, _ in frames_of(bytes(received))):
                        request.set()
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await stream.send_all(frame(SETTINGS, 0, 0))
            await request.wait()
            with contextlib.suppress(trio.BrokenResourceError):
                await script(stream, 1)
            await trio.sleep(1)  # let the client's GOAWAY arrive
            nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]
        with trio.fail_after(seconds):
            outcome = await call_status(dev, port, client)
            await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    return outcome, bytes(received)


def goaway_code(sent: bytes) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for kind, _, p in frames_of(sent) if kind == GOAWAY]
    return codes[-1] if codes else None


FLOODS = {
    "PING": frame(PING, 0, 0, b"12345678"),
    "empty DATA": frame(DATA, 0, 1),
    "WINDOW_UPDATE": frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)),
}


CLIENTS = ["trio", "blocking"]


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("kind", list(FLOODS))
async def test_a_flooding_server_gets_goaway_and_the_call_connection_failed(
    dev: pki.DevPki, kind: str, client: str
) -> None:
    async def flood(stream: trio.SSLStream[trio.SocketStream], stream_id: int) -> None:
        await stream.send_all(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_BLOCK))
        await stream.send_all(FLOODS[kind] * (3 * FLOOD_BUDGET))

    outcome, sent = await serve_script(dev, flood, client)
    assert isinstance(outcome, ConnectionFailed)
    assert goaway_code(sent) == ENHANCE_YOUR_CALM


async def test_the_trio_clients_flood_budget_refills_by_the_loop_clock(
    dev: pki.DevPki, mock_clock: trio.testing.MockClock
) -> None:
    """Two bursts of PINGs, each 90% of the budget, with the loop's clock moved on between
    them by the time the budget takes to refill, then the answer: the call succeeds. By the
    wall clock the second burst would be over the budget. (The blocking client has no loop
    and keeps the monotonic clock.)"""
    mock_clock.rate = 1.0  # timeouts as usual; jump() adds time on top
    burst = FLOOD_BUDGET * 9 // 10
    refill = burst / FLOOD_REFILL + 1
    acks = 0
    arrived = trio.lowlevel.ParkingLot()

    def on_receive(received: bytes) -> None:
        nonlocal acks
        acks = sum(kind == PING and p == b"12345678" for kind, _, p in frames_of(received))
        arrived.unpark_all()

    async def bursts(stream: trio.SSLStream[trio.SocketStream], stream_id: int) -> None:
        await stream.send_all(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_BLOCK))
        for n in (1, 2):
            await stream.send_all(FLOODS["PING"] * burst)
            while acks < n * burst:  # the client has taken the whole burst
                await arrived.park()
            mock_clock.jump(refill)
        trailers = literal("grpc-status", "0")
        await stream.send_all(frame(DATA, 0, stream_id, struct.pack(">BI", 0, 0)))
        await stream.send_all(frame(HEADERS, END_HEADERS | 0x1, stream_id, trailers))

    outcome, sent = await serve_script(dev, bursts, "trio", on_receive, seconds=10 + 2 * refill)
    assert outcome is None
    assert goaway_code(sent) in (None, 0)


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_message_over_the_bound_fails_its_call_only(dev: pki.DevPki, client: str) -> None:
    async def huge(stream: trio.SSLStream[trio.SocketStream], stream_id: int) -> None:
        await stream.send_all(frame(HEADERS, END_HEADERS, stream_id, RESPONSE_BLOCK))
        await stream.send_all(frame(DATA, 0, stream_id, struct.pack(">BI", 0, MAX_MESSAGE + 1)))

    outcome, sent = await serve_script(dev, huge, client)
    assert isinstance(outcome, TrioWorkerError)
    assert not isinstance(outcome, ConnectionFailed)
    assert goaway_code(sent) in (None, 0)  # the connection was not given up (0: closed)...
    resets = [p for kind, s, p in frames_of(sent) if kind == 0x3 and s == 1]
    assert resets  # ...the stream was reset


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_long_status_message_is_cut(dev: pki.DevPki, client: str) -> None:
    async def chatty(stream: trio.SSLStream[trio.SocketStream], stream_id: int) -> None:
        block = (
            RESPONSE_BLOCK + literal("grpc-status", "13") + literal("grpc-message", "m" * 50_000)
        )
        await stream.send_all(frame(HEADERS, END_HEADERS | 0x1, stream_id, block))

    outcome, _ = await serve_script(dev, chatty, client)
    assert isinstance(outcome, TrioWorkerError)
    assert len(str(outcome).encode()) <= 2048


async def test_a_server_granting_no_stream_times_the_blocking_call_out(dev: pki.DevPki) -> None:
    """SETTINGS_MAX_CONCURRENT_STREAMS 0 and nothing else: the blocking client's call with
    a timeout (``run``'s check on Ctrl-C) waits for a stream until then, not forever."""
    ctx = server_context(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key)

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        no_streams = struct.pack(">HL", 0x3, 0)  # SETTINGS_MAX_CONCURRENT_STREAMS
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(frame(SETTINGS, 0, 0, no_streams))
            while await stream.receive_some(65536):
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]

        def blocking() -> None:
            files = {"ca": dev.ca.cert, "cert": dev.client.cert, "key": dev.client.key}
            with connect_blocking(f"127.0.0.1:{port}", **files) as worker:
                worker.status(JOB, timeout=0.5)

        with trio.fail_after(20), pytest.raises(TimeoutError):
            await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


async def test_a_server_that_stops_reading_loses_the_blocking_connection(
    dev: pki.DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that grants all the window there is and then reads nothing: once the
    socket buffers are full, the blocking client's write gives up after the write timeout
    (as the trio driver's), rather than waiting in select forever."""
    monkeypatch.setattr(_blocking, "WRITE_TIMEOUT", 0.5)
    ctx = server_context(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key)
    largest = 2**31 - 1

    async def handler(stream: trio.SSLStream[trio.SocketStream]) -> None:
        window = struct.pack(">HL", 0x4, largest)  # SETTINGS_INITIAL_WINDOW_SIZE
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(frame(SETTINGS, 0, 0, window))
            increment = struct.pack(">L", largest - 65535)
            await stream.send_all(frame(WINDOW_UPDATE, 0, 0, increment))
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_ssl_over_tcp, handler, 0, ctx, host="127.0.0.1")
        )
        port = listeners[0].transport_listener.socket.getsockname()[1]

        def blocking() -> BaseException | None:
            context = client_context(ca=dev.ca.cert, cert=dev.client.cert, key=dev.client.key)
            conn = _blocking.dial(f"127.0.0.1:{port}", context, 5)
            calls = []
            try:
                for _ in range(16):  # 32 MiB: more than both ends' socket buffers
                    path = "/trioworker.v1.Worker/Status"
                    calls.append(conn.open_call(path, bytes(2 * 1024 * 1024)))
            except _blocking.Unprocessed:  # (the connection is lost: no new calls)
                pass
            finally:
                conn.close()
            return calls[-1].error

        with trio.fail_after(30):
            error = await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        assert isinstance(error, ConnectionFailed)
        assert "no write progress for 0.5s" in str(error)  # not the keepalive's, 20 s on
        nursery.cancel_scope.cancel()
