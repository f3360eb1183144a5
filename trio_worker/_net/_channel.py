"""The client's side of a connection: dial, calls, and the responses they wait for.

    Dialer.dial() → TCP → TLSSocketStream (client side) → ClientConnection (the shared
    driver, ``_connection``) ⇄ the client's sans-I/O core (``_wire/_client``)

``trio_worker.client`` (the ``WorkerClient`` API) opens calls here and reads their
messages. purerpc's own client I/O is not used because it has the server's gaps: when the
connection is lost its reader just returns and every pending call waits forever, and it
acknowledges received data as soon as it arrives, so a slow consumer makes it buffer
without bound. Here:

* Loss: the driver sees EOF, a reset, a TLS error or an HTTP/2 protocol error and fails
  every pending call and stream at once with :class:`ConnectionFailed`; GOAWAY fails the
  calls the server says it never processed (:class:`Unprocessed`: they are retried on a
  new connection, which is safe) and lets the rest finish. While calls are pending, a
  connection silent for ``PING_AFTER`` seconds is pinged and declared lost if nothing comes
  back within ``PING_TIMEOUT``: a peer that vanished without a FIN cannot hang a call.
* Flow control (``_wire/_window``, the server's design too): received DATA goes back to
  the connection's window at once, and to the stream's (h2 sends WINDOW_UPDATE) only while
  at most ``ACK_BELOW`` bytes of its messages wait for the consumer, and otherwise as the
  consumer takes them. The server can send at most one stream window
  (``STREAM_WINDOW``) beyond what was acknowledged, so one stream never buffers more than
  ``ACK_BELOW + STREAM_WINDOW`` + one message, however slow its consumer.
* Writes are coalesced: a call queues its headers, message and END_STREAM and wakes the
  writer, which sends what every task running meanwhile queued in one socket write.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from contextlib import suppress
from typing import Any, Final

import h2.errors
import h2.exceptions
import trio
from purerpc.grpclib.events import WindowUpdated

from .._errors import ConnectionFailed
from .._tls import ALPN_PROTOCOL
from .._wire._calls import (
    PING_AFTER,
    PING_TIMEOUT,
    CallFailed,
    CallTable,
    ClientCall,
    Unprocessed,
)
from .._wire._client import (
    MAX_FRAME,
    GoAwayReceived,
    GRPCClientConnection,
    RequestHeaders,
    request_headers,
    with_timeout,
)
from .._wire._h2conn import PROTOCOL_ERRORS
from .._wire._status import StatusCode
from ._connection import (
    Connection,
    ConnectionSettings,
    WriteCounts,
)
from ._failures import handshake_failed, left_alert, not_h2, os_reason, parse_addr
from ._sockets import RECEIVE_SIZE, set_keepalive
from ._tlsstream import TLSSocketStream

__all__ = [
    "Call",
    "ClientConnection",
    "Dialer",
]

log = logging.getLogger("trio_worker.client")

#: How long closing a connection may spend sending our GOAWAY.
CLOSE_TIMEOUT: Final = 0.5


# --- addresses and error messages --------------------------------------------------------


def _connect_reason(exc: OSError) -> str:
    """Why ``trio.open_tcp_stream`` failed: trio hides the per-address errors in __cause__."""
    if isinstance(exc, socket.gaierror):
        return os_reason(exc)
    cause = exc.__cause__
    if cause is not None and str(exc).startswith("all attempts to connect"):
        return os_reason(cause)
    return os_reason(exc)


# --- one call ----------------------------------------------------------------------------


class Call(ClientCall):
    """A call's state (``_wire._calls``), shared by the connection's reader and the
    caller's task, who waits in ``lot``."""

    __slots__ = ("conn", "lot", "peak")

    def __init__(self, conn: ClientConnection, stream_id: int) -> None:
        super().__init__(stream_id)
        self.conn = conn
        #: the most bytes buffered ahead of the consumer
        self.peak = 0
        self.lot = trio.lowlevel.ParkingLot()

    def is_done(self) -> bool:
        return self.done

    def finish(
        self,
        status: tuple[int, str, bytes | None] | None = None,
        error: BaseException | None = None,
    ) -> bool:
        if not super().finish(status, error):
            return False
        self.lot.unpark_all()
        return True


# --- one connection ----------------------------------------------------------------------


class ClientConnection(Connection):
    """One HTTP/2 connection to the server: the shared driver (reader, writer, keepalive),
    and the calls on it."""

    def __init__(self, stream: TLSSocketStream, addr: str, authority: str) -> None:
        grpc = GRPCClientConnection(clock=trio.current_time)  # refills the flood budget
        settings = ConnectionSettings(
            max_frame=MAX_FRAME,
            close_timeout=CLOSE_TIMEOUT,
            ping_after=PING_AFTER,
            ping_timeout=PING_TIMEOUT,
        )
        super().__init__(
            stream, grpc, peer=addr, peer_noun="the server", stats=WriteCounts(), settings=settings
        )
        self.addr = addr
        self._authority = authority
        self._grpc = grpc
        self._table = CallTable[Call](self._h2)
        self._calls = self._table.calls
        self._capacity_lot = trio.lowlevel.ParkingLot()  # calls waiting for a stream slot
        self._closing = False
        self._token = trio.lowlevel.current_trio_token()
        self._headers_cache: dict[str, RequestHeaders] = {}
        self.finished = trio.Event()  # run() has returned: the socket is closed

    @property
    def goaway(self) -> bool:
        """The server sent GOAWAY: no new streams on this connection."""
        return self._table.goaway

    @property
    def goaway_reason(self) -> str:
        """Why the server sent GOAWAY, in its words, unless it was a graceful one."""
        return self._table.goaway_reason

    @property
    def accepting(self) -> bool:
        """True while new calls may be opened on this connection."""
        return not (self.dead or self.goaway or self._closing or self._done.is_set())

    # -- lifecycle --

    async def handshake(self) -> None:
        """Send our preface and SETTINGS, then read until the server's SETTINGS are in.

        In TLS 1.3 the server checks our certificate after our side of the handshake has
        finished, so a refusal only shows on this first read: waiting for it here makes
        ``connect`` report it instead of the first call.
        """
        self._grpc.initiate_connection()
        stream = self._stream
        try:
            try:
                await stream.send_all(self._h2.data_to_send())
            except trio.BrokenResourceError as exc:
                # Closed before our first bytes, as a server refusing our certificate does.
                cause = left_alert(stream.socket) or exc.__cause__
                raise handshake_failed(self.addr, cause, ours_sent=True) from exc
            while not self._grpc.settings_received:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    raise handshake_failed(self.addr, None, ours_sent=True)
                self._receive(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise handshake_failed(self.addr, exc.__cause__, ours_sent=True) from exc
        except PROTOCOL_ERRORS as exc:
            raise ConnectionFailed(f"{self.addr} does not speak HTTP/2 as expected: {exc}") from exc

    async def run(self) -> bool:
        """Serve the connection until it is lost, closed, or drained by the server."""
        try:
            return await super().run()
        finally:
            self._stream.close()
            self.finished.set()

    def close(self) -> None:
        """Close gracefully: GOAWAY, then close; pending calls fail with ConnectionFailed."""
        if self.dead or self._closing or self._done.is_set():
            return  # (already ending: a GOAWAY of its own may be on its way)
        self._closing = True
        for call in list(self._calls.values()):
            self._forget(call, ConnectionFailed(f"the connection to {self.addr} was closed"))
        with suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection()
        self._wake_writer()
        self._done.set()

    def _end_calls(self, reason: str) -> None:
        """Fail every pending call at once."""
        failed = self._table.end_all(
            lambda: ConnectionFailed(f"lost the connection to {self.addr}: {reason}")
        )
        if failed:
            log.debug(
                "connection to %s lost with %d call(s) pending: %s", self.addr, failed, reason
            )
        self._capacity_lot.unpark_all()

    def _has_calls(self) -> bool:
        return bool(self._calls)

    # -- reading --

    def _on_event(self, event: Any) -> None:
        call = self._table.on_event(event)
        if call is not None:
            if call.done:
                self._call_ended()
            else:
                if call.buffered > call.peak:
                    call.peak = call.buffered
                if call.messages:
                    call.lot.unpark_all()
        elif type(event) is WindowUpdated:
            self._window_lot.unpark_all()
            self._capacity_lot.unpark_all()
        elif type(event) is GoAwayReceived:
            # No new streams here; those the server never saw (ended Unprocessed) are sent
            # again elsewhere.
            if event.error_code:
                log.info("%s sent GOAWAY with error %s", self.addr, event.error_code)
            self._call_ended()

    # -- calls --

    def _headers(self, path: str, timeout: float | None) -> RequestHeaders:
        base = self._headers_cache.get(path)
        if base is None:
            base = self._headers_cache[path] = request_headers(path, self._authority)
        return base if timeout is None else with_timeout(base, timeout)

    async def open_call(
        self, path: str, payload: bytes, deadline: float, *, end_stream: bool = True
    ) -> Call:
        """Open a stream and send the request (headers, message and END_STREAM, in one
        write when the window allows; without ``end_stream`` more messages may follow).
        Raises Unprocessed if this connection cannot take new calls any more."""
        h2c = self._h2
        while True:
            if not self.accepting:
                raise Unprocessed()
            if h2c.open_outbound_streams < h2c.remote_settings.max_concurrent_streams:
                break
            await self._capacity_lot.park()
        stream_id = int(h2c.get_next_available_stream_id())
        timeout = None if deadline == math.inf else deadline - trio.current_time()
        h2c.send_headers(stream_id, self._headers(path, timeout), end_stream=False)
        call = Call(self, stream_id)
        self._table.add(call)
        try:
            await self.send_message(
                stream_id, payload, end_stream=end_stream, abandoned=call.is_done
            )
        except BaseException:
            self.cancel(call)
            raise
        # The writer sends it once the tasks running now have queued theirs: calls made
        # together leave in one socket write (pushing each from its caller's task cost a
        # third of the rate with 8 callers on one connection).
        self._wake_writer()
        return call

    async def send_request(self, call: Call, payload: bytes) -> None:
        """One more request message on a call opened without ``end_stream``, waiting for
        flow-control window: a server that does not take requests holds us back here."""
        await self.send_message(call.stream_id, payload, abandoned=call.is_done)
        self._wake_writer()

    async def wait(self, call: Call) -> None:
        while not call.done:
            await call.lot.park()

    async def next_message(self, call: Call) -> bytes | memoryview | None:
        """The call's next message, None after the last one; raises what ended it."""
        while (got := self._table.take(call)) is None:
            await call.lot.park()
        message, released = got
        if released:
            self._push()
        return message

    def _call_ended(self) -> None:
        """A call is over: its slot is free, its request (if still being sent) stops."""
        self._capacity_lot.unpark_all()
        self._window_lot.unpark_all()
        if self.goaway and not self._calls:
            self._done.set()

    def _fail_stream(self, call: Call, error: BaseException) -> None:
        """End a call the server has not ended (the caller gave up, the connection
        closes): reset it."""
        self._table.fail(call, error)
        self._call_ended()
        self._wake_writer()

    def _forget(self, call: Call, error: BaseException) -> None:
        if call.done:
            return
        self._fail_stream(call, error)

    def cancel(self, call: Call) -> None:
        """The caller gave up on ``call`` (cancelled, closed, abandoned): reset the stream."""
        if not call.done:
            if self.dead:
                call.finish(error=ConnectionFailed(f"the connection to {self.addr} was closed"))
                return
            self._fail_stream(call, CallFailed(StatusCode.CANCELLED, "cancelled by the client"))
        else:
            call.messages.clear()
            call.queued = 0

    def cancel_soon(self, call: Call) -> None:
        """``cancel`` from anywhere (a finalizer): run it from the trio loop."""
        if call.done:
            return
        with suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.cancel, call)

    # -- writing --


# --- dialing -----------------------------------------------------------------------------


class Dialer:
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

    async def dial(self) -> ClientConnection:
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
        try:
            # From here on the socket is ours, not trio.SocketStream's.
            raw = socket.socket(fileno=tcp.socket.detach())
        except OSError as exc:
            await trio.aclose_forcefully(tcp)
            raise ConnectionFailed(f"cannot connect to {addr}: {os_reason(exc)}") from exc
        try:
            set_keepalive(raw)
            stream = TLSSocketStream(raw, self._ssl_context, server_hostname=self._server_hostname)
        except (OSError, ValueError) as exc:
            raw.close()
            raise ConnectionFailed(f"cannot set up TLS with {addr}: {exc}") from exc
        try:
            handshaken = False
            with trio.move_on_at(deadline):
                try:
                    await stream.do_handshake()
                except trio.BrokenResourceError as exc:
                    raise handshake_failed(addr, exc.__cause__) from exc
                handshaken = True
            if not handshaken:
                raise ConnectionFailed(f"TLS handshake with {addr} timed out after {timeout:g} s")
            if stream.selected_alpn_protocol() != ALPN_PROTOCOL:
                raise not_h2(addr)
            conn = ClientConnection(stream, addr, self._authority)
            ready = False
            with trio.move_on_at(deadline):
                await conn.handshake()
                ready = True
            if not ready:
                raise ConnectionFailed(f"{addr} sent no HTTP/2 settings within {timeout:g} s")
        except BaseException:
            stream.close()
            raise
        return conn
