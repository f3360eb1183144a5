"""The gRPC server transport: TCP, TLS, HTTP/2 and gRPC on trio, ours end to end.

    listener (binds exactly the address given) → TLS (handshake under a timeout)
    → peer certificate → Identity → one _Connection per client → one task per call.

TLS is ``_tlsstream.TLSSocketStream`` rather than ``trio.SSLStream``: same job, less than
half the CPU per small RPC (see that module).

A ``_Connection`` is the connection driver both ends share (``_connection``: reader,
writer, loss, close) over purerpc's sans-I/O ``GRPCConnection`` (``_h2server``), plus a task
per call. purerpc's own I/O layer (``Server``, ``GRPCSocket``, ``GRPCStream``,
``SocketWrapper``) is not used, because every gap we must close lives in it: its reader
loop drops RST_STREAM and connection loss, its writer buffers without bound for a slow
client, unexpected errors became CANCELLED, and every stream event went through an anyio
memory channel. Replacing those few I/O methods with trio code was smaller than overriding
them, and it lets a unary call's headers, message and trailers leave in one socket write:
they are queued without a checkpoint in between and written by the call itself when it
ends (``_push``); a stream's messages are written together whenever its handler yields.

Handlers get ``(request, CallContext)``. ``UnaryMethod`` handlers are coroutines returning
the response, ``StreamMethod`` handlers async iterators of responses, ``SyncUnaryMethod``
handlers plain functions run in the reader (no task: the cheapest call, for answers from
memory); a ``UnaryMethod`` may also offer such a function (``at_once``), which answers or
says "not now" before any task is made. ``BidiStreamMethod`` handlers get ``(requests,
CallContext)``, an async iterator of the request messages as they arrive, and are async
iterators of responses;
``BidiTaskMethod`` handlers are coroutines that also get a ``send`` function, for handlers
that read and send from concurrent tasks (a nursery cannot span a ``yield``). They signal
errors with :class:`RpcError`; anything else is logged with its traceback and answered
INTERNAL without details.
"""

from __future__ import annotations

import errno
import logging
import math
import resource
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from typing import Any, Final, Generic, TypeVar

import h2.errors
import h2.exceptions
import trio
from google.protobuf.message import DecodeError
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived, WindowUpdated

from .._error_codes import status_of
from .._errors import (
    AuthenticationFailed,
    ResourceExhausted,
    ShuttingDown,
    TrioWorkerError,
)
from .._identity import Identity, IdentityCache, identity_from_der
from .._tls import ALPN_PROTOCOL
from .._wire._h2conn import MAX_MESSAGE, Pieces
from .._wire._h2server import (
    BadMessage,
    BadRequest,
    ClientRequests,
    GRPCServerConnection,
    PeerGoAway,
    RequestTooLarge,
    ServerH2Connection,
    StreamReset,
)
from .._wire._status import StatusCode
from .._wire._window import MESSAGE_PREFIX
from ._budget import ClientOutput, OutputBudget
from ._connection import (
    MAX_SEND_BUFFER,
    WRITE_TIMEOUT,
    Connection,
    ConnectionSettings,
)
from ._sockets import set_keepalive as _set_keepalive
from ._starts import ClientStarts
from ._tlsstream import TLSSocketStream

__all__ = [
    "AdmissionCaps",
    "BidiStreamMethod",
    "BidiTaskMethod",
    "CallContext",
    "CallRecord",
    "ListenError",
    "Pieces",
    "RpcError",
    "Server",
    "ServerStats",
    "StatusCode",
    "StreamMethod",
    "SyncUnaryMethod",
    "TransportConfig",
    "UnaryMethod",
    "admission_caps",
]

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

_CONTENT_TYPE_SUFFIX: Final = "+proto"
_LARGEST_WINDOW: Final = 2**31 - 1
_LARGEST_FRAME: Final = 2**24 - 1
#: accept() failures that mean "out of resources for now", not "listener broken".
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


class ListenError(TrioWorkerError):
    """The server cannot listen on the address it was given (taken, not local, bad name)."""


class RpcError(TrioWorkerError):
    """Raised by a handler to end its call with ``code`` and ``message``.

    The message goes to the client verbatim, so it must not carry internals.
    """

    def __init__(
        self, code: StatusCode | int, message: str = "", details: bytes | None = None
    ) -> None:
        super().__init__(message)
        self.code = StatusCode(code)
        self.message = message
        #: a serialized ``google.rpc.Status`` for ``grpc-status-details-bin``, or None
        self.details = details

    @classmethod
    def of(cls, exc: TrioWorkerError) -> RpcError:
        """``exc`` as the one table (``_error_codes``) says it goes on the wire."""
        if isinstance(exc, RpcError):
            return exc
        wire = status_of(exc)
        return cls(wire.code, wire.message, wire.details)


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call besides the request."""

    identity: Identity
    #: "/package.Service/Method"
    method: str
    #: "host:port" of the client ("[v6]:port" for IPv6)
    peer: str
    #: trio.current_time() value of the client's deadline (grpc-timeout), or None
    deadline: float | None
    #: custom metadata sent by the client, ``-bin`` values as bytes
    metadata: tuple[tuple[str, str | bytes], ...] = ()
    #: the connection's output budget: a streaming handler that reads ahead takes a share
    output_budget: OutputBudget | None = None


@dataclass(frozen=True, slots=True)
class UnaryMethod(Generic[Req, Resp]):
    """A unary-unary method: ``await handler(request, ctx)`` returns the response.

    ``at_once``, if given, is tried first, in the connection's reader as a
    :class:`SyncUnaryMethod` handler is (no task): it returns the response, raises
    :class:`RpcError`, or returns None for "not now", and only then does ``handler`` run,
    in a task of its own. For calls usually answered from memory, rarely waited for (a
    Wait on a job that has already ended). ``handler`` must answer any request alike.
    """

    request_type: type[Req]
    response_type: type[Resp]
    handler: Callable[[Req, CallContext], Awaitable[Resp]]
    at_once: Callable[[Req, CallContext], Resp | None] | None = None


@dataclass(frozen=True, slots=True)
class SyncUnaryMethod(Generic[Req, Resp]):
    """A unary method whose handler is a plain function: ``handler(request, ctx)``.

    It runs in the connection's reader as soon as the request is in, with no task of its
    own: the cheapest call there is, for answers from memory (status, list, health). It
    must not block; it cannot be cancelled (there is nothing to cancel).
    """

    request_type: type[Req]
    response_type: type[Resp]
    handler: Callable[[Req, CallContext], Resp]


@dataclass(frozen=True, slots=True)
class StreamMethod(Generic[Req, Resp]):
    """A unary-stream method: ``handler(request, ctx)`` is an async iterator of responses.

    A response may also come serialized by the handler, as :class:`Pieces` (bulk output:
    a log's bytes framed without a protobuf copy); it is sent as it is, unchecked.
    """

    request_type: type[Req]
    response_type: type[Resp]
    handler: Callable[[Req, CallContext], AsyncIterator[Resp | Pieces]]


@dataclass(frozen=True, slots=True)
class BidiStreamMethod(Generic[Req, Resp]):
    """A bidirectional streaming method: ``handler(requests, ctx)`` is an async iterator of
    responses, where ``requests`` is an async iterator of the request messages.

    ``requests`` yields each message as it arrives and ends when the client half-closes;
    it raises :class:`RpcError` (INVALID_ARGUMENT) for a message that does not parse,
    which ends the call unless the handler catches it. Requests and responses may
    interleave freely. A request over the size cap or unreadable ends the call (the
    handler is cancelled) with RESOURCE_EXHAUSTED or INTERNAL, as a reset, a disconnect,
    the deadline or the drain timeout do with their codes.

    Inbound flow control follows the handler: the stream's window is handed back to the
    client only while no received message waits to be taken from ``requests``, so a client
    sending faster than the handler reads is held to one window (``initial_window_size``)
    plus one message.
    """

    request_type: type[Req]
    response_type: type[Resp]
    handler: Callable[[AsyncIterator[Req], CallContext], AsyncIterator[Resp]]


@dataclass(frozen=True, slots=True)
class BidiTaskMethod(Generic[Req, Resp]):
    """A bidirectional streaming method whose handler is a coroutine:
    ``await handler(requests, send, ctx)``, where ``await send(response)`` queues one
    response (waiting for flow control and buffer room, as a stream's yield does), and
    returning ends the call with OK.

    For handlers that must take requests and send responses at the same time: they run
    their own tasks in a nursery of their own, which an async-iterator handler cannot
    hold open across a ``yield``. One task at a time may ``send``. Requests, their flow
    control and the ways a call ends are as for :class:`BidiStreamMethod`.
    """

    request_type: type[Req]
    response_type: type[Resp]
    handler: Callable[
        [AsyncIterator[Req], Callable[[Resp], Awaitable[None]], CallContext], Awaitable[None]
    ]


Method = (
    UnaryMethod[Any, Any]
    | SyncUnaryMethod[Any, Any]
    | StreamMethod[Any, Any]
    | BidiStreamMethod[Any, Any]
    | BidiTaskMethod[Any, Any]
)
_BIDI = (BidiStreamMethod, BidiTaskMethod)
_RESPONSE_STREAMS = (StreamMethod, BidiStreamMethod)
#: The name of a call's task: the one trio would make of ``_Connection._call_task``, given
#: rather than worked out again from the method at every spawn.
_CALL_TASK: Final = "trio_worker._net._transport._Connection._call_task"
#: Call tasks a connection keeps waiting for its next call, once theirs has ended (see
#: ``_Connection._call_task``): a task and its frames, ~2 KiB each.
IDLE_CALL_TASKS: Final = 4
#: Calls a connection starts per turn of the loop (what one read brought beyond it waits for
#: the next turns, the other connections' input first): a read may open a thousand streams,
#: and each one's first step (a task, its log opened, a thread's read) is ~0.5 ms of the loop.
#: A lost connection's calls end at most this many per turn too (``_Connection._wind_down``):
#: a client's 4,096 stalled streams ended in one batch held everyone's calls ~0.5 s.
MAX_CALLS_PER_TURN: Final = 16
_SHUTTING_DOWN: Final = "the server is shutting down"
#: Deadlines of ended calls a connection's heap may hold beyond twice its running calls
#: (see ``_Connection._watch_deadline``).
_SPARE_DEADLINES: Final = 64


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The outcome of one RPC, handed to ``on_call`` once the call is over.

    ``request`` is None when the call ended before its request was decoded; ``response``
    is the unary response (None for streams and failures), so a Start's job id can be
    logged from it.
    """

    ctx: CallContext
    code: StatusCode
    message: str
    request: Any
    response: Any
    duration: float


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Limits and tuning of the transport; the defaults suit a job server on a LAN.

    Inbound (what clients may send us): ``max_request_bytes`` per message,
    ``initial_window_size``/``connection_window_size`` (the HTTP/2 receive windows we
    advertise), ``max_frame_size`` (largest frame we accept). Outbound, the client's own
    windows and frame size govern; ``max_send_buffer`` bounds what we hold for one
    connection beyond what the socket took, so a slow reader costs at most that much.
    """

    #: ceilings; the caps in force are also derived from the descriptors we may open
    #: (``admission_caps``), so a low RLIMIT_NOFILE lowers them rather than EMFILE
    max_connections: int = 1000
    #: connections still in their TLS handshake: smaller, since they cost CPU and prove
    #: nothing yet; under pressure their deadline shortens and the oldest is dropped
    max_handshakes: int = 128
    #: connections (handshaking or serving) from one source address, so that one
    #: address cannot crowd out the others
    max_connections_per_address: int = 256
    #: handshakes in flight from one source address
    max_handshakes_per_address: int = 16
    #: connections of one client (identity), from any address: without it one client's
    #: idle connections from a few addresses took every connection (``tools/probe_hostile.py
    #: tls-flood``: 998 held, 0 of 20 new clients served). A connection over it is told
    #: GOAWAY (ENHANCE_YOUR_CALM) once its TLS handshake has said who it is, and closed.
    max_connections_per_client: int = 128
    #: streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS: clients queue beyond it).
    #: 1,024: a thousand watchers of a job on one channel are all served at once (grpcio and
    #: grpc-go queue streams beyond it; with 32, the 68 of 100 beyond it saw nothing until
    #: the job ended). A stalled output stream holds at most 128 KiB beyond the connection's
    #: 4 MiB output budget (``_budget``), so what a client pins is bounded per client below
    max_concurrent_streams: int = 1024
    #: streams of one client (identity) across all its connections; one over it is refused
    #: (RST_STREAM REFUSED_STREAM, which gRPC clients may retry). 4,096 is what 128
    #: connections of 32 streams allowed before: raising the per-connection cap did not
    #: raise what one client may pin (4,096 x 128 KiB + 128 x 4 MiB of output budget)
    max_streams_per_client: int = 4096
    #: streams of all clients together: 32,768 is what 1,000 connections of 32 allowed
    #: before, so that many clients of a few streams each cannot pin 1,024 per connection
    max_streams: int = 32768
    max_request_bytes: int = MAX_MESSAGE
    handshake_timeout: float = 10.0
    #: close (with GOAWAY) a connection that has had no call for this long
    idle_timeout: float = 300.0
    #: pending output the socket has not taken after this long means the client is gone
    write_timeout: float = WRITE_TIMEOUT
    initial_window_size: int = 1024 * 1024
    connection_window_size: int = 16 * 1024 * 1024
    #: the largest frame we advertise (SETTINGS_MAX_FRAME_SIZE); the reader refuses a bigger
    #: one from its 9-byte header, before buffering it (FRAME_SIZE_ERROR)
    max_frame_size: int = 1024 * 1024
    #: a request's header list, decoded (SETTINGS_MAX_HEADER_LIST_SIZE): a gRPC call's are a
    #: few hundred bytes; with MAX_HEADER_BLOCK (encoded) it bounds what one block costs
    max_header_list_size: int = 16 * 1024
    max_send_buffer: int = MAX_SEND_BUFFER
    listen_backlog: int = 128

    def __post_init__(self) -> None:
        positive = (
            "max_connections",
            "max_handshakes",
            "max_connections_per_address",
            "max_handshakes_per_address",
            "max_connections_per_client",
            "max_concurrent_streams",
            "max_streams_per_client",
            "max_streams",
            "max_request_bytes",
            "max_header_list_size",
            "max_send_buffer",
            "listen_backlog",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TransportConfig.{name} must be positive")
        for name in ("handshake_timeout", "idle_timeout", "write_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransportConfig.{name} must be positive")
        if not 65535 <= self.initial_window_size <= _LARGEST_WINDOW:
            raise ValueError("initial_window_size must be within 65535..2**31-1")
        if not 65535 <= self.connection_window_size <= _LARGEST_WINDOW:
            raise ValueError("connection_window_size must be within 65535..2**31-1")
        if not 16384 <= self.max_frame_size <= _LARGEST_FRAME:
            raise ValueError("max_frame_size must be within 16384..2**24-1")


#: Descriptors kept for everything but connections (jobs' pipes and logs, the store,
#: listeners, the event loop): connections get half of what is left after this.
_RESERVED_FDS: Final = 64
#: A handshake's deadline never shortens below this under pressure (a TLS 1.3 handshake
#: takes a round trip and a few ms of CPU; a loaded loopback client still fits).
_MIN_HANDSHAKE_TIMEOUT: Final = 1.0


@dataclass(frozen=True, slots=True)
class AdmissionCaps:
    """The connection caps in force: the configured ones, lowered to fit the descriptors
    this process may open."""

    connections: int
    handshakes: int
    per_address: int
    handshakes_per_address: int
    per_client: int


def admission_caps(config: TransportConfig, nofile: int | None = None) -> AdmissionCaps:
    """Caps from ``config`` and the soft RLIMIT_NOFILE (``nofile``, read when None): at most
    half the descriptors beyond a reserve go to connections, the other half to jobs."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fit = max(8, (nofile - _RESERVED_FDS) // 2) if nofile != resource.RLIM_INFINITY else 1 << 30
    connections = min(config.max_connections, fit)
    handshakes = max(1, min(config.max_handshakes, connections // 2))
    return AdmissionCaps(
        connections=connections,
        handshakes=handshakes,
        per_address=max(1, min(config.max_connections_per_address, connections)),
        handshakes_per_address=max(1, min(config.max_handshakes_per_address, handshakes)),
        per_client=max(1, min(config.max_connections_per_client, connections)),
    )


@dataclass(slots=True)
class ServerStats:
    """Counters for tests, benchmarks and the curious; not synchronized, not persisted."""

    connections_accepted: int = 0
    connections_refused: int = 0
    handshakes_failed: int = 0
    #: connections ended by an unexpected error of ours (logged); the server went on
    connections_failed: int = 0
    #: handshakes dropped to make room for newer ones (the handshake cap was reached)
    handshakes_evicted: int = 0
    calls: int = 0
    socket_writes: int = 0
    bytes_written: int = 0


# --- listening ---------------------------------------------------------------------------


def _format_address(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _bind(host: str, port: int, backlog: int) -> list[trio.SocketListener]:
    """Listen on exactly the addresses ``host`` stands for (one, for an IP literal).

    No SO_REUSEPORT (which would let a second server share the port unnoticed);
    SO_REUSEADDR only lets us restart while old connections linger in TIME_WAIT. With
    port 0 the first socket picks the port and the others reuse it.
    """
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = await trio.socket.getaddrinfo(
            host or None,
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV,
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise ListenError(f"cannot resolve listen address {host!r}: {exc}") from exc
    seen: set[Any] = set()
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, sockaddr in infos:
            if sockaddr in seen:
                continue
            seen.add(sockaddr)
            if listeners and port == 0:
                sockaddr = (sockaddr[0], listeners[0].socket.getsockname()[1], *sockaddr[2:])
            sock = trio.socket.socket(family, type_, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    reason = "the address is already in use (is another server running?)"
                where = _format_address(sockaddr)
                raise ListenError(f"cannot listen on {where}: {reason}") from exc
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    if not listeners:
        raise ListenError(f"listen address {host!r} resolves to no usable address")
    return listeners


# --- one call ----------------------------------------------------------------------------


class _Call:
    """Per-stream state, shared by the connection's reader and the call's task."""

    __slots__ = (
        "_over",
        "_scope",
        "arrived",
        "cancelled",
        "ctx",
        "details",
        "error",
        "finished",
        "gone_reason",
        "headers_sent",
        "inbox",
        "method",
        "peer_gone",
        "request",
        "request_bytes",
        "request_over",
        "shutdown",
        "started",
        "stream_id",
    )

    def __init__(self, stream_id: int, method: Method, ctx: CallContext) -> None:
        self.stream_id = stream_id
        self.method = method
        self.ctx = ctx
        self.request_bytes: bytes | None = None
        self.error: RpcError | None = None
        self.details: bytes | None = None  # of the status the call ends with
        #: the request is whole (or failed): no message will follow
        self.request_over = False
        self.request: Any = None  # parsed, for the call's record
        self._over: trio.Event | None = None  # see wait_request
        #: the scope of the task running the call's handler, while it runs it
        self._scope: trio.CancelScope | None = None
        self.cancelled = False  # see cancel
        self.peer_gone = False  # reset by the client or connection lost: nothing to send
        self.gone_reason = ""
        self.shutdown = False  # cut short by the server's drain timeout
        self.headers_sent = False
        self.finished = False
        self.started = time.monotonic()
        # Bidirectional streams only: requests received and not yet taken by the handler,
        # and where its request iterator waits for more.
        self.inbox: deque[bytes] | None = None
        self.arrived: trio.lowlevel.ParkingLot | None = None
        if isinstance(method, _BIDI):
            self.inbox = deque()
            self.arrived = trio.lowlevel.ParkingLot()

    def cancel(self) -> None:
        """Cancel the call's handler (the reader on reset, a drain): at once if a task runs
        it, else as soon as one takes the call."""
        self.cancelled = True
        if self._scope is not None:
            self._scope.cancel()

    def _end_request(self) -> None:
        self.request_over = True
        if self._over is not None:
            self._over.set()

    async def wait_request(self) -> None:
        """Wait until the request is over (whole, or failed). Its event is made only when
        a task waits: a unary request is usually whole before its call starts."""
        if not self.request_over:
            if self._over is None:
                self._over = trio.Event()
            await self._over.wait()

    def release(self) -> None:
        """Drop what only the call's handler needed (its request, unread messages): the
        task that ran it keeps the call while it waits for the next one."""
        self.request = None
        self.request_bytes = None
        if self.inbox is not None:
            self.inbox.clear()

    def gone(self, reason: str) -> None:
        """Nobody will read this call's answer: cancel its handler."""
        self.mark_gone(reason)
        self.cancel()

    def mark_gone(self, reason: str) -> None:
        """Nobody will read this call's answer (the first reason wins); its handler is
        cancelled later (a lost connection's share per turn) or ends by itself: nothing
        it sends goes out, and it ends CANCELLED."""
        if not self.peer_gone:
            self.peer_gone = True
            self.gone_reason = reason

    def fail(self, error: RpcError) -> None:
        """Record a request-level error (first one wins) and let the task answer it.

        A bidirectional stream's handler may not be reading requests: it is cancelled
        (waiting for a request included), and the call ends with ``error``.
        """
        if self.error is None:
            self.error = error
        self._end_request()
        if self.inbox is not None:
            self.cancel()

    def requests_ended(self) -> None:
        """The client half-closed: no request message will follow."""
        self._end_request()
        if self.arrived is not None:
            self.arrived.unpark_all()


class _IdleTask:
    """A call task waiting for the connection's next call (``_Connection._next_call``)."""

    __slots__ = ("task", "work")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        #: the call handed to it, with what ``_Connection._call_task`` takes besides
        self.work: tuple[_Call, tuple[Any, Any] | None, Any] | None = None


class _Requests:
    """A bidirectional stream's request messages, as the handler's async iterator."""

    __slots__ = ("_call", "_grpc", "_h2", "_request_type", "_wake_writer")

    def __init__(self, conn: _Connection, call: _Call, request_type: type[Any]) -> None:
        self._call = call
        self._grpc = conn._grpc
        self._h2 = conn._h2
        self._wake_writer = conn._wake_writer
        self._request_type = request_type

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        call = self._call
        inbox = call.inbox
        arrived = call.arrived
        assert inbox is not None
        assert arrived is not None
        while True:
            if call.error is not None:
                raise call.error
            if inbox:
                break
            if call.request_over:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await arrived.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        data = inbox.popleft()
        # The stream's window may reopen now; the writer sends the WINDOW_UPDATE (with
        # whatever the handler queues meanwhile).
        self._grpc.message_taken(call.stream_id)
        if self._h2.outbound_buffered:
            self._wake_writer()
        request = self._request_type()
        try:
            request.ParseFromString(data)
        except DecodeError:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "malformed request message") from None
        return request


# --- one connection ----------------------------------------------------------------------


class _Connection(Connection):
    """One client connection: the shared driver (reader, writer), a task per (async) call."""

    def __init__(
        self,
        server: Server,
        stream: TLSSocketStream,
        identity: Identity | None,
        auth_error: str,
        peer: str,
        peer_cert: bytes = b"",
        grpc: GRPCServerConnection | None = None,
    ) -> None:
        cfg = server.config
        if grpc is None:
            grpc = server.new_core()
        super().__init__(
            stream,
            grpc,
            peer=peer,
            peer_noun="the client",
            stats=server.stats,
            settings=server.connection_settings,
        )
        #: The client's certificate (DER), to find connections of a revoked one.
        self.peer_cert = peer_cert
        self._server = server
        self._cfg = cfg
        self._identity = identity
        self._auth_error = auth_error
        self._grpc = grpc
        self._h2: ServerH2Connection = grpc.h2_connection
        self._calls: dict[int, _Call] = {}
        #: what its streams hold, between them (and with its client's other connections')
        self._output_budget = OutputBudget(client=server.client_output_of(identity))
        #: the turn to start calls, taken in turns with its client's other connections
        self._starts = server.client_starts_of(identity)
        self._new_calls: list[_Call] = []  # headers seen in this read, not started yet
        #: calls of a connection that is over, to cancel a share per turn (``_wind_down``)
        self._ending: deque[_Call] = deque()
        self._idle_tasks: list[_IdleTask] = []  # call tasks waiting for a call
        #: The deadlines of the calls in tasks, soonest first (those of ended calls are
        #: dropped lazily: see _expire), and the scope of _expire's wait for the soonest.
        self._deadlines: list[tuple[float, int]] = []  # (deadline, stream id)
        self._expiry: trio.CancelScope | None = None
        self._starting_calls = False  # in ``_start_calls``: the reader pushes after it
        self._draining = False
        self.drained = False  # ended by a drain (or idling) with everything flushed
        #: the loop's clock (``trio.current_time``, bound once: that goes through three
        #: Python frames, and a call reads it up to three times)
        self._now = trio.lowlevel.current_clock().current_time
        self._last_call_end = self._now()  # for the idle timeout
        # Last: counted for its client until the server's release_client_requests.
        server.share_client_requests(identity, grpc)

    # -- lifecycle --

    @property
    def grpc_core(self) -> GRPCServerConnection:
        return self._grpc

    async def run(self) -> bool:
        """Serve the connection until the client leaves, it idles out, or it is drained."""
        # Our SETTINGS (queued by ``new_core``) go now, before the tasks start: the
        # client's first call waits for them.
        self._push()
        flushed = await super().run()
        self.drained = flushed and self._draining
        return flushed

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._idle_watchdog)

    def uncount_calls(self) -> None:
        """The connection is over: calls it never completed no longer count for its client."""
        if self._calls:
            name = next(iter(self._calls.values())).ctx.identity.name
            self._server.uncount_streams(name, len(self._calls))
            self._calls.clear()

    def _end_calls(self, reason: str) -> None:
        # Marked now (what they send no longer goes out), cancelled a share per turn.
        ending = self._ending
        for call in self._calls.values():
            call.mark_gone(reason)
            ending.append(call)

    def _release_waiters(self) -> None:
        self._starts.give_up(self)  # its calls that were not started end with it
        if not self._ending:
            super()._release_waiters()
        # else the waiters are mostly the calls' senders: _wind_down wakes a share per turn

    async def _wind_down(self) -> None:
        """Cancel the calls of a connection that is over at most MAX_CALLS_PER_TURN per
        turn of the loop, with the other connections' input first (as ``_start_calls``
        starts them): each end is its task's wakeup, its trailers' bookkeeping and its
        audit record, ~0.1-0.2 ms, and a client may hold 4,096 calls. One connection
        at a time across the server (``Server.winding_down``, FIFO); cancellable (the
        server's cancellation ends everything at once anyway)."""
        if self._ending:
            async with self._server.winding_down:
                more = True
                while more:
                    more = self._end_share()
                    await trio.lowlevel.checkpoint()
                    await trio.lowlevel.cancel_shielded_checkpoint()
        if self.dead:  # (no call is left to wake: whoever else waits)
            super()._release_waiters()

    def _end_share(self) -> bool:
        """Wake or cancel one turn's share of the calls ending; whether any is left."""
        share = MAX_CALLS_PER_TURN
        if self.dead:  # a sender woken on a dead connection ends its call itself
            share -= len(self._window_lot.unpark(count=share))
            share -= len(self._flushed_lot.unpark(count=share))
        ending = self._ending
        while ending and share > 0:
            call = ending.popleft()
            if not call.cancelled:
                call.cancel()
                share -= 1
        return bool(ending) or (
            self.dead and bool(self._window_lot or self._flushed_lot) and share == 0
        )

    async def _read_turn(self) -> None:
        if not self._starts.take(self):
            # Another connection of this client is handling what it read: ours waits in
            # line (its 128 connections' reads, 32 streams each, came in the same poll).
            await self._starts.wait(self)

    async def _read_done(self) -> None:
        starts = self._starts
        if starts.holder is not self:
            return
        if starts.connections > 1:
            # Held until the loop has polled for I/O again: the client's other connections
            # whose bytes came in the same poll wait in line rather than find it free.
            await trio.lowlevel.cancel_shielded_checkpoint()
        starts.give_up(self)

    def _read_over(self) -> None:
        self._starts.give_up(self)

    def _after_read(self) -> None:
        if self._new_calls:
            self._start_calls()

    def _work_left(self) -> bool:
        return bool(self._new_calls)

    async def _next_share(self) -> None:
        await super()._next_share()
        if self._new_calls and not self._starts.take(self):
            # (Its turn went with the connection: ``_release_waiters``.)
            await self._starts.wait(self)

    def start_drain(self) -> None:
        """Send GOAWAY; streams in flight go on, new ones get UNAVAILABLE; close when done."""
        if self._draining or self.dead:
            return
        self._draining = True
        self._h2.send_graceful_goaway(self._h2.highest_inbound_stream_id)
        self._push()
        self._maybe_drained()

    def close(self, reason: str) -> None:
        """End the connection now (its certificate was revoked): GOAWAY, every call
        cancelled, closed once the GOAWAY is out (at most a second)."""
        if self.dead or self._done.is_set():
            return
        log.info("closing connection from %s: %s", self.peer, reason)
        self._draining = True
        with suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        self._end_calls(reason)
        self._push()
        self._done.set()

    def abort_calls(self) -> None:
        """End the calls still running after the drain timeout: UNAVAILABLE."""
        for call in list(self._calls.values()):
            call.shutdown = True
            call.cancel()

    def _maybe_drained(self) -> None:
        if self._draining and not self._calls:
            self._done.set()

    async def _idle_watchdog(self) -> None:
        """Drain the connection once it has had no call for ``idle_timeout``.

        Polls rather than moving a deadline on every call: calls only store a time.
        """
        idle = self._cfg.idle_timeout
        while True:
            await trio.sleep_until(self._last_call_end + idle)
            if not self._calls and trio.current_time() >= self._last_call_end + idle:
                break
            if self._calls:
                # Busy: look again one idle period from now (a call may end sooner, which
                # only delays the close by less than that).
                self._last_call_end = max(self._last_call_end, trio.current_time())
        log.debug("closing connection from %s: idle for %ss", self.peer, self._cfg.idle_timeout)
        self.start_drain()

    # -- reading --

    def _on_event(self, event: Any) -> None:
        kind = type(event)
        if kind is RequestReceived:
            self._on_request(event)
        elif kind is MessageReceived:
            call = self._calls.get(event.stream_id)
            if call is None:
                return
            inbox = call.inbox
            if inbox is not None:
                inbox.append(event.data)
                if len(inbox) == 1 and call.arrived is not None:  # the handler may wait
                    call.arrived.unpark_all()
            elif call.request_bytes is None and call.error is None:
                call.request_bytes = event.data
            else:
                self._grpc.drop_request(call.stream_id)
                call.fail(RpcError(StatusCode.INVALID_ARGUMENT, "more than one request message"))
        elif kind is RequestEnded:
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.requests_ended()
        elif kind is WindowUpdated:
            if self._window_lot:  # (two per unary call, rarely anyone waiting)
                self._window_lot.unpark_all()
        elif kind is StreamReset:
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.gone("cancelled by the client")
        elif kind is RequestTooLarge:
            call = self._calls.get(event.stream_id)
            if call is not None:
                call.fail(RpcError.of(ResourceExhausted(f"request too large: {event.reason}")))
        elif kind is BadMessage:
            call = self._calls.get(event.stream_id)
            if call is not None:
                reason = f"cannot read the request message: {event.reason}"
                call.fail(RpcError(StatusCode.INTERNAL, reason))
        elif kind is BadRequest:
            log.info("malformed request from %s: %s", self.peer, event.reason)
            self._reset(event.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        elif kind is PeerGoAway:
            # h2 3.x sends nothing after a GOAWAY either way: the connection is over.
            log.debug("client %s sent GOAWAY (%s)", self.peer, event.error_code)
            self._lost("the client sent GOAWAY")

    def _on_request(self, event: Any) -> None:
        stream_id: int = event.stream_id
        path = f"/{event.service_name}/{event.method_name}"
        timeout = event.timeout
        deadline = None if timeout is None else self._now() + timeout.total_seconds()
        identity = self._identity or Identity(name="", role=None)
        ctx = CallContext(
            identity, path, self.peer, deadline, tuple(event.custom_metadata), self._output_budget
        )
        server = self._server
        server.stats.calls += 1
        if self._draining or server.draining:
            self._reject(stream_id, ctx, RpcError.of(ShuttingDown("the server is shutting down")))
            return
        if len(self._calls) >= self._cfg.max_concurrent_streams:
            # The client ignored our SETTINGS_MAX_CONCURRENT_STREAMS (or raced it):
            # REFUSED_STREAM tells it the call was not processed and may be retried.
            self._grpc.drop_request(stream_id)
            self._reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            reason = f"refused: over {self._cfg.max_concurrent_streams} concurrent streams"
            server.record(CallRecord(ctx, StatusCode.RESOURCE_EXHAUSTED, reason, None, None, 0.0))
            return
        client_streams = server.client_streams
        name = identity.name
        over = None
        if client_streams.get(name, 0) >= self._cfg.max_streams_per_client:
            over = f"the client's {self._cfg.max_streams_per_client} streams"
        elif server.streams >= self._cfg.max_streams:
            over = f"the server's {self._cfg.max_streams} streams"
        if over is not None:
            # Its other connections (or other clients) hold the streams: refused as above.
            self._grpc.drop_request(stream_id)
            self._reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            reason = f"refused: over {over}"
            server.record(CallRecord(ctx, StatusCode.RESOURCE_EXHAUSTED, reason, None, None, 0.0))
            return
        if self._identity is None:
            self._reject(stream_id, ctx, RpcError.of(AuthenticationFailed(self._auth_error)))
            return
        encoding = event.message_encoding
        if encoding not in (None, "identity"):
            reason = f"grpc-encoding {encoding} is not supported"
            self._reject(stream_id, ctx, RpcError(StatusCode.UNIMPLEMENTED, reason))
            return
        method = server.methods.get(path)
        if method is None:
            reason = f"unknown method {path}"
            self._reject(stream_id, ctx, RpcError(StatusCode.UNIMPLEMENTED, reason))
            return
        call = _Call(stream_id, method, ctx)
        self._calls[stream_id] = call
        client_streams[name] = client_streams.get(name, 0) + 1
        server.streams += 1
        self._new_calls.append(call)

    # -- calls --

    def _start_calls(self) -> None:
        """Start the calls whose headers came in the last read.

        Deferred to the end of the read, when their request has usually arrived too: a
        SyncUnaryMethod is then answered right here, in the reader, with no task at all.
        """
        if not self._starts.take(self):
            return  # another connection of the client has the turn (``_next_share``)
        calls = self._new_calls
        if len(calls) > MAX_CALLS_PER_TURN:
            # One read may open a thousand streams: the rest wait for the loop's next
            # turns, so other clients' calls are not queued behind all their first steps.
            calls, self._new_calls = calls[:MAX_CALLS_PER_TURN], calls[MAX_CALLS_PER_TURN:]
        else:
            self._new_calls = []
        self._starting_calls = True
        try:
            for call in calls:
                deadline = call.ctx.deadline
                if call.peer_gone:  # reset in the same read
                    self._complete(call, StatusCode.CANCELLED, call.gone_reason, None, None)
                elif deadline is not None and self._now() >= deadline:
                    self._complete(
                        call, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", None, None
                    )
                elif call.request_over and (
                    isinstance(call.method, SyncUnaryMethod)
                    or (isinstance(call.method, UnaryMethod) and call.method.at_once is not None)
                ):
                    self._run_inline(call, call.method)
                else:
                    self._spawn_call(call)
        finally:
            self._starting_calls = False

    def _parse(self, call: _Call) -> Any:
        """The call's request message, or the RpcError that answers it."""
        if call.error is not None:
            raise call.error
        if call.request_bytes is None:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "missing request message")
        request = call.method.request_type()
        try:
            request.ParseFromString(call.request_bytes)
        except DecodeError:
            raise RpcError(StatusCode.INVALID_ARGUMENT, "malformed request message") from None
        call.request_bytes = None
        return request

    def _internal_error(self, call: _Call, exc: Exception) -> tuple[StatusCode, str]:
        rpc_error = _single_rpc_error(exc)
        if rpc_error is not None:
            call.details = rpc_error.details
            return rpc_error.code, rpc_error.message
        ctx = call.ctx
        log.exception("%s from %s (%s) failed", ctx.method, ctx.peer, ctx.identity.name)
        return StatusCode.INTERNAL, "internal error"

    def _run_inline(
        self, call: _Call, method: SyncUnaryMethod[Any, Any] | UnaryMethod[Any, Any]
    ) -> None:
        """Answer a call in the reader: a SyncUnaryMethod's, or a UnaryMethod's ``at_once``
        (which may say "not now": then its handler runs in a task, as any other)."""
        request: Any = None
        response: Any = None
        try:
            request = self._parse(call)
            if isinstance(method, SyncUnaryMethod):
                response = method.handler(request, call.ctx)
            else:
                assert method.at_once is not None
                response = method.at_once(request, call.ctx)
                if response is None:
                    self._spawn_call(call, None, request)
                    return
            payload = self._serialize(call, response, method.response_type)
            if not self._answer_whole(call, payload) and not self._queue_now(call, payload):
                # No window or buffer room for it now: a task will wait for some.
                self._spawn_call(call, (request, response))
                return
            code, message = StatusCode.OK, ""
        except RpcError as exc:
            code, message, response = exc.code, exc.message, None
            call.details = exc.details
        except Exception as exc:
            (code, message), response = self._internal_error(call, exc), None
        self._complete(call, code, message, request, response)

    def _spawn_call(
        self, call: _Call, ready: tuple[Any, Any] | None = None, parsed: Any = None
    ) -> None:
        """Run a call's handler in a task: one of the connection's idle call tasks, else a
        new one (see :meth:`_call_task` for ``ready`` and ``parsed``)."""
        if self._idle_tasks:
            idle = self._idle_tasks.pop()
            idle.work = (call, ready, parsed)
            trio.lowlevel.reschedule(idle.task)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._call_task, call, ready, parsed, name=_CALL_TASK)

    async def _call_task(self, call: _Call, ready: tuple[Any, Any] | None, parsed: Any) -> None:
        """A call's task, kept once the call has ended for the connection's next call that
        needs one (at most :data:`IDLE_CALL_TASKS` wait): a call then costs no spawn.

        Its cancel scope is kept from call to call too, until a call is cancelled: a call
        is cancelled through it (:meth:`_Call.cancel`), by the reader, a drain or its
        deadline (:meth:`_watch_deadline`); a new scope only after a cancellation. A scope
        of its own per call (made, entered, left) and a task per call were a fifth of an
        async call's CPU. (The calls of one task share its context variables: no
        handler here sets any.) ``ready``: the request and response made in the
        reader, which had no room to send it; ``parsed``: the request, parsed in the
        reader for an ``at_once`` that said "not now".
        """
        work: tuple[_Call, tuple[Any, Any] | None, Any] | None = (call, ready, parsed)
        while work is not None:
            call = work[0]
            ended = False
            scope = trio.CancelScope()
            try:
                with scope:
                    while True:
                        call._scope = scope
                        if call.ctx.deadline is not None:
                            self._watch_deadline(call.stream_id, call.ctx.deadline)
                        if call.cancelled:  # before this task took it
                            scope.cancel()
                        ended = False
                        outcome = await self._run_call(*work)
                        work = None  # (nothing of the call is kept while this task waits)
                        ended = True
                        self._end_call(call, *outcome)
                        del outcome
                        if call.cancelled:  # (after the call's last checkpoint)
                            break  # (this scope is cancelled: the next call gets a new one)
                        work = await self._next_call()
                        if work is None:
                            return
                        call = work[0]
            except BaseException:
                if not ended:
                    # Torn down from outside: the client left, or the server was cancelled
                    # rather than drained. Never let a cut-short stream look like a
                    # normal end.
                    if call.peer_gone:
                        self._end_call(call, StatusCode.CANCELLED, call.gone_reason, None)
                    else:
                        self._end_call(call, StatusCode.UNAVAILABLE, _SHUTTING_DOWN, None)
                raise
            if not ended:  # the call's cancellation, caught by its scope
                if call.peer_gone:
                    code, message = StatusCode.CANCELLED, call.gone_reason
                elif call.shutdown:
                    code, message = StatusCode.UNAVAILABLE, _SHUTTING_DOWN
                elif call.error is not None and call.inbox is not None:
                    code, message = call.error.code, call.error.message
                    call.details = call.error.details
                else:
                    code, message = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
                self._end_call(call, code, message, None)
            work = await self._next_call()

    def _end_call(self, call: _Call, code: StatusCode, message: str, response: Any) -> None:
        """A call in a task has ended: its answer's end (:meth:`_complete`), then nothing
        of it kept by the task that waits for the next call."""
        call._scope = None
        self._complete(call, code, message, call.request, response)
        call.release()

    def _watch_deadline(self, stream_id: int, deadline: float) -> None:
        """Cancel the call on ``stream_id`` at ``deadline`` if it is still running then
        (:meth:`_expire`).

        One heap and one task per connection, rather than the deadline of each call's
        scope: trio registers a scope's deadline (and its removal) through a context
        manager, twice per call, which cost as much as the rest of the call's task. The
        heap keeps the deadlines of ended calls (stream ids are never reused) until they
        come up, at most twice the calls running plus :data:`_SPARE_DEADLINES` (then they
        are swept)."""
        deadlines = self._deadlines
        calls = self._calls
        if len(deadlines) >= 2 * len(calls) + _SPARE_DEADLINES:
            deadlines[:] = [item for item in deadlines if item[1] in calls]
            heapify(deadlines)
        heappush(deadlines, (deadline, stream_id))
        expiry = self._expiry
        if expiry is None:
            assert self._nursery is not None
            self._expiry = trio.CancelScope(deadline=deadline)
            self._nursery.start_soon(self._expire)
        elif deadline < expiry.deadline:
            expiry.deadline = deadline

    async def _expire(self) -> None:
        """Cancel each call whose deadline has come (DEADLINE_EXCEEDED, see
        :meth:`_call_task`), sleeping until the soonest deadline of a running call."""
        deadlines = self._deadlines
        calls = self._calls
        while True:
            expiry = self._expiry
            assert expiry is not None
            with expiry:
                await trio.sleep_forever()
            now = self._now()
            while deadlines:
                deadline, stream_id = deadlines[0]
                call = calls.get(stream_id)
                if call is None:  # ended: dropped, whenever due
                    heappop(deadlines)
                elif deadline <= now:
                    heappop(deadlines)
                    call.cancel()
                else:
                    break
            self._expiry = trio.CancelScope(deadline=deadlines[0][0] if deadlines else math.inf)

    async def _next_call(self) -> tuple[_Call, tuple[Any, Any] | None, Any] | None:
        """Wait for the connection's next call that needs a task (:meth:`_spawn_call`);
        None when enough tasks wait already (this one is to end)."""
        if len(self._idle_tasks) >= IDLE_CALL_TASKS:
            return None
        idle = _IdleTask(trio.lowlevel.current_task())
        self._idle_tasks.append(idle)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle_tasks.remove(idle)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return idle.work

    async def _run_call(
        self, call: _Call, ready: tuple[Any, Any] | None, parsed: Any
    ) -> tuple[StatusCode, str, Any]:
        """A call's handler, in its task (:meth:`_call_task`), its answer queued: the
        status code, message and response it ends with, unless it is cancelled (then
        Cancelled goes up, to the task's scope)."""
        code, message = StatusCode.OK, ""
        request: Any = None
        response: Any = None
        method = call.method
        try:
            if ready is not None:
                request, response = ready
                call.request = request
            elif not isinstance(method, _BIDI):
                if parsed is None:
                    await call.wait_request()
                    request = self._parse(call)
                else:
                    request = parsed
                call.request = request
                if isinstance(method, UnaryMethod):
                    response = await method.handler(request, call.ctx)
                elif isinstance(method, SyncUnaryMethod):
                    response = method.handler(request, call.ctx)
            if isinstance(method, BidiTaskMethod):
                response_type = method.response_type

                async def send(item: Any) -> None:
                    await self._send_message(call, item, response_type)

                await method.handler(_Requests(self, call, method.request_type), send, call.ctx)
            elif not isinstance(method, _RESPONSE_STREAMS):
                # Not woken: _complete writes the message and trailers together. One
                # whole DATA frame when it fits now (send_whole_data, as a call answered
                # in the reader: not h2's send_data), once no cancellation is pending.
                await trio.lowlevel.checkpoint_if_cancelled()
                payload = self._serialize(call, response, method.response_type)
                if not self._answer_whole(call, payload) and not self._queue_now(call, payload):
                    pieces = Pieces((payload,), len(payload))
                    await self._send_message(call, pieces, method.response_type, wake=False)
            else:
                if isinstance(method, StreamMethod):
                    responses = method.handler(request, call.ctx)
                else:
                    requests = _Requests(self, call, method.request_type)
                    responses = method.handler(requests, call.ctx)
                try:
                    while True:
                        # Ask for the next message only once it could leave: a peer
                        # that never opens its window makes us hold nothing for it.
                        await self.wait_for_window(call.stream_id)
                        try:
                            # Not kept in a local: _send_message drops it once
                            # serialized, while it waits for window.
                            await self._send_message(
                                call, await anext(responses), method.response_type
                            )
                        except StopAsyncIteration:
                            break
                finally:
                    aclose = getattr(responses, "aclose", None)
                    if aclose is not None:  # an async generator: run its finally now
                        await aclose()
        except RpcError as exc:
            code, message, response = exc.code, exc.message, None
            call.details = exc.details
        except Exception as exc:
            (code, message), response = self._internal_error(call, exc), None
        return code, message, response

    def _complete(
        self, call: _Call, code: StatusCode, message: str, request: Any, response: Any
    ) -> None:
        """End a call: trailers out (in the same write as its last message), bookkeeping,
        the audit record."""
        self._finish(call, code, message)
        del self._calls[call.stream_id]
        self._server.uncount_streams(call.ctx.identity.name, 1)
        if not call.peer_gone:
            self._grpc.call_finished()
        if not self._calls:
            self._last_call_end = self._now()
        if call.peer_gone and code is StatusCode.OK:
            code, message, response = StatusCode.CANCELLED, call.gone_reason, None
        if self._starting_calls:
            pass  # answered in the reader, which writes once the read is handled
        elif self._calls:
            # Other calls are in flight: the answers of those that end in this turn of
            # the loop leave with this one, in one write of the writer task (one TLS
            # record, one syscall and one wakeup of the client, not one per answer).
            self._wake_writer()
        else:
            self._push()
        self._server.record(
            CallRecord(call.ctx, code, message, request, response, time.monotonic() - call.started)
        )
        self._maybe_drained()

    @staticmethod
    def _check_type(call: _Call, message: Any, expected: type[Any]) -> None:
        if not isinstance(message, expected):
            raise TypeError(
                f"{call.ctx.method} produced {type(message).__name__}, not {expected.__name__}"
            )

    def _serialize(self, call: _Call, message: Any, expected: type[Any]) -> bytes:
        self._check_type(call, message, expected)
        payload: bytes = message.SerializeToString()
        return payload

    def _answer_whole(self, call: _Call, payload: bytes) -> bool:
        """Queue a unary call's whole OK answer (headers, the message, trailers) in one
        step of the core, if it fits now as :meth:`_queue_now` would have it fit; the call
        is then finished, and its end (:meth:`_complete`) writes no trailers of its own."""
        settings = self._settings
        if (
            call.headers_sent
            or call.peer_gone
            or self.dead
            or MESSAGE_PREFIX.size + len(payload) > settings.max_frame
            or self._h2.outbound_buffered + self._stream.pending >= settings.max_send_buffer
            or not self._grpc.send_unary_reply(call.stream_id, payload)
        ):
            return False
        call.headers_sent = call.finished = True
        return True

    def _queue_now(self, call: _Call, payload: bytes) -> bool:
        """Queue a whole serialized response message if window, frame size and buffer
        allow it now."""
        stream_id = call.stream_id
        if not self.fits(stream_id, MESSAGE_PREFIX.size + len(payload)):
            return False
        if not call.headers_sent:
            self._grpc.start_response(stream_id, _CONTENT_TYPE_SUFFIX)
            call.headers_sent = True
        self._h2.send_whole_data(stream_id, MESSAGE_PREFIX.pack(0, len(payload)) + payload)
        return True

    async def _send_message(
        self, call: _Call, message: Any, expected: type[Any], *, wake: bool = True
    ) -> None:
        """Queue one response message, waiting for flow-control window and buffer room.

        Never yields when both suffice, so consecutive sends (and the trailers after the
        last one) leave in one socket write: a stream's messages go when its handler
        yields (the writer is woken, not pushed).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        payload: bytes | Pieces
        if type(message) is Pieces:
            payload = message
        else:
            self._check_type(call, message, expected)
            payload = message.SerializeToString()
        # While this waits for window, it holds the serialized bytes only: not the message
        # object (callers pass it without keeping it), nor a prefixed copy of it.
        del message
        stream_id = call.stream_id
        if not call.headers_sent:
            self._grpc.start_response(stream_id, _CONTENT_TYPE_SUFFIX)
            call.headers_sent = True
        budget = self._output_budget
        size = len(payload)
        budget.unsent += size  # counted until queued: it may wait for window or room
        try:
            sent = await self.send_message(stream_id, payload)
        finally:
            budget.unsent -= size
        if not sent:
            # Closed under us (a reset we have not seen yet, or the connection): end like
            # one; the call's scope is cancelled.
            call.gone("stream closed")
            await trio.lowlevel.checkpoint()
        if wake:
            self._wake_writer()

    def _finish(self, call: _Call, code: StatusCode, message: str) -> None:
        """Queue the trailers (or a trailers-only response), unless nobody can get them."""
        if call.finished:
            return
        call.finished = True
        if call.peer_gone or self.dead:
            return
        stream_id = call.stream_id
        try:
            self._grpc.send_status(
                stream_id, code, message, call.details, headers=call.headers_sent
            )
            self._stop_request(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return

    def _reject(self, stream_id: int, ctx: CallContext, error: RpcError) -> None:
        """Answer a call that never reaches a handler with a trailers-only response."""
        self._grpc.drop_request(stream_id)
        try:
            self._grpc.send_status(
                stream_id, error.code, error.message, error.details, headers=False
            )
            self._stop_request(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        self._server.record(CallRecord(ctx, error.code, error.message, None, None, 0.0))

    def _stop_request(self, stream_id: int) -> None:
        """After our END_STREAM: if the client is still sending, tell it to stop.

        RST_STREAM(NO_ERROR) after a complete response is how HTTP/2 says "the rest of the
        request is not needed" (RFC 9113 §8.1); it spares us an oversized upload.
        """
        self._grpc.drop_request(stream_id)
        stream = self._h2.streams.get(stream_id)
        if stream is not None and not stream.closed:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _reset(self, stream_id: int, error_code: int) -> None:
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)


def _single_rpc_error(exc: BaseException) -> RpcError | None:
    """The RpcError inside an exception group made of nothing else (a handler's nursery)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, RpcError) else None


# --- the server --------------------------------------------------------------------------


class Server:
    """A gRPC server for ``methods`` (full path → descriptor) over mutual TLS.

    Run it with ``port = await nursery.start(server.serve, host, port)``; stop it
    gracefully with ``await server.drain(grace)``, or abruptly by cancelling ``serve``.
    ``on_call`` is invoked once per RPC, after it ended, with its :class:`CallRecord`.
    ``on_drain`` runs when a drain starts (e.g. to turn health to NOT_SERVING).
    """

    def __init__(
        self,
        methods: Mapping[str, Method],
        ssl_context: ssl.SSLContext,
        *,
        config: TransportConfig | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        on_drain: Callable[[], None] | None = None,
        identify: Callable[[bytes], Identity] = identity_from_der,
    ) -> None:
        for path in methods:
            if not (path.startswith("/") and path.count("/") == 2):
                raise ValueError(f"method path must look like /package.Service/Method: {path!r}")
        self.methods: Mapping[str, Method] = dict(methods)
        self._bidi_paths = frozenset(
            path for path, method in self.methods.items() if isinstance(method, _BIDI)
        )
        self.config = config or TransportConfig()
        self.stats = ServerStats()
        self._ssl_context = ssl_context
        self._on_call = on_call
        self._on_drain = on_drain
        #: ``identify`` per client certificate (DER): a short command's one connection per
        #: run does not parse the same certificate again; emptied by ``use_tls``.
        self.identities = IdentityCache(identify)
        #: Since the last ``use_tls``: which client certificates are no longer served.
        self._refused: Callable[[bytes], bool] | None = None
        self._addresses: list[str] = []
        self._port = 0
        self._draining = False
        self._connection_count = 0  # accepted, handshaking or serving
        self._connections: set[_Connection] = set()
        # In start order: the first is the oldest, dropped first when the cap is reached.
        self._handshakes: dict[trio.CancelScope, str] = {}
        self._per_address: dict[str, int] = {}
        self._handshaking: dict[str, int] = {}
        #: request bytes held per client (identity name), across its connections
        self.client_requests: dict[str, ClientRequests] = {}
        #: the output its connections' streams hold, per client (``CLIENT_OUTPUT_BUDGET``),
        #: dropped with its ``client_requests``
        self.client_output: dict[str, ClientOutput] = {}
        #: whose turn it is to start calls among a client's connections (``ClientStarts``)
        self.client_starts: dict[str, ClientStarts] = {}
        #: calls in flight per client (identity name), across its connections, and in all
        #: (``TransportConfig.max_streams_per_client``, ``max_streams``)
        self.client_streams: dict[str, int] = {}
        self.streams = 0
        #: held by the connection whose lost calls are being ended (``_wind_down``): one
        #: at a time, so that a client's 128 connections ending together still end at
        #: most MAX_CALLS_PER_TURN calls per turn of the loop, not that many each
        self.winding_down = trio.Lock()
        self.caps = admission_caps(self.config)
        self.connection_settings = ConnectionSettings(
            # Frames no larger than we accept ourselves, even if a client takes 16 MiB ones:
            # streams then interleave, and the send buffer stays near its bound.
            max_frame=self.config.max_frame_size,
            close_timeout=1.0,
            write_timeout=self.config.write_timeout,
            max_send_buffer=self.config.max_send_buffer,
        )
        self._accept_scope = trio.CancelScope()
        self._serve_scope: trio.CancelScope | None = None
        self._all_closed = trio.Event()
        self._stopped = trio.Event()
        self._started = False
        self._last_refusal_log = -math.inf

    def new_core(self) -> GRPCServerConnection:
        """A connection's sans-I/O core, our SETTINGS queued in it."""
        cfg = self.config
        core = GRPCServerConnection(
            max_message_length=cfg.max_request_bytes,
            max_concurrent_streams=cfg.max_concurrent_streams,
            initial_window_size=cfg.initial_window_size,
            connection_window_size=cfg.connection_window_size,
            max_frame_size=cfg.max_frame_size,
            max_header_list_size=cfg.max_header_list_size,
            streams_requests=self.streams_requests,
            # The flood budget refills by the loop's clock (bound once, as in _Connection).
            clock=trio.lowlevel.current_clock().current_time,
        )
        core.initiate_connection()
        return core

    def share_client_requests(self, identity: Identity | None, core: GRPCServerConnection) -> None:
        """Count ``core``'s request bytes with those of its client's other connections
        (``MAX_CLIENT_BUFFERED_REQUESTS``); ``release_client_requests`` when it ends."""
        name = "" if identity is None else identity.name
        shared = self.client_requests.get(name)
        if shared is None:
            shared = self.client_requests[name] = ClientRequests()
        core.share_client_requests(shared)

    def client_starts_of(self, identity: Identity | None) -> ClientStarts:
        """The turn to start calls shared by the connections of ``identity``'s client."""
        name = "" if identity is None else identity.name
        shared = self.client_starts.get(name)
        if shared is None:
            shared = self.client_starts[name] = ClientStarts()
        shared.connections += 1
        return shared

    def client_output_of(self, identity: Identity | None) -> ClientOutput:
        """The output budget shared by the connections of ``identity``'s client."""
        name = "" if identity is None else identity.name
        shared = self.client_output.get(name)
        if shared is None:
            shared = self.client_output[name] = ClientOutput()
        return shared

    def release_client_requests(
        self, identity: Identity | None, core: GRPCServerConnection
    ) -> None:
        core.release_client()
        name = "" if identity is None else identity.name
        shared = self.client_requests.get(name)
        if shared is not None and shared.connections <= 0:
            del self.client_requests[name]
            self.client_output.pop(name, None)

    def release_client_starts(self, identity: Identity | None, connection: object) -> None:
        """``connection`` of ``identity``'s client is over: out of its turns, and the
        turns dropped with the client's last connection."""
        name = "" if identity is None else identity.name
        shared = self.client_starts.get(name)
        if shared is None:
            return
        shared.give_up(connection)
        shared.connections -= 1
        if shared.connections <= 0:
            del self.client_starts[name]

    def uncount_streams(self, name: str, count: int) -> None:
        """``count`` calls of client ``name`` ended (or went with their connection)."""
        self.streams -= count
        left = self.client_streams[name] - count
        if left > 0:
            self.client_streams[name] = left
        else:
            del self.client_streams[name]

    def streams_requests(self, path: str) -> bool:
        """Whether the method at ``path`` takes a stream of requests (flow control follows
        its handler)."""
        return path in self._bidi_paths

    @property
    def port(self) -> int:
        """The port listened on (the one picked by the OS when 0 was asked)."""
        return self._port

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every listening socket."""
        return list(self._addresses)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def connection_count(self) -> int:
        """Connections accepted and not yet closed, handshakes included."""
        return self._connection_count

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 50051,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port``, report the port through ``task_status``, serve until
        drained or cancelled. Raises :class:`ListenError` before starting when the
        address cannot be listened on."""
        if self._started:
            raise RuntimeError("Server.serve can only run once")
        self._started = True
        self.caps = admission_caps(self.config)  # after whoever raised RLIMIT_NOFILE
        listeners = await _bind(host, port, self.config.listen_backlog)
        self._addresses = [_format_address(lst.socket.getsockname()) for lst in listeners]
        self._port = listeners[0].socket.getsockname()[1]
        log.info("listening on %s", ", ".join(self._addresses))
        try:
            async with trio.open_nursery() as nursery:
                self._serve_scope = nursery.cancel_scope
                nursery.start_soon(self._accept_all, listeners, nursery)
                task_status.started(self._port)
        finally:
            for listener in listeners:
                listener.socket.close()
            self._stopped.set()

    async def drain(self, grace: float = 5.0) -> None:
        """Stop gracefully: stop accepting, GOAWAY everyone, let calls in flight finish for
        up to ``grace`` seconds, cut the rest short (UNAVAILABLE), close, and return
        once ``serve`` has returned."""
        if not self._started:
            return
        if not self._draining:
            self._draining = True
            log.info("draining: finishing calls in flight for up to %ss", grace)
            if self._on_drain is not None:
                try:
                    self._on_drain()
                except Exception:
                    log.exception("on_drain hook failed")
            self._accept_scope.cancel()
            for scope in list(self._handshakes):
                scope.cancel()
            for conn in list(self._connections):
                conn.start_drain()
            self._check_all_closed()
        with trio.move_on_after(grace):
            await self._all_closed.wait()
        if self._connections:
            log.info("drain timeout: ending %d connection(s)", len(self._connections))
            for conn in list(self._connections):
                conn.abort_calls()
            with trio.move_on_after(2.0):
                await self._all_closed.wait()
        if not self._all_closed.is_set() and self._serve_scope is not None:
            self._serve_scope.cancel()
        await self._stopped.wait()

    def use_tls(
        self, ssl_context: ssl.SSLContext, *, refused: Callable[[bytes], bool] | None = None
    ) -> int:
        """Handshake with ``ssl_context`` from now on (a reload); close the open
        connections whose client certificate (DER) ``refused`` says is no longer served
        (revoked, or not from the CA any more), and refuse such certificates after the
        handshakes still under way with an older context. Returns how many connections
        were closed."""
        self._ssl_context = ssl_context
        self._refused = refused
        self.identities.clear()
        if refused is None:
            return 0
        closing = [conn for conn in self._connections if refused(conn.peer_cert)]
        for conn in closing:
            conn.close("its certificate is no longer accepted (revoked, or another CA)")
        return len(closing)

    def record(self, record: CallRecord) -> None:
        """Hand one finished call to ``on_call``; its failures are logged, never raised."""
        if self._on_call is None:
            return
        try:
            self._on_call(record)
        except Exception:
            log.exception("on_call hook failed")

    def _check_all_closed(self) -> None:
        if self._draining and self._connection_count == 0:
            self._all_closed.set()

    async def _accept_all(
        self, listeners: list[trio.SocketListener], nursery: trio.Nursery
    ) -> None:
        try:
            with self._accept_scope:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept_loop, listener, nursery)
        finally:
            # Closed as soon as we stop accepting: new clients are refused, not left
            # waiting in the backlog.
            for listener in listeners:
                listener.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                self._log_refusal(f"accept failed: {exc.strerror}")
                await trio.sleep(0.1)
                continue
            address, refusal = self._admit(stream)
            if refusal:
                # An answer, not a hang: the client sees the connection reset at once.
                self.stats.connections_refused += 1
                self._log_refusal(f"refusing connections: {refusal}")
                _refuse(stream)
                continue
            self._connection_count += 1
            self.stats.connections_accepted += 1
            nursery.start_soon(self._handle, stream, address)

    def _admit(self, stream: trio.SocketStream) -> tuple[str, str]:
        """(source address, why this new connection is refused or ""); when admitted it
        is counted in for its address. A full handshake table drops its oldest entry
        rather than refusing."""
        caps = self.caps
        try:
            address = str(stream.socket.getpeername()[0])
        except OSError:
            return "", "the peer is already gone"
        if self._connection_count >= caps.connections:
            return address, f"{caps.connections} connections open"
        if self._per_address.get(address, 0) >= caps.per_address:
            return address, f"{caps.per_address} connections open from {address}"
        if self._handshaking.get(address, 0) >= caps.handshakes_per_address:
            return address, f"{caps.handshakes_per_address} handshakes in progress from {address}"
        if len(self._handshakes) >= caps.handshakes:
            oldest = next(iter(self._handshakes))
            oldest.cancel()
            del self._handshakes[oldest]  # counted out now, so one drop makes one room
            self.stats.handshakes_evicted += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return address, ""

    def _handshake_timeout(self) -> float:
        """The configured timeout, shortened as the handshake table fills (down to
        ``_MIN_HANDSHAKE_TIMEOUT``): under a flood, idle handshakes give way sooner."""
        free = 1.0 - len(self._handshakes) / self.caps.handshakes
        return max(
            min(_MIN_HANDSHAKE_TIMEOUT, self.config.handshake_timeout),
            self.config.handshake_timeout * free,
        )

    def _log_refusal(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log >= 10.0:
            self._last_refusal_log = now
            log.warning("%s", message)

    async def _handle(self, tcp: trio.SocketStream, address: str) -> None:
        ssl_stream: TLSSocketStream | None = None
        graceful = False
        try:
            if self._draining:
                return
            try:
                peer = _format_address(tcp.socket.getpeername())
                # From here on the socket is ours, not trio.SocketStream's.
                raw = socket.socket(fileno=tcp.socket.detach())
            except OSError:
                return
            try:
                _set_keepalive(raw)
                handshake_context = self._ssl_context
                ssl_stream = TLSSocketStream(raw, handshake_context)
            except (OSError, ValueError) as exc:
                raw.close()
                log.info("cannot set up TLS with %s: %s", peer, exc)
                return
            cores: list[GRPCServerConnection] = []
            with trio.CancelScope() as handshake:
                handshake.deadline = trio.current_time() + self._handshake_timeout()
                self._handshakes[handshake] = address
                self._handshaking[address] = self._handshaking.get(address, 0) + 1
                try:
                    # The connection's core is made while the handshake waits for the
                    # client (its certificate's flight, usually): not after, where the
                    # client waits for our SETTINGS. At most one per handshake in flight.
                    await ssl_stream.do_handshake(
                        while_waiting=lambda: cores.append(self.new_core())
                    )
                except trio.BrokenResourceError as exc:
                    self.stats.handshakes_failed += 1
                    log.info("TLS handshake with %s failed: %s", peer, exc.__cause__ or exc)
                    return
                finally:
                    self._handshakes.pop(handshake, None)
                    _count_out(self._handshaking, address)
            if handshake.cancelled_caught:
                self.stats.handshakes_failed += 1
                if not self._draining:
                    log.info("TLS handshake with %s timed out", peer)
                return
            if self._draining:
                return
            if ssl_stream.selected_alpn_protocol() != ALPN_PROTOCOL:
                # gRPC is HTTP/2 only: a client that did not offer h2 (or offered no ALPN)
                # would only be confused by our frames. Closed before any byte of HTTP/2.
                self.stats.handshakes_failed += 1
                log.info("refusing %s: its TLS handshake did not choose ALPN h2", peer)
                return
            der = ssl_stream.getpeercert(binary_form=True) or b""
            refused = self._refused
            if handshake_context is not self._ssl_context and refused is not None and refused(der):
                # Handshaken with the context of before a reload: OpenSSL did not see
                # the CA or CRL that refuse it.
                log.info("refusing %s: its certificate is no longer accepted", peer)
                return
            identity, auth_error = self._identity_of(der, peer)
            if self._over_client_cap(identity):
                core = cores[0] if cores else self.new_core()
                await self._refuse_client(ssl_stream, core, identity, peer)
                return
            conn = _Connection(
                self, ssl_stream, identity, auth_error, peer, der, cores[0] if cores else None
            )
            self._connections.add(conn)
            try:
                await conn.run()
            except Exception:
                # A bug that one peer's bytes reach ends that peer's connection, never the
                # server: every other client goes on being served.
                self.stats.connections_failed += 1
                log.exception("connection from %s failed; closed", peer)
                return
            finally:
                self._connections.discard(conn)
                self.release_client_requests(identity, conn.grpc_core)
                self.release_client_starts(identity, conn)
                conn.uncount_calls()
            graceful = conn.drained
        finally:
            try:
                if ssl_stream is None:
                    await trio.aclose_forcefully(tcp)
                elif graceful:
                    await ssl_stream.aclose()  # close_notify, if it can go at once
                else:
                    ssl_stream.close()
            finally:
                self._connection_count -= 1
                _count_out(self._per_address, address)
                self._check_all_closed()

    def _over_client_cap(self, identity: Identity | None) -> bool:
        shared = self.client_requests.get("" if identity is None else identity.name)
        return shared is not None and shared.connections >= self.caps.per_client

    async def _refuse_client(
        self,
        stream: TLSSocketStream,
        core: GRPCServerConnection,
        identity: Identity | None,
        peer: str,
    ) -> None:
        """A client over its connection cap: GOAWAY (ENHANCE_YOUR_CALM) saying why, after
        our SETTINGS, then the connection is closed (by the caller)."""
        self.stats.connections_refused += 1
        name = "" if identity is None else identity.name
        reason = f"{self.caps.per_client} connections open for this client"
        self._log_refusal(f"refusing a connection from {peer} ({name}): {reason}")
        core.h2_connection.close_connection(
            error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, additional_data=reason.encode()
        )
        with trio.move_on_after(1.0), suppress(trio.BrokenResourceError, trio.TooSlowError):
            await stream.send_all(core.data_to_send())

    def _identity_of(self, der: bytes, peer: str) -> tuple[Identity | None, str]:
        if not der:  # only without CERT_REQUIRED, which our contexts never are
            return None, "no client certificate"
        try:
            return self.identities(der), ""
        except TrioWorkerError as exc:
            log.info("client %s has no usable identity: %s", peer, exc)
            return None, str(exc)
        except Exception:
            log.exception("cannot read the identity of client %s", peer)
            return None, "unusable client certificate"


def _count_out(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _refuse(stream: trio.SocketStream) -> None:
    """Close an accepted socket at once with a RST: no TLS, no TIME_WAIT kept for it."""
    with suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()
