"""The committed code in trio_worker/_pb/ must be what worker.proto generates.

Two checks, so that a proto change without regeneration always fails while a newer
grpcio-tools on a fresh clone does not: the descriptor embedded in worker_pb2 must equal
the one protoc compiles from worker.proto now (independent of tool versions), and, when
the installed generators are the ones recorded in the committed code, every generated
file must match byte for byte.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

from trio_worker._pb import GENERATOR, worker_grpc, worker_pb2

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "trio_worker" / "_pb"


def _load_gen_proto() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_proto = _load_gen_proto()


def _clear_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # protoc's Python generator leaves json_name out of the descriptor it embeds.
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _clear_json_names(message.nested_type)


def test_embedded_descriptor_matches_worker_proto(tmp_path: Path) -> None:
    out = tmp_path / "worker.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO}",
            f"--descriptor_set_out={out}",
            "worker.proto",
        ],
        check=True,
        cwd=REPO,
    )
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    committed = descriptor_pb2.FileDescriptorProto.FromString(worker_pb2.DESCRIPTOR.serialized_pb)
    _clear_json_names(fresh.message_type)
    assert committed == fresh, "worker.proto changed: regenerate with `nox -s proto`"


@pytest.mark.parametrize("source", sorted(gen_proto.STANDARD_PROTOS))
def test_embedded_descriptor_matches_standard_proto(tmp_path: Path, source: str) -> None:
    """Same check for the standard services' protos kept in proto/ (health, reflection)."""
    out = tmp_path / "standard.binpb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={REPO / 'proto'}",
            f"--descriptor_set_out={out}",
            f"{source}.proto",
        ],
        check=True,
        cwd=REPO,
    )
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    module = importlib.import_module(f"trio_worker._pb.{gen_proto.STANDARD_PROTOS[source]}")
    committed = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    _clear_json_names(fresh.message_type)
    assert committed == fresh, f"proto/{source}.proto changed: regenerate with `nox -s proto`"
    assert module.DESCRIPTOR.name == f"{source}.proto"


def test_generated_files_match_byte_for_byte(tmp_path: Path) -> None:
    installed = gen_proto.generator_versions()
    if installed != GENERATOR:
        pytest.skip(f"committed code is from {GENERATOR}; installed: {installed}")
    gen_proto.generate(tmp_path)
    committed = {p.name for p in COMMITTED.iterdir() if p.is_file()}
    generated = {p.name for p in tmp_path.iterdir()}
    assert committed == generated
    stale = [
        n for n in sorted(generated) if (tmp_path / n).read_bytes() != (COMMITTED / n).read_bytes()
    ]
    assert not stale, f"{stale} out of date: regenerate with `nox -s proto`"


def test_purerpc_stubs_expose_the_nine_methods() -> None:
    import purerpc

    unary, stream = purerpc.Cardinality.UNARY_UNARY, purerpc.Cardinality.UNARY_STREAM
    bidi = purerpc.Cardinality.STREAM_STREAM
    pb = worker_pb2
    expected = {
        "Start": (unary, pb.StartRequest, pb.Job),
        "Stop": (unary, pb.StopRequest, pb.Job),
        "Signal": (unary, pb.SignalRequest, pb.Job),
        "Status": (unary, pb.StatusRequest, pb.Job),
        "Wait": (unary, pb.WaitRequest, pb.Job),
        "List": (unary, pb.ListRequest, pb.ListResponse),
        "Output": (stream, pb.OutputRequest, pb.OutputChunk),
        "Attach": (bidi, pb.AttachRequest, pb.AttachResponse),
        "Remove": (unary, pb.RemoveRequest, pb.Job),
    }
    service = worker_grpc.WorkerServicer().service
    assert service.name == "trioworker.v1.Worker"
    got = {
        name: (m.signature.cardinality, m.signature.request_type, m.signature.response_type)
        for name, m in service.methods.items()
    }
    assert got == expected
    stub = worker_grpc.WorkerStub(None)  # building stubs does not touch the channel
    assert all(callable(getattr(stub, name)) for name in expected)


def test_wire_names_follow_the_contract() -> None:
    pb = worker_pb2
    assert pb.DESCRIPTOR.package == "trioworker.v1"
    assert dict(pb.JobState.items()) == {
        "JOB_STATE_UNSPECIFIED": 0,
        "JOB_STATE_RUNNING": 1,
        "JOB_STATE_EXITED": 2,
        "JOB_STATE_KILLED": 3,
        "JOB_STATE_FAILED": 4,
        "JOB_STATE_LOST": 5,
    }
    assert dict(pb.OutputStream.items()) == {
        "OUTPUT_STREAM_UNSPECIFIED": 0,
        "OUTPUT_STREAM_STDOUT": 1,
        "OUTPUT_STREAM_STDERR": 2,
    }
    job_fields = {f.name for f in pb.Job.DESCRIPTOR.fields}
    assert job_fields >= {
        "id", "owner", "command", "args", "state", "pid", "exit_code", "signal", "error",
        "started_at", "ended_at", "output_bytes", "limits", "isolation", "oom_killed",
        "stdin", "tty", "user",
    }  # fmt: skip
    # exit_code and signal have presence: 0 and "not set" differ.
    job = pb.Job(exit_code=0)
    assert job.HasField("exit_code")
    assert not job.HasField("signal")
    assert [f.name for f in pb.StartRequest.DESCRIPTOR.fields] == [
        "command", "args", "env", "working_dir", "limits", "isolation",
        "stdin", "tty", "terminal_size", "user",
    ]  # fmt: skip
    assert [f.name for f in pb.Limits.DESCRIPTOR.fields] == [
        "cpus", "memory_bytes", "io_read_bps", "io_write_bps", "pids",
    ]  # fmt: skip
    assert [f.name for f in pb.ListRequest.DESCRIPTOR.fields] == [
        "page_size", "page_token", "states", "owner",
    ]  # fmt: skip
    assert [f.name for f in pb.ListResponse.DESCRIPTOR.fields] == ["jobs", "next_page_token"]
    assert [f.name for f in pb.RemoveRequest.DESCRIPTOR.fields] == ["id", "force"]
    assert [f.name for f in pb.TerminalSize.DESCRIPTOR.fields] == ["rows", "cols"]
    assert [f.name for f in pb.AttachOpen.DESCRIPTOR.fields] == ["id", "offset"]
    attach_events = pb.AttachRequest.DESCRIPTOR.oneofs_by_name["event"].fields
    assert [f.name for f in attach_events] == ["open", "stdin", "close_stdin", "resize"]
    reply_events = pb.AttachResponse.DESCRIPTOR.oneofs_by_name["event"].fields
    assert [f.name for f in reply_events] == ["output", "ended"]
