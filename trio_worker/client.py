"""The trio client of a trio-worker server: gRPC over HTTP/2 over mutual TLS, ours end to end.

    async with connect("127.0.0.1:50051", ca=..., cert=..., key=...) as client:
        job = await client.start("sh", ["-c", "echo hi"])
        async for chunk in client.output(job.id):
            ...

It mirrors the server's transport (``_transport``): purerpc's sans-I/O ``GRPCConnection``
(HTTP/2 through h2, gRPC headers and trailers) driven by trio tasks we own, a reader and a
writer per connection, in a nursery owned by :func:`connect`. purerpc's own client I/O is
not used because it has the server's gaps: when the connection is lost its reader just
returns and every pending call waits forever, and it acknowledges received data as soon as
it arrives, so a slow consumer makes it buffer without bound. Here:

* Loss: the reader sees EOF, a reset, a TLS error or an HTTP/2 protocol error and fails every
  pending call and stream at once with :class:`ConnectionFailed`; GOAWAY fails the calls the
  server says it never processed (they are retried on a new connection, which is safe) and
  lets the rest finish. While calls are pending, a connection silent for
  ``_PING_AFTER`` seconds is pinged and declared lost if nothing comes back within
  ``_PING_TIMEOUT``: a peer that vanished without a FIN cannot hang a call either.
* Flow control: received DATA is acknowledged to h2 (which sends WINDOW_UPDATE) only while
  fewer than ``_ACK_BELOW`` bytes of complete messages wait for the consumer, and otherwise
  as the consumer takes them. The server can send at most one stream window
  (``_STREAM_WINDOW``) beyond what was acknowledged, so one stream never buffers more than
  ``_ACK_BELOW + _STREAM_WINDOW`` + one message (1.75 MiB for the server's 256 KiB output
  chunks), however slow its consumer.
* Writes are coalesced: calls queue frames in h2 and wake the writer, which sends whatever is
  queued in one ``send_all``; a unary call's headers, message and END_STREAM go in one write.

A connection that ends (the server's idle timeout, a restart) is replaced on the next call;
the first connection is made by :func:`connect` itself, so a wrong address or certificate
fails there, with a one-line :class:`ConnectionFailed` naming the address.
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from purerpc.grpclib.events import ResponseEnded, ResponseReceived, WindowUpdated

from ._convert import chunk_from_pb, job_from_pb
from ._error_codes import exception_from
from ._errors import (
    ConnectionFailed,
    InvalidRequest,
    RemoteError,
    TrioWorkerError,
)
from ._model import DEFAULT_STOP_GRACE, Isolation, JobInfo, JobState, Limits, OutputChunk
from ._net._failures import os_reason, parse_addr, tls_reason
from ._net._sockets import set_keepalive as _set_keepalive
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
from ._tls import ALPN_PROTOCOL, client_context
from ._wire._client import (
    BadResponse as _BadResponse,
)
from ._wire._client import (
    GoAwayReceived as _GoAway,
)
from ._wire._client import (
    GRPCClientConnection as _GRPCClientConnection,
)
from ._wire._client import (
    MessageReader as _MessageReader,
)
from ._wire._client import (
    MessageRefused as _MessageRefused,
)
from ._wire._client import (
    RequestHeaders as _Headers,
)
from ._wire._client import (
    ResponseData as _Data,
)
from ._wire._client import (
    StreamEnded as _Ended,
)
from ._wire._client import (
    StreamResetByPeer as _Reset,
)
from ._wire._client import (
    request_headers as _request_headers,
)
from ._wire._client import (
    with_timeout as _with_timeout,
)
from ._wire._h2conn import (
    MAX_UNSENT_CONTROL,
    PROTOCOL_ERRORS,
    PeerMisbehaved,
)
from ._wire._status import StatusCode

__all__ = [
    "Attachment",
    "ConnectionFailed",
    "OutputIterator",
    "RemoteError",
    "WorkerClient",
    "connect",
]

log = logging.getLogger("trio_worker.client")

_MESSAGE_PREFIX: Final = struct.Struct(">BI")
_FRAME_HEADER_SIZE: Final = 9

#: Received data is acknowledged at once while fewer bytes than this (complete messages)
#: wait for the consumer; beyond it, only as the consumer takes messages.
_ACK_BELOW: Final = 512 * 1024
#: Asked of each TLS read. OpenSSL returns at most one record (16 KiB) per read, but Python
#: allocates the whole size asked for first: 256 KiB (mmap'd, then trimmed) made decrypting
#: four times slower than asking for what a record can hold.
_RECEIVE_SIZE: Final = 16 * 1024
#: With calls pending, ping a connection that has been silent this long...
_PING_AFTER: Final = 10.0
#: ...and declare it lost if nothing at all arrives this long after the ping.
_PING_TIMEOUT: Final = 10.0
#: How long closing a connection may spend sending our GOAWAY.
_CLOSE_TIMEOUT: Final = 0.5
#: Attempts of a call the server said it never processed (GOAWAY) before giving up.
_ATTEMPTS: Final = 3
#: Stdin is sent in messages of at most this size (the server takes up to 4 MiB).
_STDIN_MESSAGE: Final = 256 * 1024


M = TypeVar("M")


# --- addresses and error messages --------------------------------------------------------


def _connect_reason(exc: OSError) -> str:
    """Why ``trio.open_tcp_stream`` failed: trio hides the per-address errors in __cause__."""
    if isinstance(exc, socket.gaierror):
        return os_reason(exc)
    cause = exc.__cause__
    if cause is not None and str(exc).startswith("all attempts to connect"):
        return os_reason(cause)
    return os_reason(exc)


def _tls_reason(exc: BaseException, *, handshake: bool = False) -> str:
    """Why the TLS layer failed, from trio's BrokenResourceError or the SSLError itself."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if cause is None:
        return str(exc) or type(exc).__name__
    return tls_reason(cause, handshake=handshake)


# --- one call ----------------------------------------------------------------------------


class _Unprocessed(Exception):
    """The server never processed this call (GOAWAY below its id, or it could not be sent
    on this connection any more): safe to send again on another connection."""


class _CallFailed(Exception):
    """The call ended with a non-OK gRPC status."""

    def __init__(self, code: int, message: str, details: bytes | None = None) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.details = details


class _Call(_MessageReader):
    """Per-stream state, shared by the connection's reader and the caller's task.

    Messages are reassembled from DATA payloads by the core's ``MessageReader``;
    ``unacked`` counts the flow-controlled bytes not yet handed back to h2, ``queued`` the
    bytes of complete messages the consumer has not taken.
    """

    __slots__ = (
        "conn",
        "done",
        "error",
        "lot",
        "peak",
        "status",
        "stream_id",
        "unacked",
    )

    def __init__(self, conn: _Connection, stream_id: int) -> None:
        super().__init__()
        self.conn = conn
        self.stream_id = stream_id
        self.unacked = 0
        self.peak = 0
        self.status: tuple[int, str, bytes | None] | None = None
        self.error: BaseException | None = None
        self.done = False  # nothing more will arrive
        self.lot = trio.lowlevel.ParkingLot()

    def finish(
        self,
        status: tuple[int, str, bytes | None] | None = None,
        error: BaseException | None = None,
    ) -> None:
        if self.done:
            return
        self.done = True
        self.status = status
        self.error = error
        self.lot.unpark_all()

    def outcome(self) -> None:
        """Raise what ended the call, unless it was OK."""
        if self.error is not None:
            raise self.error
        assert self.status is not None
        code, message, details = self.status
        if code != StatusCode.OK:
            raise _CallFailed(code, message, details)


# --- one connection ----------------------------------------------------------------------


class _Connection:
    """One HTTP/2 connection: a reader task, a writer task and a keepalive task."""

    def __init__(
        self, stream: trio.SSLStream[trio.SocketStream], addr: str, authority: str
    ) -> None:
        self._stream = stream
        self.addr = addr
        self._authority = authority
        self._grpc = _GRPCClientConnection()
        self._h2 = self._grpc.h2_connection
        self._calls: dict[int, _Call] = {}
        self._gate = self._grpc.gate
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._flushed_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()  # senders waiting for window
        self._capacity_lot = trio.lowlevel.ParkingLot()  # calls waiting for a stream slot
        self._writing = False
        self._done = trio.Event()
        self.dead = False  # nothing can be sent or received any more
        self.goaway = False  # no new streams on this connection
        self._closing = False
        self._last_received = trio.current_time()
        self._token = trio.lowlevel.current_trio_token()
        self._headers_cache: dict[str, _Headers] = {}
        self.finished = trio.Event()  # run() has returned: the socket is closed

    @property
    def accepting(self) -> bool:
        """True while new calls may be opened on this connection."""
        return not (self.dead or self.goaway or self._closing)

    # -- lifecycle --

    async def handshake(self) -> None:
        """Send our preface and SETTINGS, then read until the server's SETTINGS are in.

        In TLS 1.3 the server checks our certificate after our side of the handshake has
        finished, so a refusal only shows on this first read: waiting for it here makes
        ``connect`` report it instead of the first call.
        """
        self._grpc.initiate_connection()
        try:
            await self._stream.send_all(self._h2.data_to_send())
            while not self._grpc.settings_received:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    raise ConnectionFailed(
                        f"TLS handshake with {self.addr} failed: the server closed the "
                        "connection (did it refuse our certificate?)"
                    )
                self._last_received = trio.current_time()
                self._feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = _tls_reason(exc, handshake=True)
            if "our certificate" not in reason:
                # The server's close can overtake its alert: say what it most likely meant.
                reason += " (did it refuse our certificate?)"
            raise ConnectionFailed(f"TLS handshake with {self.addr} failed: {reason}") from exc
        except PROTOCOL_ERRORS as exc:
            raise ConnectionFailed(f"{self.addr} does not speak HTTP/2 as expected: {exc}") from exc
        self._wake_writer()

    async def run(self) -> None:
        """Serve the connection until it is lost, closed, or drained by the server."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                await self._done.wait()
                if not self.dead:
                    with trio.move_on_after(_CLOSE_TIMEOUT):
                        await self._flushed()
                nursery.cancel_scope.cancel()
        finally:
            self._lost("the connection was closed")
            await trio.aclose_forcefully(self._stream)
            self.finished.set()

    def close(self) -> None:
        """Close gracefully: GOAWAY, then close; pending calls fail with ConnectionFailed."""
        if self.dead or self._closing:
            return
        self._closing = True
        for call in list(self._calls.values()):
            self._forget(call, ConnectionFailed(f"the connection to {self.addr} was closed"))
        with suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        self._wake_writer()
        self._done.set()

    def _lost(self, reason: str) -> None:
        """The connection is unusable: fail every pending call at once."""
        if self.dead:
            return
        self.dead = True
        calls = list(self._calls.values())
        self._calls.clear()
        for call in calls:
            call.finish(error=ConnectionFailed(f"lost the connection to {self.addr}: {reason}"))
        if calls:
            log.debug(
                "connection to %s lost with %d call(s) pending: %s", self.addr, len(calls), reason
            )
        self._window_lot.unpark_all()
        self._capacity_lot.unpark_all()
        self._flushed_lot.unpark_all()
        self._done.set()

    async def _keepalive(self) -> None:
        """Ping a silent connection while calls wait on it; no answer means it is gone."""
        while True:
            await trio.sleep_until(self._last_received + _PING_AFTER)
            now = trio.current_time()
            if not self._calls or now < self._last_received + _PING_AFTER:
                if not self._calls:
                    await trio.sleep(_PING_AFTER)
                continue
            with suppress(h2.exceptions.ProtocolError):
                self._h2.ping(b"trioping")
            self._wake_writer()
            deadline = now + _PING_TIMEOUT
            while self._last_received < now:
                await trio.sleep_until(deadline)
                if self._last_received >= now:
                    break
                if trio.current_time() - deadline > 0.5:
                    # We overslept: our own loop was blocked, and the answer may be waiting
                    # unread. Give the reader a moment before blaming the server.
                    deadline = trio.current_time() + 0.5
                    continue
                silent = math.ceil(trio.current_time() - self._last_received)
                self._lost(f"no answer from the server for {silent} s")
                return

    # -- reading --

    async def _reader(self) -> None:
        stream = self._stream
        while True:
            try:
                data = await stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._lost(_tls_reason(exc))
                return
            if not data:
                self._lost("the server closed the connection")
                return
            self._last_received = trio.current_time()
            try:
                self._feed(data)
            except PROTOCOL_ERRORS as exc:
                if isinstance(exc, PeerMisbehaved):
                    self._grpc.calm_down(exc)
                # h2 (or calm_down) has queued a GOAWAY: tell the server why, briefly.
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    await self._flushed()
                self._lost(f"HTTP/2 protocol error: {exc}")
                return
            self._wake_writer_if_output()
            if self._gate.control_owed > MAX_UNSENT_CONTROL:
                # A server flooding PINGs or SETTINGS: read on once the replies are out.
                await self._flushed()
                self._gate.control_owed = 0

    def _feed(self, data: bytes | bytearray) -> None:
        """Hand h2 whole frames only, checked against our bounds (``FrameGate``)."""
        for event in self._grpc.receive_frames(data):
            self._on_event(event)

    def _on_event(self, event: Any) -> None:
        kind = type(event)
        if kind is _Data:
            self._on_data(event)
        elif kind is ResponseReceived:
            if event.message_encoding not in (None, "identity"):
                call = self._calls.get(event.stream_id)
                if call is not None:
                    reason = f"the server used grpc-encoding {event.message_encoding}"
                    self._fail_stream(call, _CallFailed(StatusCode.INTERNAL, reason))
        elif kind is ResponseEnded:
            call = self._calls.get(event.stream_id)
            if call is not None:
                status = event.status
                code, message = int(status.int_value), str(status.status_message)
                self._end(call, status=(code, message, event.details))
        elif kind is _Ended:
            call = self._calls.get(event.stream_id)
            if call is not None:  # END_STREAM without trailers
                self._end(call, error=_CallFailed(StatusCode.INTERNAL, "the server sent no status"))
        elif kind is WindowUpdated:
            self._window_lot.unpark_all()
            self._capacity_lot.unpark_all()
        elif kind is _Reset:
            self._on_reset(event)
        elif kind is _GoAway:
            self._on_goaway(event)
        elif kind is _BadResponse:
            call = self._calls.get(event.stream_id)
            if call is not None:
                self._fail_stream(call, _CallFailed(StatusCode.INTERNAL, event.reason))

    def _on_data(self, event: _Data) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:  # cancelled by us: give the connection window back
            if event.flow:
                self._h2.acknowledge_received_data(event.flow, event.stream_id)
            return
        call.unacked += event.flow
        try:
            call.feed(event.data)
        except _MessageRefused as exc:
            self._fail_stream(call, _CallFailed(exc.code, exc.reason))
            return
        if call.queued <= _ACK_BELOW:
            self._ack(call)
        if call.buffered > call.peak:
            call.peak = call.buffered
        if call.messages:
            call.lot.unpark_all()

    def _on_reset(self, event: _Reset) -> None:
        call = self._calls.get(event.stream_id)
        if call is None:
            return
        code = event.error_code
        if code == h2.errors.ErrorCodes.REFUSED_STREAM:
            failure = _CallFailed(
                StatusCode.RESOURCE_EXHAUSTED, "the server refused the call (too many calls)"
            )
        elif code == h2.errors.ErrorCodes.CANCEL:
            failure = _CallFailed(StatusCode.CANCELLED, "the server cancelled the call")
        else:
            try:
                name = h2.errors.ErrorCodes(code).name
            except ValueError:
                name = str(code)
            failure = _CallFailed(StatusCode.INTERNAL, f"the server reset the call ({name})")
        self._end(call, error=failure)

    def _on_goaway(self, event: _GoAway) -> None:
        """No new streams here; those the server never saw may be sent again elsewhere."""
        self.goaway = True
        if event.error_code:
            log.info("%s sent GOAWAY with error %s", self.addr, event.error_code)
        for call in list(self._calls.values()):
            if call.stream_id > event.last_stream_id:
                self._end(call, error=_Unprocessed())
        self._capacity_lot.unpark_all()
        if not self._calls:
            self._done.set()

    # -- calls --

    def _headers(self, path: str, timeout: float | None) -> _Headers:
        base = self._headers_cache.get(path)
        if base is None:
            base = self._headers_cache[path] = _request_headers(path, self._authority)
        return base if timeout is None else _with_timeout(base, timeout)

    async def open_call(
        self, path: str, payload: bytes, deadline: float, *, end_stream: bool = True
    ) -> _Call:
        """Open a stream and send the request (headers, message and END_STREAM, in one
        write when the window allows; without ``end_stream`` more messages may follow).
        Raises _Unprocessed if this connection cannot take new calls any more."""
        h2c = self._h2
        while True:
            if not self.accepting:
                raise _Unprocessed()
            if h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams:
                break
            await self._capacity_lot.park()
        stream_id = int(h2c.get_next_available_stream_id())
        timeout = None if deadline == math.inf else deadline - trio.current_time()
        h2c.send_headers(stream_id, self._headers(path, timeout), end_stream=False)
        call = _Call(self, stream_id)
        self._calls[stream_id] = call
        try:
            await self._send_request(
                call, _MESSAGE_PREFIX.pack(0, len(payload)) + payload, end_stream=end_stream
            )
        except BaseException:
            self.cancel(call)
            raise
        return call

    async def send_message(self, call: _Call, payload: bytes) -> None:
        """One more request message on a call opened without ``end_stream``, waiting for
        flow-control window: a server that does not take requests holds us back here."""
        await self._send_request(
            call, _MESSAGE_PREFIX.pack(0, len(payload)) + payload, end_stream=False
        )

    async def _send_request(self, call: _Call, data: bytes, *, end_stream: bool = True) -> None:
        h2c = self._h2
        view = memoryview(data)
        while view:
            if call.done or self.dead:
                return  # answered (or failed) before we finished sending
            try:
                window = int(h2c.local_flow_control_window(call.stream_id))
            except h2.exceptions.StreamClosedError:
                return
            n = min(len(view), window, int(h2c.max_outbound_frame_size))
            if n > 0:
                last = n == len(view)
                h2c.send_data(
                    call.stream_id,
                    data if last and len(view) == len(data) else bytes(view[:n]),
                    end_stream=last and end_stream,
                )
                view = view[n:]
                self._wake_writer()
            if view:
                await self._window_lot.park()

    async def wait(self, call: _Call) -> None:
        while not call.done:
            await call.lot.park()

    async def next_message(self, call: _Call) -> bytes | memoryview | None:
        """The call's next message, None after the last one; raises what ended it."""
        while True:
            if call.messages:
                message = call.take()
                if call.unacked and call.queued <= _ACK_BELOW and not self.dead:
                    self._ack(call)
                    self._wake_writer_if_output()
                return message
            if call.done:
                call.outcome()
                return None
            await call.lot.park()

    def _ack(self, call: _Call) -> None:
        """Hand the call's received bytes back to h2, which sends WINDOW_UPDATE in batches."""
        if call.unacked and not self.dead:
            amount, call.unacked = call.unacked, 0
            self._h2.acknowledge_received_data(amount, call.stream_id)

    def _end(
        self,
        call: _Call,
        *,
        status: tuple[int, str, bytes | None] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The server is done with this stream: deliver the outcome, free the slot."""
        self._calls.pop(call.stream_id, None)
        # Nothing more can arrive on it: no reason to hold back its window.
        self._ack(call)
        call.finish(status, error)
        self._capacity_lot.unpark_all()
        self._window_lot.unpark_all()  # its request may be waiting for window: stop it
        if self.goaway and not self._calls:
            self._done.set()

    def _fail_stream(self, call: _Call, error: BaseException) -> None:
        """End a call the server has not ended (a response we cannot read): reset it."""
        self._reset(call.stream_id, h2.errors.ErrorCodes.CANCEL)
        self._end(call, error=error)
        call.clear()
        self._wake_writer()

    def _forget(self, call: _Call, error: BaseException) -> None:
        if call.done:
            return
        self._fail_stream(call, error)

    def cancel(self, call: _Call) -> None:
        """The caller gave up on ``call`` (cancelled, closed, abandoned): reset the stream."""
        if not call.done:
            if self.dead:
                call.finish(error=ConnectionFailed(f"the connection to {self.addr} was closed"))
                return
            self._fail_stream(call, _CallFailed(StatusCode.CANCELLED, "cancelled by the client"))
        else:
            call.messages.clear()
            call.queued = 0

    def cancel_soon(self, call: _Call) -> None:
        """``cancel`` from anywhere (a finalizer): run it from the trio loop."""
        if call.done:
            return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.cancel, call)

    def _reset(self, stream_id: int, code: int) -> None:
        if self.dead:
            return
        with suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)

    # -- writing --

    def _wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    def _wake_writer_if_output(self) -> None:
        if self._h2.outbound_buffered:
            self._writer_lot.unpark_all()

    async def _flushed(self) -> None:
        while (self._h2.outbound_buffered or self._writing) and not self.dead:
            self._wake_writer()
            await self._flushed_lot.park()

    async def _writer(self) -> None:
        """Send whatever h2 has queued, in one write per wake-up."""
        h2c = self._h2
        stream = self._stream
        while True:
            data = h2c.data_to_send()
            if not data:
                self._flushed_lot.unpark_all()
                await self._writer_lot.park()
                continue
            self._writing = True
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._lost(_tls_reason(exc))
                return
            finally:
                self._writing = False


# --- dialing -----------------------------------------------------------------------------


class _Dialer:
    """Everything needed to open a connection to one server, again and again."""

    def __init__(
        self,
        addr: str,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None,
        timeout: float,
    ) -> None:
        self.addr = addr
        self.host, self.port = parse_addr(addr)
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname or self.host
        self._timeout = timeout
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._authority = f"{host}:{self.port}"

    async def dial(self) -> _Connection:
        """TCP, TLS handshake, HTTP/2 settings exchange, all within ``timeout``."""
        addr, timeout = self.addr, self._timeout
        deadline = trio.current_time() + timeout
        tcp: trio.SocketStream | None = None
        with trio.move_on_at(deadline):
            try:
                tcp = await trio.open_tcp_stream(self.host, self.port)
            except (OSError, UnicodeError) as exc:
                reason = _connect_reason(exc) if isinstance(exc, OSError) else str(exc)
                raise ConnectionFailed(f"cannot connect to {addr}: {reason}") from exc
        if tcp is None:
            raise ConnectionFailed(f"cannot connect to {addr}: no answer within {timeout:g} s")
        ssl_stream = trio.SSLStream(tcp, self._ssl_context, server_hostname=self._server_hostname)
        try:
            _set_keepalive(tcp.socket)
            handshaken = False
            with trio.move_on_at(deadline):
                try:
                    await ssl_stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise ConnectionFailed(
                        f"TLS handshake with {addr} failed: {_tls_reason(exc, handshake=True)}"
                    ) from exc
                handshaken = True
            if not handshaken:
                raise ConnectionFailed(f"TLS handshake with {addr} timed out after {timeout:g} s")
            if ssl_stream.selected_alpn_protocol() != ALPN_PROTOCOL:
                raise ConnectionFailed(
                    f"TLS handshake with {addr} failed: the server does not offer HTTP/2 "
                    "(ALPN h2); is it a trio-worker server?"
                )
            conn = _Connection(ssl_stream, addr, self._authority)
            ready = False
            with trio.move_on_at(deadline):
                await conn.handshake()
                ready = True
            if not ready:
                raise ConnectionFailed(f"{addr} sent no HTTP/2 settings within {timeout:g} s")
        except BaseException:
            await trio.aclose_forcefully(ssl_stream)
            raise
        return conn


# --- the client ----------------------------------------------------------------------------


class WorkerClient:
    """A connection to one trio-worker server; get one from :func:`connect`.

    Every method may raise :class:`ConnectionFailed` (server unreachable, TLS refused,
    connection lost mid-call) besides the errors named on it; statuses the client has no
    class for arrive as :class:`RemoteError`. A call follows the caller's trio deadline,
    as trio's own functions do (``with trio.fail_after(5): await client.status(id)``); it
    is sent to the server as grpc-timeout. Calls may run concurrently from any number of
    tasks.
    """

    def __init__(self, dialer: _Dialer, nursery: trio.Nursery) -> None:
        self._dialer = dialer
        self._nursery = nursery
        self._conn: _Connection | None = None
        self._connections: set[_Connection] = set()
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

    async def remove(
        self,
        job_id: str,
        *,
        force: bool = False,
    ) -> JobInfo:
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

    def output(
        self,
        job_id: str,
        *,
        offset: int = 0,
        follow: bool = True,
    ) -> OutputIterator:
        """The job's output from byte ``offset`` of its combined log; with ``follow``, live
        until the job ends. Iterate it with ``async for``; ``aclose()`` it (or use it as
        ``async with``) to stop early. Raises JobNotFound when iterated."""
        return OutputIterator(self, output_request(job_id, offset, follow))

    def attach(self, job_id: str, *, offset: int = 0) -> Attachment:
        """Use a job interactively over one bidirectional stream: its output from byte
        ``offset``, followed live, and (for a job started with stdin) its input.

        Use it as ``async with client.attach(job_id) as session``: ``async for chunk in
        session`` gets the output until the job ends, after which ``session.ended`` is its
        final state; ``write``, ``close_stdin`` and ``resize`` send input meanwhile, from
        any task. Leaving the block detaches: the job goes on running."""
        return Attachment(self, attach_open(job_id, offset))

    # -- plumbing --

    async def _connection(self) -> _Connection:
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

    async def _run(self, conn: _Connection) -> None:
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    async def _open(self, method: str, payload: bytes, deadline: float) -> _Call:
        """Open a call, sending it again on a new connection while the server says it
        never processed it."""
        for _ in range(_ATTEMPTS):
            conn = await self._connection()
            try:
                return await conn.open_call(method_path(method), payload, deadline)
            except _Unprocessed:
                continue
        raise ConnectionFailed(f"{self.address} keeps closing connections before taking calls")

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
            except _Unprocessed:
                continue
            except _CallFailed as exc:
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
        raise ConnectionFailed(f"{self.address} keeps closing connections before taking calls")

    def _adopt(self, conn: _Connection) -> None:
        self._conn = conn
        self._connections.add(conn)
        self._nursery.start_soon(self._run, conn)

    async def _aclose(self) -> None:
        """Send GOAWAY on every connection and give the writers a moment to flush it."""
        self._closed = True
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        with trio.move_on_after(_CLOSE_TIMEOUT):
            for conn in connections:
                await conn.finished.wait()


async def _deadline_passes(deadline: float) -> None:
    """The server said our deadline passed: let the caller's own clock say it (trio's
    Cancelled, at most the clock skew of the two later), as for any other deadline."""
    if deadline != math.inf:
        await trio.sleep_until(deadline)


class OutputIterator:
    """The chunks of a job's output, as an async iterator: ``async for chunk in it``.

    The call starts on the first ``__anext__``. Up to ``_ACK_BELOW + _STREAM_WINDOW`` bytes
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
        self._call: _Call | None = None
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
        except _CallFailed as exc:
            self._finished = True
            if exc.code == StatusCode.DEADLINE_EXCEEDED:
                await _deadline_passes(self._deadline)
            raise exception_from(exc.code, exc.message, exc.details, self._job_id) from None
        except TrioWorkerError:
            self._finished = True
            raise
        except _Unprocessed:  # only a confused server would do this after answering
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
            if call.done and isinstance(call.error, _Unprocessed):
                continue
            self._call = call
            return
        raise ConnectionFailed(f"{client.address} keeps closing connections before taking calls")

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


class Attachment:
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
        self._call: _Call | None = None
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
            except _Unprocessed:
                continue
            return self
        raise ConnectionFailed(f"{client.address} keeps closing connections before taking calls")

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
            except _CallFailed as exc:
                self._finished = True
                raise exception_from(exc.code, exc.message, exc.details, self._job_id) from None
            except _Unprocessed:
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
        with request_field("terminal_size"):
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
                    with suppress(_Unprocessed):
                        try:
                            call.outcome()
                        except _CallFailed as exc:
                            raise exception_from(
                                exc.code, exc.message, exc.details, self._job_id
                            ) from None
                await trio.lowlevel.checkpoint()
                return
            await call.conn.send_message(call, payload)

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
    dialer = _Dialer(addr, context, server_hostname, timeout)
    # Dialed outside the nursery, so that its errors do not come out in an ExceptionGroup.
    first = await dialer.dial()
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        client = WorkerClient(dialer, nursery)
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
