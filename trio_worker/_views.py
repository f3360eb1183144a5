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
from collections.abc import Callable
from datetime import datetime
from typing import Final

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


#: ``Job``'s string fields by number, and its plain varint fields: (name, how to read).
_JOB_STRINGS: Final = {1: "id", 2: "owner", 3: "command", 9: "error", 21: "user"}
_JOB_NUMBERS: Final[dict[int, tuple[str, Callable[[int], object]]]] = {
    6: ("pid", to_int32),
    7: ("exit_code", to_int32),
    8: ("signal", to_int32),
    12: ("output_bytes", int),
    15: ("oom_killed", bool),
    16: ("output_start", int),
    19: ("stdin", bool),
    20: ("tty", bool),
}


def read_job(data: bytes) -> JobView:
    """A ``Job`` message; raises :class:`Malformed`."""
    strings = dict.fromkeys(_JOB_STRINGS.values(), "")
    numbers: dict[str, object] = {"pid": 0, "exit_code": None, "signal": None}
    numbers.update(output_bytes=0, oom_killed=False, output_start=0, stdin=False, tty=False)
    args: list[str] = []
    state = spawn_error = 0
    started = [0, 0]
    ended: list[int] | None = None
    limits = LimitsView()
    isolation = IsolationView()
    usage: UsageView | None = None
    for number, wire, value in read_fields(data):
        if wire == _LENGTH:
            raw: bytes = value  # type: ignore[assignment]
            if number in _JOB_STRINGS:
                strings[_JOB_STRINGS[number]] = utf8(raw)
            elif number == 4:
                args.append(utf8(raw))
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
        elif wire == _VARINT:
            number_value: int = value  # type: ignore[assignment]
            if number in _JOB_NUMBERS:
                name, convert = _JOB_NUMBERS[number]
                numbers[name] = convert(number_value)
            elif number == 5:
                state = to_int32(number_value)
            elif number == 18:
                spawn_error = to_int32(number_value)
    job = JobView()
    for name, text in strings.items():
        setattr(job, name, text)
    for name, number_or_none in numbers.items():
        setattr(job, name, number_or_none)
    job.pid = job.pid or None
    job.args = tuple(args)
    job.state = STATE_FROM_PB.get(state, JobState.LOST)
    job.started_at = timestamp(*started)
    job.ended_at = None if ended is None else timestamp(*ended)
    job.limits = limits
    job.isolation = isolation
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
