"""Talking to the server from a command: connections, retries, and following output.

Each call opens its own connection in its own ``async with`` block, so a connection that
breaks can be replaced without unwinding anything else the command has open. Commands
that would otherwise lose work when the connection drops (``logs -f``, ``run``) retry with
backoff for a bounded time; the first connection of a command is never retried, because a
wrong address or certificate is far likelier than a blip.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, BinaryIO, TypeVar

import trio

from .._errors import ConnectionFailed
from .._model import OutputChunk, OutputStream
from ._settings import Connection

if TYPE_CHECKING:
    from ..client import WorkerClient

__all__ = [
    "Backoff",
    "OutputSink",
    "call",
    "follow_output",
    "only_connection_failed",
    "open_client",
]

T = TypeVar("T")
_log = logging.getLogger("trio_worker.cli")

#: How long to keep trying to get a lost connection back (seconds; env for tests/operators).
RECONNECT_FOR = float(os.environ.get("TRIO_WORKER_RECONNECT_FOR", "60"))
CONNECT_TIMEOUT = 10.0


@asynccontextmanager
async def open_client(conn: Connection) -> AsyncIterator[WorkerClient]:
    from ..client import connect  # imported when needed: serve and certs start faster

    async with connect(
        conn.addr, ca=conn.ca, cert=conn.cert, key=conn.key, timeout=CONNECT_TIMEOUT
    ) as client:
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


#: A connection that stayed up this long counts as regained, even if no byte came.
_STABLE_AFTER = 5.0


class Backoff:
    """Exponential backoff (0.1 s doubling to 2 s) for at most ``budget`` seconds from the
    first failure of a run of failures; ``progress()`` ends the run."""

    def __init__(self, budget: float = RECONNECT_FOR) -> None:
        self.budget = budget
        self._delay = 0.1
        self._since: float | None = None

    def progress(self) -> None:
        self._delay = 0.1
        self._since = None

    async def wait(self, error: ConnectionFailed) -> None:
        """Sleep before the next attempt, or raise if the budget is spent."""
        now = trio.current_time()
        if self._since is None:
            self._since = now
        elapsed = now - self._since
        if elapsed + self._delay > self.budget:
            raise ConnectionFailed(
                f"lost the connection to the server and could not get it back within "
                f"{math.ceil(self.budget)} s: {error}"
            ) from error
        _log.info("connection lost (%s); retrying in %.1f s", error, self._delay)
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, 2.0)


async def call(
    conn: Connection, fn: Callable[[WorkerClient], Awaitable[T]], *, retry: bool = False
) -> T:
    """``fn(client)`` on a fresh connection; with ``retry``, again on a new one while the
    connection fails (for idempotent calls: status, wait, stop)."""
    backoff = Backoff()
    while True:
        try:
            async with open_client(conn) as client:
                return await fn(client)
        except BaseException as exc:
            failed = only_connection_failed(exc)
            if failed is None or not retry:
                raise
            await backoff.wait(failed)


class OutputSink:
    """Writes job output where it belongs: stdout bytes to our stdout, stderr bytes to our
    stderr, unchanged, flushed chunk by chunk so the two interleave as the job wrote them.

    It counts the log offset it has written up to, and skips bytes it has already written
    when a resumed stream replays them: nothing is lost or repeated across reconnects.
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

    def write(self, chunk: OutputChunk) -> None:
        data = chunk.data
        if chunk.end <= self.offset:
            return  # entirely replayed
        if chunk.offset < self.offset:
            data = data[self.offset - chunk.offset :]
        elif chunk.offset > self.offset and not self._gap_reported:
            self._gap_reported = True
            _log.warning(
                "bytes %d to %d of the log are no longer kept on the server; continuing after them",
                self.offset,
                chunk.offset,
            )
        target = self._err if chunk.stream is OutputStream.STDERR else self._out
        target.write(data)
        target.flush()
        self.offset = chunk.end


async def follow_output(
    conn: Connection,
    job_id: str,
    sink: OutputSink,
    *,
    follow: bool,
    retry_first: bool = False,
) -> None:
    """Copy the job's output from ``sink.offset`` into ``sink``; with ``follow``, until
    the job has ended. A dropped connection is replaced and the stream resumed from the
    last byte written. ``retry_first``: also retry if the first connection fails (the
    caller has already talked to this server)."""
    backoff = Backoff()
    connected_once = retry_first
    while True:
        connected_at: float | None = None
        try:
            async with open_client(conn) as client:
                connected_once = True
                connected_at = trio.current_time()
                async with client.output(job_id, offset=sink.offset, follow=follow) as stream:
                    async for chunk in stream:
                        sink.write(chunk)
                        backoff.progress()
                return
        except BaseException as exc:
            failed = only_connection_failed(exc)
            if failed is None or not connected_once:
                raise
            if connected_at is not None and trio.current_time() - connected_at >= _STABLE_AFTER:
                backoff.progress()
            await backoff.wait(failed)
