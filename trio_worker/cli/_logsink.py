"""The server's stderr: log lines (one audit line per call among them) written off the loop.

A ``logging.StreamHandler`` writes each line on the thread that logs it: for ``serve`` that
is the loop, once per call. A stderr that does not take the line (a pipe whose reader
stalled, a terminal on hold, journald behind) then stops every client's calls. While the
server runs, :class:`LogSink` only queues each line and a task writes them in batches from a
worker thread (``trio.to_thread``); before and after, it writes at once, as a plain handler.
What it holds is bounded (:data:`LOG_BUFFER`): past it lines are dropped, counted, and the
count is written as soon as stderr takes lines again: never lost silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Final

import trio

__all__ = ["LOG_BUFFER", "LOG_DELAY", "LOG_EXIT_WAIT", "LogSink"]

#: The bytes of log lines a server holds while its stderr takes none (~13,000 audit lines).
LOG_BUFFER: Final = 4 * 1024 * 1024
#: How long a line waits for others to go out with it: one wakeup and one write per this
#: much time at most, not one per call.
LOG_DELAY: Final = 0.02
#: How long the server's exit waits for its last lines to be written.
LOG_EXIT_WAIT: Final = 5.0


class LogSink(logging.Handler):
    """A handler writing to a descriptor (stderr), queued while :meth:`run` runs."""

    def __init__(self, fd: int = 2, *, limit: int = LOG_BUFFER) -> None:
        super().__init__()
        self._fd = fd
        self._limit = limit
        self._mutex = threading.Lock()  # (emit runs on any thread; the writer on the loop)
        self._pending: list[bytes] = []
        self._size = 0
        self._dropped = 0
        #: the writer's run and what wakes it (both None while no writer runs)
        self._token: trio.lowlevel.TrioToken | None = None
        self._loop_thread: int | None = None
        self._idle: trio.Event | None = None

    @property
    def dropped(self) -> int:
        """Lines dropped (the buffer full) and not yet reported."""
        return self._dropped

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        with self._mutex:
            token = self._token
            if token is not None:
                if self._size + len(line) > self._limit:
                    self._dropped += 1
                    return
                self._pending.append(line)
                self._size += len(line)
                idle, self._idle = self._idle, None
        if token is None:
            self._write_all([line])
        elif idle is not None:  # the writer waits for a first line: wake it
            if threading.get_ident() == self._loop_thread:
                idle.set()
            else:
                with contextlib.suppress(trio.RunFinishedError):  # (its finally writes them)
                    token.run_sync_soon(idle.set)

    def _take(self) -> list[bytes]:
        with self._mutex:
            lines, self._pending, self._size = self._pending, [], 0
            dropped, self._dropped = self._dropped, 0
        if dropped:
            note = logging.LogRecord(
                "trio_worker", logging.WARNING, __file__, 0,
                "%d log lines were dropped: stderr took none while %d bytes waited",
                (dropped, self._limit), None,
            )  # fmt: skip
            lines.append((self.format(note) + "\n").encode())
        return lines

    def _write_all(self, lines: list[bytes]) -> None:
        """Write ``lines`` whole (blocking); a descriptor that fails loses them."""
        data = memoryview(b"".join(lines))
        try:
            while data:
                data = data[os.write(self._fd, data) :]
        except OSError:
            pass  # (stderr closed or its disk full: there is nowhere to say so)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the queued lines until cancelled (started: lines are queued from then
        on); then what is left, and the handler writes at once again."""
        with self._mutex:
            self._token = trio.lowlevel.current_trio_token()
            self._loop_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                with self._mutex:
                    idle = None if self._pending or self._dropped else trio.Event()
                    self._idle = idle
                if idle is not None:
                    await idle.wait()
                await trio.sleep(LOG_DELAY)
                lines = self._take()
                await trio.to_thread.run_sync(self._write_all, lines)
        finally:
            with self._mutex:
                self._token = self._idle = self._loop_thread = None
            lines = self._take()
            if lines:  # (a stderr that takes nothing cannot hold the exit for long)
                with trio.CancelScope(shield=True, deadline=trio.current_time() + LOG_EXIT_WAIT):
                    await trio.to_thread.run_sync(self._write_all, lines, abandon_on_cancel=True)
