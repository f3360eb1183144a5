"""Conversions between our value types and the wire messages, in one place.

The server turns ``JobInfo`` into ``Job`` messages and request messages into
arguments; the client does the reverse, so both directions live side by side
and are tested as round trips.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from ._errors import InvalidRequest
from ._model import Isolation, JobInfo, JobState, Limits, OutputChunk, OutputStream, Usage
from ._pb import worker_pb2 as pb

__all__ = [
    "chunk_from_pb",
    "chunk_serialized",
    "chunk_to_pb",
    "duration_to_seconds",
    "isolation_from_pb",
    "isolation_to_pb",
    "job_from_pb",
    "job_to_pb",
    "limits_from_pb",
    "limits_to_pb",
    "start_limits",
    "states_from_pb",
]


#: (``_views`` has the same table by number, for the blocking client.)
STATE_TO_PB = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXITED: pb.JOB_STATE_EXITED,
    JobState.KILLED: pb.JOB_STATE_KILLED,
    JobState.FAILED: pb.JOB_STATE_FAILED,
    JobState.LOST: pb.JOB_STATE_LOST,
}
STATE_FROM_PB = {v: k for k, v in STATE_TO_PB.items()}


def states_from_pb(values: Iterable[int]) -> frozenset[JobState]:
    """A List filter's states; UNSPECIFIED or an unknown number is ``InvalidRequest``."""
    states = set()
    for value in values:
        state = STATE_FROM_PB.get(value)  # type: ignore[call-overload]  # any int may come
        if state is None:
            raise InvalidRequest("states", f"{value} is not a job state to filter on")
        states.add(state)
    return frozenset(states)


_STREAM_TO_PB = {
    OutputStream.STDOUT: pb.OUTPUT_STREAM_STDOUT,
    OutputStream.STDERR: pb.OUTPUT_STREAM_STDERR,
}
_STREAM_FROM_PB = {v: k for k, v in _STREAM_TO_PB.items()}


def limits_to_pb(limits: Limits) -> pb.Limits:
    return pb.Limits(
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        io_read_bps=limits.io_read_bps,
        io_write_bps=limits.io_write_bps,
        pids=limits.pids,
    )


def limits_from_pb(message: pb.Limits) -> Limits:
    return Limits(
        cpus=message.cpus,
        memory_bytes=message.memory_bytes,
        io_read_bps=message.io_read_bps,
        io_write_bps=message.io_write_bps,
        pids=message.pids,
    )


def start_limits(
    limits: Limits | None, isolation: Isolation | None
) -> tuple[pb.Limits | None, pb.Isolation | None]:
    """A library caller's ``limits`` and ``isolation`` as a StartRequest takes them
    (``_requests.start_request``); they must be ours."""
    if limits is not None and not isinstance(limits, Limits):
        raise InvalidRequest("limits", "must be a trio_worker.Limits")
    if isolation is not None and not isinstance(isolation, Isolation):
        raise InvalidRequest("isolation", "must be a trio_worker.Isolation")
    try:
        limits_pb = None if limits is None else limits_to_pb(limits)
    except (TypeError, ValueError, OverflowError) as exc:  # (protobuf's, as request_field)
        raise InvalidRequest("limits", str(exc)) from None
    return limits_pb, None if isolation is None else isolation_to_pb(isolation)


def isolation_to_pb(isolation: Isolation) -> pb.Isolation:
    return pb.Isolation(pid=isolation.pid, mount=isolation.mount, network=isolation.network)


def isolation_from_pb(message: pb.Isolation) -> Isolation:
    return Isolation(pid=message.pid, mount=message.mount, network=message.network)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(value: datetime) -> Timestamp:
    """What ``Timestamp.FromDatetime`` makes, in a fifth of its time (it goes through a
    time tuple): a job has two, in every Status and for each job of a List page."""
    if value.tzinfo is None:  # naive is UTC, as FromDatetime takes it
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


def _spawn_error(errno: int | None) -> int:
    if errno is None:
        return int(pb.SPAWN_ERROR_UNSPECIFIED)
    if errno == _errno.ENOENT:
        return int(pb.SPAWN_ERROR_NOT_FOUND)
    return int(pb.SPAWN_ERROR_NOT_EXECUTABLE)


def _set_time(timestamp: Timestamp, value: datetime) -> None:
    """``timestamp`` set to ``_timestamp(value)`` in place (no message made and copied)."""
    if value.tzinfo is None:  # naive is UTC, as FromDatetime takes it
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    timestamp.seconds = delta.days * 86400 + delta.seconds
    timestamp.nanos = delta.microseconds * 1000


def job_to_pb(info: JobInfo) -> pb.Job:
    """The job's message, its parts (timestamps, limits, isolation) set in place: the
    constructor given messages copied each (an ended job's 8.2-9.3 -> 5.6-5.8 us of CPU;
    every Start, Wait and Stop makes one, a List page one per job)."""
    job = pb.Job(
        id=info.id,
        owner=info.owner,
        command=info.command,
        args=info.args,
        state=STATE_TO_PB[info.state],
        pid=info.pid or 0,
        error=info.error,
        output_bytes=info.output_bytes,
        oom_killed=info.oom_killed,
        output_start=info.output_start,
        spawn_error=_spawn_error(info.spawn_errno),  # type: ignore[arg-type]
        stdin=info.stdin,
        tty=info.tty,
        user=info.user,
    )
    _set_time(job.started_at, info.started_at)
    # (Setting a field of a submessage sets it in the message, zeros too: present as
    # the constructor makes them; tests/test_convert.py checks it.)
    limits, limits_pb = info.limits, job.limits
    limits_pb.cpus = limits.cpus
    limits_pb.memory_bytes = limits.memory_bytes
    limits_pb.io_read_bps = limits.io_read_bps
    limits_pb.io_write_bps = limits.io_write_bps
    limits_pb.pids = limits.pids
    isolation, isolation_pb = info.isolation, job.isolation
    isolation_pb.pid = isolation.pid
    isolation_pb.mount = isolation.mount
    isolation_pb.network = isolation.network
    if info.exit_code is not None:
        job.exit_code = info.exit_code
    if info.signal is not None:
        job.signal = info.signal
    if info.ended_at is not None:
        _set_time(job.ended_at, info.ended_at)
    if info.usage is not None:
        job.usage.cpu_seconds = info.usage.cpu_seconds
        job.usage.memory_peak_bytes = info.usage.memory_peak_bytes
    return job


def job_from_pb(job: pb.Job) -> JobInfo:
    spawn_errno = {
        pb.SPAWN_ERROR_NOT_FOUND: _errno.ENOENT,
        pb.SPAWN_ERROR_NOT_EXECUTABLE: _errno.EACCES,
    }.get(job.spawn_error)
    return JobInfo(
        id=job.id,
        owner=job.owner,
        command=job.command,
        args=tuple(job.args),
        state=STATE_FROM_PB.get(job.state, JobState.LOST),
        pid=job.pid or None,
        exit_code=job.exit_code if job.HasField("exit_code") else None,
        signal=job.signal if job.HasField("signal") else None,
        error=job.error,
        started_at=job.started_at.ToDatetime(tzinfo=UTC),
        ended_at=job.ended_at.ToDatetime(tzinfo=UTC) if job.HasField("ended_at") else None,
        output_bytes=job.output_bytes,
        limits=limits_from_pb(job.limits),
        isolation=isolation_from_pb(job.isolation),
        oom_killed=job.oom_killed,
        spawn_errno=spawn_errno,
        output_start=job.output_start,
        usage=Usage(job.usage.cpu_seconds, job.usage.memory_peak_bytes)
        if job.HasField("usage")
        else None,
        stdin=job.stdin,
        tty=job.tty,
        user=job.user,
    )


def chunk_to_pb(chunk: OutputChunk) -> pb.OutputChunk:
    return pb.OutputChunk(data=chunk.data, offset=chunk.offset, stream=_STREAM_TO_PB[chunk.stream])


def chunk_serialized(chunk: OutputChunk) -> tuple[bytes, bytes, bytes]:
    """``chunk_to_pb(chunk).SerializeToString()`` as three pieces (head, the data itself,
    tail), written by hand: the data is neither copied into a message nor out of it.

    The same bytes protobuf writes (fields in number order, defaults left out), so a
    client cannot tell; ``tests/test_convert.py`` compares the two.
    """
    data = chunk.data
    head = b"\x0a" + _varint(len(data)) if data else b""
    tail = b"\x10" + _varint(chunk.offset) if chunk.offset else b""
    stream = _STREAM_TO_PB[chunk.stream]
    if stream:
        tail += b"\x18" + _varint(stream)
    return head, data, tail


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_from_pb(message: pb.OutputChunk) -> OutputChunk:
    stream = _STREAM_FROM_PB.get(message.stream, OutputStream.STDOUT)
    return OutputChunk(message.data, message.offset, stream)


def duration_to_seconds(duration: Duration, field: str) -> float:
    """A Duration as seconds; negative or malformed ones are the caller's mistake."""
    if duration.seconds < 0 or duration.nanos < 0 or duration.nanos >= 1_000_000_000:
        raise InvalidRequest(field, "must be a non-negative duration")
    return float(duration.seconds + duration.nanos / 1e9)
