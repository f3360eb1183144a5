"""Jobs and output as the blocking client answers them: the wire messages read into plain
slotted classes with ``JobInfo``'s and ``OutputChunk``'s attributes.

The public value types (``_model``) are dataclasses; importing ``dataclasses`` (and the
``inspect``, ``ast`` and ``dis`` it imports) and defining them was a tenth of a
``trio-worker list``, which reads each job once, prints it and exits. The command line's
short commands read these instead (``_render`` takes either): the same attribute names,
types and meanings as ``JobInfo`` (``job_from_pb`` in ``_convert`` is the reference,
``tests/test_convert.py`` compares the two), with ``limits``, ``isolation`` and ``usage``
left as the messages themselves, whose fields are ``Limits``', ``Isolation``' and
``Usage``'s. The library's clients answer with the public types.
"""

from __future__ import annotations

import errno
from datetime import UTC, datetime
from typing import Final

from ._pb import worker_pb2 as pb
from ._states import JobState, OutputStream

__all__ = ["STATE_FROM_PB", "STATE_TO_PB", "ChunkView", "JobView"]

#: A job's state on the wire (one table for both directions, ``_convert`` uses it too).
STATE_TO_PB: Final = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXITED: pb.JOB_STATE_EXITED,
    JobState.KILLED: pb.JOB_STATE_KILLED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.LOST: pb.JOB_STATE_LOST,
}
STATE_FROM_PB: Final = {value: state for state, value in STATE_TO_PB.items()}
_STREAMS = {pb.OUTPUT_STREAM_STDERR: OutputStream.STDERR}
_SPAWN_ERRNO = {
    pb.SPAWN_ERROR_NOT_FOUND: errno.ENOENT,
    pb.SPAWN_ERROR_NOT_EXECUTABLE: errno.EACCES,
}


class JobView:
    """One job as a ``Job`` message told it: ``JobInfo``'s attributes, read once."""

    __slots__ = (
        "args",
        "command",
        "ended_at",
        "error",
        "exit_code",
        "id",
        "isolation",
        "limits",
        "oom_killed",
        "output_bytes",
        "output_start",
        "owner",
        "pid",
        "signal",
        "spawn_errno",
        "started_at",
        "state",
        "stdin",
        "tty",
        "usage",
        "user",
    )

    def __init__(self, job: pb.Job) -> None:
        self.id: str = job.id
        self.owner: str = job.owner
        self.command: str = job.command
        self.args: tuple[str, ...] = tuple(job.args)
        self.state: JobState = STATE_FROM_PB.get(job.state, JobState.LOST)
        self.pid: int | None = job.pid or None
        self.exit_code: int | None = job.exit_code if job.HasField("exit_code") else None
        self.signal: int | None = job.signal if job.HasField("signal") else None
        self.error: str = job.error
        self.started_at: datetime = job.started_at.ToDatetime(tzinfo=UTC)
        self.ended_at: datetime | None = (
            job.ended_at.ToDatetime(tzinfo=UTC) if job.HasField("ended_at") else None
        )
        self.output_bytes: int = job.output_bytes
        self.limits: pb.Limits = job.limits
        self.isolation: pb.Isolation = job.isolation
        self.oom_killed: bool = job.oom_killed
        self.spawn_errno: int | None = _SPAWN_ERRNO.get(job.spawn_error)
        self.output_start: int = job.output_start
        self.usage: pb.Usage | None = job.usage if job.HasField("usage") else None
        self.stdin: bool = job.stdin
        self.tty: bool = job.tty
        self.user: str = job.user

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __repr__(self) -> str:
        return f"JobView(id={self.id!r}, state={self.state}, command={self.command!r})"


class ChunkView:
    """Bytes from one stream, at ``offset`` in the job's combined log (``OutputChunk``'s
    attributes)."""

    __slots__ = ("data", "offset", "stream")

    def __init__(self, chunk: pb.OutputChunk) -> None:
        self.data: bytes = chunk.data
        self.offset: int = chunk.offset
        self.stream: OutputStream = _STREAMS.get(chunk.stream, OutputStream.STDOUT)

    @property
    def end(self) -> int:
        return self.offset + len(self.data)
