"""The gRPC transport over real sockets and real mutual TLS, driven by the official grpcio
client (in worker threads) and, where grpcio is too well behaved, by a bare HTTP/2 client.

Test services use google.protobuf wrappers as messages on made-up paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from google.protobuf import wrappers_pb2 as w

from tests.grpc_support import (
    Pki,
    RawClient,
    channel,
    eventually,
    frame,
    make_pki,
    raw,
    running_server,
)
from trio_worker._identity import Role
from trio_worker._net._budget import LEAN_STEP, MAX_STEP, MIN_STEP
from trio_worker._net._transport import (
    _CALL_TASK,
    _SPARE_DEADLINES,
    IDLE_CALL_TASKS,
    MAX_CALLS_PER_TURN,
    BidiStreamMethod,
    CallContext,
    ListenError,
    RpcError,
    Server,
    StatusCode,
    StreamMethod,
    SyncUnaryMethod,
    TransportConfig,
    UnaryMethod,
    admission_caps,
)
from trio_worker.pki import issue_client

ECHO = "/test.Test/Echo"
SLEEP = "/test.Test/Sleep"
BOOM = "/test.Test/Boom"
DENY = "/test.Test/Deny"
GROUP = "/test.Test/Group"
TICKS = "/test.Test/Ticks"
HANG = "/test.Test/Hang"
FLOOD = "/test.Test/Flood"
STEPS = "/test.Test/Steps"
CTX = "/test.Test/Ctx"
SYNC = "/test.Test/Sync"
CHAT = "/test.Test/Chat"
LISTEN = "/test.Test/Listen"
GATED = "/test.Test/Gated"
OPENED = "/test.Test/Opened"
SOON = "/test.Test/Soon"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Probe:
    """What the test handlers saw, for the test to assert on."""

    def __init__(self) -> None:
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.active = 0
        self.max_active = 0
        self.produced = 0
        self.consumed = 0
        self.gate = trio.Event()
        self.at_gate = 0
        self.contexts: list[CallContext] = []
        self.tasks: list[trio.lowlevel.Task] = []  # the task of each SLEEP call


def methods(probe: Probe) -> dict[str, Any]:
    async def echo(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        return w.StringValue(value=req.value)

    async def sleep(req: w.DoubleValue, ctx: CallContext) -> w.DoubleValue:
        probe.tasks.append(trio.lowlevel.current_task())
        probe.active += 1
        probe.max_active = max(probe.max_active, probe.active)
        probe.started.set()
        try:
            await trio.sleep(req.value)
        except trio.Cancelled:
            probe.cancelled.set()
            raise
        finally:
            probe.active -= 1
        return req

    async def boom(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        raise ValueError("secret internals: /etc/shadow")

    async def deny(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        raise RpcError(StatusCode.NOT_FOUND, f"no job {req.value}")

    async def group(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        async def fail() -> None:
            raise RpcError(StatusCode.FAILED_PRECONDITION, "inside a nursery")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
        return req

    async def ticks(req: w.Int32Value, ctx: CallContext) -> AsyncIterator[w.Int32Value]:
        for i in range(req.value):
            yield w.Int32Value(value=i)
            await trio.sleep(0.05)

    async def hang(req: w.StringValue, ctx: CallContext) -> AsyncIterator[w.StringValue]:
        """A quiet job's output: one chunk, then nothing for ever."""
        yield w.StringValue(value="first")
        probe.started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            probe.cancelled.set()
            raise

    async def flood(req: w.Int32Value, ctx: CallContext) -> AsyncIterator[w.BytesValue]:
        chunk = w.BytesValue(value=b"x" * req.value)
        probe.started.set()
        try:
            while True:
                yield chunk
                probe.produced += req.value
        except (trio.Cancelled, GeneratorExit):  # closed while suspended in a send
            probe.cancelled.set()
            raise

    async def steps(req: w.Int32Value, ctx: CallContext) -> AsyncIterator[w.BytesValue]:
        """``req.value`` messages, each the size of a step of the connection's output
        budget (as the Output handler's reader sizes them)."""
        budget = ctx.output_budget
        assert budget is not None
        probe.active += 1
        try:
            for _ in range(req.value):
                yield w.BytesValue(value=b"x" * budget.step())
        finally:
            probe.active -= 1

    async def context(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        probe.contexts.append(ctx)
        return req

    def soon(req: w.DoubleValue, ctx: CallContext) -> w.DoubleValue | None:
        """SOON's ``at_once``: over 1000 answered at once, < 0 refused at once, else "not
        now" (the handler sleeps that long)."""
        if req.value < 0:
            raise RpcError(StatusCode.NOT_FOUND, "not here")
        return req if req.value > 1000 else None

    def sync(req: w.StringValue, ctx: CallContext) -> w.BytesValue:
        """Answered in the reader: echo, fail on demand, or a reply larger than a window."""
        if req.value == "deny":
            raise RpcError(StatusCode.PERMISSION_DENIED, "no")
        if req.value == "boom":
            raise KeyError("internal detail")
        if req.value.startswith("big:"):
            return w.BytesValue(value=b"b" * int(req.value[4:]))
        return w.BytesValue(value=req.value.encode())

    async def chat(
        requests: AsyncIterator[w.StringValue], ctx: CallContext
    ) -> AsyncIterator[w.StringValue]:
        """Bidi echo: each request answered as it comes, then a count at half-close."""
        count = 0
        async for req in requests:
            count += 1
            yield w.StringValue(value=req.value)
        yield w.StringValue(value=f"end:{count}")

    async def listen(
        requests: AsyncIterator[w.StringValue], ctx: CallContext
    ) -> AsyncIterator[w.StringValue]:
        """Bidi: answers each request, waiting for the next one for ever."""
        try:
            async for req in requests:
                probe.started.set()
                yield req
            await trio.sleep_forever()
        except trio.Cancelled:
            probe.cancelled.set()
            raise

    async def gated(
        requests: AsyncIterator[w.BytesValue], ctx: CallContext
    ) -> AsyncIterator[w.Int32Value]:
        """Bidi: reads nothing until the gate opens, then counts the requests."""
        probe.started.set()
        await probe.gate.wait()
        async for _ in requests:
            probe.consumed += 1
        yield w.Int32Value(value=probe.consumed)

    async def opened(req: w.StringValue, ctx: CallContext) -> w.StringValue:
        """Unary: answers once the gate opens (every waiting call in the same turn)."""
        probe.at_gate += 1
        await probe.gate.wait()
        return req

    return {
        ECHO: UnaryMethod(w.StringValue, w.StringValue, echo),
        OPENED: UnaryMethod(w.StringValue, w.StringValue, opened),
        SLEEP: UnaryMethod(w.DoubleValue, w.DoubleValue, sleep),
        SOON: UnaryMethod(w.DoubleValue, w.DoubleValue, sleep, soon),
        BOOM: UnaryMethod(w.StringValue, w.StringValue, boom),
        DENY: UnaryMethod(w.StringValue, w.StringValue, deny),
        GROUP: UnaryMethod(w.StringValue, w.StringValue, group),
        TICKS: StreamMethod(w.Int32Value, w.Int32Value, ticks),
        HANG: StreamMethod(w.StringValue, w.StringValue, hang),
        FLOOD: StreamMethod(w.Int32Value, w.BytesValue, flood),
        STEPS: StreamMethod(w.Int32Value, w.BytesValue, steps),
        CTX: UnaryMethod(w.StringValue, w.StringValue, context),
        SYNC: SyncUnaryMethod(w.StringValue, w.BytesValue, sync),
        CHAT: BidiStreamMethod(w.StringValue, w.StringValue, chat),
        LISTEN: BidiStreamMethod(w.StringValue, w.StringValue, listen),
        GATED: BidiStreamMethod(w.BytesValue, w.Int32Value, gated),
    }


def unary(ch: grpc.Channel, path: str, request: Any, response_type: Any, **kw: Any) -> Any:
    call = ch.unary_unary(
        path,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return call(request, timeout=kw.pop("timeout", 10), **kw)


def code_of(fn: Any) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded")


async def in_thread(fn: Any) -> Any:
    return await trio.to_thread.run_sync(fn)


async def echo_ok(pki: Pki, target: str) -> None:
    def call() -> None:
        with channel(pki, target) as ch:
            assert unary(ch, ECHO, w.StringValue(value="hi"), w.StringValue).value == "hi"

    await in_thread(call)


async def the_one_reset(client: RawClient) -> h2.events.StreamReset:
    """The one RST_STREAM the server sends ``client`` (waited for, at most 5 s)."""
    with trio.fail_after(5):
        await client.until(lambda: any(isinstance(e, h2.events.StreamReset) for e in client.events))
    (reset,) = [e for e in client.events if isinstance(e, h2.events.StreamReset)]
    return reset


async def assert_closed_at_once(port: int) -> None:
    """A new connection is refused: reset during connect, or closed right after."""
    try:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return
    async with tcp:
        await assert_eof(tcp)


async def assert_eof(tcp: trio.SocketStream) -> None:
    """The server closes the connection: EOF, or a reset."""
    try:
        while await tcp.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        return


# --- calls ------------------------------------------------------------------------------


async def test_unary_and_stream_interop(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:

        def calls() -> list[int]:
            with channel(pki, r.target) as ch:
                assert unary(ch, ECHO, w.StringValue(value="é" * 1000), w.StringValue).value == (
                    "é" * 1000
                )
                stream = ch.unary_stream(
                    TICKS,
                    request_serializer=w.Int32Value.SerializeToString,
                    response_deserializer=w.Int32Value.FromString,
                )
                return [m.value for m in stream(w.Int32Value(value=5), timeout=10)]

        assert await in_thread(calls) == [0, 1, 2, 3, 4]
    codes = [(rec.ctx.method, rec.code) for rec in r.records]
    assert codes == [(ECHO, StatusCode.OK), (TICKS, StatusCode.OK)]
    assert r.records[0].request.value == "é" * 1000
    assert r.records[0].response.value == "é" * 1000
    assert r.records[1].response is None


async def test_sync_unary_method(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def calls() -> None:
            with channel(pki, r.target) as ch:

                def call(value: str) -> Any:
                    return unary(ch, SYNC, w.StringValue(value=value), w.BytesValue)

                assert call("hi").value == b"hi"
                assert code_of(lambda: call("deny")) == (grpc.StatusCode.PERMISSION_DENIED, "no")
                assert code_of(lambda: call("boom")) == (grpc.StatusCode.INTERNAL, "internal error")
                # Larger than the window grpcio grants at first: sent from a task instead.
                assert len(call("big:3000000").value) == 3000000
                assert call("again").value == b"again"

        await in_thread(calls)
    assert [rec.code for rec in r.records] == [
        StatusCode.OK,
        StatusCode.PERMISSION_DENIED,
        StatusCode.INTERNAL,
        StatusCode.OK,
        StatusCode.OK,
    ]
    assert r.records[0].response.value == b"hi"


async def test_an_at_once_answer_spawns_no_task_and_not_now_waits_in_one(pki: Pki) -> None:
    """A UnaryMethod's ``at_once`` answers (or refuses) in the reader, its handler never
    run; "not now" runs the handler in a task, which waits, and is cut by the client's
    cancel (and by the deadline: the next test) as any call's."""
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        ch = channel(pki, r.target)
        try:

            def call(value: float, timeout: float = 10) -> Any:
                return unary(ch, SOON, w.DoubleValue(value=value), w.DoubleValue, timeout=timeout)

            def now_calls() -> None:
                assert call(1001).value == 1001
                assert code_of(lambda: call(-1)) == (grpc.StatusCode.NOT_FOUND, "not here")

            await in_thread(now_calls)
            assert not probe.started.is_set()  # the handler (the task's) never ran
            assert (await in_thread(lambda: call(0.01))).value == 0.01
            assert probe.started.is_set()
            probe.started = trio.Event()
            future = ch.unary_unary(
                SOON,
                request_serializer=w.DoubleValue.SerializeToString,
                response_deserializer=w.DoubleValue.FromString,
            ).future(w.DoubleValue(value=60), timeout=60)
            await probe.started.wait()
            future.cancel()
            with trio.fail_after(2):
                await probe.cancelled.wait()
        finally:
            ch.close()
        await eventually(lambda: len(r.records) == 4)
    assert [rec.code for rec in r.records] == [
        StatusCode.OK,
        StatusCode.NOT_FOUND,
        StatusCode.OK,
        StatusCode.CANCELLED,
    ]


async def test_sync_unary_response_over_raw_window(pki: Pki) -> None:
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port) as client,  # 64 KiB windows, acknowledged as read
    ):
        sid = await client.start(SYNC, w.StringValue(value="big:200000").SerializeToString())
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.OK
        assert len(client.data[sid]) == 5 + 1 + 3 + 200000  # gRPC prefix, tag, varint length


async def test_async_unary_response_over_raw_window(pki: Pki) -> None:
    # A handler's response is queued as one whole DATA frame when it fits (send_whole_data);
    # one over the client's window waits for window in frames, as before.
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port, window=1000) as client,  # acknowledged as read
    ):
        text = "e" * 5000
        sid = await client.start(ECHO, w.StringValue(value=text).SerializeToString())
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.OK
        assert bytes(client.data[sid])[5:] == w.StringValue(value=text).SerializeToString()


async def test_many_concurrent_calls_on_one_connection(pki: Pki) -> None:
    """Sync, async and streaming calls interleaved on one channel from many threads."""
    async with running_server(pki, methods(Probe())) as r:

        def calls() -> None:
            with channel(pki, r.target) as ch:
                stream = ch.unary_stream(
                    TICKS,
                    request_serializer=w.Int32Value.SerializeToString,
                    response_deserializer=w.Int32Value.FromString,
                )

                def worker(i: int) -> None:
                    for j in range(10):
                        text = f"{i}-{j}" * (1 + 300 * (j % 3))
                        got = unary(ch, ECHO, w.StringValue(value=text), w.StringValue)
                        assert got.value == text
                        got = unary(ch, SYNC, w.StringValue(value=text), w.BytesValue)
                        assert got.value == text.encode()
                    assert [m.value for m in stream(w.Int32Value(value=3), timeout=10)] == [0, 1, 2]

                with ThreadPoolExecutor(max_workers=32) as pool:
                    for future in [pool.submit(worker, i) for i in range(32)]:
                        future.result()

        await in_thread(calls)
    assert len(r.records) == 32 * 21
    assert {rec.code for rec in r.records} == {StatusCode.OK}
    assert r.server.stats.connections_accepted == 1


async def test_call_context(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                unary(
                    ch, CTX, w.StringValue(), w.StringValue, timeout=30, metadata=[("x-trace", "7")]
                )

        before = trio.current_time()
        await in_thread(call)
    (ctx,) = probe.contexts
    assert ctx.identity.name == "alice"
    assert ctx.method == CTX
    host, port = ctx.peer.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    assert ctx.deadline is not None
    assert before + 20 < ctx.deadline < before + 31
    assert ("x-trace", "7") in ctx.metadata


async def test_unknown_method_unimplemented(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                code, details = code_of(
                    lambda: unary(ch, "/test.Test/Nope", w.StringValue(), w.StringValue)
                )
                assert code == grpc.StatusCode.UNIMPLEMENTED
                assert "/test.Test/Nope" in details
                code, _ = code_of(
                    lambda: unary(ch, "/other.Svc/Echo", w.StringValue(), w.StringValue)
                )
                assert code == grpc.StatusCode.UNIMPLEMENTED

        await in_thread(call)
    assert [rec.code for rec in r.records] == [StatusCode.UNIMPLEMENTED] * 2


@pytest.mark.parametrize("payload", [b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"])
async def test_malformed_protobuf_invalid_argument(pki: Pki, payload: bytes) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                code, details = code_of(lambda: raw(ECHO, ch)(payload, timeout=10))
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert details == "malformed request message"
                # The connection is fine afterwards.
                assert unary(ch, ECHO, w.StringValue(value="ok"), w.StringValue).value == "ok"

        await in_thread(call)


@pytest.mark.parametrize("size", [2048, 20 * 1024 * 1024])
async def test_oversized_request_resource_exhausted(pki: Pki, size: int) -> None:
    config = TransportConfig(max_request_bytes=1024)
    async with running_server(pki, methods(Probe()), config=config) as r:

        def call() -> float:
            with channel(pki, r.target) as ch:
                started = time.monotonic()
                code, details = code_of(lambda: raw(ECHO, ch)(b"\x0a" * size, timeout=30))
                elapsed = time.monotonic() - started
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "1024" in details
                assert unary(ch, ECHO, w.StringValue(value="ok"), w.StringValue).value == "ok"
                return elapsed

        elapsed = await in_thread(call)
    # Refused on the length prefix, not after buffering 20 MiB (generous bound).
    assert elapsed < 10


async def test_compressed_request_unimplemented(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                code, details = code_of(
                    lambda: unary(
                        ch,
                        ECHO,
                        w.StringValue(value="z" * 1000),
                        w.StringValue,
                        compression=grpc.Compression.Gzip,
                    )
                )
                assert code == grpc.StatusCode.UNIMPLEMENTED
                assert "gzip" in details

        await in_thread(call)


async def test_handler_exception_is_internal_and_logged(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                code, details = code_of(lambda: unary(ch, BOOM, w.StringValue(), w.StringValue))
                assert code == grpc.StatusCode.INTERNAL
                assert details == "internal error"

        with caplog.at_level(logging.ERROR, logger="trio_worker._net._transport"):
            await in_thread(call)
    (entry,) = [e for e in caplog.records if e.exc_info]
    assert BOOM in entry.getMessage()
    assert "secret internals" in str(entry.exc_info[1])  # type: ignore[index]
    assert r.records[0].code is StatusCode.INTERNAL


async def test_rpc_error_passes_through(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                assert code_of(
                    lambda: unary(ch, DENY, w.StringValue(value="j1"), w.StringValue)
                ) == (
                    grpc.StatusCode.NOT_FOUND,
                    "no job j1",
                )
                assert code_of(lambda: unary(ch, GROUP, w.StringValue(), w.StringValue)) == (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "inside a nursery",
                )

        await in_thread(call)


# --- bidirectional streaming ------------------------------------------------------------


class Feed:
    """A grpcio request iterator fed from the test, one message at a time."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Half-close: the request iterator ends."""
        self._queue.put(None)

    def __iter__(self) -> Iterator[Any]:
        while (message := self._queue.get()) is not None:
            yield message


def bidi(ch: grpc.Channel, path: str, request_type: Any, response_type: Any) -> Any:
    return ch.stream_stream(
        path,
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )


async def test_bidi_echo_interleaves_and_half_close_ends_requests(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> list[str]:
            with channel(pki, r.target) as ch:
                feed = Feed()
                responses = bidi(ch, CHAT, w.StringValue, w.StringValue)(iter(feed), timeout=30)
                got = []
                # Each answer arrives before the next request is sent: nothing waits for
                # the half-close. The big one spans several of the stream's windows.
                for text in ("a", "b" * 3_000_000, "c"):
                    feed.put(w.StringValue(value=text))
                    got.append(next(responses).value)
                feed.close()
                got.extend(m.value for m in responses)
                assert responses.code() == grpc.StatusCode.OK
                return got

        assert await in_thread(call) == ["a", "b" * 3_000_000, "c", "end:3"]
        assert [rec.code for rec in r.records] == [StatusCode.OK]
        assert r.records[0].request is None


async def test_bidi_half_close_without_requests(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> list[str]:
            with channel(pki, r.target) as ch:
                responses = bidi(ch, CHAT, w.StringValue, w.StringValue)(iter([]), timeout=10)
                return [m.value for m in responses]

        assert await in_thread(call) == ["end:0"]


async def test_bidi_client_cancel_cancels_handler(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        ch = channel(pki, r.target)
        feed = Feed()
        try:
            responses = bidi(ch, LISTEN, w.StringValue, w.StringValue)(iter(feed), timeout=60)
            feed.put(w.StringValue(value="hello"))
            assert (await in_thread(lambda: next(responses))).value == "hello"
            await probe.started.wait()
            responses.cancel()
            with trio.fail_after(1.5):
                await probe.cancelled.wait()
        finally:
            feed.close()
            ch.close()
        await eventually(lambda: bool(r.records))
    assert r.records[0].code is StatusCode.CANCELLED


async def test_bidi_connection_drop_cancels_handler(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        async with RawClient.connect(pki, r.port) as client:
            sid = await client.start(LISTEN, b"", end=False)
            with trio.fail_after(5):
                await client.until(lambda: len(client.data.get(sid, b"")) > 0)
            await probe.started.wait()
            client.stream.transport_stream.socket.close()
        with trio.fail_after(1.5):
            await probe.cancelled.wait()
        await eventually(lambda: bool(r.records))
    assert r.records[0].code is StatusCode.CANCELLED


async def test_bidi_deadline(pki: Pki) -> None:
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        sid = await client.start(LISTEN, b"", end=False, headers=[("grpc-timeout", "300m")])
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.DEADLINE_EXCEEDED
        assert probe.cancelled.is_set()
    assert r.records[0].code is StatusCode.DEADLINE_EXCEEDED


async def test_bidi_oversized_message_resource_exhausted(pki: Pki) -> None:
    probe = Probe()
    config = TransportConfig(max_request_bytes=1024)
    async with running_server(pki, methods(probe), config=config) as r:

        def call() -> tuple[str, grpc.StatusCode, str]:
            with channel(pki, r.target) as ch:
                feed = Feed()
                responses = bidi(ch, LISTEN, w.StringValue, w.StringValue)(iter(feed), timeout=30)
                try:
                    feed.put(w.StringValue(value="fits"))
                    first = next(responses).value
                    feed.put(w.StringValue(value="x" * 2048))
                    code, details = code_of(lambda: list(responses))
                finally:
                    feed.close()
                # The connection is fine afterwards.
                assert unary(ch, ECHO, w.StringValue(value="ok"), w.StringValue).value == "ok"
                return first, code, details

        first, code, details = await in_thread(call)
    assert first == "fits"
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1024" in details
    assert probe.cancelled.is_set()  # it was waiting for requests, not reading the big one
    assert r.records[0].code is StatusCode.RESOURCE_EXHAUSTED


async def test_bidi_malformed_message_invalid_argument(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:

        def call() -> tuple[list[bytes], grpc.StatusCode, str]:
            with channel(pki, r.target) as ch:
                fn = ch.stream_stream(
                    CHAT, request_serializer=lambda b: b, response_deserializer=lambda b: b
                )
                good = w.StringValue(value="ok").SerializeToString()
                responses = fn(iter([good, b"\x0a\x05ab"]), timeout=10)
                got: list[bytes] = []

                def drain() -> None:
                    got.extend(responses)

                code, details = code_of(drain)
                return got, code, details

        got, code, details = await in_thread(call)
    assert got == [w.StringValue(value="ok").SerializeToString()]
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "malformed request message")


async def test_bidi_inbound_flow_control_follows_the_handler(pki: Pki) -> None:
    """A client sending faster than the handler reads is held to one stream window, while
    the connection window (and so every other stream) keeps flowing."""
    probe = Probe()
    # A connection window no larger than the stream's: unless it is handed back at once,
    # one held stream would stop the whole connection.
    config = TransportConfig(connection_window_size=1024 * 1024)
    async with (
        running_server(pki, methods(probe), config=config) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        with trio.fail_after(5):  # the server's SETTINGS: 1 MiB stream windows
            await client.until(lambda: client.h2.remote_settings.initial_window_size > 65535)
        sid = await client.start(GATED, None, end=False)
        await probe.started.wait()
        message = frame(w.BytesValue(value=b"m" * 16384).SerializeToString())
        sent = 0
        while client.h2.local_flow_control_window(sid) >= len(message):
            client.h2.send_data(sid, message)
            sent += 1
        await client.flush()
        assert sent == (1024 * 1024) // len(message)
        window = client.h2.local_flow_control_window(sid)
        # The server reads on, handing back the connection's window but not the stream's.
        with trio.move_on_after(0.5):
            while await client.pump():
                pass
        assert client.h2.local_flow_control_window(sid) == window
        # (h2 hands back a window in halves: at least one half came back.)
        assert client.h2.outbound_flow_control_window > 512 * 1024
        other = w.StringValue(value="o" * 500_000).SerializeToString()
        echo = await client.start(ECHO, other)
        with trio.fail_after(5):
            await client.until(lambda: client.status(echo) is not None)
        assert client.status(echo) == StatusCode.OK
        assert bytes(client.data[echo]) == frame(other)
        assert probe.consumed == 0
        # The handler reads: the stream's window reopens, and the client finishes.
        probe.gate.set()
        with trio.fail_after(5):
            await client.until(lambda: client.h2.local_flow_control_window(sid) > window)
        client.h2.send_data(sid, message, end_stream=True)
        await client.flush()
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.OK
        assert bytes(client.data[sid]) == frame(w.Int32Value(value=sent + 1).SerializeToString())


# --- deadlines and cancellation ---------------------------------------------------------


@pytest.mark.parametrize("method", [SLEEP, SOON])
async def test_deadline_enforced_by_server(pki: Pki, method: str) -> None:
    """grpc-timeout alone (no client-side cancel) ends the call with DEADLINE_EXCEEDED:
    also a call whose ``at_once`` said "not now" (SOON), which keeps its deadline."""
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        request = w.DoubleValue(value=60).SerializeToString()
        sid = await client.start(method, request, headers=[("grpc-timeout", "300m")])
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.DEADLINE_EXCEEDED
        assert probe.cancelled.is_set()
    assert r.records[0].code is StatusCode.DEADLINE_EXCEEDED


async def test_a_connections_calls_take_turns_in_one_task_each_with_its_own_end(pki: Pki) -> None:
    """A call's task, its call ended, runs the connection's next call that needs a task
    (in the same cancel scope until a call is cancelled): each call still ends by its own
    deadline, reset or answer, never by an earlier call's."""
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):

        async def call(seconds: float, grpc_timeout: str | None = None, reset: bool = False) -> int:
            headers = None if grpc_timeout is None else [("grpc-timeout", grpc_timeout)]
            request = w.DoubleValue(value=seconds).SerializeToString()
            ended = len(r.records)
            sid = await client.start(SLEEP, request, headers=headers)
            if reset:  # once the handler sleeps
                await eventually(lambda: probe.active == 1)
                client.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                await client.flush()
                await eventually(lambda: len(r.records) > ended)
                return int(r.records[-1].code)
            with trio.fail_after(5):
                await client.until(lambda: client.status(sid) is not None)
            status = client.status(sid)
            assert status is not None
            return status

        assert await call(0) == StatusCode.OK
        assert await call(0) == StatusCode.OK
        assert await call(60, "300m") == StatusCode.DEADLINE_EXCEEDED  # (then a new scope)
        assert await call(0.01, "300m") == StatusCode.OK
        # The deadline of the call before, 300 ms after it, is not this one's.
        assert await call(0.6) == StatusCode.OK
        assert await call(60, reset=True) == StatusCode.CANCELLED
        assert await call(0.01, "5S") == StatusCode.OK
        assert len(r.records) == 7
        assert len(set(probe.tasks)) == 1


async def test_a_connection_keeps_at_most_IDLE_CALL_TASKS_tasks_for_its_next_calls(
    pki: Pki,
) -> None:
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        (connection,) = r.server._connections
        nursery = connection._nursery
        assert nursery is not None

        def call_tasks() -> set[trio.lowlevel.Task]:
            return {task for task in nursery.child_tasks if task.name == _CALL_TASK}

        burst = IDLE_CALL_TASKS + 6
        kept: list[set[trio.lowlevel.Task]] = []
        for _ in range(2):
            request = w.DoubleValue(value=0.3).SerializeToString()
            sids = [await client.start(SLEEP, request) for _ in range(burst)]
            with trio.fail_after(5):
                await client.until(lambda s=sids: all(client.status(i) is not None for i in s))
            assert {client.status(sid) for sid in sids} == {StatusCode.OK}
            assert probe.max_active == burst
            await eventually(lambda: len(call_tasks()) == IDLE_CALL_TASKS)
            kept.append(call_tasks())
        # The second burst ran in the tasks the first left, and in new ones.
        assert kept[0] <= set(probe.tasks[burst:])
        assert len(set(probe.tasks)) == 2 * burst - IDLE_CALL_TASKS


async def test_a_call_task_waiting_for_the_next_call_keeps_nothing_of_the_last(pki: Pki) -> None:
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        (connection,) = r.server._connections
        nursery = connection._nursery
        assert nursery is not None
        big = "x" * 10_000
        for method, request in ((ECHO, w.StringValue(value=big)), (SLEEP, w.DoubleValue())):
            sid = await client.start(method, request.SerializeToString())
            with trio.fail_after(5):
                await client.until(lambda s=sid: client.status(s) is not None)
            assert client.status(sid) == StatusCode.OK
        # The client has the call's status once the reply is written; the task lets its call
        # go after that, then waits for the next: look once it waits.
        await trio.testing.wait_all_tasks_blocked()
        (task,) = [task for task in nursery.child_tasks if task.name == _CALL_TASK]
        held: list[Any] = []
        coroutine: Any = task.coro
        while hasattr(coroutine, "cr_frame"):  # the task's frames, down to where it waits
            held.extend(coroutine.cr_frame.f_locals.values())
            coroutine = coroutine.cr_await
        calls = [value for value in held if type(value).__name__ == "_Call"]
        assert calls, "the task keeps its last call (its stream id, its flags)"
        for call in calls:
            assert (call.request, call.request_bytes) == (None, None)
        assert not [v for v in held if isinstance(v, w.StringValue | w.DoubleValue | tuple)]


async def test_a_sooner_deadline_after_a_later_one_is_enforced_first(pki: Pki) -> None:
    # The connection's one expiry waits for the soonest deadline of its running calls.
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        request = w.DoubleValue(value=60).SerializeToString()
        later = await client.start(SLEEP, request, headers=[("grpc-timeout", "60S")])
        await eventually(lambda: probe.active == 1)
        sooner = await client.start(SLEEP, request, headers=[("grpc-timeout", "300m")])
        with trio.fail_after(10):
            await client.until(lambda: client.status(sooner) is not None)
        assert client.status(sooner) == StatusCode.DEADLINE_EXCEEDED
        assert client.status(later) is None
        assert probe.active == 1


async def test_the_deadlines_of_ended_calls_are_dropped_within_their_bound(pki: Pki) -> None:
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        (connection,) = r.server._connections
        request = w.DoubleValue(value=0).SerializeToString()
        for _ in range(3 * _SPARE_DEADLINES):
            sid = await client.start(SLEEP, request, headers=[("grpc-timeout", "60S")])
            with trio.fail_after(5):
                await client.until(lambda s=sid: client.status(s) is not None)
            assert client.status(sid) == StatusCode.OK
            # (at most twice the calls running then, one, and the spare ones)
            assert len(connection._deadlines) <= 2 + _SPARE_DEADLINES
        # Swept, not stopped: a deadline still ends its call.
        request = w.DoubleValue(value=60).SerializeToString()
        sid = await client.start(SLEEP, request, headers=[("grpc-timeout", "300m")])
        with trio.fail_after(10):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.DEADLINE_EXCEEDED


async def test_grpcio_deadline(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:

        def call() -> None:
            with channel(pki, r.target) as ch:
                code, _ = code_of(
                    lambda: unary(ch, SLEEP, w.DoubleValue(value=60), w.DoubleValue, timeout=0.3)
                )
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED

        await in_thread(call)
        with trio.fail_after(2):
            await probe.cancelled.wait()


async def test_client_cancel_cancels_streaming_handler(pki: Pki) -> None:
    """RST_STREAM from grpcio reaches a handler that is blocked, sending nothing."""
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        ch = channel(pki, r.target)
        try:
            call = ch.unary_stream(
                HANG,
                request_serializer=w.StringValue.SerializeToString,
                response_deserializer=w.StringValue.FromString,
            )(w.StringValue(), timeout=60)
            assert (await in_thread(lambda: next(call))).value == "first"
            await probe.started.wait()
            call.cancel()
            with trio.fail_after(1.5):
                await probe.cancelled.wait()
        finally:
            ch.close()
        await eventually(lambda: bool(r.records))
    assert r.records[0].code is StatusCode.CANCELLED


async def test_connection_drop_cancels_streaming_handler(pki: Pki) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        async with RawClient.connect(pki, r.port) as client:
            sid = await client.start(HANG, b"")
            with trio.fail_after(5):
                await client.until(lambda: len(client.data.get(sid, b"")) > 0)
            await probe.started.wait()
            # Drop TCP without any HTTP/2 or TLS goodbye.
            client.stream.transport_stream.socket.close()
        with trio.fail_after(1.5):
            await probe.cancelled.wait()
        await echo_ok(pki, r.target)
        assert r.records[0].code is StatusCode.CANCELLED


async def test_missing_request_message(pki: Pki) -> None:
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        sid = await client.start(ECHO, None)
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.INVALID_ARGUMENT


async def test_malformed_headers_reset_only_that_stream(pki: Pki) -> None:
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        bad = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            bad,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", "/nopath"),
                (":authority", "x"),
                ("content-type", "text/plain"),
            ],
            end_stream=True,
        )
        await client.flush()
        sid = await client.start(ECHO, w.StringValue(value="still").SerializeToString())
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.OK
        resets = [e for e in client.events if isinstance(e, h2.events.StreamReset)]
        assert [(e.stream_id, e.error_code) for e in resets] == [
            (bad, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        ]


# --- connections ------------------------------------------------------------------------


async def test_garbage_instead_of_tls(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:
        for garbage in (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            bytes(range(256)) * 8,
        ):
            tcp = await trio.open_tcp_stream("127.0.0.1", r.port)
            async with tcp:
                await tcp.send_all(garbage)
                with trio.fail_after(5):
                    await assert_eof(tcp)
        await echo_ok(pki, r.target)
        assert r.server.stats.handshakes_failed == 3


@pytest.mark.parametrize("alpn", [["http/1.1"], ["http/1.1", "spdy/3", "h2c"], None])
async def test_a_client_without_alpn_h2_is_refused_at_the_handshake(
    pki: Pki, alpn: list[str] | None
) -> None:
    """RFC 7301: a server that speaks none of the client's protocols ends the handshake with
    the fatal ``no_application_protocol`` alert; the client never completes it. So does one
    that offers no ALPN at all (None)."""
    async with running_server(pki, methods(Probe())) as r:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        tcp = await trio.open_tcp_stream("127.0.0.1", r.port)
        stream = trio.SSLStream(tcp, context, server_hostname="localhost")
        async with stream:
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
                await stream.do_handshake()
            assert "no application protocol" in str(info.value.__cause__)
        await echo_ok(pki, r.target)
        assert r.server.stats.handshakes_failed == 1


async def test_a_client_offering_h2_among_others_gets_h2(pki: Pki) -> None:
    async with running_server(pki, methods(Probe())) as r:
        context = ssl.create_default_context(cafile=str(pki.ca))
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        context.set_alpn_protocols(["http/1.1", "h2"])
        tcp = await trio.open_tcp_stream("127.0.0.1", r.port)
        stream = trio.SSLStream(tcp, context, server_hostname="localhost")
        async with stream:
            with trio.fail_after(5):
                await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "h2"


async def test_stalled_handshake_times_out(pki: Pki) -> None:
    config = TransportConfig(handshake_timeout=0.5)
    async with running_server(pki, methods(Probe()), config=config) as r:
        tcp = await trio.open_tcp_stream("127.0.0.1", r.port)
        async with tcp:
            await tcp.send_all(b"\x16\x03\x01\x02\x00\x01\x00")  # a ClientHello, cut short
            started = trio.current_time()
            with trio.fail_after(5):
                await assert_eof(tcp)
            assert trio.current_time() - started >= 0.4
        await echo_ok(pki, r.target)


async def _flood(port: int, count: int, source: str) -> tuple[list[trio.socket.SocketType], int]:
    """``count`` TCP connections from ``source`` that never say a word: (the ones the
    server accepted, how many it refused at once)."""
    held: list[trio.socket.SocketType] = []
    refused = 0
    for _ in range(count):
        sock = trio.socket.socket()
        await sock.bind((source, 0))
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError:
            refused += 1
            sock.close()
            continue
        held.append(sock)
    return held, refused


async def _answered(sock: trio.socket.SocketType) -> bool:
    """Whether the server has closed or reset this connection."""
    try:
        return await sock.recv(1) == b""
    except OSError:
        return True


async def test_a_connection_flood_from_one_address_leaves_others_served(pki: Pki) -> None:
    """Admission: one address's idle connections fill only its own share (refused beyond
    it, at once: an answer, never a hang), and others connect meanwhile."""
    config = TransportConfig(
        handshake_timeout=10.0,
        max_handshakes=32,
        max_handshakes_per_address=8,
        max_connections_per_address=16,
    )
    async with running_server(pki, methods(Probe()), config=config) as r:
        held, refused = await _flood(r.port, 200, "127.0.0.2")
        try:
            with trio.fail_after(10):
                await echo_ok(pki, r.target)  # from 127.0.0.1, while the flood is held
            assert r.server.connection_count <= 8 + 1
            over = held[8:]  # accepted by the kernel, refused by the server: reset at once
            with trio.fail_after(5):
                for sock in over[:20]:
                    assert await _answered(sock)
            assert refused + r.server.stats.connections_refused >= 150
        finally:
            for sock in held:
                sock.close()


async def test_handshakes_shorten_and_the_oldest_gives_way_when_full(pki: Pki) -> None:
    config = TransportConfig(handshake_timeout=30.0, max_handshakes=8, max_handshakes_per_address=8)
    async with running_server(pki, methods(Probe()), config=config) as r:
        held = []
        try:
            for source in ("127.0.0.2", "127.0.0.3"):
                more, _ = await _flood(r.port, 8, source)
                held += more
            with trio.fail_after(10):
                await echo_ok(pki, r.target)
            assert r.server.stats.handshakes_evicted >= 8
            with trio.fail_after(5):
                assert await _answered(held[0])  # the oldest gave way
        finally:
            for sock in held:
                sock.close()


def test_caps_follow_the_descriptors_we_may_open() -> None:
    caps = admission_caps(TransportConfig(), nofile=1024)
    assert caps.connections == (1024 - 64) // 2
    assert caps.handshakes <= caps.connections // 2
    assert caps.handshakes_per_address <= caps.handshakes
    roomy = admission_caps(TransportConfig(), nofile=1 << 20)
    assert roomy.connections == TransportConfig().max_connections


async def _refused_connection(pki: Pki, port: int) -> h2.events.ConnectionTerminated:
    """Connect, read what the server says until it closes, and return its GOAWAY."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, pki.client_context(), server_hostname="localhost")
    received = b""
    with trio.fail_after(5):
        try:
            await stream.do_handshake()
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    events = client.receive_data(received)
    (goaway,) = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    return goaway


async def test_one_client_holds_at_most_its_connections_and_others_are_served(
    pki: Pki,
) -> None:
    """tools/probe_hostile.py tls-flood: one client's idle connections, from several
    addresses, took every connection (998 held; 0 of 20 new clients served). It now holds
    at most ``max_connections_per_client``; the next is told why (GOAWAY ENHANCE_YOUR_CALM)
    and closed, another client is served, and a connection that ends makes room."""
    config = TransportConfig(max_connections_per_client=2)
    bob_files = issue_client(pki.ca.parent, "bob", Role.ADMIN)
    bob = dataclasses.replace(pki, client_cert=bob_files.cert, client_key=bob_files.key)
    async with running_server(pki, methods(Probe()), config=config) as r:
        assert r.server.caps.per_client == 2
        async with RawClient.connect(pki, r.port) as first, RawClient.connect(pki, r.port):
            goaway = await _refused_connection(pki, r.port)
            assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert b"2 connections open for this client" in (goaway.additional_data or b"")
            assert r.server.stats.connections_refused == 1
            async with RawClient.connect(bob, r.port) as other:
                sid = await other.start(ECHO, w.StringValue(value="x").SerializeToString())
                with trio.fail_after(5):
                    await other.until(lambda: other.status(sid) is not None)
                assert other.status(sid) == 0
            sid = await first.start(ECHO, w.StringValue(value="x").SerializeToString())
            with trio.fail_after(5):
                await first.until(lambda: first.status(sid) is not None)
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked()
        async with RawClient.connect(pki, r.port) as again:
            sid = await again.start(ECHO, w.StringValue(value="x").SerializeToString())
            with trio.fail_after(5):
                await again.until(lambda: again.status(sid) is not None)
            assert again.status(sid) == 0


async def test_one_clients_stalled_streams_hold_its_output_budget_and_its_live_one_goes_on(
    pki: Pki,
) -> None:
    """tools/probe_hostile.py many-windows: one client's streams on several connections, each
    with a message waiting for a window that never opens. Each connection's budget let every
    stream hold a 64 KiB step (1 GiB for the client's 4,096); the client's output budget
    (``ClientOutput``, shared by its connections) holds them to it and a lean step each, and
    a live stream of the same client, on another connection, still gets all of its output."""
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        async with contextlib.AsyncExitStack() as stack:
            stalled = [await stack.enter_async_context(RawClient.connect(pki, r.port, window=1))]
            [client] = r.server.client_output.values()
            client.total = 256 * 1024
            for _ in range(3):
                stalled.append(
                    await stack.enter_async_context(RawClient.connect(pki, r.port, window=1))
                )
            for raw in stalled:
                for _ in range(32):
                    await raw.start(STEPS, w.Int32Value(value=1000).SerializeToString())
            with trio.fail_after(10):
                await eventually(lambda: probe.active == 128)
                await trio.testing.wait_all_tasks_blocked()
            assert client.held <= client.total + MAX_STEP + 128 * 2 * LEAN_STEP
            assert client.held < 128 * MIN_STEP  # what they held without the client's budget
            async with RawClient.connect(pki, r.port) as live:  # 64 KiB windows, acknowledged
                sid = await live.start(STEPS, w.Int32Value(value=100).SerializeToString())
                with trio.fail_after(10):
                    await live.until(lambda: live.status(sid) is not None)
                assert live.status(sid) == 0
                assert len(live.data[sid]) == 100 * (5 + 1 + 2 + LEAN_STEP)  # (BytesValue's)
        with trio.fail_after(10):  # gone with the client's last connection
            await eventually(lambda: not r.server.client_output)


async def test_max_connections(pki: Pki) -> None:
    config = TransportConfig(max_connections=2)
    async with running_server(pki, methods(Probe()), config=config) as r:
        async with RawClient.connect(pki, r.port) as first, RawClient.connect(pki, r.port):
            sid = await first.start(ECHO, w.StringValue(value="x").SerializeToString())
            with trio.fail_after(5):
                await first.until(lambda: first.status(sid) is not None)
            with trio.fail_after(2):
                await assert_closed_at_once(r.port)
            assert r.server.stats.connections_refused == 1
        await eventually(lambda: r.server.connection_count == 0)
        await echo_ok(pki, r.target)


async def test_a_certificate_is_parsed_once_until_the_tls_material_is_reloaded(
    pki: Pki,
) -> None:
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        await echo_ok(pki, r.target)
        await echo_ok(pki, r.target)  # a second connection, the same certificate
        assert len(r.server.identities) == 1
        r.server.use_tls(pki.server_context(), refused=lambda der: False)
        assert len(r.server.identities) == 0  # nothing read under the old material stays
        await echo_ok(pki, r.target)
        assert len(r.server.identities) == 1


async def test_port_taken_is_listen_error(pki: Pki) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Server(methods(Probe()), pki.server_context())
        async with trio.open_nursery() as nursery:
            with pytest.raises(ListenError, match="already in use"):
                await nursery.start(server.serve, "127.0.0.1", port)


async def test_bad_listen_address(pki: Pki) -> None:
    server = Server(methods(Probe()), pki.server_context())
    async with trio.open_nursery() as nursery:
        with pytest.raises(ListenError):
            await nursery.start(server.serve, "192.0.2.1", 0)  # not an address of ours


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")
async def test_ipv6_literal(pki: Pki) -> None:
    async with running_server(pki, methods(Probe()), host="::1") as r:
        assert r.server.addresses == [f"[::1]:{r.port}"]
        await echo_ok(pki, f"[::1]:{r.port}")
        # exactly that address: not IPv4
        with pytest.raises(OSError, match="all attempts to connect"):
            await trio.open_tcp_stream("127.0.0.1", r.port)


async def test_idle_connection_gets_goaway(pki: Pki) -> None:
    config = TransportConfig(idle_timeout=0.3)
    async with (
        running_server(pki, methods(Probe()), config=config) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        with trio.fail_after(5):
            while await client.pump():
                pass
        goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.NO_ERROR]


# --- HTTP/2 limits and flow control -----------------------------------------------------


async def test_stream_cap_refuses_excess_stream(pki: Pki) -> None:
    probe = Probe()
    config = TransportConfig(max_concurrent_streams=2)
    async with (
        running_server(pki, methods(probe), config=config) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        # Sent before our client has read the server's SETTINGS, as a racing client would.
        request = w.DoubleValue(value=60).SerializeToString()
        sids = [await client.start(SLEEP, request) for _ in range(3)]
        reset = await the_one_reset(client)
        assert reset.stream_id == sids[2]
        assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        assert client.h2.remote_settings.max_concurrent_streams == 2
        assert probe.active == 2


async def test_one_clients_streams_are_bounded_across_its_connections(pki: Pki) -> None:
    """max_streams_per_client counts a client's calls on all its connections: the stream
    over it is refused (REFUSED_STREAM) though its own connection has room, and the calls
    of a connection that goes are the client's again."""
    probe = Probe()
    config = TransportConfig(max_concurrent_streams=3, max_streams_per_client=4)
    request = w.DoubleValue(value=60).SerializeToString()
    async with running_server(pki, methods(probe), config=config) as r:
        async with RawClient.connect(pki, r.port) as first:
            for _ in range(3):
                await first.start(SLEEP, request)
            await eventually(lambda: probe.active == 3)
            async with RawClient.connect(pki, r.port) as second:
                sids = [await second.start(SLEEP, request) for _ in range(2)]
                reset = await the_one_reset(second)
                assert reset.stream_id == sids[1]
                assert reset.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                assert second.h2.remote_settings.max_concurrent_streams == 3
                assert probe.active == 4
                assert list(r.server.client_streams.values()) == [4]
                await first.stream.aclose()  # its three calls go with it
                await eventually(lambda: probe.active == 1)
                assert list(r.server.client_streams.values()) == [1]
                more = [await second.start(SLEEP, request) for _ in range(2)]
                await eventually(lambda: probe.active == 3)
                assert not any(
                    isinstance(e, h2.events.StreamReset) and e.stream_id in more
                    for e in second.events
                )
        await eventually(lambda: probe.active == 0)
        assert r.server.client_streams == {}


async def test_the_servers_streams_are_bounded(pki: Pki) -> None:
    """max_streams counts every client's calls: the stream over it is refused
    (REFUSED_STREAM) though the connection and the client have room."""
    probe = Probe()
    config = TransportConfig(max_concurrent_streams=5, max_streams=2)
    request = w.DoubleValue(value=60).SerializeToString()
    async with (
        running_server(pki, methods(probe), config=config) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        sids = [await client.start(SLEEP, request) for _ in range(3)]
        reset = await the_one_reset(client)
        assert (reset.stream_id, reset.error_code) == (sids[2], h2.errors.ErrorCodes.REFUSED_STREAM)
        await eventually(lambda: probe.active == 2)
        assert r.server.streams == 2
        assert "over the server's 2 streams" in r.records[-1].message


async def test_grpcio_respects_stream_cap(pki: Pki) -> None:
    probe = Probe()
    config = TransportConfig(max_concurrent_streams=2)
    async with running_server(pki, methods(probe), config=config) as r:

        def calls() -> None:
            with channel(pki, r.target) as ch:
                call = ch.unary_unary(
                    SLEEP,
                    request_serializer=w.DoubleValue.SerializeToString,
                    response_deserializer=w.DoubleValue.FromString,
                )
                futures = [call.future(w.DoubleValue(value=0.2), timeout=20) for _ in range(6)]
                assert [f.result().value for f in futures] == [0.2] * 6

        await in_thread(calls)
    assert probe.max_active == 2


async def test_slow_reader_bounded_by_flow_control(pki: Pki) -> None:
    """A client that grants no window gets 64 KiB, and the handler waits."""
    probe = Probe()
    async with running_server(pki, methods(probe)) as r:
        async with RawClient.connect(pki, r.port) as client:
            sid = await client.start(FLOOD, w.Int32Value(value=16384).SerializeToString())
            await probe.started.wait()
            with trio.move_on_after(1.0):
                while await client.pump(ack=False):
                    pass
            assert probe.produced <= 65535 + 2 * 16384
            assert len(client.data.get(sid, b"")) <= 65535
            await echo_ok(pki, r.target)  # others are served meanwhile
        with trio.fail_after(2):
            await probe.cancelled.wait()


async def test_a_tiny_window_gets_every_message_intact(pki: Pki) -> None:
    """With a 1-byte stream window the server sends one byte per WINDOW_UPDATE, the
    length prefix split across frames too, and the messages arrive whole and in order."""
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port, window=1) as client,
    ):
        sid = await client.start(TICKS, w.Int32Value(value=3).SerializeToString())
        with trio.fail_after(10):
            await client.until(lambda: client.status(sid) is not None)
        data = client.data[sid]
        values = []
        while data:
            length = int.from_bytes(data[1:5], "big")
            values.append(w.Int32Value.FromString(data[5 : 5 + length]).value)
            data = data[5 + length :]
        assert values == [0, 1, 2]
        assert client.status(sid) == 0


async def test_stuck_reader_bounded_by_send_buffer(pki: Pki) -> None:
    """A client with a huge window that stops reading the socket costs a bounded buffer."""
    probe = Probe()
    config = TransportConfig(max_send_buffer=256 * 1024)
    async with (
        running_server(pki, methods(probe), config=config) as r,
        RawClient.connect(pki, r.port, window=2**31 - 1) as client,
    ):
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)
        await client.flush()
        await client.start(FLOOD, w.Int32Value(value=65536).SerializeToString())
        await probe.started.wait()
        # Never read. The socket buffers fill, then our send buffer, then it stops: every
        # task (the in-process server's too) waits (was a 1 s sleep, which a loaded host
        # could spend before the buffers were full).
        await trio.testing.wait_all_tasks_blocked()
        stalled_at = probe.produced
        await trio.sleep(0.5)
        assert probe.produced == stalled_at
        assert stalled_at < 64 * 1024 * 1024
        await echo_ok(pki, r.target)


async def test_write_timeout_drops_stuck_reader(pki: Pki) -> None:
    probe = Probe()
    config = TransportConfig(write_timeout=0.5)
    async with (
        running_server(pki, methods(probe), config=config) as r,
        RawClient.connect(pki, r.port, window=2**31 - 1) as client,
    ):
        client.h2.increment_flow_control_window(2**31 - 1 - 65535)
        await client.flush()
        await client.start(FLOOD, w.Int32Value(value=65536).SerializeToString())
        with trio.fail_after(10):
            await probe.cancelled.wait()


async def test_unary_response_is_one_write(pki: Pki) -> None:
    async with (
        running_server(pki, methods(Probe())) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        request = w.StringValue(value="x").SerializeToString()
        sid = await client.start(ECHO, request)
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        await trio.sleep(0.1)  # settings acks and the like are done
        for path in (ECHO, SYNC, ECHO, SYNC):
            before = r.server.stats.socket_writes
            sid = await client.start(path, request)
            with trio.fail_after(5):
                await client.until(lambda: client.status(sid) is not None)  # noqa: B023
            assert r.server.stats.socket_writes - before == 1
            assert bytes(client.data[sid]).endswith(request)


async def test_answers_ending_in_one_turn_leave_in_one_write(pki: Pki) -> None:
    """Calls on one connection that end in the same turn of the loop (16 Stops whose jobs
    died together) leave in one socket write: one TLS record and one wakeup of the
    client, not one each."""
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        request = w.StringValue(value="x").SerializeToString()
        sid = await client.start(ECHO, request)
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        sids = [await client.start(OPENED, request) for _ in range(8)]
        await eventually(lambda: probe.at_gate == 8)
        await trio.sleep(0.1)  # settings acks and the like are done
        before = r.server.stats.socket_writes
        probe.gate.set()
        with trio.fail_after(5):
            await client.until(lambda: all(client.status(s) is not None for s in sids))
        assert r.server.stats.socket_writes - before == 1
        assert all(client.status(s) == 0 and bytes(client.data[s]).endswith(request) for s in sids)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (SYNC, w.StringValue(value="x").SerializeToString()),
        (SOON, w.DoubleValue(value=1001).SerializeToString()),
    ],
    ids=["sync", "at_once"],
)
async def test_answers_made_in_one_read_leave_in_one_write(
    pki: Pki, path: str, message: bytes
) -> None:
    """Calls answered in the reader (SyncUnaryMethod, a UnaryMethod's ``at_once``) that
    came in one read leave in the read's one write."""
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        sid = await client.start(path, message)
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        await trio.sleep(0.1)
        before = r.server.stats.socket_writes
        sids = []
        for _ in range(8):  # queued, then sent in one piece
            stream_id = client.h2.get_next_available_stream_id()
            client.h2.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":path", path),
                    (":authority", "localhost"),
                    ("te", "trailers"),
                    ("content-type", "application/grpc"),
                ],
            )
            client.h2.send_data(stream_id, frame(message), end_stream=True)
            sids.append(stream_id)
        await client.flush()
        with trio.fail_after(5):
            await client.until(lambda: all(client.status(s) is not None for s in sids))
        assert r.server.stats.socket_writes - before == 1
        assert all(bytes(client.data[s]).endswith(message) for s in sids)
    assert not probe.started.is_set()  # SOON's handler never ran: no task


# --- drain ------------------------------------------------------------------------------


async def test_drain_goaway_and_finish_in_flight(pki: Pki) -> None:
    probe = Probe()
    drained = trio.Event()
    async with running_server(pki, methods(probe), on_drain=drained.set) as r:
        ch = channel(pki, r.target)
        try:
            stream = ch.unary_stream(
                TICKS,
                request_serializer=w.Int32Value.SerializeToString,
                response_deserializer=w.Int32Value.FromString,
            )(w.Int32Value(value=20), timeout=30)
            assert (await in_thread(lambda: next(stream))).value == 0
            async with RawClient.connect(pki, r.port) as watcher, trio.open_nursery() as nursery:
                await watcher.until(lambda: bool(watcher.events))  # the server's SETTINGS
                nursery.start_soon(r.server.drain, 10.0)
                with trio.fail_after(5):
                    await watcher.until(
                        lambda: any(
                            isinstance(e, h2.events.ConnectionTerminated) for e in watcher.events
                        )
                    )
                (goaway,) = [
                    e for e in watcher.events if isinstance(e, h2.events.ConnectionTerminated)
                ]
                assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
                assert drained.is_set()
                # The stream in flight runs to its end.
                rest = await in_thread(lambda: [m.value for m in stream])
                assert rest == list(range(1, 20))
                assert stream.code() == grpc.StatusCode.OK

                def new_call() -> None:
                    with channel(pki, r.target) as ch2:
                        code, _ = code_of(lambda: unary(ch2, ECHO, w.StringValue(), w.StringValue))
                        assert code == grpc.StatusCode.UNAVAILABLE

                await in_thread(new_call)
        finally:
            ch.close()
    assert [rec.code for rec in r.records] == [StatusCode.OK]


async def test_drain_grace_cuts_long_calls(pki: Pki) -> None:
    probe = Probe()
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        sid = await client.start(HANG, b"")
        await probe.started.wait()
        started = trio.current_time()
        await r.server.drain(0.3)
        assert trio.current_time() - started < 3
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        assert client.status(sid) == StatusCode.UNAVAILABLE
    assert probe.cancelled.is_set()
    assert r.records[0].code is StatusCode.UNAVAILABLE


def test_a_calls_task_is_named_as_trio_would_name_it() -> None:
    # Given at spawn rather than worked out from the method each time: a rename shows here.
    from trio_worker._net._transport import _CALL_TASK, _Connection

    method = _Connection._call_task
    assert f"{method.__module__}.{method.__qualname__}" == _CALL_TASK


class _CallsPerTurn(trio.abc.Instrument):
    """What the probe's gated calls had reached at each of the loop's polls for I/O."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.seen: list[int] = []

    def before_io_wait(self, timeout: float) -> None:
        if not self.seen or self.seen[-1] != self.probe.at_gate:
            self.seen.append(self.probe.at_gate)


async def test_a_read_that_opens_many_calls_starts_them_a_turns_share_at_a_time(
    pki: Pki,
) -> None:
    """One read that opens 100 calls (one write of the client) starts at most
    MAX_CALLS_PER_TURN of them between two polls for I/O: the other connections' input
    is not queued behind every first step (tools/probe_streams.py windows-5x1000)."""
    probe = Probe()
    calls = 100
    async with (
        running_server(pki, methods(probe)) as r,
        RawClient.connect(pki, r.port) as client,
    ):
        request = w.StringValue(value="x").SerializeToString()
        sid = await client.start(ECHO, request)
        with trio.fail_after(5):
            await client.until(lambda: client.status(sid) is not None)
        for _ in range(calls):  # queued, then sent in one piece
            stream_id = client.h2.get_next_available_stream_id()
            client.h2.send_headers(
                stream_id,
                [
                    (":method", "POST"),
                    (":scheme", "https"),
                    (":path", OPENED),
                    (":authority", "localhost"),
                    ("te", "trailers"),
                    ("content-type", "application/grpc"),
                ],
            )
            client.h2.send_data(stream_id, frame(request), end_stream=True)
        turns = _CallsPerTurn(probe)
        trio.lowlevel.add_instrument(turns)
        try:
            await client.flush()
            await eventually(lambda: probe.at_gate == calls)
        finally:
            trio.lowlevel.remove_instrument(turns)
        steps = [b - a for a, b in zip(turns.seen, turns.seen[1:], strict=False)]
        assert turns.seen[-1] == calls
        assert max(steps) <= MAX_CALLS_PER_TURN, turns.seen
        probe.gate.set()


def _queue_calls(client: RawClient, path: str, request: bytes, count: int) -> None:
    """``count`` calls in the client's h2 buffer, sent by its next flush in one piece."""
    for _ in range(count):
        stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", path),
                (":authority", "localhost"),
                ("te", "trailers"),
                ("content-type", "application/grpc"),
            ],
        )
        client.h2.send_data(stream_id, frame(request), end_stream=True)


async def test_a_clients_connections_start_their_calls_in_turns(pki: Pki) -> None:
    """Eight connections of one client open 20 calls each at once: at most
    MAX_CALLS_PER_TURN of them start between two polls for I/O across the server, one
    connection's share at a time, not that many per connection (tools/probe_hostile.py
    many-windows: 128 connections opened 32 streams each, and a bystander's call waited
    0.2 s behind 2,048 first steps in one turn)."""
    probe = Probe()
    conns, each = 8, 20
    request = w.StringValue(value="x").SerializeToString()
    async with running_server(pki, methods(probe)) as r, contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(RawClient.connect(pki, r.port)) for _ in range(conns)
        ]
        for client in clients:
            _queue_calls(client, OPENED, request, each)
        turns = _CallsPerTurn(probe)
        trio.lowlevel.add_instrument(turns)
        try:
            async with trio.open_nursery() as nursery:  # all in the same turn
                for client in clients:
                    nursery.start_soon(client.flush)
            await eventually(lambda: probe.at_gate == conns * each)
        finally:
            trio.lowlevel.remove_instrument(turns)
        steps = [b - a for a, b in zip(turns.seen, turns.seen[1:], strict=False)]
        assert turns.seen[-1] == conns * each
        assert max(steps) <= MAX_CALLS_PER_TURN, turns.seen
        # Every connection's turn was handed on: none is left holding it.
        (starts,) = r.server.client_starts.values()
        assert starts.holder is None
        probe.gate.set()


class _ReadsPerTurn(trio.abc.Instrument):
    """The streams the server had opened (their headers read) and the probe's gated calls
    started, at each of the loop's polls for I/O."""

    def __init__(self, server: Server, probe: Probe) -> None:
        self.server = server
        self.probe = probe
        self.seen: list[tuple[int, int]] = []

    def before_io_wait(self, timeout: float) -> None:
        now = (self.server.streams, self.probe.at_gate)
        if not self.seen or self.seen[-1] != now:
            self.seen.append(now)


@pytest.mark.parametrize("each", [8, 20])
async def test_a_clients_connections_handle_their_reads_in_turns(pki: Pki, each: int) -> None:
    """Eight connections of one client whose requests (``each`` calls apiece) come in the
    same poll for I/O: one connection's read is handled between two polls (its streams
    opened, its calls started), the others' wait in line. Before, every reader parsed its
    read in the same turn (~3 ms a read of 32 streams: tools/probe_hostile.py
    many-windows ran 40 of them, 0.12 s, before a bystander's call), and connections with
    at most MAX_CALLS_PER_TURN calls each all started them in one turn."""
    probe = Probe()
    conns = 8
    request = w.StringValue(value="x").SerializeToString()
    async with running_server(pki, methods(probe)) as r, contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(RawClient.connect(pki, r.port)) for _ in range(conns)
        ]
        for client in clients:
            _queue_calls(client, OPENED, request, each)
        turns = _ReadsPerTurn(r.server, probe)
        opened_before = r.server.streams
        trio.lowlevel.add_instrument(turns)
        try:
            async with trio.open_nursery() as nursery:  # all in the same turn
                for client in clients:
                    nursery.start_soon(client.flush)
            await eventually(lambda: probe.at_gate == conns * each)
        finally:
            trio.lowlevel.remove_instrument(turns)
        opened = [streams - opened_before for streams, _ in turns.seen]
        started = [at_gate for _, at_gate in turns.seen]
        assert opened[-1] == started[-1] == conns * each
        assert max(b - a for a, b in itertools.pairwise(opened)) <= each, turns.seen
        most = min(each, MAX_CALLS_PER_TURN)
        assert max(b - a for a, b in itertools.pairwise(started)) <= most, turns.seen
        (starts,) = r.server.client_starts.values()
        assert starts.holder is None
        probe.gate.set()


class _EndsPerTurn(trio.abc.Instrument):
    """How many calls the server had recorded as ended at each of the loop's polls for I/O."""

    def __init__(self, records: list[Any]) -> None:
        self.records = records
        self.seen: list[int] = []

    def before_io_wait(self, timeout: float) -> None:
        if not self.seen or self.seen[-1] != len(self.records):
            self.seen.append(len(self.records))


@pytest.mark.parametrize("waiting", ["handler", "window"])
async def test_a_lost_connections_calls_end_a_turns_share_at_a_time(pki: Pki, waiting: str) -> None:
    """A client that leaves with 100 calls waiting (in their handlers, or for a window it
    never opens) has them ended (woken or cancelled, their ends and audit records) at most
    MAX_CALLS_PER_TURN between two polls for I/O: the other connections' calls are not
    queued behind all of them (tools/probe_streams.py windows-5x1000: a bystander's call
    waited ~0.5 s behind 4,096 ends)."""
    probe = Probe()
    calls = 100
    window = 1 if waiting == "window" else None
    async with running_server(pki, methods(probe)) as r:
        async with RawClient.connect(pki, r.port, window=window) as client:
            if waiting == "handler":
                request = w.StringValue(value="x").SerializeToString()
                for _ in range(calls):
                    await client.start(OPENED, request)
                await eventually(lambda: probe.at_gate == calls)
            else:
                request = w.Int32Value(value=100).SerializeToString()
                for _ in range(calls):
                    await client.start(FLOOD, request)
                (conn,) = r.server._connections
                await eventually(lambda: len(conn._window_lot) == calls)  # every one parked
            turns = _EndsPerTurn(r.records)
            trio.lowlevel.add_instrument(turns)
        try:  # the client has closed its socket: every call is gone
            await eventually(lambda: len(r.records) == calls)
        finally:
            trio.lowlevel.remove_instrument(turns)
        steps = [b - a for a, b in zip(turns.seen, turns.seen[1:], strict=False)]
        assert turns.seen[-1] == calls
        assert max(steps) <= MAX_CALLS_PER_TURN, turns.seen
        assert {rec.code for rec in r.records} == {StatusCode.CANCELLED}
        assert not probe.gate.is_set()


async def test_connections_lost_together_end_their_calls_a_turns_share_at_a_time(
    pki: Pki,
) -> None:
    """Eight connections of one client, 20 calls each, lost together: at most
    MAX_CALLS_PER_TURN calls end per turn across the server, not that many per connection
    (tools/probe_hostile.py many-windows: 128 connections of 32 streams each)."""
    probe = Probe()
    conns, each = 8, 20
    request = w.StringValue(value="x").SerializeToString()
    async with running_server(pki, methods(probe)) as r:
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for _ in range(conns):
                client = await stack.enter_async_context(RawClient.connect(pki, r.port))
                for _ in range(each):
                    await client.start(OPENED, request)
                clients.append(client)
            await eventually(lambda: probe.at_gate == conns * each)
            turns = _EndsPerTurn(r.records)
            trio.lowlevel.add_instrument(turns)
            for client in clients:  # all in one step: the server sees them end together
                tcp = client.stream.transport_stream
                assert isinstance(tcp, trio.SocketStream)
                tcp.socket.close()
        try:
            await eventually(lambda: len(r.records) == conns * each)
        finally:
            trio.lowlevel.remove_instrument(turns)
        steps = [b - a for a, b in zip(turns.seen, turns.seen[1:], strict=False)]
        assert turns.seen[-1] == conns * each
        assert max(steps) <= MAX_CALLS_PER_TURN, turns.seen
        assert {rec.code for rec in r.records} == {StatusCode.CANCELLED}
