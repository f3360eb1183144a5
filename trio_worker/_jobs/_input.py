"""A job's input side as callers reach it: write its stdin, close it, resize its
terminal; and which error a caller gets when it cannot (no stdin, closed, ended).

The bytes themselves go through ``StdinWriter`` (``_stdin``): no queue here.
"""

from __future__ import annotations

import trio

from .._errors import InvalidRequest, JobNotRunning, NoStdin
from .._model import JobState
from ._job import Job, running_process
from ._stdin import StdinClosed, StdinWriter, check_terminal_size

__all__ = ["close_stdin", "resize", "write_stdin"]


async def write_stdin(job: Job, data: bytes) -> None:
    """Write ``data`` to the job's stdin, waiting while the job does not read it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidRequest("data", f"must be bytes, got {type(data).__name__}")
    writer = _stdin_of(job)
    try:
        await writer.write(data)
    except StdinClosed:
        raise _closed_stdin(job) from None


async def close_stdin(job: Job) -> None:
    """End the job's input (closing twice is no error)."""
    await _stdin_of(job, closing=True).close()


async def resize(job: Job, rows: int, cols: int) -> None:
    """Set a tty job's terminal size; its foreground process group gets SIGWINCH."""
    try:
        rows, cols = check_terminal_size(rows, cols)
    except ValueError as exc:
        raise InvalidRequest("terminal_size", str(exc)) from None
    await trio.lowlevel.checkpoint()
    if not job.tty:
        raise NoStdin(job.id, "it has no terminal (start it with tty)")
    running_process(job)
    if job.input is None:
        raise _closed_stdin(job)
    try:
        job.input.resize(rows, cols)
    except StdinClosed:
        raise _closed_stdin(job) from None


def _stdin_of(job: Job, *, closing: bool = False) -> StdinWriter:
    if not job.stdin:
        raise NoStdin(job.id, "it was started without stdin")
    running_process(job)
    writer = job.input
    if writer is None:
        raise _closed_stdin(job)
    if writer.closed and not closing:
        raise NoStdin(job.id, "its stdin was closed")
    return writer


def _closed_stdin(job: Job) -> Exception:
    if job.ended.is_set() or job.record.state is not JobState.RUNNING:
        state = job.record.state.value if job.record.state else "new"
        return JobNotRunning(job.id, state)
    return NoStdin(job.id, "its stdin was closed")
