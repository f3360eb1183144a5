"""Conversions to the wire written by hand (``_convert.chunk_serialized``,
``_convert._timestamp``) against what protobuf itself writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from trio_worker._convert import _timestamp, chunk_from_pb, chunk_serialized, chunk_to_pb
from trio_worker._model import OutputChunk, OutputStream
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
