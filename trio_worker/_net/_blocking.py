"""The blocking driver of the client's wire core: a plain socket and ``ssl``, no event loop.

The command line's short commands (``list``, ``status``, ``run``...) live a fraction of a
second; importing trio alone would take longer than the whole of ``trio-worker list`` may.
They drive the same sans-I/O core as the trio client (``_wire._client``: h2 and purerpc's
gRPC layer, our bounds), as httpcore drives h11/h2 with a sync and an async backend:

* one connection, many calls: a caller waiting for one call reads the socket and files
  what arrives for the others (``pump``), so ``run`` can wait for a job's end while it
  follows the output on the same connection;
* flow control as the trio client does it: a stream's DATA is handed back to h2 (which
  sends WINDOW_UPDATE) only while at most ``ACK_BELOW`` bytes of its messages wait for
  the caller, so a stream nobody reads holds at most that plus one window;
* loss: EOF, a reset, a TLS or HTTP/2 error fails every pending call with
  ``ConnectionFailed``; GOAWAY fails the calls the server never processed (``Unprocessed``:
  safe to send again on a new connection); a silent connection with calls pending is
  pinged after ``PING_AFTER`` seconds and lost ``PING_TIMEOUT`` seconds later;
* a *wake-up fd* (``signal.set_wakeup_fd``) may be watched beside the socket: when it turns
  readable the caller's ``on_wake`` runs between two reads, never inside h2, and may raise
  to break a wait (``run``'s Ctrl-C).

Errors and their words are the trio client's (``_failures``, ``_error_codes``).
"""

from __future__ import annotations

import math
import os
import select
import socket
import ssl
import time
from collections.abc import Callable

import h2.errors
import h2.exceptions

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
    GRPCClientConnection,
    RequestHeaders,
    request_headers,
    with_timeout,
)
from .._wire._h2conn import MAX_UNSENT_CONTROL, PROTOCOL_ERRORS, PeerMisbehaved
from .._wire._status import StatusCode
from .._wire._window import MESSAGE_PREFIX
from ._failures import handshake_failed, left_alert, not_h2, os_reason, parse_addr, tls_reason
from ._sockets import RECEIVE_SIZE, WRITE_TIMEOUT, set_keepalive

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any

__all__ = ["BlockingCall", "BlockingConnection", "CallFailed", "Unprocessed", "dial"]


class BlockingCall(ClientCall):
    """One stream: its messages as they arrive, its window and how it ended
    (``_wire._calls``, as for the trio client's calls)."""

    __slots__ = ()


class BlockingConnection:
    """One HTTP/2 connection over a blocking TLS socket; see the module's docstring."""

    def __init__(self, sock: ssl.SSLSocket, addr: str, authority: str) -> None:
        self._sock = sock
        self.addr = addr
        self._authority = authority
        self._grpc = GRPCClientConnection()
        self._h2 = self._grpc.h2_connection
        self._gate = self._grpc.gate
        self._table = CallTable[BlockingCall](self._h2)
        self._calls = self._table.calls
        self._headers: dict[str, RequestHeaders] = {}
        self.dead = False
        self._last_received = time.monotonic()
        self._pinged_at: float | None = None
        #: An fd to watch beside the socket, and what to run when it turns readable.
        self.wake_fd: int | None = None
        self.on_wake: Callable[[], None] | None = None

    @property
    def goaway(self) -> bool:
        return self._table.goaway

    @property
    def goaway_reason(self) -> str:
        """Why the server sent GOAWAY, in its words, unless it was a graceful one."""
        return self._table.goaway_reason

    @property
    def idle(self) -> bool:
        """No call in flight here."""
        return not self._calls

    @property
    def accepting(self) -> bool:
        return not (self.dead or self.goaway)

    # -- lifecycle --

    def handshake(self, deadline: float) -> None:
        """Our preface and SETTINGS, then read until the server's SETTINGS are in (a TLS 1.3
        server refuses our certificate only now, so ``dial`` reports it, not a call)."""
        self._grpc.initiate_connection()
        try:
            self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                self._sock.sendall(self._h2.data_to_send())
            except (ssl.SSLError, ConnectionError) as exc:
                # Closed before our first bytes, as a server refusing our certificate does.
                cause = left_alert(self._sock) or exc
                raise handshake_failed(self.addr, cause, ours_sent=True) from exc
            while not self._grpc.settings_received:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self._sock.settimeout(remaining)
                data = self._sock.recv(RECEIVE_SIZE)
                if not data:
                    raise handshake_failed(self.addr, None, ours_sent=True)
                self._feed(data)
        except (ssl.SSLError, ConnectionError) as exc:
            raise handshake_failed(self.addr, exc, ours_sent=True) from exc
        except PROTOCOL_ERRORS as exc:
            raise ConnectionFailed(f"{self.addr} does not speak HTTP/2 as expected: {exc}") from exc
        finally:
            # From here on the socket never blocks: ``pump`` waits with select, so it can
            # watch the wake-up fd and the keepalive's clock too.
            self._sock.setblocking(False)
        self._flush()

    def close(self) -> None:
        """GOAWAY (best effort, never waiting), then close the socket."""
        if not self.dead:
            try:
                self._h2.close_connection()
                self._sock.setblocking(False)
                self._sock.send(self._h2.data_to_send())
            except (OSError, h2.exceptions.ProtocolError):
                pass
        self._lost("the connection was closed")
        self._sock.close()

    def _lost(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self._table.end_all(
            lambda: ConnectionFailed(f"lost the connection to {self.addr}: {reason}")
        )

    # -- calls --

    def open_call(self, path: str, payload: bytes, timeout: float | None = None) -> BlockingCall:
        """Open a stream and send the whole request. Raises Unprocessed if this
        connection takes no new calls any more, TimeoutError once ``timeout`` seconds
        passed waiting for a stream or for window (a server that grants neither)."""
        h2c = self._h2
        deadline = None if timeout is None else time.monotonic() + timeout
        while h2c.open_outbound_streams >= h2c.remote_settings.max_concurrent_streams:
            if not self.accepting:
                break
            self.pump(deadline)
        if not self.accepting:
            raise Unprocessed()
        stream_id = int(h2c.get_next_available_stream_id())
        headers = self._headers.get(path)
        if headers is None:
            headers = self._headers[path] = request_headers(path, self._authority)
        if timeout is not None:
            headers = with_timeout(headers, timeout)
        h2c.send_headers(stream_id, headers, end_stream=False)
        call = BlockingCall(stream_id)
        self._table.add(call)
        try:
            self._send_request(call, MESSAGE_PREFIX.pack(0, len(payload)) + payload, deadline)
        except BaseException:
            self.cancel(call)
            raise
        return call

    def _send_request(self, call: BlockingCall, data: bytes, deadline: float | None) -> None:
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
                h2c.send_data(call.stream_id, bytes(view[:n]), end_stream=last)
                view = view[n:]
            self._flush()
            if view and n <= 0:
                self.pump(deadline)  # wait for window (not after every frame: a server
                # that sends nothing back while window remains would hold the rest)

    def next_message(
        self, call: BlockingCall, deadline: float | None = None
    ) -> bytes | memoryview | None:
        """The call's next message, None after the last; raises what ended it, or
        TimeoutError once ``deadline`` (``time.monotonic()``) passes."""
        while (got := self._table.take(call)) is None:
            self.pump(deadline)
        message, released = got
        if released:
            self._flush()
        return message

    def cancel(self, call: BlockingCall) -> None:
        """The caller gave up on ``call``: reset the stream (the connection goes on)."""
        if call.done:
            call.clear()
            return
        if self.dead:
            call.finish(error=ConnectionFailed(f"the connection to {self.addr} was closed"))
            return
        self._table.fail(call, CallFailed(StatusCode.CANCELLED, "cancelled by the client"))
        self._flush()

    # -- the socket --

    def pump(self, deadline: float | None = None) -> None:
        """Wait for the socket (or the wake-up fd), read once and file what arrived.
        Raises TimeoutError at ``deadline``; a lost connection fails the calls instead."""
        if self.dead:
            return
        sock = self._sock
        if not sock.pending():
            now = time.monotonic()
            wait_until = self._keepalive(now)
            if deadline is not None:
                if now >= deadline:
                    raise TimeoutError
                wait_until = min(wait_until, deadline)
            fds = [sock.fileno()] if self.wake_fd is None else [sock.fileno(), self.wake_fd]
            timeout = None if wait_until == math.inf else max(0.0, wait_until - now)
            readable, _, _ = select.select(fds, [], [], timeout)
            if self.wake_fd is not None and self.wake_fd in readable:
                _drain(self.wake_fd)
                if self.on_wake is not None:
                    self.on_wake()
            if sock.fileno() not in readable:
                return
        try:
            data = sock.recv(RECEIVE_SIZE)
        except (ssl.SSLWantReadError, BlockingIOError):
            return  # a TLS record not yet whole, or one without data (a session ticket)
        except (ssl.SSLError, OSError) as exc:
            self._lost(tls_reason(exc))
            return
        if not data:
            self._lost("the server closed the connection")
            return
        self._last_received = time.monotonic()
        self._pinged_at = None
        try:
            self._feed(data)
        except PROTOCOL_ERRORS as exc:
            if isinstance(exc, PeerMisbehaved):
                self._grpc.calm_down(exc)
            self._flush()  # h2 (or calm_down) has queued a GOAWAY: tell the server why
            self._lost(f"HTTP/2 protocol error: {exc}")
            return
        if self._gate.control_owed > MAX_UNSENT_CONTROL:
            self._gate.control_owed = 0  # the replies go out with the flush below
        self._flush()

    def _keepalive(self, now: float) -> float:
        """Ping a silent connection while calls wait; lose it when the ping goes unanswered.
        Returns when to look again."""
        if not self._calls:
            return math.inf
        if self._pinged_at is not None:
            if now >= self._pinged_at + PING_TIMEOUT:
                silent = math.ceil(now - self._last_received)
                self._lost(f"no answer from the server for {silent} s")
                return now
            return self._pinged_at + PING_TIMEOUT
        if now >= self._last_received + PING_AFTER:
            try:
                self._h2.ping(b"trioping")
            except h2.exceptions.ProtocolError:
                return math.inf
            self._pinged_at = now
            self._flush()
            return now + PING_TIMEOUT
        return self._last_received + PING_AFTER

    def _flush(self) -> None:
        if self.dead:
            return
        data = self._h2.data_to_send()
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = self._sock.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    # As the trio driver: a server that takes nothing for this long is
                    # gone (else a server that stopped reading would hold us forever).
                    _, writable, _ = select.select([], [self._sock], [], WRITE_TIMEOUT)
                    if not writable:
                        self._lost(f"no write progress for {WRITE_TIMEOUT}s")  # (trio's words)
                        return
                    continue
                view = view[sent:]
        except (ssl.SSLError, OSError) as exc:
            self._lost(tls_reason(exc))

    def _feed(self, data: bytes) -> None:
        """Whole frames only, checked against the core's bounds (``receive_frames``)."""
        for event in self._grpc.receive_frames(data):
            self._on_event(event)

    def _on_event(self, event: Any) -> None:
        self._table.on_event(event)  # a sender waiting for window looks again by itself


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def dial(
    addr: str, context: ssl.SSLContext, timeout: float, server_hostname: str | None = None
) -> BlockingConnection:
    """TCP, TLS handshake, HTTP/2 settings exchange, all within ``timeout`` seconds; the
    failures are the trio client's, word for word."""
    host, port = parse_addr(addr)
    deadline = time.monotonic() + timeout
    # An ASCII host as bytes: getaddrinfo and ssl skip their IDNA codec (and unicodedata),
    # which would change nothing in it.
    wire_host: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        tcp = socket.create_connection((wire_host, port), timeout=timeout)  # type: ignore[arg-type]
    except TimeoutError as exc:
        raise ConnectionFailed(f"cannot connect to {addr}: no answer within {timeout:g} s") from exc
    except (OSError, UnicodeError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc)
        raise ConnectionFailed(f"cannot connect to {addr}: {reason}") from exc
    try:
        set_keepalive(tcp)
        # Requests go out whole, in one write each: Nagle would hold one back for the ACK
        # of the last (40 ms of delayed ACK), as trio's sockets know.
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            name = server_hostname or host
            sni: str | bytes = name.encode("ascii") if name.isascii() else name
            sock = context.wrap_socket(tcp, server_hostname=sni)
        except TimeoutError as exc:
            raise ConnectionFailed(
                f"TLS handshake with {addr} timed out after {timeout:g} s"
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            raise handshake_failed(addr, exc) from exc
    except BaseException:
        tcp.close()
        raise
    try:
        if sock.selected_alpn_protocol() != ALPN_PROTOCOL:
            raise not_h2(addr)
        bracketed = f"[{host}]" if ":" in host else host
        conn = BlockingConnection(sock, addr, f"{bracketed}:{port}")
        try:
            conn.handshake(deadline)
        except TimeoutError:
            raise ConnectionFailed(f"{addr} sent no HTTP/2 settings within {timeout:g} s") from None
    except BaseException:
        sock.close()
        raise
    return conn
