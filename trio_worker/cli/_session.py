"""Talking to the server from a command: one connection, retries, and following output.

A command opens one client (:func:`open_client`) and makes every call on it: ``run`` starts
the job, follows its output and waits for its end on one connection, one TLS handshake.
When that connection is lost, the client dials a new one on the next call; commands that
would otherwise lose work (``logs -f``, ``run``, ``wait``) retry with backoff for a bounded
time (:class:`Backoff`), and say so: one line on stderr when the connection is lost, one
when it is back. An EOF, a reset or a timeout is retried wherever it lands, a new
connection's handshake included; a TLS refusal (an alert, a server certificate our CA does
not vouch for: ``_net._failures.Refused``) ends the command at once. The first connection
of a command is never retried, because a wrong address or certificate is far likelier than
a blip.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .._errors import ConnectionFailed
from .._net._failures import Refused
from .._states import OutputStream
from ._settings import Connection

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import BinaryIO, TypeVar

    T = TypeVar("T")

    from .._blocking_client import BlockingClient
    from .._model import OutputChunk
    from .._views import ChunkView

__all__ = [
    "Backoff",
    "OutputSink",
    "follow_output",
    "only_connection_failed",
    "open_client",
    "retrying",
]

_log = logging.getLogger("trio_worker.cli")

#: How long to keep trying to get a lost connection back (seconds; env for tests/operators).
RECONNECT_FOR = float(os.environ.get("TRIO_WORKER_RECONNECT_FOR", "60"))
CONNECT_TIMEOUT = 10.0


@contextmanager
def open_client(conn: Connection) -> Iterator[BlockingClient]:
    """The command's one client (blocking: no event loop to import and start); it dials
    again by itself after a lost connection."""
    from .._blocking_client import connect_blocking  # not for serve and certs
    from ._lazy import resume_collector

    with connect_blocking(
        conn.addr, ca=conn.ca, cert=conn.cert, key=conn.key, timeout=CONNECT_TIMEOUT
    ) as client:
        resume_collector()  # start-up is over
        yield client


def only_connection_failed(exc: BaseException) -> ConnectionFailed | None:
    """``exc`` if it is a ConnectionFailed, or a group holding nothing else; else None."""
    if isinstance(exc, ConnectionFailed):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(ConnectionFailed)
        if matched is not None and rest is None:
            first = matched.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, ConnectionFailed)
            return first
    return None


def _say(line: str) -> None:
    print(f"trio-worker: {line}", file=sys.stderr, flush=True)


class Backoff:
    """Exponential backoff (0.1 s doubling to 2 s) for at most ``budget`` seconds from the
    first failure of a run of failures; ``progress()`` ends the run.

    The first failure of a run prints one line (lost, reconnecting), ``progress()`` after
    failures one more (reconnected): a person sees why the command went quiet.
    """

    def __init__(self, addr: str, budget: float = RECONNECT_FOR) -> None:
        self.addr = addr
        self.budget = budget
        self._delay = 0.1
        self._since: float | None = None

    @property
    def failing(self) -> bool:
        return self._since is not None

    def progress(self, resumed: str = "") -> None:
        if self._since is not None:
            _say(f"reconnected to {self.addr}{resumed}")
        self._delay = 0.1
        self._since = None

    def wait(self, error: ConnectionFailed) -> None:
        """Sleep before the next attempt, or raise if the budget is spent, or ``error``
        itself if the server refused us (``Refused``: its TLS said no, as it will again)."""
        if isinstance(error, Refused):
            raise error
        now = time.monotonic()
        if self._since is None:
            self._since = now
            # The client's own words may already say "lost the connection to ADDR: why".
            why = str(error).removeprefix(f"lost the connection to {self.addr}: ")
            _say(
                f"lost the connection to {self.addr} ({why}); reconnecting for up to "
                f"{math.ceil(self.budget)} s"
            )
        elapsed = now - self._since
        if elapsed + self._delay > self.budget:
            raise ConnectionFailed(
                f"lost the connection to the server and could not get it back within "
                f"{math.ceil(self.budget)} s: {error}"
            ) from error
        _log.info("connection lost (%s); retrying in %.1f s", error, self._delay)
        time.sleep(self._delay)
        self._delay = min(self._delay * 2, 2.0)


def retrying(backoff: Backoff, fn: Callable[[], T]) -> T:
    """``fn()``, again while the connection fails (for idempotent calls: status, wait,
    stop); the client underneath dials a new connection for each attempt."""
    while True:
        try:
            result = fn()
        except BaseException as exc:
            failed = only_connection_failed(exc)
            if failed is None:
                raise
            backoff.wait(failed)
            continue
        backoff.progress()
        return result


class OutputSink:
    """Writes job output where it belongs: stdout bytes to our stdout, stderr bytes to our
    stderr, unchanged, flushed chunk by chunk so the two interleave as the job wrote them.

    It counts the log offset it has written up to, and skips bytes it has already written
    when a resumed stream replays them: nothing is lost or repeated across reconnects.
    ``mute()`` stops the printing at once (the first Ctrl-C of ``run``).
    """

    def __init__(
        self,
        offset: int = 0,
        *,
        stdout: BinaryIO | None = None,
        stderr: BinaryIO | None = None,
    ) -> None:
        self.offset = offset
        self._out = stdout if stdout is not None else sys.stdout.buffer
        self._err = stderr if stderr is not None else sys.stderr.buffer
        self._gap_reported = False
        self._printed = False
        #: Bytes of the job's output were lost on the server (never written: a full
        #: disk): a gap after the first byte printed, or its end (``ended``).
        self.lost = False
        self.muted = False

    def mute(self) -> None:
        self.muted = True

    def write(self, chunk: OutputChunk | ChunkView) -> None:
        data = chunk.data
        if chunk.end <= self.offset:
            return  # entirely replayed
        if chunk.offset < self.offset:
            data = data[self.offset - chunk.offset :]
        elif chunk.offset > self.offset and not self._gap_reported:
            self._gap_reported = True
            # (Before the first byte printed, a gap is the oldest part that retention
            # dropped, which is no loss: the log starts later by design.)
            self.lost = self._printed
            _log.warning(
                "bytes %d to %d of the log are no longer kept on the server; continuing after them",
                self.offset,
                chunk.offset,
            )
        self.offset = chunk.end
        self._printed = True
        if self.muted:
            return
        target = self._err if chunk.stream is OutputStream.STDERR else self._out
        target.write(data)
        target.flush()

    def ended(self, output_bytes: int) -> None:
        """The job has ended with ``output_bytes`` counted and every byte the server kept
        written here: say so if the last ones were never written on the server (a full
        disk, a crash), as a gap in the middle is said (its next chunk shows it; nothing
        comes after these)."""
        if output_bytes > self.offset:
            self.lost = True
            _log.warning("%s", lost_end(self.offset, output_bytes))


def lost_end(offset: int, output_bytes: int) -> str:
    """What ``OutputSink.ended`` says of bytes ``offset`` to ``output_bytes``, lost."""
    return (
        f"bytes {offset} to {output_bytes} of the job's output were lost on the server "
        "(never written: its disk was full?)"
    )


def follow_output(
    client: BlockingClient,
    job_id: str,
    sink: OutputSink,
    *,
    follow: bool,
    backoff: Backoff,
) -> None:
    """Copy the job's output from ``sink.offset`` into ``sink``; with ``follow``, until
    the job has ended. A dropped connection is replaced and the stream resumed from the
    last byte written."""
    while True:
        try:
            if backoff.failing:
                # Back? A status call says so (and that the job is still there) before
                # the stream, which may stay silent for as long as the job does.
                client.status(job_id)
                backoff.progress(f"; resuming the output at byte {sink.offset}")
            with client.output(job_id, offset=sink.offset, follow=follow) as stream:
                for chunk in stream:
                    sink.write(chunk)
                    backoff.progress()
            return
        except BaseException as exc:
            failed = only_connection_failed(exc)
            if failed is None:
                raise
            backoff.wait(failed)
