"""The trio client of a trio-worker server: gRPC over HTTP/2 over mutual TLS, ours end to end.

    async with connect("127.0.0.1:50051", ca=..., cert=..., key=...) as client:
        job = await client.start("sh", ["-c", "echo hi"])
        async for chunk in client.output(job.id):
            ...

The API only: calls are opened and read through ``_net._channel`` (dial, calls, flow
control per consumer), which runs on the connection driver the server uses too
(``_net._connection``).

A connection that ends (the server's idle timeout, a restart) is replaced on the next call;
the first connection is made by :func:`connect` itself, so a wrong address or certificate
fails there, with a one-line :class:`ConnectionFailed` naming the address.
"""

from __future__ import annotations

import builtins
import math
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import trio

from ._convert import chunk_from_pb, job_from_pb, start_limits
from ._error_codes import exception_from
from ._errors import (
    ConnectionFailed,
    InvalidRequest,
    RemoteError,
    TrioWorkerError,
)
from ._model import DEFAULT_STOP_GRACE, Isolation, JobInfo, JobState, Limits, OutputChunk
from ._net._channel import CLOSE_TIMEOUT, Call, ClientConnection, Dialer
from ._pb import worker_pb2 as pb
from ._requests import (
    attach_open,
    id_request,
    list_request,
    method_path,
    output_request,
    parse,
    remove_request,
    request_field,
    signal_request,
    start_request,
    stop_request,
)
from ._tls import client_context
from ._util import NoPublicConstructor, final
from ._wire._calls import CallFailed, Unprocessed
from ._wire._status import StatusCode

__all__ = [
    "Attachment",
    "ConnectionFailed",
    "OutputIterator",
    "RemoteError",
    "WorkerClient",
    "connect",
]

#: Attempts of a call the server said it never processed (GOAWAY) before giving up.
_ATTEMPTS: Final = 3
#: Stdin is sent in messages of at most this size (the server takes up to 4 MiB).
_STDIN_MESSAGE: Final = 256 * 1024


M = TypeVar("M")


# --- the client ----------------------------------------------------------------------------


@final
class WorkerClient(metaclass=NoPublicConstructor):
    """A connection to one trio-worker server; get one from :func:`connect`.

    Every method may raise :class:`ConnectionFailed` (server unreachable, TLS refused,
    connection lost mid-call) besides the errors named on it; statuses the client has no
    class for arrive as :class:`RemoteError`. A call follows the caller's trio deadline,
    as trio's own functions do (``with trio.fail_after(5): await client.status(id)``); it
    is sent to the server as grpc-timeout. Calls may run concurrently from any number of
    tasks.
    """

    def __init__(self, dialer: Dialer, nursery: trio.Nursery) -> None:
        self._dialer = dialer
        self._nursery = nursery
        self._conn: ClientConnection | None = None
        self._connections: set[ClientConnection] = set()
        self._lock = trio.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        """The ``HOST:PORT`` this client talks to."""
        return self._dialer.addr

    # -- the API --

    async def start(
        self,
        command: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
        isolation: Isolation | None = None,
        user: str | None = None,
        stdin: bool = False,
        tty: bool = False,
        terminal_size: tuple[int, int] | None = None,
    ) -> JobInfo:
        """Start a job. A command that cannot be executed is a job in state FAILED, not an
        error. ``stdin`` keeps its stdin open for :meth:`attach`; ``tty`` runs it on a
        pseudo-terminal of ``terminal_size`` (rows, cols; default: the server's, 24x80).
        Raises InvalidRequest, PermissionDenied, Unenforceable, ResourceExhausted."""
        limits_pb, isolation_pb = start_limits(limits, isolation)
        request = start_request(
            command,
            args,
            env=env,
            cwd=cwd,
            limits=limits_pb,
            isolation=isolation_pb,
            user=user,
            stdin=stdin,
            tty=tty,
            terminal_size=terminal_size,
        )
        job = await self._unary("Start", request, pb.Job)
        return job_from_pb(job)

    async def stop(self, job_id: str, grace: float = DEFAULT_STOP_GRACE) -> JobInfo:
        """SIGTERM the job's process group, SIGKILL after ``grace`` seconds (as
        ``Supervisor.stop``); returns the final state. Raises JobNotFound, JobNotRunning."""
        request = stop_request(job_id, grace)
        return job_from_pb(await self._unary("Stop", request, pb.Job, job_id))

    async def signal(
        self,
        job_id: str,
        signum: int,
    ) -> JobInfo:
        """Send ``signum`` to the job's process group. Raises JobNotFound, JobNotRunning,
        InvalidRequest (not a signal)."""
        request = signal_request(job_id, signum)
        return job_from_pb(await self._unary("Signal", request, pb.Job, job_id))

    async def status(
        self,
        job_id: str,
    ) -> JobInfo:
        """The job's current state. Raises JobNotFound."""
        request = id_request(pb.StatusRequest, job_id)
        return job_from_pb(await self._unary("Status", request, pb.Job, job_id))

    async def wait(
        self,
        job_id: str,
    ) -> JobInfo:
        """Wait for the job to end; its final state. Raises JobNotFound."""
        request = id_request(pb.WaitRequest, job_id)
        return job_from_pb(await self._unary("Wait", request, pb.Job, job_id))

    async def remove(self, job_id: str, force: bool = False) -> JobInfo:
        """Delete an ended job's record and output; its last state. With ``force`` a
        running job is SIGKILLed and removed once ended. Raises JobNotFound,
        JobStillRunning (running, without ``force``)."""
        request = remove_request(job_id, force)
        return job_from_pb(await self._unary("Remove", request, pb.Job, job_id))

    async def list(
        self,
        *,
        states: Iterable[JobState] | None = None,
        owner: str | None = None,
        page_size: int = 1000,
    ) -> list[JobInfo]:
        """Every job this client may see, newest first, walking the server's pages.

        ``states`` keeps only jobs in those states, ``owner`` only that owner's
        (for callers who see others' jobs).
        """
        jobs: list[JobInfo] = []
        async for page in self.list_pages(states=states, owner=owner, page_size=page_size):
            jobs.extend(page)
        return jobs

    async def list_pages(
        self,
        *,
        states: Iterable[JobState] | None = None,
        owner: str | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[builtins.list[JobInfo]]:
        """``list`` one page at a time (each at most ``page_size`` jobs and 4 MiB)."""
        request = list_request(states, owner, page_size)
        seen: set[str] = set()
        while True:
            response = await self._unary("List", request, pb.ListResponse)
            yield [job_from_pb(job) for job in response.jobs]
            token = response.next_page_token
            if not token or token in seen:  # (a repeated token would loop forever)
                return
            seen.add(token)
            request.page_token = token

    def output(self, job_id: str, offset: int = 0, follow: bool = True) -> OutputIterator:
        """The job's output from byte ``offset`` of its combined log; with ``follow``, live
        until the job ends. Iterate it with ``async for``; ``aclose()`` it (or use it as
        ``async with``) to stop early. Raises JobNotFound when iterated."""
        return OutputIterator._create(self, output_request(job_id, offset, follow))

    def attach(self, job_id: str, *, offset: int = 0) -> Attachment:
        """Use a job interactively over one bidirectional stream: its output from byte
        ``offset``, followed live, and (for a job started with stdin) its input.

        Use it as ``async with client.attach(job_id) as session``: ``async for chunk in
        session`` gets the output until the job ends, after which ``session.ended`` is its
        final state; ``write``, ``close_stdin`` and ``resize`` send input meanwhile, from
        any task. Leaving the block detaches: the job goes on running."""
        return Attachment._create(self, attach_open(job_id, offset))

    # -- plumbing --

    async def _connection(self) -> ClientConnection:
        """The connection to use for a new call, opening a new one if the last has ended."""
        conn = self._conn
        if conn is not None and conn.accepting:
            return conn
        async with self._lock:
            if self._closed:
                raise ConnectionFailed(f"the client for {self.address} is closed")
            conn = self._conn
            if conn is None or not conn.accepting:
                conn = await self._dialer.dial()
                self._adopt(conn)
            return conn

    async def _run(self, conn: ClientConnection) -> None:
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def _open(self, method: str, payload: bytes, deadline: float) -> Call:
        """Open a call, sending it again on a new connection while the server says it
        never processed it."""
        for _ in range(_ATTEMPTS):
            conn = await self._connection()
            try:
                return await conn.open_call(method_path(method), payload, deadline)
            except Unprocessed:
                continue
        raise self._keeps_closing()

    async def _unary(
        self,
        method: str,
        request: Any,
        response_type: type[M],
        job_id: str | None = None,
    ) -> M:
        """One unary call, under the caller's deadline (sent as grpc-timeout)."""
        payload = request.SerializeToString()
        deadline = trio.current_effective_deadline()
        for _ in range(_ATTEMPTS):
            call = await self._open(method, payload, deadline)
            conn = call.conn
            try:
                await conn.wait(call)
                call.outcome()
            except Unprocessed:
                continue
            except CallFailed as exc:
                if exc.code == StatusCode.DEADLINE_EXCEEDED:
                    await _deadline_passes(deadline)
                raise exception_from(exc.code, exc.message, exc.details, job_id) from None
            finally:
                if not call.done:
                    conn.cancel(call)
            if len(call.messages) != 1:
                raise RemoteError(
                    StatusCode.INTERNAL, f"expected one response message, got {len(call.messages)}"
                )
            return parse(response_type, call.take())
        raise self._keeps_closing()

    def _keeps_closing(self) -> ConnectionFailed:
        """Every attempt's connection ended before taking the call: say so, with the
        server's reason if its last GOAWAY gave one (a cap on the client's connections)."""
        conn = self._conn
        reason = "" if conn is None else conn.goaway_reason
        said = f" (the server said: {reason})" if reason else ""
        return ConnectionFailed(
            f"{self.address} keeps closing connections before taking calls{said}"
        )

    def _adopt(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._connections.add(conn)
        self._nursery.start_soon(self._run, conn)

    async def _aclose(self) -> None:
        """Send GOAWAY on every connection and give the writers a moment to flush it."""
        self._closed = True
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        with trio.move_on_after(CLOSE_TIMEOUT):
            for conn in connections:
                await conn.finished.wait()


async def _deadline_passes(deadline: float) -> None:
    """The server said our deadline passed: let the caller's own clock say it (trio's
    Cancelled, at most the clock skew of the two later), as for any other deadline."""
    if deadline != math.inf:
        await trio.sleep_until(deadline)


@final
class OutputIterator(metaclass=NoPublicConstructor):
    """The chunks of a job's output, as an async iterator: ``async for chunk in it``.

    The call starts on the first ``__anext__``. Up to ``ACK_BELOW + STREAM_WINDOW`` bytes
    plus one message (1.75 MiB with the server's 256 KiB chunks) are buffered ahead of the
    consumer, never more: the server is held back by HTTP/2 flow control instead
    (``buffered_bytes`` and ``peak_buffered_bytes`` show it). ``aclose()`` (or leaving an
    ``async with`` block) resets the stream and leaves the connection to other calls; an
    iterator dropped without closing is reset when it is garbage-collected. A cancelled
    ``__anext__`` loses nothing: the next one carries on.
    """

    def __init__(self, client: WorkerClient, request: Any) -> None:
        self._client = client
        self._request = request
        self._job_id: str = request.id
        self._deadline: float | None = None
        self._call: Call | None = None
        self._finished = False

    def __aiter__(self) -> OutputIterator:
        return self

    async def __aenter__(self) -> OutputIterator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet taken by the consumer."""
        return 0 if self._call is None else self._call.buffered

    @property
    def peak_buffered_bytes(self) -> int:
        """The most ``buffered_bytes`` has been."""
        return 0 if self._call is None else self._call.peak

    async def __anext__(self) -> OutputChunk:
        if self._finished:
            raise StopAsyncIteration
        if self._deadline is None:
            # No grpc-timeout: an iterator may be consumed under several cancel scopes
            # (a cancelled __anext__ loses nothing), so each __anext__ follows its own
            # caller's deadline, and closing the iterator resets the stream.
            self._deadline = math.inf
        try:
            if self._call is None:
                await self._start()
                assert self._call is not None
            call = self._call
            message = await call.conn.next_message(call)
        except CallFailed as exc:
            self._finished = True
            if exc.code == StatusCode.DEADLINE_EXCEEDED:
                await _deadline_passes(self._deadline)
            raise exception_from(exc.code, exc.message, exc.details, self._job_id) from None
        except TrioWorkerError:
            self._finished = True
            raise
        except Unprocessed:  # only a confused server would do this after answering
            self._finished = True
            raise ConnectionFailed(
                f"{self._client.address} dropped the output stream unprocessed"
            ) from None
        if message is None:
            self._finished = True
            raise StopAsyncIteration
        return chunk_from_pb(parse(pb.OutputChunk, message))

    async def _start(self) -> None:
        client = self._client
        assert self._deadline is not None
        payload = self._request.SerializeToString()
        for _ in range(_ATTEMPTS):
            call = await client._open("Output", payload, self._deadline)
            # A GOAWAY can still say the server never saw it, before any message arrived.
            while not call.messages and not call.done:
                try:
                    await call.lot.park()
                except BaseException:
                    call.conn.cancel(call)
                    raise
            if call.done and isinstance(call.error, Unprocessed):
                continue
            self._call = call
            return
        raise client._keeps_closing()

    async def aclose(self) -> None:
        """Stop early: reset the stream; the connection goes on serving other calls."""
        self._finished = True
        call = self._call
        if call is not None:
            call.conn.cancel(call)
        await trio.lowlevel.checkpoint()

    def __del__(self) -> None:
        call = self._call
        if call is not None and not call.done:
            with suppress(Exception):
                call.conn.cancel_soon(call)


@final
class Attachment(metaclass=NoPublicConstructor):
    """One job, attached: its output as an async iterator, its input as methods.

    Get one from :meth:`WorkerClient.attach` and use it as ``async with``. Output is
    buffered ahead of the consumer as for :meth:`WorkerClient.output` (never more than a
    stream window and a message); input waits for HTTP/2 flow control, so a job that
    does not read holds ``write`` back. Input goes in the order it was sent, whichever
    task sends it. Errors (``JobNotFound``, ``PermissionDenied``, ``NoStdin``...) come
    from the iteration or from the next ``write``.
    """

    def __init__(self, client: WorkerClient, request: Any) -> None:
        self._client = client
        self._open = request
        self._job_id: str = request.open.id
        #: Where the output starts (the offset asked for).
        self.offset: int = request.open.offset
        self._call: Call | None = None
        self._send_lock = trio.Lock()
        self._finished = False
        #: The job's final state, once the iteration has ended.
        self.ended: JobInfo | None = None

    async def __aenter__(self) -> Attachment:
        client = self._client
        payload = self._open.SerializeToString()
        for _ in range(_ATTEMPTS):
            conn = await client._connection()
            try:
                self._call = await conn.open_call(
                    method_path("Attach"), payload, math.inf, end_stream=False
                )
            except Unprocessed:
                continue
            return self
        raise client._keeps_closing()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Attachment:
        return self

    async def __anext__(self) -> OutputChunk:
        call = self._call
        if call is None:
            raise RuntimeError("use the attachment as `async with client.attach(...)`")
        while not self._finished:
            try:
                message = await call.conn.next_message(call)
            except CallFailed as exc:
                self._finished = True
                raise exception_from(exc.code, exc.message, exc.details, self._job_id) from None
            except Unprocessed:
                self._finished = True
                raise ConnectionFailed(
                    f"{self._client.address} dropped the attach stream unprocessed"
                ) from None
            except TrioWorkerError:
                self._finished = True
                raise
            if message is None:
                self._finished = True
                if self.ended is None:
                    raise RemoteError(
                        StatusCode.INTERNAL, "the attach stream closed before the job ended"
                    )
                break
            response = parse(pb.AttachResponse, message)
            kind = response.WhichOneof("event")
            if kind == "output":
                return chunk_from_pb(response.output)
            if kind == "ended":
                self.ended = job_from_pb(response.ended)
        raise StopAsyncIteration

    async def write(self, data: bytes) -> None:
        """Send bytes to the job's stdin; waits while the job (or the network) is behind."""
        view = memoryview(data)
        for start in range(0, len(view), _STDIN_MESSAGE):
            await self._send(pb.AttachRequest(stdin=bytes(view[start : start + _STDIN_MESSAGE])))

    async def close_stdin(self) -> None:
        """End the job's input (on a terminal: its EOF character)."""
        await self._send(pb.AttachRequest(close_stdin=True))

    async def resize(self, rows: int, cols: int) -> None:
        """Set a tty job's terminal size."""
        request = pb.AttachRequest()
        with request_field("resize"):
            request.resize.rows = rows
            request.resize.cols = cols
        await self._send(request)

    async def _send(self, request: Any) -> None:
        call = self._call
        if call is None:
            raise RuntimeError("use the attachment as `async with client.attach(...)`")
        payload = request.SerializeToString()
        async with self._send_lock:
            if call.done:
                # The call has ended: its outcome (an error, or the job's end) is what the
                # iteration reports; an error is worth raising here too.
                if call.error is not None or (call.status and call.status[0] != StatusCode.OK):
                    with suppress(Unprocessed):
                        try:
                            call.outcome()
                        except CallFailed as exc:
                            raise exception_from(
                                exc.code, exc.message, exc.details, self._job_id
                            ) from None
                await trio.lowlevel.checkpoint()
                return
            await call.conn.send_request(call, payload)

    async def aclose(self) -> None:
        """Detach: reset the stream. The job goes on running."""
        self._finished = True
        call = self._call
        if call is not None:
            call.conn.cancel(call)
        await trio.lowlevel.checkpoint()


# --- connecting --------------------------------------------------------------------------


@asynccontextmanager
async def connect(
    addr: str,
    *,
    ca: Path | str,
    cert: Path | str,
    key: Path | str,
    server_hostname: str | None = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - bounds connecting only
) -> AsyncIterator[WorkerClient]:
    """Connect to the server at ``HOST:PORT`` (``[V6]:PORT``) over mutual TLS.

    ``ca`` verifies the server's certificate, whose names must include ``server_hostname``
    (default: the host of ``addr``); ``cert``/``key`` are ours, and carry our identity and
    role. The TCP connect, TLS handshake and HTTP/2 settings exchange must complete within
    ``timeout`` seconds. Raises ConnectionFailed (unreachable, TLS failed or refused),
    TLSConfigError (unreadable certificate or key), InvalidRequest (malformed ``addr``).
    Leaving the block closes the connection; calls still pending then fail.
    """
    if not (timeout > 0 and math.isfinite(timeout)):
        raise InvalidRequest("timeout", f"must be a positive number of seconds, got {timeout!r}")
    context = client_context(ca=Path(ca), cert=Path(cert), key=Path(key))
    dialer = Dialer(addr, context, server_hostname, timeout)
    # Dialed outside the nursery, so that its errors do not come out in an ExceptionGroup.
    first = await dialer.dial()
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client: WorkerClient = WorkerClient._create(dialer, nursery)
        client._adopt(first)
        try:
            yield client
        except BaseException as exc:
            # Raised again outside the nursery, so the caller's own exception does not come
            # out wrapped in an ExceptionGroup.
            body_error = exc
        finally:
            with trio.CancelScope(shield=True):
                await client._aclose()
            nursery.cancel_scope.cancel()
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None
