"""Jobs and output as the blocking client answers them: ``Job``, ``ListResponse`` and
``OutputChunk`` messages read into plain slotted classes with ``JobInfo``'s and
``OutputChunk``'s attributes.

The public value types (``_model``) are dataclasses; importing ``dataclasses`` (and the
``inspect``, ``ast`` and ``dis`` it imports) and defining them was a tenth of a
``trio-worker list``, which reads each job once, prints it and exits; and protobuf's
runtime a fifth (``_pbwire``, which these are read with). The command line's short
commands read these instead (``_render`` takes either): the same attribute names, types
and meanings as ``JobInfo`` (``job_from_pb`` in ``_convert`` is the reference,
``tests/test_pbwire.py`` compares the two). The library's clients answer with the public
types.
"""

from __future__ import annotations

import errno
from datetime import datetime

from ._pbwire import (
    ISOLATION_FIELDS,
    LIMIT_FIELDS,
    Malformed,
    double,
    merge_timestamp,
    read_fields,
    timestamp,
    to_int32,
    utf8,
)
from ._states import JobState, OutputStream

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Final

__all__ = [
    "STATE_FROM_PB",
    "STATE_TO_PB",
    "ChunkView",
    "IsolationView",
    "JobView",
    "LimitsView",
    "Malformed",
    "UsageView",
    "read_chunk",
    "read_job",
    "read_list",
]

#: A job's state on the wire: worker.proto's ``JobState`` numbers (``_convert`` has the
#: same table with protobuf's names; ``tests/test_pbwire.py`` compares them).
STATE_TO_PB: Final = {
    JobState.RUNNING: 1,
    JobState.EXITED: 2,
    JobState.KILLED: 3,
    JobState.FAILED: 4,
    JobState.LOST: 5,
}
STATE_FROM_PB: Final = {value: state for state, value in STATE_TO_PB.items()}
#: ``SpawnError``'s numbers: NOT_FOUND, NOT_EXECUTABLE.
_SPAWN_ERRNO: Final = {1: errno.ENOENT, 2: errno.EACCES}
#: ``OutputStream``'s STDERR (anything else is stdout, as ``_convert`` reads it).
_STDERR: Final = 2
_VARINT, _FIXED64, _LENGTH = 0, 1, 2


class LimitsView:
    """``Limits``' fields (0: no limit)."""

    __slots__ = ("cpus", "io_read_bps", "io_write_bps", "memory_bytes", "pids")

    def __init__(self) -> None:
        self.cpus = 0.0
        self.memory_bytes = 0
        self.io_read_bps = 0
        self.io_write_bps = 0
        self.pids = 0

    def merge(self, data: bytes) -> None:
        for number, wire, value in read_fields(data):
            if number == 1 and wire == _FIXED64:
                self.cpus = double(value)  # type: ignore[arg-type]
            elif 2 <= number <= 5 and wire == _VARINT:
                name, maximum = LIMIT_FIELDS[number - 1]
                setattr(self, name, value & maximum)  # type: ignore[operator]


class IsolationView:
    """``Isolation``'s fields."""

    __slots__ = ("mount", "network", "pid")

    def __init__(self) -> None:
        self.pid = self.mount = self.network = False

    def merge(self, data: bytes) -> None:
        for number, wire, value in read_fields(data):
            if 1 <= number <= 3 and wire == _VARINT:
                setattr(self, ISOLATION_FIELDS[number - 1], bool(value))


class UsageView:
    """``Usage``'s fields."""

    __slots__ = ("cpu_seconds", "memory_peak_bytes")

    def __init__(self) -> None:
        self.cpu_seconds = 0.0
        self.memory_peak_bytes = 0

    def merge(self, data: bytes) -> None:
        for number, wire, value in read_fields(data):
            if number == 1 and wire == _FIXED64:
                self.cpu_seconds = double(value)  # type: ignore[arg-type]
            elif number == 2 and wire == _VARINT:
                self.memory_peak_bytes = value  # type: ignore[assignment]


class JobView:
    """One job as a ``Job`` message told it: ``JobInfo``'s attributes."""

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

    id: str
    owner: str
    command: str
    args: tuple[str, ...]
    state: JobState
    pid: int | None
    exit_code: int | None
    signal: int | None
    error: str
    started_at: datetime
    ended_at: datetime | None
    output_bytes: int
    limits: LimitsView
    isolation: IsolationView
    oom_killed: bool
    spawn_errno: int | None
    output_start: int
    usage: UsageView | None
    stdin: bool
    tty: bool
    user: str

    @property
    def ended(self) -> bool:
        return self.state.ended

    def __repr__(self) -> str:
        return f"JobView(id={self.id!r}, state={self.state}, command={self.command!r})"


def read_job(data: bytes) -> JobView:
    """A ``Job`` message; raises :class:`Malformed`."""
    job = JobView()
    job.id = job.owner = job.command = job.error = job.user = ""
    job.exit_code = job.signal = None
    job.output_bytes = job.output_start = 0
    job.oom_killed = job.stdin = job.tty = False
    job.limits = limits = LimitsView()
    job.isolation = isolation = IsolationView()
    job.usage = usage = None
    args: list[str] = []
    pid = state = spawn_error = 0
    started = [0, 0]
    ended: list[int] | None = None
    try:
        for number, wire, value in read_fields(data):
            if wire == _LENGTH:
                raw: bytes = value  # type: ignore[assignment]
                if number == 1:
                    job.id = raw.decode()
                elif number == 2:
                    job.owner = raw.decode()
                elif number == 3:
                    job.command = raw.decode()
                elif number == 4:
                    args.append(raw.decode())
                elif number == 9:
                    job.error = raw.decode()
                elif number == 10:
                    merge_timestamp(raw, started)
                elif number == 11:
                    ended = ended or [0, 0]
                    merge_timestamp(raw, ended)
                elif number == 13:
                    limits.merge(raw)
                elif number == 14:
                    isolation.merge(raw)
                elif number == 17:
                    usage = usage or UsageView()
                    usage.merge(raw)
                elif number == 21:
                    job.user = raw.decode()
            elif wire == _VARINT:
                varint: int = value  # type: ignore[assignment]
                if number == 5:
                    state = to_int32(varint)
                elif number == 6:
                    pid = to_int32(varint)
                elif number == 7:
                    job.exit_code = to_int32(varint)
                elif number == 8:
                    job.signal = to_int32(varint)
                elif number == 12:
                    job.output_bytes = varint
                elif number == 15:
                    job.oom_killed = varint != 0
                elif number == 16:
                    job.output_start = varint
                elif number == 18:
                    spawn_error = to_int32(varint)
                elif number == 19:
                    job.stdin = varint != 0
                elif number == 20:
                    job.tty = varint != 0
    except UnicodeDecodeError:
        raise Malformed("a string that is not UTF-8") from None
    job.pid = pid or None
    job.args = tuple(args)
    job.state = STATE_FROM_PB.get(state, JobState.LOST)
    job.started_at = timestamp(*started)
    job.ended_at = None if ended is None else timestamp(*ended)
    job.usage = usage
    job.spawn_errno = _SPAWN_ERRNO.get(spawn_error)
    return job


def read_list(data: bytes) -> tuple[list[JobView], str]:
    """A ``ListResponse``: its jobs and its next page's token."""
    jobs: list[JobView] = []
    token = ""
    for number, wire, value in read_fields(data):
        if wire == _LENGTH and number == 1:
            jobs.append(read_job(value))  # type: ignore[arg-type]
        elif wire == _LENGTH and number == 2:
            token = utf8(value)  # type: ignore[arg-type]
    return jobs, token


class ChunkView:
    """Bytes from one stream, at ``offset`` in the job's combined log (``OutputChunk``'s
    attributes)."""

    __slots__ = ("data", "offset", "stream")

    def __init__(self, data: bytes, offset: int, stream: OutputStream) -> None:
        self.data = data
        self.offset = offset
        self.stream = stream

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def read_chunk(data: bytes) -> ChunkView:
    """An ``OutputChunk`` message."""
    chunk = b""
    offset = stream = 0
    for number, wire, value in read_fields(data):
        if number == 1 and wire == _LENGTH:
            chunk = value  # type: ignore[assignment]
        elif number == 2 and wire == _VARINT:
            offset = value  # type: ignore[assignment]
        elif number == 3 and wire == _VARINT:
            stream = to_int32(value)  # type: ignore[arg-type]
    kind = OutputStream.STDERR if stream == _STDERR else OutputStream.STDOUT
    return ChunkView(bytes(chunk), offset, kind)
