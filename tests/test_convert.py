"""Conversions to the wire written by hand (``_convert.chunk_serialized``,
``_convert._timestamp``, ``_convert.job_to_pb``'s parts set in place) against what
protobuf itself writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from trio_worker._convert import (
    STATE_TO_PB,
    _spawn_error,
    _timestamp,
    chunk_from_pb,
    chunk_serialized,
    chunk_to_pb,
    job_from_pb,
    job_to_pb,
)
from trio_worker._model import (
    Isolation,
    JobInfo,
    JobState,
    Limits,
    OutputChunk,
    OutputStream,
    Usage,
)
from trio_worker._pb import worker_pb2 as pb

chunks = st.builds(
    OutputChunk,
    st.binary(max_size=300),
    st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 127, 128, 2**14, 2**35])),
    st.sampled_from(list(OutputStream)),
)


@given(chunks)
def test_an_output_chunk_serialized_by_hand_is_what_protobuf_writes(chunk: OutputChunk) -> None:
    pieces = chunk_serialized(chunk)
    assert pieces[1] is chunk.data  # the data itself, not a copy
    wire = b"".join(pieces)
    assert wire == chunk_to_pb(chunk).SerializeToString()
    assert chunk_from_pb(pb.OutputChunk.FromString(wire)) == chunk


def test_a_large_chunk_keeps_its_length_prefix_whole() -> None:
    data = bytes(300_000)
    chunk = OutputChunk(data, 2**40, OutputStream.STDERR)
    wire = b"".join(chunk_serialized(chunk))
    assert wire == chunk_to_pb(chunk).SerializeToString()


offsets = st.integers(-23 * 60, 23 * 60).map(lambda m: timezone(timedelta(minutes=m)))


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.one_of(st.none(), st.just(UTC), offsets),
    )
)
def test_a_timestamp_made_by_hand_is_what_protobuf_makes(value: datetime) -> None:
    expected = Timestamp()
    expected.FromDatetime(value)
    assert _timestamp(value) == expected


u64 = st.integers(0, 2**64 - 1)
times = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.one_of(st.none(), st.just(UTC), offsets),
)
infos = st.builds(
    JobInfo,
    id=st.text(max_size=30),
    owner=st.text(max_size=10),
    command=st.text(max_size=10),
    args=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    state=st.sampled_from(list(JobState)),
    pid=st.one_of(st.none(), st.integers(1, 2**31 - 1)),
    exit_code=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    signal=st.one_of(st.none(), st.integers(0, 64)),
    error=st.text(max_size=10),
    started_at=times,
    ended_at=st.one_of(st.none(), times),
    output_bytes=u64,
    limits=st.builds(
        Limits,
        cpus=st.one_of(st.just(0.0), st.just(-0.0), st.floats(0, 1024)),
        memory_bytes=st.one_of(st.just(0), u64),
        io_read_bps=st.one_of(st.just(0), u64),
        io_write_bps=st.one_of(st.just(0), u64),
        pids=st.integers(0, 2**32 - 1),
    ),
    isolation=st.builds(Isolation, pid=st.booleans(), mount=st.booleans(), network=st.booleans()),
    oom_killed=st.booleans(),
    spawn_errno=st.one_of(st.none(), st.integers(0, 200)),
    output_start=u64,
    usage=st.one_of(
        st.none(),
        st.builds(Usage, cpu_seconds=st.floats(0, 1e9), memory_peak_bytes=u64),
    ),
    stdin=st.booleans(),
    tty=st.booleans(),
    user=st.text(max_size=10),
)


def _job_made_by_protobuf(info: JobInfo) -> pb.Job:
    """Every field given to the constructor, submessages made whole first."""
    job = pb.Job(
        id=info.id,
        owner=info.owner,
        command=info.command,
        args=info.args,
        state=STATE_TO_PB[info.state],
        pid=info.pid or 0,
        error=info.error,
        started_at=_timestamp(info.started_at),
        output_bytes=info.output_bytes,
        limits=pb.Limits(
            cpus=info.limits.cpus,
            memory_bytes=info.limits.memory_bytes,
            io_read_bps=info.limits.io_read_bps,
            io_write_bps=info.limits.io_write_bps,
            pids=info.limits.pids,
        ),
        isolation=pb.Isolation(
            pid=info.isolation.pid, mount=info.isolation.mount, network=info.isolation.network
        ),
        oom_killed=info.oom_killed,
        output_start=info.output_start,
        spawn_error=_spawn_error(info.spawn_errno),  # type: ignore[arg-type]
        stdin=info.stdin,
        tty=info.tty,
        user=info.user,
    )
    if info.exit_code is not None:
        job.exit_code = info.exit_code
    if info.signal is not None:
        job.signal = info.signal
    if info.ended_at is not None:
        job.ended_at.CopyFrom(_timestamp(info.ended_at))
    if info.usage is not None:
        job.usage.CopyFrom(
            pb.Usage(
                cpu_seconds=info.usage.cpu_seconds, memory_peak_bytes=info.usage.memory_peak_bytes
            )
        )
    return job


@given(infos)
def test_a_job_message_is_what_protobuf_makes_from_every_field(info: JobInfo) -> None:
    made, expected = job_to_pb(info), _job_made_by_protobuf(info)
    assert made == expected
    assert made.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )
    for part in ("started_at", "limits", "isolation", "ended_at", "usage"):
        assert made.HasField(part) == expected.HasField(part)
    assert job_from_pb(made).usage == info.usage
