"""One HTTP/2 connection's life on trio, the same for both ends.

    TLSSocketStream ⇄ Connection (reader, writer, keepalive) ⇄ sans-I/O core (``_wire``)

:class:`Connection` owns what a connection does whichever end it is: a reader task that
feeds received bytes to the core (whole frames, through its ``FrameGate``) and hands each
event to the subclass; output written by whoever queued it when the socket takes it at once
(:meth:`Connection._push`), else by a writer task; sending a message in frames as flow
control, the peer's frame size and the send buffer allow; keepalive pings; loss (EOF, a
reset, a TLS error, an HTTP/2 protocol error or a broken bound, a stalled write) failing
every call (the server: a share per turn, :meth:`Connection._wind_down`); and the close
(GOAWAY flushed for a moment, then the socket).

The server (``_transport``) adds accept, handshake, identity and dispatch; the client
(``trio_worker.client``) adds dial and calls. Each implements :meth:`Connection._on_event`
and :meth:`Connection._end_calls`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import h2.exceptions
import trio

from .._wire._h2conn import (
    MAX_UNSENT_CONTROL,
    PROTOCOL_ERRORS,
    PeerMisbehaved,
    Pieces,
    WireGRPCConnection,
)
from .._wire._window import MESSAGE_PREFIX
from ._failures import tls_reason
from ._sockets import RECEIVE_SIZE, WRITE_TIMEOUT
from ._tlsstream import TLSSocketStream

__all__ = [
    "MAX_SEND_BUFFER",
    "WRITE_TIMEOUT",
    "Connection",
    "ConnectionSettings",
    "WriteCounts",
    "WriteStats",
    "loss_reason",
]

log = logging.getLogger("trio_worker.net")


class WriteStats(Protocol):
    """Where a connection counts its socket writes (the server's stats, or the client's)."""

    socket_writes: int
    bytes_written: int


@dataclass(slots=True)
class WriteCounts:
    """A connection's own :class:`WriteStats` (the client's)."""

    socket_writes: int = 0
    bytes_written: int = 0


#: Bytes queued beyond what the socket took before senders wait for room.
MAX_SEND_BUFFER: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """How a connection drives its socket: each end makes one (the server from its
    ``TransportConfig``)."""

    #: DATA frames we send are at most this large, so streams interleave
    max_frame: int
    #: how long the close may spend flushing what is queued (final trailers, GOAWAY)
    close_timeout: float
    write_timeout: float = WRITE_TIMEOUT
    max_send_buffer: int = MAX_SEND_BUFFER
    #: while calls wait, a connection silent this long is pinged (None: never)...
    ping_after: float | None = None
    #: ...and lost when nothing at all arrives this long after the ping
    ping_timeout: float = math.inf


class Connection:
    """One HTTP/2 connection over ``stream``, driving the sans-I/O ``core`` as ``settings``
    say. ``peer`` names the other end in logs (its address), ``peer_noun`` in reasons
    ("the server"); socket writes are counted in ``stats``."""

    def __init__(
        self,
        stream: TLSSocketStream,
        core: WireGRPCConnection,
        *,
        peer: str,
        peer_noun: str,
        stats: WriteStats,
        settings: ConnectionSettings,
    ) -> None:
        self._stream = stream
        self._core = core
        self._h2 = core.h2_connection
        self.peer = peer
        self._peer_noun = peer_noun
        self._stats = stats
        self._settings = settings
        self._nursery: trio.Nursery | None = None
        self._writer_lot = trio.lowlevel.ParkingLot()  # the writer waits here for data
        self._flushed_lot = trio.lowlevel.ParkingLot()  # waiting for the buffer to drain
        self._window_lot = trio.lowlevel.ParkingLot()  # senders waiting for window
        self._done = trio.Event()  # the connection is to be closed now
        #: nothing can be sent or received any more
        self.dead = False
        self._last_received = trio.current_time()

    # -- hooks for the two ends --

    def _on_event(self, event: Any) -> None:
        """One event from the core."""
        raise NotImplementedError

    async def _read_turn(self) -> None:
        """Before the bytes of one read are handled: the server's connections of one
        client take turns (``_transport._Connection``); nothing on the client's side."""

    def _read_over(self) -> None:
        """A read's handling ended early: the connection is over (a protocol error)."""

    def _after_read(self) -> None:
        """Every event of one read has been handled (before its output is written)."""

    def _work_left(self) -> bool:
        """Whether ``_after_read`` left work of this read for the loop's next turn."""
        return False

    def _end_calls(self, reason: str) -> None:
        """The connection is over (``reason``): end every call on it (at once, or a share
        per turn in :meth:`_wind_down`)."""
        raise NotImplementedError

    def _release_waiters(self) -> None:
        """The connection died: wake whoever waits for its window or its buffer to drain."""
        self._window_lot.unpark_all()
        self._flushed_lot.unpark_all()

    async def _wind_down(self) -> None:
        """End what :meth:`_end_calls` left to end, before the connection's tasks are
        cancelled (all at once)."""

    def _has_calls(self) -> bool:
        """Whether calls wait on this connection (keepalive pings only then)."""
        return False

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """Start the end's own background tasks beside the reader and the writer."""

    # -- lifecycle --

    async def run(self) -> bool:
        """Serve the connection until it is lost or closed (``_done``). Returns True when it
        was closed with everything queued written (a graceful end)."""
        flushed = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                if self._settings.ping_after is not None:
                    nursery.start_soon(self._keepalive, self._settings.ping_after)
                self._start_tasks(nursery)
                self._push()  # our SETTINGS, unless sent already
                await self._done.wait()
                await self._wind_down()
                if not self.dead:
                    # Let queued frames (final trailers, GOAWAY) reach the peer.
                    with trio.move_on_after(self._settings.close_timeout):
                        await self._flushed()
                        flushed = not self.dead
                self._lost("the connection was closed")
                await self._wind_down()
                nursery.cancel_scope.cancel()
        finally:
            self._lost("the connection was closed")
        return flushed

    def _lost(self, reason: str) -> None:
        """The connection is unusable: end every call at once."""
        if self.dead:
            return
        self.dead = True
        self._end_calls(reason)
        self._release_waiters()
        self._done.set()

    # -- reading --

    def _receive(self, data: bytes | bytearray) -> None:
        """Hand received bytes to the core and its events to the subclass. Raises h2's or
        purerpc's ProtocolError, or :class:`PeerMisbehaved`."""
        if self._settings.ping_after is not None:  # (read by the keepalive only)
            self._last_received = trio.current_time()
        for event in self._core.receive_frames(data):
            self._on_event(event)

    async def _reader(self) -> None:
        stream = self._stream
        core = self._core
        gate = core.gate
        while True:
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.debug("connection with %s lost: %r", self.peer, exc.__cause__ or exc)
                self._lost(loss_reason(exc, self._peer_noun))
                return
            if not data:
                self._lost(f"{self._peer_noun} closed the connection")
                return
            await self._read_turn()
            try:
                self._receive(data)
            except PROTOCOL_ERRORS as exc:
                # h2 has queued a GOAWAY with the error (we do, for our own bounds); the
                # close sends it.
                if isinstance(exc, PeerMisbehaved):
                    core.calm_down(exc)
                log.info("HTTP/2 protocol error from %s: %s", self.peer, exc)
                self._end_calls(f"HTTP/2 protocol error: {exc}")
                self._after_read()
                self._read_over()
                self._wake_writer()
                self._done.set()
                return
            self._after_read()
            self._push()
            while self._work_left() and not self.dead:
                # What one read brought is done a turn's share at a time (the server's
                # calls: MAX_CALLS_PER_TURN), with the other connections' input first, and
                # no more is read meanwhile.
                await self._next_share()
                self._after_read()
                self._push()
            await self._read_done()
            if gate.control_owed > MAX_UNSENT_CONTROL:
                # The peer's PINGs and SETTINGS make us write: read on only once those
                # replies are out, so a peer that never reads cannot grow our buffer.
                await self._flushed()
                gate.control_owed = 0

    async def _next_share(self) -> None:
        """Between two shares of the work one read brought: the other tasks' turn."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def _read_done(self) -> None:
        """What one read brought is done (the server's connections hand their client's
        turn on, ``_transport._Connection``)."""

    async def _keepalive(self, ping_after: float) -> None:
        """Ping a silent connection while calls wait on it; no answer means it is gone."""
        while True:
            await trio.sleep_until(self._last_received + ping_after)
            now = trio.current_time()
            if not self._has_calls() or now < self._last_received + ping_after:
                if not self._has_calls():
                    await trio.sleep(ping_after)
                continue
            try:
                self._h2.ping(b"trioping")
            except h2.exceptions.ProtocolError:
                return
            self._push()
            deadline = now + self._settings.ping_timeout
            while self._last_received < now:
                await trio.sleep_until(deadline)
                if self._last_received >= now:
                    break
                if trio.current_time() - deadline > 0.5:
                    # We overslept: our own loop was blocked, and the answer may be waiting
                    # unread. Give the reader a moment before blaming the peer.
                    deadline = trio.current_time() + 0.5
                    continue
                silent = math.ceil(trio.current_time() - self._last_received)
                self._lost(f"no answer from {self._peer_noun} for {silent} s")
                return

    # -- sending --

    def window(self, stream_id: int) -> int:
        """The stream's send window now; -1 when the stream is closed."""
        try:
            return int(self._h2.local_flow_control_window(stream_id))
        except h2.exceptions.StreamClosedError:
            return -1

    def fits(self, stream_id: int, size: int) -> bool:
        """Whether one DATA frame of ``size`` bytes may be queued on the stream now."""
        h2c = self._h2
        return (
            size <= self.window(stream_id)
            and size <= h2c.max_outbound_frame_size
            and size <= self._settings.max_frame
            and h2c.outbound_buffered + self._stream.pending < self._settings.max_send_buffer
        )

    async def wait_for_window(self, stream_id: int) -> None:
        """Wait until the stream has window (or is closed)."""
        while self.window(stream_id) == 0 and not self.dead:
            self._wake_writer()
            await self._window_lot.park()

    async def send_message(
        self,
        stream_id: int,
        payload: bytes | Pieces,
        *,
        end_stream: bool = False,
        abandoned: Callable[[], bool] | None = None,
    ) -> bool:
        """Queue one gRPC message (prefix and ``payload``) on the stream, in frames as
        window, frame sizes and the send buffer allow, waiting for them.

        Never yields when all of it fits at once and writes nothing itself: the caller
        pushes or wakes the writer when its batch is complete, so consecutive messages
        (and what follows the last) leave in one socket write. Returns False, with the
        rest unsent, when the stream closed under us, the connection died, or
        ``abandoned()`` says the other end is done with the stream.
        """
        h2c = self._h2
        stream = self._stream
        size = len(payload)
        prefix = MESSAGE_PREFIX.pack(0, size)
        # Frames carry views of the prefix and the payload: the only copy is into h2's
        # output buffer.
        if isinstance(payload, Pieces):
            message = Pieces((prefix, *payload.pieces), len(prefix) + size)
        else:
            message = Pieces((prefix, payload), len(prefix) + size)
        high_water = self._settings.max_send_buffer
        max_frame = self._settings.max_frame
        pos, total = 0, message.size
        while pos < total:
            if self.dead or (abandoned is not None and abandoned()):
                return False
            if h2c.outbound_buffered + stream.pending >= high_water:
                self._wake_writer()
                await self._flushed_lot.park()
                continue
            window = self.window(stream_id)
            if window < 0:
                return False
            if window == 0:
                self._wake_writer()
                await self._window_lot.park()
                continue
            n = min(total - pos, window, int(h2c.max_outbound_frame_size), max_frame)
            last = end_stream and pos + n == total
            h2c.send_data(
                stream_id, message if n == total else message.cut(pos, n), end_stream=last
            )
            pos += n
        return True

    # -- writing --

    def _wake_writer(self) -> None:
        self._writer_lot.unpark_all()

    def _push(self) -> None:
        """Write what is queued now, if the socket takes it without waiting.

        Called where a batch of output is complete (end of a read, end of a call, a
        request sent): saves waking the writer task, which then only deals with a socket
        that is full.
        """
        if self.dead or not self._h2.outbound_buffered:
            return
        stream = self._stream
        if stream.pending:  # the writer is at it; it takes this too
            self._wake_writer()
            return
        size = self._h2.outbound_buffered
        segments = self._h2.segments_to_send()
        stats = self._stats
        stats.socket_writes += 1
        stats.bytes_written += size
        try:
            if not stream.try_send_many(segments):
                self._wake_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("cannot write to %s: %r", self.peer, exc.__cause__ or exc)
            self._lost(loss_reason(exc, self._peer_noun))

    async def _flushed(self) -> None:
        """Wait until everything queued has been written (or the connection is dead)."""
        while (self._h2.outbound_buffered or self._stream.pending) and not self.dead:
            self._wake_writer()
            await self._flushed_lot.park()

    async def _writer(self) -> None:
        """Writes what could not be written at once, and output queued without a push."""
        h2c = self._h2
        stream = self._stream
        stats = self._stats
        timeout = self._settings.write_timeout
        while True:
            try:
                if stream.pending:
                    await stream.flush(stall_timeout=timeout)
                else:
                    size = h2c.outbound_buffered
                    if not size:
                        self._flushed_lot.unpark_all()
                        await self._writer_lot.park()
                        continue
                    stats.socket_writes += 1
                    stats.bytes_written += size
                    if not stream.try_send_many(h2c.segments_to_send()):
                        await stream.flush(stall_timeout=timeout)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
                log.debug("cannot write to %s: %r", self.peer, exc.__cause__ or exc)
                self._lost(loss_reason(exc, self._peer_noun))
                return
            self._flushed_lot.unpark_all()


def loss_reason(exc: BaseException, peer: str) -> str:
    """Why a connection's stream failed, in words (``_failures``), ``peer`` naming the
    other end."""
    if isinstance(exc, trio.TooSlowError):
        return str(exc)
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection was closed"
    return tls_reason(cause, peer=peer)
