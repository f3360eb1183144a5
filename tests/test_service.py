"""The Worker service end to end: the official grpcio client over mTLS against
``run_server`` (real supervisor, real processes), every method, every cell of
the authorization table."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from trio_worker import LimitPolicy, Limits, open_supervisor, pki
from trio_worker._identity import Identity, Role
from trio_worker._net._transport import CallContext, CallRecord, RpcError, StatusCode, UnaryMethod
from trio_worker._pb import worker_pb2 as pb
from trio_worker.server._run import ServerSettings, run_server
from trio_worker.server._service import WorkerService

W = "/trioworker.v1.Worker/"
UNARY = {
    "Start": (pb.StartRequest, pb.Job),
    "Stop": (pb.StopRequest, pb.Job),
    "Signal": (pb.SignalRequest, pb.Job),
    "Status": (pb.StatusRequest, pb.Job),
    "Wait": (pb.WaitRequest, pb.Job),
    "List": (pb.ListRequest, pb.ListResponse),
    "Remove": (pb.RemoveRequest, pb.Job),
}


def _roleless_client(directory: Path, name: str) -> pki.CertFiles:
    """A client certificate from our CA that carries no role extension."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = pki.CertFiles(directory / f"{name}.pem", directory / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass
class Cluster:
    port: int
    ca: Path
    clients: dict[str, pki.CertFiles]
    records: list[CallRecord]

    def channel(self, who: str) -> grpc.Channel:
        files = self.clients[who]
        creds = grpc.ssl_channel_credentials(
            self.ca.read_bytes(), files.key.read_bytes(), files.cert.read_bytes()
        )
        return grpc.secure_channel(f"localhost:{self.port}", creds)


class Caller:
    """Blocking grpcio calls, run from trio through a worker thread."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.ch = channel

    async def __call__(self, method: str, request: Any, **kw: Any) -> Any:
        req_type, resp_type = UNARY[method]
        fn = self.ch.unary_unary(W + method, req_type.SerializeToString, resp_type.FromString)
        return await trio.to_thread.run_sync(lambda: fn(request, timeout=30, **kw))

    async def output(self, request: pb.OutputRequest) -> list[pb.OutputChunk]:
        fn = self.ch.unary_stream(
            W + "Output", pb.OutputRequest.SerializeToString, pb.OutputChunk.FromString
        )
        return await trio.to_thread.run_sync(lambda: list(fn(request, timeout=30)))

    async def code(self, method: str, request: Any) -> grpc.StatusCode:
        try:
            if method == "Output":
                await self.output(request)
            else:
                await self(method, request)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with _serving(tmp_path) as running:
        yield running


@asynccontextmanager
async def _serving(tmp_path: Path, **settings_: Any) -> AsyncIterator[Cluster]:
    certs = tmp_path / "pki"
    ca = pki.init_ca(certs)
    server = pki.issue_server(certs, ["localhost", "127.0.0.1"])
    clients = {
        "reader": pki.issue_client(certs, "reader", Role.READONLY),
        "alice": pki.issue_client(certs, "alice", Role.FULL),
        "bob": pki.issue_client(certs, "bob", Role.FULL),
        "root": pki.issue_client(certs, "root", Role.ADMIN),
        "nobody": _roleless_client(certs, "nobody"),
    }
    records: list[CallRecord] = []
    settings = ServerSettings(
        ca=ca.cert,
        cert=server.cert,
        key=server.key,
        state_dir=tmp_path / "state",
        port=0,
        **settings_,
    )
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(
                settings, handle_signals=False, on_call=records.append, task_status=task_status
            )

        port = await nursery.start(serve)
        yield Cluster(port, ca.cert, clients, records)
        nursery.cancel_scope.cancel()


async def test_every_method_through_grpcio(cluster: Cluster) -> None:
    call = Caller(cluster.channel("alice"))
    job = await call(
        "Start",
        pb.StartRequest(
            command="sh",
            args=["-c", 'printf "$GREETING"; printf err >&2; exit 3'],
            env={"GREETING": "hi"},
            working_dir="/tmp",
        ),
    )
    # Start answers once the process exists; under load this short job may already have ended.
    assert job.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_EXITED)
    assert job.owner == "alice"
    assert job.pid > 0
    end = await call("Wait", pb.WaitRequest(id=job.id))
    assert (end.state, end.exit_code, end.HasField("signal")) == (pb.JOB_STATE_EXITED, 3, False)
    assert end.output_bytes == 5
    status = await call("Status", pb.StatusRequest(id=job.id))
    assert status.ended_at.ToDatetime() >= status.started_at.ToDatetime()
    chunks = await call.output(pb.OutputRequest(id=job.id, follow=True))
    tagged = {(c.stream, bytes(c.data)) for c in chunks}
    assert tagged == {(pb.OUTPUT_STREAM_STDOUT, b"hi"), (pb.OUTPUT_STREAM_STDERR, b"err")}
    from_two = await call.output(pb.OutputRequest(id=job.id, offset=2, follow=False))
    assert b"".join(c.data for c in from_two) == b"".join(c.data for c in chunks)[2:]
    listed = await call("List", pb.ListRequest())
    assert [j.id for j in listed.jobs] == [job.id]

    sleeper = await call("Start", pb.StartRequest(command="sleep", args=["1000"]))
    signalled = await call("Signal", pb.SignalRequest(id=sleeper.id, signal=10))
    assert signalled.id == sleeper.id
    end = await call("Wait", pb.WaitRequest(id=sleeper.id))
    assert (end.state, end.signal) == (pb.JOB_STATE_KILLED, 10)

    sleeper = await call("Start", pb.StartRequest(command="sleep", args=["1000"]))
    stopped = await call("Stop", pb.StopRequest(id=sleeper.id, grace=Duration(seconds=2)))
    assert (stopped.state, stopped.signal) == (pb.JOB_STATE_KILLED, 15)

    running = await call("Start", pb.StartRequest(command="sleep", args=["1000"]))
    assert await call.code("Remove", pb.RemoveRequest(id=running.id)) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    removed = await call("Remove", pb.RemoveRequest(id=running.id, force=True))
    assert (removed.id, removed.state, removed.signal) == (running.id, pb.JOB_STATE_KILLED, 9)
    removed = await call("Remove", pb.RemoveRequest(id=job.id))
    assert (removed.state, removed.output_bytes) == (pb.JOB_STATE_EXITED, 5)
    for gone in (running.id, job.id):
        assert await call.code("Status", pb.StatusRequest(id=gone)) == grpc.StatusCode.NOT_FOUND
        assert await call.code("Remove", pb.RemoveRequest(id=gone)) == grpc.StatusCode.NOT_FOUND


async def test_a_start_naming_no_limits_gets_the_policys_as_one_naming_zeros(
    tmp_path: Path,
) -> None:
    """A StartRequest without limits (the server applies its policy once for all such
    Starts) and one whose limits are there but all zero get the same: the policy's,
    here its maximum; a limit above the maximum is still refused."""
    policy = LimitPolicy(maximums=Limits(memory_bytes=256 << 20))
    async with _serving(tmp_path, limit_policy=policy) as running:
        call = Caller(running.channel("alice"))
        unset = await call("Start", pb.StartRequest(command="true"))
        zeros = await call("Start", pb.StartRequest(command="true", limits=pb.Limits()))
        assert unset.limits.memory_bytes == zeros.limits.memory_bytes == 256 << 20
        assert unset.limits == zeros.limits
        over = pb.StartRequest(command="true", limits=pb.Limits(memory_bytes=1 << 30))
        assert await call.code("Start", over) == grpc.StatusCode.INVALID_ARGUMENT
        for job in (unset, zeros):
            assert (await call("Wait", pb.WaitRequest(id=job.id))).exit_code == 0


async def test_following_a_live_job_streams_binary_bytes(cluster: Cluster) -> None:
    call = Caller(cluster.channel("root"))
    script = (
        "printf 'a\\000\\377'; sleep 0.3; head -c 300000 /dev/urandom | od -An | head -c 200000"
    )
    job = await call("Start", pb.StartRequest(command="sh", args=["-c", script]))
    chunks = await call.output(pb.OutputRequest(id=job.id, follow=True))
    data = b"".join(c.data for c in chunks)
    assert data.startswith(b"a\x00\xff")
    assert len(data) == 3 + 200000
    offsets = [c.offset for c in chunks]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0


async def test_a_command_that_cannot_run_is_a_failed_job(cluster: Cluster) -> None:
    call = Caller(cluster.channel("alice"))
    job = await call("Start", pb.StartRequest(command="echi", args=["hello"]))
    assert job.state == pb.JOB_STATE_FAILED
    assert job.error == "No such file or directory: 'echi'"
    assert job.spawn_error == pb.SPAWN_ERROR_NOT_FOUND
    listed = await call("List", pb.ListRequest())
    assert [j.id for j in listed.jobs] == [job.id]


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (pb.StartRequest(command=""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.StartRequest(command="echo", env={"A=B": "x"}), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.StartRequest(command="e\0cho"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.StartRequest(command="ls", working_dir="/nope"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            pb.StartRequest(command="true", limits=pb.Limits(cpus=0.001)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_bad_start_requests(cluster: Cluster, request_: Any, code: Any) -> None:
    call = Caller(cluster.channel("alice"))
    assert await call.code("Start", request_) == code
    assert (await call("List", pb.ListRequest())).jobs == []


async def test_errors_carry_error_info_and_bad_request_to_grpcio(cluster: Cluster) -> None:
    """The official client reads ``grpc-status-details-bin``: a google.rpc.Status with an
    ErrorInfo (reason, domain trioworker.v1) and, for INVALID_ARGUMENT, a BadRequest."""
    call = Caller(cluster.channel("alice"))

    async def details(method: str, request: Any) -> status_pb2.Status:
        with pytest.raises(grpc.RpcError) as info:
            await call(method, request)
        trailers = dict(info.value.trailing_metadata())  # type: ignore[attr-defined]
        status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        assert status.code == info.value.code().value[0]  # type: ignore[attr-defined]
        return status

    def unpack(status: status_pb2.Status, kind: Any) -> Any:
        found = [d for d in status.details if d.Is(kind.DESCRIPTOR)]
        assert len(found) == 1
        message = kind()
        found[0].Unpack(message)
        return message

    missing = await details("Status", pb.StatusRequest(id="x" * 100_000))
    info = unpack(missing, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("JOB_NOT_FOUND", "trioworker.v1")
    assert len(missing.message) < 200  # described, not echoed

    invalid = await details("Start", pb.StartRequest(command=""))
    assert unpack(invalid, error_details_pb2.ErrorInfo).reason == "INVALID_ARGUMENT"
    bad_request = unpack(invalid, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["command"]

    # The field as the request names it (the library's parameter is ``cwd``).
    nowhere = await details("Start", pb.StartRequest(command="ls", working_dir="/no/such/dir"))
    bad_request = unpack(nowhere, error_details_pb2.BadRequest)
    assert [v.field for v in bad_request.field_violations] == ["working_dir"]
    assert nowhere.message.startswith("working_dir: ")


async def test_errors_map_to_status_codes(cluster: Cluster) -> None:
    call = Caller(cluster.channel("alice"))
    assert await call.code("Status", pb.StatusRequest(id="nope")) == grpc.StatusCode.NOT_FOUND
    job = await call("Start", pb.StartRequest(command="true"))
    await call("Wait", pb.WaitRequest(id=job.id))
    failed_precondition = grpc.StatusCode.FAILED_PRECONDITION
    assert await call.code("Stop", pb.StopRequest(id=job.id)) == failed_precondition
    assert await call.code("Signal", pb.SignalRequest(id=job.id, signal=15)) == failed_precondition
    sleeper = await call("Start", pb.StartRequest(command="sleep", args=["1000"]))
    bad_signal = pb.SignalRequest(id=sleeper.id, signal=1000)
    assert await call.code("Signal", bad_signal) == grpc.StatusCode.INVALID_ARGUMENT
    bad_grace = pb.StopRequest(id=sleeper.id, grace=Duration(seconds=-1))
    assert await call.code("Stop", bad_grace) == grpc.StatusCode.INVALID_ARGUMENT
    past_end = pb.OutputRequest(id=job.id, offset=10)
    assert await call.code("Output", past_end) == grpc.StatusCode.INVALID_ARGUMENT
    await call("Stop", pb.StopRequest(id=sleeper.id, grace=Duration()))


Action = Callable[[Caller, str], Any]
ACTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "Stop": ("Stop", lambda i: pb.StopRequest(id=i, grace=Duration())),
    "Signal": ("Signal", lambda i: pb.SignalRequest(id=i, signal=0 + 10)),
    "Status": ("Status", lambda i: pb.StatusRequest(id=i)),
    "Wait": ("Wait", lambda i: pb.WaitRequest(id=i)),
    "Output": ("Output", lambda i: pb.OutputRequest(id=i, follow=False)),
    "Remove": ("Remove", lambda i: pb.RemoveRequest(id=i, force=True)),
}

OK, DENIED, HIDDEN = (
    grpc.StatusCode.OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
)


def _READS(code: Any) -> dict[str, Any]:
    return dict.fromkeys(("Status", "Wait", "Output"), code)


#: caller -> method -> code on a job owned by alice (the contract's table; Remove as Stop).
TABLE = {
    "reader": {"Stop": DENIED, "Signal": DENIED, "Remove": DENIED} | _READS(OK),
    "alice": {"Stop": OK, "Signal": OK, "Remove": OK} | _READS(OK),
    "bob": {"Stop": HIDDEN, "Signal": HIDDEN, "Remove": HIDDEN} | _READS(HIDDEN),
    "root": {"Stop": OK, "Signal": OK, "Remove": OK} | _READS(OK),
    "nobody": dict.fromkeys(ACTIONS, DENIED),
}


@pytest.mark.parametrize("who", list(TABLE))
@pytest.mark.parametrize("method", list(ACTIONS))
async def test_authorization_table(cluster: Cluster, who: str, method: str) -> None:
    owner = Caller(cluster.channel("alice"))
    # A job that ends on SIGUSR1 and then, for Wait, is already over.
    script = "trap 'exit 0' USR1; while :; do sleep 0.05; done"
    job = await owner("Start", pb.StartRequest(command="sh", args=["-c", script]))
    if method == "Wait":
        await owner("Signal", pb.SignalRequest(id=job.id, signal=10))
    caller = Caller(cluster.channel(who))
    name, build = ACTIONS[method]
    assert await caller.code(name, build(job.id)) == TABLE[who][method]


@pytest.mark.parametrize(
    ("who", "start", "sees"),
    [
        ("reader", DENIED, {"alice", "bob"}),
        ("alice", OK, {"alice"}),
        ("bob", OK, {"bob"}),
        ("root", OK, {"alice", "bob"}),
        ("nobody", DENIED, None),
    ],
)
async def test_start_and_list_per_role(
    cluster: Cluster, who: str, start: Any, sees: set[str] | None
) -> None:
    for owner in ("alice", "bob"):
        await Caller(cluster.channel(owner))("Start", pb.StartRequest(command="true"))
    caller = Caller(cluster.channel(who))
    assert await caller.code("Start", pb.StartRequest(command="true")) == start
    if sees is None:
        assert await caller.code("List", pb.ListRequest()) == DENIED
        return
    owners = {j.owner for j in (await caller("List", pb.ListRequest())).jobs}
    assert owners == sees | ({who} if start == OK else set())


async def test_audit_records_identity_method_job_and_status(cluster: Cluster) -> None:
    call = Caller(cluster.channel("alice"))
    job = await call("Start", pb.StartRequest(command="true"))
    await call.code("Status", pb.StatusRequest(id="missing"))
    starts = [r for r in cluster.records if r.ctx.method.endswith("/Start")]
    assert starts[-1].ctx.identity.name == "alice"
    assert starts[-1].response.id == job.id
    assert starts[-1].code.name == "OK"
    missing = [r for r in cluster.records if getattr(r.request, "id", "") == "missing"]
    assert missing[-1].code.name == "NOT_FOUND"


async def test_a_wait_for_an_ended_job_answers_without_a_turn_of_the_loop() -> None:
    """A short command has usually ended before its client's Wait comes: that Wait's
    reply is made at once, with no checkpoint (a cancelled scope around it does not stop
    it); the Wait of a running job still waits, and is cancellable."""
    ctx = CallContext(Identity("alice", Role.FULL), W + "Wait", "test", None)
    async with open_supervisor() as sup:
        service = WorkerService(sup)
        done = await sup.start("sh", ["-c", "exit 3"], owner="alice")
        await sup.wait(done.id)
        sleeper = await sup.start("sleep", ["60"], owner="alice")
        with trio.CancelScope() as scope:
            scope.cancel()
            reply = await service.wait(pb.WaitRequest(id=done.id), ctx)
        assert not scope.cancelled_caught
        assert reply.state == pb.JOB_STATE_EXITED
        assert reply.exit_code == 3
        with trio.CancelScope() as scope:
            scope.cancel()
            await service.wait(pb.WaitRequest(id=sleeper.id), ctx)
        assert scope.cancelled_caught
        await sup.stop(sleeper.id, grace=0)


def _hold_the_loop_until_exited(pid: int) -> None:
    """Block (no checkpoint: the watcher cannot run meanwhile) until the process has
    exited, leaving it unreaped."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


async def test_a_wait_that_comes_before_the_watchers_turn_is_answered_in_the_reader() -> None:
    """A job whose process has exited, with the watcher's turn still to come (the loop is
    held here; in a server it is busy elsewhere): ``wait_ended`` records its end and
    answers it then, with its exit status and usage, and the watcher does not end it
    again. A job still running: "not now". A job whose last output is still in its pipe:
    that output is read then, and its end (which waits for the disk) is the Wait's."""
    ctx = CallContext(Identity("alice", Role.FULL), W + "Wait", "test", None)
    async with open_supervisor() as sup:
        service = WorkerService(sup)
        runner = sup._runner
        ended: list[str] = []
        record = runner._done

        def counted(watch: Any) -> None:
            ended.append(watch.job.id)
            record(watch)

        runner._done = counted  # type: ignore[method-assign]
        sleeper = await sup.start("sleep", ["60"], owner="alice")
        job = await sup.start("sh", ["-c", "sleep 0.2; exit 3"], owner="alice")
        _hold_the_loop_until_exited(job.pid)
        assert service.wait_ended(pb.WaitRequest(id=sleeper.id), ctx) is None
        reply = service.wait_ended(pb.WaitRequest(id=job.id), ctx)
        assert reply is not None
        assert (reply.state, reply.exit_code) == (pb.JOB_STATE_EXITED, 3)
        assert reply.HasField("usage")
        assert ended == [job.id]
        for _ in range(5):
            await trio.sleep(0.01)  # the watcher's turns: nothing left for it
        assert ended == [job.id]

        talker = await sup.start("sh", ["-c", "sleep 0.2; printf 'last words'"], owner="alice")
        _hold_the_loop_until_exited(talker.pid)
        assert service.wait_ended(pb.WaitRequest(id=talker.id), ctx) is None
        assert sup.status(talker.id).output_bytes == len("last words")
        reply = await service.wait(pb.WaitRequest(id=talker.id), ctx)
        assert (reply.state, reply.exit_code, reply.output_bytes) == (pb.JOB_STATE_EXITED, 0, 10)
        data = b"".join([chunk.data async for chunk in sup.output(talker.id, follow=False)])
        assert data == b"last words"
        assert ended == [job.id, talker.id]
        await sup.stop(sleeper.id, grace=0)


async def test_a_wait_for_an_ended_job_is_answered_in_the_reader() -> None:
    """``wait_ended`` (Wait's ``at_once``, run in the connection's reader with no task)
    answers a visible ended job, says "not now" (None) for a running one, and refuses as
    ``wait`` does: NOT_FOUND for a job the caller may not see or that is not there,
    PERMISSION_DENIED for a caller without the right."""

    def ctx(name: str, role: Role | None) -> CallContext:
        return CallContext(Identity(name, role), W + "Wait", "test", None)

    alice = ctx("alice", Role.FULL)
    async with open_supervisor() as sup:
        service = WorkerService(sup)
        wait = service.methods()[W + "Wait"]
        assert isinstance(wait, UnaryMethod)
        assert wait.at_once == service.wait_ended
        done = await sup.start("sh", ["-c", "exit 3"], owner="alice")
        await sup.wait(done.id)
        sleeper = await sup.start("sleep", ["60"], owner="alice")
        reply = service.wait_ended(pb.WaitRequest(id=done.id), alice)
        assert reply is not None
        assert (reply.state, reply.exit_code) == (pb.JOB_STATE_EXITED, 3)
        assert service.wait_ended(pb.WaitRequest(id=sleeper.id), alice) is None
        refusals = [
            (ctx("bob", Role.FULL), done.id, StatusCode.NOT_FOUND),
            (alice, "no-such-job", StatusCode.NOT_FOUND),
            (ctx("nobody", None), done.id, StatusCode.PERMISSION_DENIED),
        ]
        for caller, job_id, code in refusals:
            with pytest.raises(RpcError) as raised:
                service.wait_ended(pb.WaitRequest(id=job_id), caller)
            assert raised.value.code is code
            with pytest.raises(RpcError) as waited:
                await service.wait(pb.WaitRequest(id=job_id), caller)
            assert (waited.value.code, waited.value.message) == (code, raised.value.message)
        await sup.stop(sleeper.id, grace=0)
