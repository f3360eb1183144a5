"""Conversions to the wire written by hand (``_convert.chunk_serialized``) against what
protobuf itself writes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from trio_worker._convert import chunk_from_pb, chunk_serialized, chunk_to_pb
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
