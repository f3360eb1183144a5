"""grpc.health.v1.Health over real mTLS, checked with grpcio-health-checking's own stubs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
import trustme
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.grpc_support import Pki, channel, make_pki, running_server
from trio_worker._net._transport import StatusCode
from trio_worker._pb import health_pb2 as our_health_pb2
from trio_worker.server._health import HealthService, ServingStatus

REPO = Path(__file__).resolve().parent.parent
WORKER = "trioworker.v1.Worker"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def check(pki: Pki, target: str, service: str = "") -> Any:
    with channel(pki, target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def code_of_check(pki: Pki, target: str, service: str) -> grpc.StatusCode:
    try:
        check(pki, target, service)
    except grpc.RpcError as exc:
        return exc.code()
    raise AssertionError("Check succeeded")


async def test_check(pki: Pki) -> None:
    health = HealthService([WORKER])
    async with running_server(pki, health.methods()) as r:
        assert await trio.to_thread.run_sync(check, pki, r.target) == SERVING
        assert await trio.to_thread.run_sync(check, pki, r.target, WORKER) == SERVING
        health.set_status(WORKER, ServingStatus.NOT_SERVING)
        assert await trio.to_thread.run_sync(check, pki, r.target, WORKER) == NOT_SERVING
        code = await trio.to_thread.run_sync(code_of_check, pki, r.target, "no.Such")
        assert code == grpc.StatusCode.NOT_FOUND
    assert [rec.code for rec in r.records][-1] is StatusCode.NOT_FOUND


async def test_list(pki: Pki) -> None:
    health = HealthService([WORKER])
    async with running_server(pki, health.methods()) as r:

        def call() -> dict[str, int]:
            with channel(pki, r.target) as ch:
                response = health_pb2_grpc.HealthStub(ch).List(
                    health_pb2.HealthListRequest(), timeout=10
                )
                return {name: value.status for name, value in response.statuses.items()}

        assert await trio.to_thread.run_sync(call) == {"": SERVING, WORKER: SERVING}


async def test_check_without_role(pki: Pki, tmp_path: Path) -> None:
    """Health needs a valid client certificate, not a role."""
    ca = trustme.CA.from_pem(pki.ca.read_bytes(), (pki.ca.parent / "ca.key").read_bytes())
    leaf = ca.issue_cert("probe.example", common_name="probe")
    cert, key = tmp_path / "probe.pem", tmp_path / "probe.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    norole = Pki(pki.ca, pki.server_cert, pki.server_key, cert, key)
    health = HealthService()
    async with running_server(pki, health.methods()) as r:
        assert await trio.to_thread.run_sync(check, norole, r.target) == SERVING
    assert r.records[0].ctx.identity.name == "probe"
    assert r.records[0].ctx.identity.role is None


async def test_watch_streams_changes(pki: Pki) -> None:
    health = HealthService([WORKER])
    async with running_server(pki, health.methods()) as r:
        ch = channel(pki, r.target)
        try:
            stub = health_pb2_grpc.HealthStub(ch)
            known = stub.Watch(health_pb2.HealthCheckRequest(service=WORKER), timeout=30)
            unknown = stub.Watch(health_pb2.HealthCheckRequest(service="later"), timeout=30)

            async def receive(stream: Any) -> Any:
                return (await trio.to_thread.run_sync(next, stream)).status

            assert await receive(known) == SERVING
            assert await receive(unknown) == SERVICE_UNKNOWN
            health.set_status(WORKER, ServingStatus.NOT_SERVING)
            assert await receive(known) == NOT_SERVING
            health.set_status("later", ServingStatus.SERVING)
            assert await receive(unknown) == SERVING
            health.set_status(WORKER, ServingStatus.SERVING)
            assert await receive(known) == SERVING
            known.cancel()
            unknown.cancel()
        finally:
            ch.close()


async def test_shutdown_not_serving_and_watch_ends(pki: Pki) -> None:
    health = HealthService([WORKER])
    async with running_server(pki, health.methods(), on_drain=health.enter_graceful_shutdown) as r:
        ch = channel(pki, r.target)
        try:
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            assert (await trio.to_thread.run_sync(next, watch)).status == SERVING
            with trio.fail_after(5):
                await r.server.drain(5.0)  # returns early: the watch does not hold it up

            def rest() -> tuple[list[Any], grpc.StatusCode]:
                statuses = []
                try:
                    for message in watch:
                        statuses.append(message.status)
                except grpc.RpcError as exc:
                    return statuses, exc.code()
                return statuses, grpc.StatusCode.OK

            assert await trio.to_thread.run_sync(rest) == (
                [NOT_SERVING],
                grpc.StatusCode.UNAVAILABLE,
            )
        finally:
            ch.close()
    assert health.status() == ServingStatus.NOT_SERVING
    health.set_status("", ServingStatus.SERVING)  # ignored once shutting down
    assert health.status() == ServingStatus.NOT_SERVING


async def test_check_while_shutting_down(pki: Pki) -> None:
    health = HealthService()
    async with running_server(pki, health.methods()) as r:
        health.enter_graceful_shutdown()
        assert await trio.to_thread.run_sync(check, pki, r.target) == NOT_SERVING


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """The committed health_pb2 is proto/grpc_health/v1/health.proto, and is the very file
    grpcio-health-checking registers, so both load into one descriptor pool."""
    out = tmp_path / "health.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--descriptor_set_out={out}",
            str(REPO / "proto" / "grpc_health" / "v1" / "health.proto"),
        ],
        check=True,
    )
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in compiled.message_type:  # protoc fills json_name; gencode leaves it out
        for nested in [message, *message.nested_type]:
            for field in nested.field:
                field.ClearField("json_name")
    assert compiled.SerializeToString() == our_health_pb2.DESCRIPTOR.serialized_pb
    assert our_health_pb2.DESCRIPTOR.serialized_pb == health_pb2.DESCRIPTOR.serialized_pb
    assert our_health_pb2.HealthCheckResponse is health_pb2.HealthCheckResponse
