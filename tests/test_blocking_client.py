"""The blocking client (the CLI's short commands) against a real server, real TLS.

It must behave as the trio client does: every method round-trips, errors arrive as our
exceptions, dial failures are worded alike (the CLI's hints key on the words), a lost
connection fails the calls on it promptly and the next call dials again, a stream nobody
reads stays bounded, and a wake-up fd interrupts a wait between two reads. The server runs
in the test's trio loop; the blocking client in a worker thread.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from tests.test_client import (
    SERVER_CHUNK,
    Certs,
    Server,
    _unused_port,
    certs,
    py_job,
    running_server,
    server,
    tcp_proxy,
)
from trio_worker import (
    ConnectionFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    JobState,
    OutputStream,
    PermissionDenied,
)
from trio_worker._blocking_client import BlockingClient, connect_blocking
from trio_worker._net._failures import Refused
from trio_worker._net._transport import TransportConfig
from trio_worker._wire._calls import ACK_BELOW
from trio_worker._wire._client import STREAM_WINDOW
from trio_worker.client import connect

__all__ = ["certs", "server"]  # fixtures shared with test_client

T = TypeVar("T")


@contextmanager
def blocking(
    server: Server, who: str = "admin", port: int | None = None
) -> Iterator[BlockingClient]:
    files = server.certs.clients[who]
    with connect_blocking(
        f"127.0.0.1:{port or server.port}", ca=server.certs.ca, cert=files.cert, key=files.key
    ) as client:
        yield client


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


async def test_every_method_round_trips(server: Server) -> None:
    def body() -> None:
        with blocking(server) as client:
            job = client.start(*py_job("import sys; print('out'); print('err', file=sys.stderr)"))
            assert job.state is JobState.RUNNING
            pending = client.wait_later(job.id)  # in flight while the output streams
            with client.output(job.id) as stream:
                chunks = list(stream)
            end = pending.result()
            assert (end.state, end.exit_code) == (JobState.EXITED, 0)
            out = b"".join(c.data for c in chunks if c.stream is OutputStream.STDOUT)
            err = b"".join(c.data for c in chunks if c.stream is OutputStream.STDERR)
            assert (out, err) == (b"out\n", b"err\n")
            assert client.status(job.id).state is JobState.EXITED
            assert job.id in [j.id for j in client.list(states=[JobState.EXITED])]
            with client.output(job.id, offset=2, follow=False) as stream:
                assert sum(len(c.data) for c in stream) == 8 - 2

            sleeper = client.start("sleep", ["30"])
            client.signal(sleeper.id, signal.SIGTERM)
            assert client.wait(sleeper.id).state is JobState.KILLED
            with pytest.raises(JobNotRunning):
                client.stop(sleeper.id, grace=0)
            assert client.remove(job.id).id == job.id
            with pytest.raises(JobNotFound):
                client.status(job.id)

    await in_thread(body)


async def test_list_walks_every_page_as_the_trio_client_does(server: Server) -> None:
    """The CLI's ``list`` (and ``-q``, ``--state``, ``prune``, id prefixes) takes all it
    shows from this: every page, newest first, filters kept on each page."""

    def body() -> None:
        with blocking(server) as client:
            ended = [client.start("true") for _ in range(5)]
            sleeper = client.start("sleep", ["30"])
            for job in ended:
                client.wait(job.id)
            mine = {j.id for j in (*ended, sleeper)}
            listed = [j.id for j in client.list(page_size=2) if j.id in mine]
            assert listed == sorted(mine, reverse=True)
            assert [j.id for j in client.list(page_size=1)] == [
                j.id for j in client.list(page_size=1000)
            ]
            running = client.list(states=[JobState.RUNNING], page_size=1)
            assert sleeper.id in [j.id for j in running]
            assert all(j.state is JobState.RUNNING for j in running)
            exited = [j.id for j in client.list(states=[JobState.EXITED], page_size=2)]
            assert {j.id for j in ended} <= set(exited)
            client.stop(sleeper.id, grace=0)

    await in_thread(body)


async def test_errors_arrive_as_their_class(server: Server) -> None:
    def body() -> None:
        with blocking(server, "reader") as reader, pytest.raises(PermissionDenied):
            reader.start("true")
        with blocking(server) as client:
            with pytest.raises(JobNotFound) as info:
                client.wait("01ARZ3NDEKTSV4RRFFQ69G5FAV")
            assert info.value.job_id == "01ARZ3NDEKTSV4RRFFQ69G5FAV"
            with pytest.raises(InvalidRequest) as bad:
                client.stop("01ARZ3NDEKTSV4RRFFQ69G5FAV", grace=-1)  # refused before sending
            assert bad.value.field == "grace"
            with pytest.raises(InvalidRequest) as bad:
                client.start("true", env={"A=B": "c"})  # refused by the server
            assert bad.value.field.startswith("env")
            with pytest.raises(JobNotFound):
                next(iter(client.output("01ARZ3NDEKTSV4RRFFQ69G5FAV")))
            assert client.list() == []  # the connection is still good

    await in_thread(body)


async def _trio_failure(addr: str, **files: object) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as info:
        async with connect(addr, **files):  # type: ignore[arg-type]
            pass
    return info.value


def _blocking_failure(addr: str, **files: object) -> ConnectionFailed:
    with pytest.raises(ConnectionFailed) as info, connect_blocking(addr, **files):  # type: ignore[arg-type]
        pass
    return info.value


async def test_dial_failures_are_worded_as_the_trio_clients(server: Server) -> None:
    """Alike in words, and alike in telling a definite no (``Refused``: our CA does not
    vouch for the server, or it refuses our certificate) from what another try may mend
    (nobody listening)."""
    files = server.certs
    admin, foreign = files.clients["admin"], files.foreign_client
    closed = f"127.0.0.1:{_unused_port()}"
    cases = [
        (closed, {"ca": files.ca, "cert": admin.cert, "key": admin.key}, False),
        (server.addr, {"ca": files.foreign_ca, "cert": admin.cert, "key": admin.key}, True),
        (server.addr, {"ca": files.ca, "cert": foreign.cert, "key": foreign.key}, True),
    ]
    for addr, given, refusal in cases:
        expected = await _trio_failure(addr, **given)
        got = await in_thread(lambda: _blocking_failure(addr, **given))  # noqa: B023
        assert str(got) == str(expected)
        assert isinstance(expected, Refused) == isinstance(got, Refused) == refusal


async def test_not_a_tls_server_and_a_silent_one(certs: Certs) -> None:
    async def http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    files = certs.clients["admin"]
    async with trio.open_nursery() as nursery:
        for handler, expected in ((http, "failed"), (mute, "timed out")):
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            addr = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"

            def dial(addr: str = addr) -> str:
                with (
                    pytest.raises(ConnectionFailed) as info,
                    connect_blocking(
                        addr, ca=certs.ca, cert=files.cert, key=files.key, timeout=0.5
                    ),
                ):
                    pass
                # Not a definite no: another try may find a trio-worker server there.
                assert not isinstance(info.value, Refused)
                return str(info.value)

            message = await in_thread(dial)
            assert message.startswith(f"TLS handshake with {addr} ")
            assert expected in message
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_fails_the_stream_and_the_next_call_dials_again(
    server: Server,
) -> None:
    async with tcp_proxy(server.port) as proxy:
        started = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def body() -> str:
            with blocking(server, port=proxy.port) as client:
                job = client.start("sh", ["-c", "echo started; sleep 30"])
                with client.output(job.id) as stream:
                    next(stream)
                    trio.from_thread.run_sync(started.set, trio_token=token)
                    with pytest.raises(ConnectionFailed) as info:
                        next(stream)
                # A new connection, through the proxy again.
                assert client.status(job.id).state is JobState.RUNNING
                client.stop(job.id, grace=0)
                return str(info.value)

        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def run() -> None:
                result.append(await in_thread(body))

            nursery.start_soon(run)
            await started.wait()
            await trio.sleep(0.1)
            proxy.cut()
        assert result[0].startswith(f"lost the connection to 127.0.0.1:{proxy.port}")


async def test_a_stream_nobody_reads_stays_bounded(server: Server) -> None:
    """While another call is waited for, a chatty job's stream fills only its window."""

    def body() -> int:
        with blocking(server) as client:
            job = client.start(*py_job("import sys\nwhile True: sys.stdout.write('x' * 65536)"))
            try:
                with client.output(job.id) as stream:
                    next(stream)
                    for _ in range(50):  # each call reads whatever the stream sends meanwhile
                        client.status(job.id)
                    assert stream._call is not None
                    return stream._call.buffered
            finally:
                client.stop(job.id, grace=0)

    buffered = await in_thread(body)
    assert buffered <= ACK_BELOW + STREAM_WINDOW + SERVER_CHUNK


async def test_a_wake_up_fd_breaks_a_wait_between_two_reads(server: Server) -> None:
    class Woken(Exception):
        pass

    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)

    def woken() -> None:
        raise Woken

    def body() -> JobState:
        with blocking(server) as client:
            job = client.start("sleep", ["30"])
            client.watch(read_end, woken)
            with pytest.raises(Woken):
                client.wait(job.id)
            client.watch(None)
            # The wait was reset, the connection goes on.
            return client.stop(job.id, grace=0).state

    try:
        async with trio.open_nursery() as nursery:
            result: list[JobState] = []

            async def run() -> None:
                result.append(await in_thread(body))

            nursery.start_soon(run)
            await trio.sleep(0.5)
            os.write(write_end, b"\0")
        assert result == [JobState.KILLED]
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_connection_over_the_clients_cap_fails_in_the_servers_words(
    certs: Certs, tmp_path: Path
) -> None:
    """One connection per client (``serve --max-connections-per-client 1``): a second
    connection of the same certificate is refused with GOAWAY (ENHANCE_YOUR_CALM) and its
    reason; both clients retry, then say it (they said only that the server "keeps closing
    connections", which the CLI took for a server not running)."""
    config = TransportConfig(max_connections_per_client=1)
    async with (
        running_server(certs, tmp_path / "state", config) as srv,
        srv.connect() as holder,
    ):
        await holder.list()
        said = "(the server said: 1 connections open for this client)"
        with pytest.raises(ConnectionFailed) as trio_info:
            async with srv.connect() as second:
                await second.list()
        assert said in str(trio_info.value)

        def over() -> None:
            with blocking(srv) as client:
                client.list()

        with pytest.raises(ConnectionFailed) as blocking_info:
            await in_thread(over)
        assert said in str(blocking_info.value)
