"""The blocking client: ``WorkerClient``'s API without an event loop, for the command line.

A short command would spend longer importing trio than doing its work; this client stands
on the blocking driver (``_net._blocking``) instead, over the same wire core. Requests are
written and answers read by hand (``_pbwire``, ``_views``: protobuf's runtime would be a
fifth of a ``trio-worker list``), checked as the trio client's ``_requests`` checks them,
and errors raised by ``_error_codes`` as for the trio client. One connection is used for
every call, and a new one dialed on the next call once it is lost or drained.

``run`` needs two calls at once (Wait in flight while the output streams): ``submit``
sends a call and returns a :class:`Pending` whose ``result()`` waits for it; waiting for
either reads for both.

Jobs and output chunks come back as ``_views``' ``JobView`` and ``ChunkView`` (the
attributes of ``JobInfo`` and ``OutputChunk``, without the dataclasses, which a short
command has no time to import); limits go by ``Limits``' field names, isolation as the
names of the namespaces.
"""

from __future__ import annotations

import builtins
import os
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType

from ._errors import ConnectionFailed, InvalidRequest, RemoteError
from ._net._blocking import BlockingCall, BlockingConnection, CallFailed, Unprocessed, dial
from ._pbwire import (
    id_request,
    list_request,
    output_request,
    remove_request,
    signal_request,
    start_request,
    stop_request,
)
from ._states import DEFAULT_STOP_GRACE, JobState
from ._tls import client_context
from ._views import STATE_TO_PB, ChunkView, JobView, Malformed, read_chunk, read_job, read_list
from ._wire._status import StatusCode

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any, Final, TypeVar

    M = TypeVar("M")

__all__ = ["BlockingClient", "BlockingOutput", "Pending", "connect_blocking"]


#: The service's name in the method paths (worker.proto's package and service).
SERVICE: Final = "trioworker.v1.Worker"
#: Attempts of a call the server said it never processed (GOAWAY) before giving up.
_ATTEMPTS: Final = 3


class BlockingClient:
    """A connection to one server, called from one thread; get one from
    :func:`connect_blocking`. Every method may raise ``ConnectionFailed`` besides the
    errors ``WorkerClient``'s of the same name raise."""

    def __init__(
        self, addr: str, context: ssl.SSLContext, timeout: float, server_hostname: str | None
    ) -> None:
        self.address = addr
        self._context = context
        self._timeout = timeout
        self._server_hostname = server_hostname
        self._conn: BlockingConnection | None = None
        self._wake: tuple[int, Callable[[], None]] | None = None

    # -- connections --

    def dial(self) -> BlockingConnection:
        """The connection for a new call: the last one, or a new one once it has ended."""
        conn = self._conn
        if conn is not None and conn.accepting:
            return conn
        if conn is not None and (conn.dead or conn.idle):
            conn.close()  # (one told GOAWAY with no call left: nobody else would close it)
        conn = dial(self.address, self._context, self._timeout, self._server_hostname)
        if self._wake is not None:
            conn.wake_fd, conn.on_wake = self._wake
        self._conn = conn
        return conn

    def keeps_closing(self) -> ConnectionFailed:
        """Every attempt's connection ended before taking the call: say so, with the
        server's reason if its last GOAWAY gave one (a cap on the client's connections)."""
        reason = "" if self._conn is None else self._conn.goaway_reason
        said = f" (the server said: {reason})" if reason else ""
        return ConnectionFailed(
            f"{self.address} keeps closing connections before taking calls{said}"
        )

    def watch(self, fd: int | None, on_wake: Callable[[], None] | None = None) -> None:
        """While waiting, watch ``fd`` too and call ``on_wake`` when it turns readable (a
        ``signal.set_wakeup_fd`` pipe); ``on_wake`` may raise to break the wait."""
        self._wake = None if fd is None or on_wake is None else (fd, on_wake)
        if self._conn is not None:
            self._conn.wake_fd, self._conn.on_wake = fd, on_wake

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def open(self, method: str, payload: bytes, timeout: float | None) -> tuple[Any, Any]:
        """Send a call, again on a new connection while the server says it never saw it."""
        for _ in range(_ATTEMPTS):
            conn = self.dial()
            try:
                return conn, conn.open_call(f"/{SERVICE}/{method}", payload, timeout)
            except Unprocessed:
                continue
        raise self.keeps_closing()

    # -- the API (as WorkerClient's) --

    def submit(
        self,
        method: str,
        request: bytes,
        job_id: str | None = None,
        timeout: float | None = None,
    ) -> Pending:
        """Send a unary call (its serialized request) whose answer is a job now;
        ``result()`` waits for it."""
        return Pending(self, method, request, job_id, timeout)

    def start(
        self,
        command: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        limits: Mapping[str, float | int] | None = None,
        isolation: Iterable[str] | None = None,
        user: str | None = None,
        stdin: bool = False,
        tty: bool = False,
        terminal_size: tuple[int, int] | None = None,
    ) -> JobView:
        request = start_request(
            command,
            args,
            env=env,
            cwd=cwd,
            limits=limits,
            isolation=isolation,
            user=user,
            stdin=stdin,
            tty=tty,
            terminal_size=terminal_size,
        )
        return self.submit("Start", request).result()

    def stop(self, job_id: str, grace: float = DEFAULT_STOP_GRACE) -> JobView:
        request = stop_request(job_id, grace)
        return self.submit("Stop", request, job_id).result()

    def signal(self, job_id: str, signum: int) -> JobView:
        request = signal_request(job_id, signum)
        return self.submit("Signal", request, job_id).result()

    def status(self, job_id: str, *, timeout: float | None = None) -> JobView:
        request = id_request(job_id)
        return self.submit("Status", request, job_id, timeout).result()

    def wait(self, job_id: str) -> JobView:
        return self.wait_later(job_id).result()

    def wait_later(self, job_id: str) -> Pending:
        """Wait, sent now: ``result()`` is the job's final state."""
        return self.submit("Wait", id_request(job_id), job_id)

    def remove(self, job_id: str, *, force: bool = False) -> JobView:
        return self.remove_later(job_id, force=force).result()

    def remove_later(self, job_id: str, *, force: bool = False) -> Pending:
        """Remove, sent now (``prune`` keeps several in flight)."""
        return self.submit("Remove", remove_request(job_id, force), job_id)

    def list(
        self,
        *,
        states: Iterable[JobState] | None = None,
        owner: str | None = None,
        page_size: int = 1000,
    ) -> builtins.list[JobView]:
        """Every job this client may see, newest first, walking the server's pages."""
        numbers = [STATE_TO_PB[JobState(state)] for state in states or ()]
        token = ""
        jobs: builtins.list[JobView] = []
        seen: set[str] = set()
        while True:
            request = list_request(numbers, owner, page_size, token)
            page, token = Pending(self, "List", request, None, None).answer(read_list)
            jobs.extend(page)
            if not token or token in seen:  # (a repeated token would loop forever)
                return jobs
            seen.add(token)

    def output(self, job_id: str, *, offset: int = 0, follow: bool = True) -> BlockingOutput:
        """The job's output from byte ``offset``; iterate it, and close it (or use it as
        ``with``) to stop early. Raises JobNotFound when iterated."""
        return BlockingOutput(self, job_id, output_request(job_id, offset, follow))


class Pending:
    """A unary call sent; ``result()`` waits for the answer (reading for the other calls
    on the connection meanwhile)."""

    def __init__(
        self,
        client: BlockingClient,
        method: str,
        payload: bytes,
        job_id: str | None,
        timeout: float | None,
    ) -> None:
        self._client = client
        self._method = method
        self._payload = payload
        self._job_id = job_id
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._conn, self._call = client.open(method, payload, timeout)

    def result(self) -> JobView:
        """The answer, a job."""
        return self.answer(read_job)

    def answer(self, read: Callable[[bytes], M]) -> M:
        """The answer; raises the error the server answered with, ``TimeoutError`` past
        the timeout, ``ConnectionFailed`` if the connection is lost meanwhile."""
        for _ in range(_ATTEMPTS):
            conn: BlockingConnection = self._conn
            call: BlockingCall = self._call
            messages: list[bytes | memoryview] = []
            try:
                while (message := conn.next_message(call, self._deadline)) is not None:
                    messages.append(message)
            except Unprocessed:
                self._conn, self._call = self._client.open(
                    self._method, self._payload, self._timeout
                )
                continue
            except CallFailed as exc:
                raise _exception(exc, self._job_id) from None
            except BaseException:
                conn.cancel(call)
                raise
            if len(messages) != 1:
                raise RemoteError(
                    StatusCode.INTERNAL, f"expected one response message, got {len(messages)}"
                )
            return _read(read, messages[0])
        raise self._client.keeps_closing()


class BlockingOutput:
    """A job's output chunks as an iterator; see ``WorkerClient.output``."""

    def __init__(self, client: BlockingClient, job_id: str, request: bytes) -> None:
        self._client = client
        self._request = request
        self._job_id = job_id
        self._conn: BlockingConnection | None = None
        self._call: BlockingCall | None = None
        self._finished = False

    def __enter__(self) -> BlockingOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[ChunkView]:
        return self

    def __next__(self) -> ChunkView:
        if self._finished:
            raise StopIteration
        try:
            message = self._next_message()
        except CallFailed as exc:
            self._finished = True
            raise _exception(exc, self._job_id) from None
        except Unprocessed:
            self._finished = True
            raise ConnectionFailed(
                f"{self._client.address} dropped the output stream unprocessed"
            ) from None
        except Exception:
            self._finished = True
            raise
        if message is None:
            self._finished = True
            raise StopIteration
        return _read(read_chunk, message)

    def _next_message(self) -> bytes | memoryview | None:
        if self._call is None:
            payload = self._request
            for _ in range(_ATTEMPTS):
                conn, call = self._client.open("Output", payload, None)
                try:
                    # A GOAWAY can still say the server never saw it, before any message.
                    while not call.messages and not call.done:
                        conn.pump()
                except BaseException:
                    conn.cancel(call)
                    raise
                if call.done and isinstance(call.error, Unprocessed):
                    continue
                self._conn, self._call = conn, call
                break
            else:
                raise self._client.keeps_closing()
        assert self._conn is not None
        assert self._call is not None
        return self._conn.next_message(self._call)

    def close(self) -> None:
        """Stop early: reset the stream; the connection goes on serving other calls."""
        self._finished = True
        if self._conn is not None and self._call is not None:
            self._conn.cancel(self._call)


def _read(read: Callable[[bytes], M], message: bytes | memoryview) -> M:
    """An answer read; a malformed one is the server's INTERNAL error (as protobuf's
    ``DecodeError`` is for the trio client, ``_requests.parse``)."""
    try:
        return read(bytes(message))
    except Malformed:
        message_ = "the server sent a malformed response message"
        raise RemoteError(StatusCode.INTERNAL, message_) from None


def _exception(failed: CallFailed, job_id: str | None) -> Exception:
    """Our exception for a call's non-OK status (``_error_codes``, imported when a call
    fails: most commands never need its tables)."""
    from ._error_codes import exception_from

    return exception_from(failed.code, failed.message, failed.details, job_id)


@contextmanager
def connect_blocking(
    addr: str,
    *,
    ca: str | os.PathLike[str],
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Iterator[BlockingClient]:
    """``client.connect`` without trio: the first connection is dialed here, so a wrong
    address or certificate fails here; leaving the block closes the connection."""
    if not (timeout > 0 and timeout != float("inf")):
        raise InvalidRequest("timeout", f"must be a positive number of seconds, got {timeout!r}")
    context = client_context(ca=ca, cert=cert, key=key)
    client = BlockingClient(addr, context, timeout, server_hostname)
    client.dial()
    try:
        yield client
    finally:
        client.close()
