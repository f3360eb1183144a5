"""TLS for both ends: OpenSSL on a non-blocking socket, waited on with trio.

Why not ``trio.SSLStream``: it runs OpenSSL over memory BIOs and goes through the
scheduler several times per read and per write (its own checkpoints, the transport's,
``_retry``'s loop). On our reference machine a TLS ping-pong cost the server 210 µs of CPU
per round trip through ``trio.SSLStream`` and 90 µs this way; for a small RPC that is a
fifth of the server's whole budget. Here OpenSSL reads and writes the socket itself and
trio is asked only to wait for readiness when OpenSSL says it must (``SSLWantRead`` /
``SSLWantWrite``). The server wraps accepted sockets, the client dialed ones (with
``server_hostname``): the connection driver (``_connection``) is the same for both.

Semantics match what the transport needs from ``trio.SSLStream``: ``receive_some`` (b""
at EOF) and ``send_all`` may run concurrently in two tasks, errors become
``trio.BrokenResourceError`` (cause attached), a cancelled ``send_all`` breaks the stream,
``receive_some`` is a checkpoint. Writing is also offered without ``await``
(``try_send``, then ``flush`` for what the socket did not take), so a task that has just
queued a response can write it itself instead of waking another task to do it.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Final

import trio

__all__ = ["TLSSocketStream"]

_CLOSED_ERRORS: Final = (OSError, ssl.SSLError, ValueError)
#: Writes of at least this much go out corked (``TLSSocketStream._send_pending``): bulk
#: output, not a small response, which leaves at once as it did.
_CORK_FROM: Final = 64 * 1024


class TLSSocketStream:
    """One TCP connection with TLS: the server side of an accepted one, or, given
    ``server_hostname`` (the name the server's certificate must carry), the client side
    of a dialed one."""

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str | None = None
    ) -> None:
        sock.setblocking(False)
        self._ssl: ssl.SSLSocket = context.wrap_socket(
            sock,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=True,
        )
        self._broken = False
        self._closed = False
        #: what the socket has not taken yet, in order (the first maybe partly sent)
        self._pending: list[memoryview] = []
        self._pending_size = 0
        self._want_read = False
        #: TCP_CORK around bulk writes (see ``_send_pending``); off where it is refused
        self._cork = sock.family in (socket.AF_INET, socket.AF_INET6)

    @property
    def socket(self) -> ssl.SSLSocket:
        return self._ssl

    async def do_handshake(self, *, while_waiting: Callable[[], None] | None = None) -> None:
        """Complete the TLS handshake (the peer's certificate is verified by OpenSSL).
        ``while_waiting`` is called once, the first time the handshake has to wait for the
        peer's bytes: work done there costs no latency (never, if it never waits)."""
        sock = self._ssl
        while True:
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                if while_waiting is not None:
                    work, while_waiting = while_waiting, None
                    work()
                await self._wait(readable=True)
            except ssl.SSLWantWriteError:
                await self._wait(readable=False)
            except _CLOSED_ERRORS as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            else:
                return

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        return self._ssl.getpeercert(binary_form=True) if binary_form else None

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    async def receive_some(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of plaintext; b"" once the peer has closed."""
        sock = self._ssl
        waited = False
        while True:
            self._check()
            try:
                data = sock.recv(max_bytes)
            except ssl.SSLWantReadError:
                await self._wait(readable=True)
                waited = True
            except ssl.SSLWantWriteError:  # e.g. answering a TLS 1.3 KeyUpdate
                await self._wait(readable=False)
                waited = True
            except _CLOSED_ERRORS as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
            else:
                if not waited:
                    await trio.lowlevel.checkpoint()
                return data

    @property
    def pending(self) -> int:
        """Bytes accepted by :meth:`try_send` that the socket has not taken yet."""
        return self._pending_size

    def try_send(self, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` as far as the socket takes it now, without waiting.

        Returns True when all of it went. Otherwise the rest is kept (OpenSSL must be
        given the same buffer again) and :meth:`flush` must complete it before anything
        else is sent.
        """
        return self.try_send_many((data,))

    def try_send_many(self, buffers: Iterable[bytes | bytearray | memoryview]) -> bool:
        """:meth:`try_send` of the buffers' bytes, in order, each encrypted from where it
        lies (no joining copy; TLS records end where a buffer does)."""
        if self._pending:
            raise RuntimeError("try_send with data still pending")
        if type(buffers) is list and len(buffers) == 1 and not (self._closed or self._broken):
            # One small buffer (a unary call's answer): sent as it is, kept only if the
            # socket does not take all of it.
            buffer = buffers[0]
            size = len(buffer)
            if size < _CORK_FROM:
                try:
                    sent = self._ssl.send(buffer)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as want:
                    self._want_read = isinstance(want, ssl.SSLWantReadError)
                    sent = 0
                except _CLOSED_ERRORS as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
                if sent == size:
                    return True
                self._pending.append(memoryview(buffer)[sent:])
                self._pending_size += size - sent
                return False
        for buffer in buffers:
            if buffer:
                self._pending.append(memoryview(buffer))
                self._pending_size += len(buffer)
        return self._send_pending()

    async def flush(self, *, stall_timeout: float = math.inf) -> None:
        """Complete what :meth:`try_send` left. Raises ``trio.TooSlowError`` (and breaks
        the stream) if the socket has not taken it ``stall_timeout`` seconds after it first had
        to wait; the timer costs nothing when the data goes at once, the usual case.
        A cancellation half-way breaks the stream, as with trio.SSLStream."""
        deadline = math.inf
        try:
            while not self._send_pending():
                if deadline == math.inf:
                    deadline = trio.current_time() + stall_timeout
                with trio.move_on_at(deadline):
                    await self._wait(readable=self._want_read)
                if trio.current_time() >= deadline:
                    raise trio.TooSlowError(f"no write progress for {stall_timeout}s")
        except BaseException:
            self._broken = True
            raise

    async def send_all(
        self, data: bytes | bytearray | memoryview, *, stall_timeout: float = math.inf
    ) -> None:
        """Send everything (see :meth:`flush` for ``stall_timeout``)."""
        if not self.try_send(data):
            await self.flush(stall_timeout=stall_timeout)

    def _send_pending(self) -> bool:
        if self._cork and self._pending_size >= _CORK_FROM:
            # OpenSSL writes one 16 KiB record per write(2), and with TCP_NODELAY each
            # goes out as a segment of its own; corked, the kernel sends full segments
            # (64 KiB on loopback): a quarter of the packets for the reader to take in.
            # Uncorked before returning, so nothing waits on the cork's 200 ms timer.
            try:
                self._ssl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            except OSError:
                self._cork = False
                return self._send_some()
            try:
                return self._send_some()
            finally:
                with contextlib.suppress(OSError):
                    self._ssl.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        return self._send_some()

    def _send_some(self) -> bool:
        pending = self._pending
        sock = self._ssl
        while pending:
            view = pending[0]
            self._check()
            try:
                sent = sock.send(view)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError) as want:
                # (kept as it is: OpenSSL must be given the same buffer again)
                self._want_read = isinstance(want, ssl.SSLWantReadError)
                return False
            except _CLOSED_ERRORS as exc:
                self._broken = True
                raise trio.BrokenResourceError(f"connection lost: {exc}") from exc
            self._pending_size -= sent
            if sent < len(view):
                pending[0] = view[sent:]
            else:
                del pending[0]
        return True

    async def aclose(self) -> None:
        """Send close_notify if that can be done at once, then close the socket."""
        if self._closed:
            return
        if not self._broken:
            try:
                self._ssl.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, *_CLOSED_ERRORS):
                pass
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now; tasks waiting on the socket get ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._ssl)
        self._ssl.close()

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        if self._broken:
            raise trio.BrokenResourceError("the connection is broken")

    async def _wait(self, *, readable: bool) -> None:
        try:
            if readable:
                await trio.lowlevel.wait_readable(self._ssl)
            else:
                await trio.lowlevel.wait_writable(self._ssl)
        except OSError as exc:  # pragma: no cover - epoll refused the fd
            self._broken = True
            raise trio.BrokenResourceError(str(exc)) from exc
