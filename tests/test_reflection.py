"""Server reflection (grpc.reflection.v1 and v1alpha) and health as ``run_server`` serves
them, over real mTLS: grpcio-reflection's own client resolves the Worker service into a
descriptor pool, and a call made with message classes built from those descriptors alone
shows that a client needs no proto file. Both need a valid certificate, not a role."""

from __future__ import annotations

import queue
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
import trustme
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as grpcio_reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import cgroup_parent
from tests.grpc_support import Pki, make_pki, running_server
from trio_worker import pki
from trio_worker._identity import Role
from trio_worker._net._transport import CallRecord, StatusCode
from trio_worker._pb import reflection_pb2 as v1
from trio_worker._pb import reflection_v1alpha_pb2 as v1alpha
from trio_worker._pb import worker_pb2
from trio_worker.server._reflection import ReflectionService
from trio_worker.server._run import ServerSettings, run_server

WORKER = "trioworker.v1.Worker"
V1_INFO = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
ALL_SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    WORKER,
]
WORKER_FILES = {
    "worker.proto",
    "google/protobuf/duration.proto",
    "google/protobuf/timestamp.proto",
}
NOT_FOUND = int(StatusCode.NOT_FOUND)


@dataclass
class Served:
    port: int
    ca: Path
    admin: pki.CertFiles
    norole: pki.CertFiles
    records: list[CallRecord]

    def channel(self, who: pki.CertFiles | None = None) -> grpc.Channel:
        files = who or self.admin
        creds = grpc.ssl_channel_credentials(
            self.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
        )
        return grpc.secure_channel(f"localhost:{self.port}", creds)


def _norole_client(directory: Path) -> pki.CertFiles:
    """A certificate from the server's CA without the role extension."""
    ca = trustme.CA.from_pem(
        (directory / "ca.pem").read_bytes(), (directory / "ca.key").read_bytes()
    )
    leaf = ca.issue_cert("probe.example", common_name="probe")
    files = pki.CertFiles(directory / "probe.pem", directory / "probe.key")
    leaf.cert_chain_pems[0].write_to_path(str(files.cert))
    leaf.private_key_pem.write_to_path(str(files.key))
    return files


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    certs = tmp_path / "pki"
    ca = pki.init_ca(certs)
    server = pki.issue_server(certs, ["localhost", "127.0.0.1"])
    admin = pki.issue_client(certs, "root", Role.ADMIN)
    norole = _norole_client(certs)
    records: list[CallRecord] = []
    settings = ServerSettings(
        ca=ca.cert,
        cert=server.cert,
        key=server.key,
        state_dir=tmp_path / "state",
        port=0,
        # Its own parent group: servers of concurrent test runs must not share one.
        cgroup_parent=cgroup_parent(),
    )
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(
                settings, handle_signals=False, on_call=records.append, task_status=task_status
            )

        port = await nursery.start(serve)
        yield Served(port, ca.cert, admin, norole, records)
        nursery.cancel_scope.cancel()


def reflect(ch: grpc.Channel, path: str, pb: Any, requests: list[Any]) -> list[Any]:
    """One bidi call: all ``requests``, then half-close; every response."""
    call = ch.stream_stream(
        path,
        request_serializer=pb.ServerReflectionRequest.SerializeToString,
        response_deserializer=pb.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=30))


def file_names(response: Any) -> list[str]:
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]


# --- grpcio-reflection's client (v1alpha) ------------------------------------------------


async def test_list_services(served: Served) -> None:
    def call() -> list[str]:
        with served.channel() as ch:
            return sorted(ProtoReflectionDescriptorDatabase(ch).get_services())

    assert await trio.to_thread.run_sync(call) == ALL_SERVICES


async def test_call_worker_with_reflected_descriptors_only(served: Served) -> None:
    """Resolve Worker through reflection into a fresh pool, then Start and Wait a job with
    message classes built from it: no proto file, no generated code."""

    def call() -> tuple[set[str], str, int, str]:
        with served.channel() as ch:
            pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
            service = pool.FindServiceByName(WORKER)
            methods = {m.name for m in service.methods}
            output = service.FindMethodByName("Output")
            assert output.output_type.full_name == "trioworker.v1.OutputChunk"
            job_type = pool.FindMessageTypeByName("trioworker.v1.Job")
            assert job_type.fields_by_name["started_at"].message_type.full_name == (
                "google.protobuf.Timestamp"
            )
            env = pool.FindMessageTypeByName("trioworker.v1.StartRequest.EnvEntry")
            assert env.GetOptions().map_entry
            states = pool.FindEnumTypeByName("trioworker.v1.JobState")
            # Nothing came from the process's own (default) pool.
            assert job_type is not worker_pb2.Job.DESCRIPTOR

            def stub(name: str) -> Any:
                method = service.FindMethodByName(name)
                request = message_factory.GetMessageClass(method.input_type)
                response = message_factory.GetMessageClass(method.output_type)
                rpc = ch.unary_unary(
                    f"/{WORKER}/{name}",
                    request_serializer=request.SerializeToString,
                    response_deserializer=response.FromString,
                )
                return request, rpc

            start_request, start = stub("Start")
            job = start(start_request(command="sh", args=["-c", "exit 7"]), timeout=30)
            wait_request, wait = stub("Wait")
            ended = wait(wait_request(id=job.id), timeout=30)
            state = states.values_by_number[ended.state].name
            assert ended.error == "", ended.error
            return methods, state, ended.exit_code, type(ended).DESCRIPTOR.full_name

    methods, state, exit_code, type_name = await trio.to_thread.run_sync(call)
    assert methods == {
        "Start",
        "Stop",
        "Signal",
        "Status",
        "Wait",
        "List",
        "Output",
        "Attach",
        "Remove",
    }
    assert (state, exit_code, type_name) == ("JOB_STATE_EXITED", 7, "trioworker.v1.Job")


async def test_unknown_symbol_and_file_are_not_found(served: Served) -> None:
    def call() -> None:
        with served.channel() as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            # The client raises KeyError on an error_response, after asserting NOT_FOUND.
            with pytest.raises(KeyError):
                db.FindFileContainingSymbol("no.such.Thing")
            with pytest.raises(KeyError):
                db.FindFileByName("no/such.proto")
            # (FindFileContainingExtension never asks the server: see the raw tests.)
            assert db.FindAllExtensionNumbers("trioworker.v1.Job") == []
            # The stream survives errors: the next request is answered.
            assert db.FindFileByName("worker.proto").package == "trioworker.v1"

    await trio.to_thread.run_sync(call)


# --- grpc.reflection.v1, raw ----------------------------------------------------------


async def test_v1_bidi_answers_every_request_in_order(served: Served) -> None:
    R = v1.ServerReflectionRequest
    requests = [
        R(host="h", list_services=""),
        R(file_containing_symbol=WORKER),
        R(file_containing_symbol=f"{WORKER}.Output"),  # a method
        R(file_containing_symbol="trioworker.v1.Job"),  # a message
        R(file_containing_symbol="trioworker.v1.StartRequest.EnvEntry"),  # nested
        R(file_containing_symbol="trioworker.v1.JobState"),  # an enum
        R(file_containing_symbol="trioworker.v1.JOB_STATE_EXITED"),  # an enum value
        R(file_containing_symbol="trioworker.v1.Job.exit_code"),  # a field
        R(file_containing_symbol="google.protobuf.Duration"),  # a dependency's message
        R(file_by_filename="google/protobuf/timestamp.proto"),
        R(file_containing_symbol="grpc.health.v1.HealthCheckResponse.ServingStatus"),
        R(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
        R(file_containing_symbol="trioworker.v1.Nope"),
        R(file_by_filename="nope.proto"),
        R(file_by_filename="google/protobuf/descriptor.proto"),  # loaded, but not ours
        R(file_containing_extension=v1.ExtensionRequest(containing_type="trioworker.v1.Job")),
        R(all_extension_numbers_of_type="trioworker.v1.Job"),
        R(all_extension_numbers_of_type="trioworker.v1.Nope"),
        R(host="only-a-host"),
    ]

    def call() -> list[Any]:
        with served.channel() as ch:
            return reflect(ch, V1_INFO, v1, requests)

    responses = await trio.to_thread.run_sync(call)
    assert len(responses) == len(requests)
    for request, response in zip(requests, responses, strict=True):
        assert response.original_request == request
        assert response.valid_host == request.host
    kinds = [r.WhichOneof("message_response") for r in responses]
    assert kinds == [
        "list_services_response",
        *["file_descriptor_response"] * 11,
        *["error_response"] * 4,
        "all_extension_numbers_response",
        "error_response",
        "error_response",
    ]
    assert [s.name for s in responses[0].list_services_response.service] == ALL_SERVICES
    for response in responses[1:8]:
        names = file_names(response)
        assert names[0] == "worker.proto"  # the file asked for first, then its imports
        assert set(names) == WORKER_FILES
        assert len(names) == len(WORKER_FILES)
    worker = responses[1].file_descriptor_response.file_descriptor_proto[0]
    assert worker == worker_pb2.DESCRIPTOR.serialized_pb
    assert file_names(responses[8]) == ["google/protobuf/duration.proto"]
    assert file_names(responses[9]) == ["google/protobuf/timestamp.proto"]
    assert file_names(responses[10]) == ["grpc_health/v1/health.proto"]
    assert file_names(responses[11]) == ["grpc_reflection/v1/reflection.proto"]
    errors = [r.error_response for r in responses if r.HasField("error_response")]
    assert [e.error_code for e in errors] == [NOT_FOUND] * 5 + [int(StatusCode.INVALID_ARGUMENT)]
    assert "trioworker.v1.Nope" in errors[0].error_message
    numbers = responses[16].all_extension_numbers_response
    assert (numbers.base_type_name, list(numbers.extension_number)) == ("trioworker.v1.Job", [])
    info = [rec for rec in served.records if rec.ctx.method == V1_INFO]
    assert [rec.code for rec in info] == [StatusCode.OK]


async def test_v1alpha_answers_like_v1(served: Served) -> None:
    R = v1alpha.ServerReflectionRequest
    requests = [
        R(list_services=""),
        R(file_containing_symbol="trioworker.v1.OutputChunk"),
        R(file_containing_extension=v1alpha.ExtensionRequest(containing_type="trioworker.v1.Job")),
        R(all_extension_numbers_of_type="no.Such"),
    ]

    def call() -> list[Any]:
        with served.channel() as ch:
            return reflect(ch, V1ALPHA_INFO, v1alpha, requests)

    listed, files, extension, numbers = await trio.to_thread.run_sync(call)
    assert [s.name for s in listed.list_services_response.service] == ALL_SERVICES
    assert set(file_names(files)) == WORKER_FILES
    assert extension.error_response.error_code == NOT_FOUND
    assert numbers.error_response.error_code == NOT_FOUND


# --- no role needed -----------------------------------------------------------------------


async def test_health_and_reflection_need_no_role(served: Served) -> None:
    def call() -> tuple[Any, Any, list[str], grpc.StatusCode]:
        with served.channel(served.norole) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            overall = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            worker = health.Check(health_pb2.HealthCheckRequest(service=WORKER), timeout=10)
            services = sorted(ProtoReflectionDescriptorDatabase(ch).get_services())
            listing = ch.unary_unary(
                f"/{WORKER}/List",
                request_serializer=worker_pb2.ListRequest.SerializeToString,
                response_deserializer=worker_pb2.ListResponse.FromString,
            )
            try:
                listing(worker_pb2.ListRequest(), timeout=10)
            except grpc.RpcError as exc:
                return overall, worker.status, services, exc.code()
            raise AssertionError("List without a role succeeded")

    overall, worker, services, denied = await trio.to_thread.run_sync(call)
    assert overall == health_pb2.HealthCheckResponse.SERVING
    assert worker == health_pb2.HealthCheckResponse.SERVING
    assert services == ALL_SERVICES
    assert denied == grpc.StatusCode.PERMISSION_DENIED  # the Worker still needs one
    roles = {rec.ctx.method: rec.ctx.identity.role for rec in served.records}
    assert roles["/grpc.health.v1.Health/Check"] is None
    assert roles[V1ALPHA_INFO] is None


# --- the service on its own ---------------------------------------------------------------


@pytest.fixture(scope="module")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_drain_ends_idle_reflection_streams(test_pki: Pki) -> None:
    """A client idling on its reflection stream does not hold up a drain."""
    reflection = ReflectionService([])
    async with running_server(
        test_pki, reflection.methods(), on_drain=reflection.enter_graceful_shutdown
    ) as r:
        ch = grpc.secure_channel(r.target, test_pki.credentials())
        release: queue.Queue[None] = queue.Queue()

        def requests() -> Iterator[Any]:
            yield v1.ServerReflectionRequest(list_services="")
            release.get()  # no half-close until the test is over

        try:
            call = ch.stream_stream(
                V1_INFO,
                request_serializer=v1.ServerReflectionRequest.SerializeToString,
                response_deserializer=v1.ServerReflectionResponse.FromString,
            )(requests(), timeout=30)
            first = await trio.to_thread.run_sync(lambda: next(call))
            assert first.HasField("list_services_response")
            started = trio.current_time()
            with trio.fail_after(5):
                await r.server.drain(20.0)
            assert trio.current_time() - started < 5

            def rest() -> grpc.StatusCode:
                try:
                    list(call)
                except grpc.RpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            assert await trio.to_thread.run_sync(rest) == grpc.StatusCode.UNAVAILABLE
        finally:
            release.put(None)
            ch.close()
    assert [rec.code for rec in r.records] == [StatusCode.UNAVAILABLE]


def test_reflection_lists_only_what_it_is_given() -> None:
    reflection = ReflectionService(["grpc.health.v1.Health"])
    assert reflection.service_names == (
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    )
    answer = reflection.answer(v1, v1.ServerReflectionRequest(file_by_filename="worker.proto"))
    assert answer.error_response.error_code == NOT_FOUND
    with pytest.raises(ValueError, match=r"no\.Such"):
        ReflectionService(["no.Such"])


def test_v1alpha_module_is_grpcio_reflections_file() -> None:
    """Our v1alpha gencode registers the very file grpcio-reflection does, so both load in
    one process and share their message classes."""
    assert v1alpha.DESCRIPTOR.name == grpcio_reflection_pb2.DESCRIPTOR.name
    assert v1alpha.DESCRIPTOR.serialized_pb == grpcio_reflection_pb2.DESCRIPTOR.serialized_pb
    assert v1alpha.ServerReflectionRequest is grpcio_reflection_pb2.ServerReflectionRequest
    assert v1.DESCRIPTOR.package == "grpc.reflection.v1"
    assert v1.DESCRIPTOR.name == "grpc_reflection/v1/reflection.proto"
