"""trio_worker.client against a real server (run_server, real TLS, real processes).

Every method round-trips; every status the service sends comes back as our exception;
connection failures are one-line ConnectionFailed naming the address; a lost connection
fails pending calls and followers promptly; a slow consumer keeps the client's buffer
bounded; closing or dropping an output iterator leaves the connection to other calls.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_worker import (
    AuthenticationFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    JobState,
    JobStillRunning,
    OutputStream,
    PermissionDenied,
    ResourceExhausted,
    ShuttingDown,
    pki,
)
from trio_worker._error_codes import exception_from
from trio_worker._identity import Role
from trio_worker._net import _channel as channel
from trio_worker._net._failures import Refused
from trio_worker._net._transport import TransportConfig
from trio_worker._wire import _calls as wire_calls
from trio_worker._wire import _client as wire_client
from trio_worker.client import ConnectionFailed, RemoteError, WorkerClient, connect
from trio_worker.server._run import ServerSettings, run_server

PY = sys.executable
#: The server's output chunk size (WorkerService's default).
SERVER_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, pki.CertFiles]
    foreign_ca: Path
    foreign_client: pki.CertFiles


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    dev = pki.ensure_dev_pki(tmp_path_factory.mktemp("state"))
    directory = dev.directory
    clients = {
        "admin": dev.client,
        "reader": pki.issue_client(directory, "reader", Role.READONLY),
        "alice": pki.issue_client(directory, "alice", Role.FULL),
        "bob": pki.issue_client(directory, "bob", Role.FULL),
    }
    other = pki.ensure_dev_pki(tmp_path_factory.mktemp("other"))
    return Certs(
        dev.ca.cert,
        dev.server.cert,
        dev.server.key,
        clients,
        other.ca.cert,
        other.client,
    )


@dataclass
class Server:
    certs: Certs
    port: int
    scope: trio.CancelScope
    #: ``run_server`` has returned (after ``scope`` was cancelled: its listener is closed).
    stopped: trio.Event

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connect(
        self, who: str = "admin", *, port: int | None = None, server_hostname: str | None = None
    ) -> AbstractAsyncContextManager[WorkerClient]:
        files = self.certs.clients[who]
        return connect(
            f"127.0.0.1:{port or self.port}",
            ca=self.certs.ca,
            cert=files.cert,
            key=files.key,
            server_hostname=server_hostname,
        )


@asynccontextmanager
async def running_server(
    certs: Certs, state_dir: Path, transport: TransportConfig | None = None
) -> AsyncIterator[Server]:
    settings = ServerSettings(
        ca=certs.ca,
        cert=certs.server_cert,
        key=certs.server_key,
        state_dir=state_dir,
        port=0,
        shutdown_grace=1.0,
        transport=transport or TransportConfig(),
        # Our own parent group: servers sharing one kill each other's jobs as leftovers.
        cgroup_parent=f"trio-worker-test-{hashlib.sha256(bytes(state_dir)).hexdigest()[:12]}",
    )
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(settings, handle_signals=False, task_status=task_status)

        scope = trio.CancelScope()

        stopped = trio.Event()

        async def serve_in_scope(task_status: trio.TaskStatus[int]) -> None:
            try:
                with scope:
                    await serve(task_status=task_status)
            finally:
                stopped.set()

        port = await nursery.start(serve_in_scope)
        yield Server(certs, port, scope, stopped)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def server(certs: Certs, tmp_path: Path) -> AsyncIterator[Server]:
    async with running_server(certs, tmp_path / "server-state") as srv:
        yield srv


def py_job(code: str) -> tuple[str, list[str]]:
    return PY, ["-c", code]


async def stop_quietly(client: WorkerClient, job_id: str) -> None:
    """Clean up a job a test left running; how that goes is not what the test is about
    (a stop racing the job's own end can fail on the server's side)."""
    with contextlib.suppress(JobNotRunning, RemoteError):
        await client.stop(job_id, grace=0)


# --- a TCP proxy that can cut connections ------------------------------------------------


@dataclass
class Proxy:
    port: int = 0
    scopes: set[trio.CancelScope] = field(default_factory=set)
    sockets: list[trio.SocketStream] = field(default_factory=list)
    frozen: bool = False

    def cut(self, *, reset: bool = False) -> None:
        """Close every proxied connection: FIN (or RST with ``reset``) to both sides."""
        if reset:
            for stream in self.sockets:
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        for scope in self.scopes:
            scope.cancel()


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[Proxy]:
    proxy = Proxy()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy.port = listeners[0].socket.getsockname()[1]

    async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        while True:
            data = await source.receive_some(65536)
            if not data:
                return
            if proxy.frozen:  # a peer that vanished without a FIN
                await trio.sleep_forever()
            await sink.send_all(data)

    async def handle(downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", target_port)
        except BaseException:
            downstream.socket.close()
            raise
        proxy.sockets += [downstream, upstream]
        try:
            with trio.CancelScope() as scope:
                proxy.scopes.add(scope)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(pump, downstream, upstream)
                        nursery.start_soon(pump, upstream, downstream)
                except* (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            for stream in (downstream, upstream):
                stream.socket.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield proxy
        nursery.cancel_scope.cancel()


# --- round trips ---------------------------------------------------------------------------


async def test_every_method_round_trips(server: Server, tmp_path: Path) -> None:
    async with server.connect() as client:
        assert client.address == server.addr
        job = await client.start(
            "sh",
            ["-c", 'printf "$GREETING"; printf err >&2; pwd; exit 3'],
            env={"GREETING": "hi"},
            cwd=tmp_path,
        )
        assert job.state is JobState.RUNNING
        assert job.owner == "admin"
        assert job.command == "sh"
        ended = await client.wait(job.id)
        assert (ended.state, ended.exit_code) == (JobState.EXITED, 3)
        status = await client.status(job.id)
        assert (status.id, status.state, status.exit_code) == (job.id, JobState.EXITED, 3)
        assert status.ended_at == ended.ended_at
        assert job.id in {j.id for j in await client.list()}
        chunks = [c async for c in client.output(job.id, follow=False)]
        out = b"".join(c.data for c in chunks if c.stream is OutputStream.STDOUT)
        err = b"".join(c.data for c in chunks if c.stream is OutputStream.STDERR)
        assert (out, err) == (b"hi" + str(tmp_path).encode() + b"\n", b"err")
        offsets = [c.offset for c in chunks]
        assert offsets == sorted(offsets)
        assert offsets[0] == 0

        trap = 'trap "echo got-usr1" USR1; echo ready; while :; do sleep 0.05; done'
        sleeper = await client.start("sh", ["-c", trap])
        async with client.output(sleeper.id) as stream:
            async for chunk in stream:
                if b"ready" in chunk.data:
                    break
        signalled = await client.signal(sleeper.id, signal.SIGUSR1)
        assert signalled.id == sleeper.id
        with trio.fail_after(10):
            async for chunk in client.output(sleeper.id):
                if b"got-usr1" in chunk.data:
                    break
        stopped = await client.stop(sleeper.id, grace=2.0)
        assert stopped.state is JobState.KILLED
        assert stopped.signal in (signal.SIGTERM, signal.SIGKILL)  # KILL: a very slow host


async def test_stop_with_server_default_grace(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("sleep", ["30"])
        stopped = await client.stop(job.id)
        assert stopped.state is JobState.KILLED


async def test_remove_refuses_running_jobs_unless_forced(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("sleep", ["30"])
        with pytest.raises(JobStillRunning) as refused:
            await client.remove(job.id)
        assert refused.value.job_id == job.id
        removed = await client.remove(job.id, force=True)
        assert (removed.id, removed.state) == (job.id, JobState.KILLED)
        with pytest.raises(JobNotFound):
            await client.remove(job.id)
        assert job.id not in {j.id for j in await client.list()}


async def test_a_replay_under_way_when_its_job_is_removed_is_not_found(server: Server) -> None:
    # Not INTERNAL: its output files went from under the reader.
    async with server.connect() as client:
        job = await client.start("head", ["-c", str(24 * 1024 * 1024), "/dev/zero"])
        await client.wait(job.id)
        replay = client.output(job.id, follow=False)
        first = await replay.__anext__()
        assert first.offset == 0
        await client.remove(job.id)
        with pytest.raises(JobNotFound):
            async for _ in replay:
                pass


async def test_command_that_cannot_run_is_a_failed_job(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("/nonexistent/command")
        assert job.state is JobState.FAILED
        assert job.error


async def test_follow_live_job_and_replay_from_offset(server: Server) -> None:
    code = "import sys,time\nfor i in range(5):\n print(f'line {i}', flush=True); time.sleep(0.1)"
    async with server.connect() as client:
        job = await client.start(*py_job(code))
        live = [c async for c in client.output(job.id, follow=True)]
        assert (await client.wait(job.id)).state is JobState.EXITED
        data = b"".join(c.data for c in live)
        assert data == b"".join(f"line {i}\n".encode() for i in range(5))
        assert len(live) > 1  # it came as the job wrote it, not at the end
        tail = [c async for c in client.output(job.id, offset=7, follow=False)]
        assert tail[0].offset == 7
        assert b"".join(c.data for c in tail) == data[7:]
        assert [c async for c in client.output(job.id, offset=len(data), follow=False)] == []


async def test_many_followers_on_one_connection_all_see_a_live_job(
    server: Server, tmp_path: Path
) -> None:
    """150 followers of a running job on one connection all get its first line while it
    runs: with SETTINGS_MAX_CONCURRENT_STREAMS 32 the client queued the other 118 until
    the first streams ended, that is until the job did (a grpcio channel does the same)."""
    followers = 150
    release = tmp_path / "release"
    script = f"echo hello; while [ ! -e {release} ]; do sleep 0.05; done; echo bye"
    seen = 0
    everyone = trio.Event()
    async with server.connect() as client:
        job = await client.start("sh", ["-c", script])

        async def follow() -> None:
            nonlocal seen
            data = b""
            async for chunk in client.output(job.id, follow=True):
                if b"hello" not in data and b"hello" in data + chunk.data:
                    seen += 1
                    if seen == followers:
                        everyone.set()
                data += chunk.data
            assert data == b"hello\nbye\n"

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(followers):
                    nursery.start_soon(follow)
                with trio.fail_after(60):
                    await everyone.wait()  # all of them, while the job waits for us
                release.touch()
        finally:
            release.touch()
        assert (await client.wait(job.id)).state is JobState.EXITED


async def test_binary_output_every_byte_value(server: Server) -> None:
    payload = bytes(range(256)) * 1024
    code = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 1024)"
    async with server.connect() as client:
        job = await client.start(*py_job(code))
        data = b"".join([c.data async for c in client.output(job.id)])
        assert data == payload
        replay = b"".join([c.data async for c in client.output(job.id, follow=False)])
        assert replay == payload


async def test_large_request_waits_for_flow_control_window(server: Server) -> None:
    # 1.5 MB of environment: more than the server's initial 1 MiB stream window, less than
    # the kernel's limit on a command's arguments and environment.
    env = {f"BIG{i}": "x" * 64000 for i in range(24)}
    code = "import os; print(sum(len(v) for k, v in os.environ.items() if k.startswith('BIG')))"
    async with server.connect() as client:
        job = await client.start(*py_job(code), env=env)
        await client.wait(job.id)
        data = b"".join([c.data async for c in client.output(job.id, follow=False)])
        assert data.strip() == str(24 * 64000).encode()


async def test_many_concurrent_calls_on_one_connection(server: Server) -> None:
    # More than the server's concurrent streams (32): the rest wait for a slot.
    async with server.connect() as client:
        job = await client.start("true")
        results: list[str] = []

        async def one() -> None:
            results.append((await client.status(job.id)).id)

        async with trio.open_nursery() as nursery:
            for _ in range(250):
                nursery.start_soon(one)
        assert results == [job.id] * 250


# --- errors --------------------------------------------------------------------------------


async def test_unknown_job_is_job_not_found(server: Server) -> None:
    async with server.connect() as client:
        for call in (
            client.status("nope"),
            client.wait("nope"),
            client.stop("nope"),
            client.signal("nope", signal.SIGTERM),
        ):
            with pytest.raises(JobNotFound) as info:
                await call
            assert info.value.job_id == "nope"
        with pytest.raises(JobNotFound):
            async for _ in client.output("nope"):
                pass


async def test_bad_input_names_the_field(server: Server) -> None:
    async with server.connect() as client:
        with pytest.raises(InvalidRequest) as info:
            await client.start("")
        assert info.value.field == "command"
        job = await client.start("sleep", ["30"])
        with pytest.raises(InvalidRequest) as info:
            await client.signal(job.id, 12345)
        assert info.value.field == "signal"
        with pytest.raises(InvalidRequest) as info:
            await client.status("")
        assert info.value.field == "id"
        # Caught before sending: no request can carry them.
        with pytest.raises(InvalidRequest) as info:
            await client.start("echo", "hello")
        assert info.value.field == "args"
        with pytest.raises(InvalidRequest) as info:
            await client.stop(job.id, grace=-1)
        assert info.value.field == "grace"
        with pytest.raises(InvalidRequest) as info:
            client.output(job.id, offset=-1)
        assert info.value.field == "offset"
        with pytest.raises(InvalidRequest) as info:
            await client.start("echo", [1])  # type: ignore[list-item]
        assert info.value.field == "args"
        with pytest.raises(InvalidRequest) as info:
            await client.start("echo", env={"A": "\udcff"})  # not UTF-8: protobuf refuses
        assert info.value.field == "env"
        # The parameter's name, as Supervisor.start says it (the wire's is working_dir),
        # whether the server finds it wrong or the client does before sending.
        with pytest.raises(InvalidRequest) as info:
            await client.start("ls", cwd="/no/such/dir")
        assert info.value.field == "cwd"
        with pytest.raises(InvalidRequest) as info:
            await client.start("ls", cwd="/\udcff")
        assert info.value.field == "cwd"
        await stop_quietly(client, job.id)


async def test_readonly_cannot_start(server: Server) -> None:
    async with server.connect("reader") as client:
        with pytest.raises(PermissionDenied):
            await client.start("true")
        assert await client.list() == []


async def test_stop_of_ended_job_is_job_not_running(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("true")
        await client.wait(job.id)
        with pytest.raises(JobNotRunning) as info:
            await client.stop(job.id)
        assert info.value.job_id == job.id
        assert info.value.state == "exited"
        with pytest.raises(JobNotRunning):
            await client.signal(job.id, signal.SIGTERM)


async def test_full_role_sees_only_its_own_jobs(server: Server) -> None:
    async with server.connect("alice") as alice, server.connect("bob") as bob:
        mine = await alice.start("true")
        theirs = await bob.start("true")
        assert [j.id for j in await alice.list()] == [mine.id]
        with pytest.raises(JobNotFound):
            await alice.status(theirs.id)
        with pytest.raises(JobNotFound):
            await alice.stop(theirs.id)
        with pytest.raises(JobNotFound):
            async for _ in alice.output(theirs.id):
                pass
        async with server.connect("admin") as admin:
            assert {j.id for j in await admin.list()} == {mine.id, theirs.id}


def test_statuses_without_our_details_map_by_code_alone() -> None:
    """A status from the transport itself or another server: the class the code alone
    names, else RemoteError; the message text is never parsed."""
    assert isinstance(exception_from(5, "no job with id 'x'", None, "x"), JobNotFound)
    assert isinstance(exception_from(5, "gone", None, None), RemoteError)
    unnamed = exception_from(3, "limits.memory_bytes: must be >= 0", None)
    assert isinstance(unnamed, InvalidRequest)
    assert unnamed.field == "request"
    assert isinstance(exception_from(7, "no", None), PermissionDenied)
    assert isinstance(exception_from(16, "no role", None), AuthenticationFailed)
    # Once parsed from the text; now an unexplained FAILED_PRECONDITION stays unexplained.
    not_running = exception_from(9, "job 01ABC is not running (it is killed)", None, "01ABC")
    assert type(not_running) is RemoteError
    assert type(exception_from(9, "memory limits need cgroup v2", None)) is RemoteError
    assert isinstance(exception_from(8, "too many jobs", None), ResourceExhausted)
    assert isinstance(exception_from(14, "the server is shutting down", None), ShuttingDown)
    other = exception_from(13, "internal error", None)
    assert isinstance(other, RemoteError)
    assert (other.code, other.message) == (13, "internal error")


async def test_errors_arrive_as_their_class_from_the_reason(server: Server) -> None:
    async with server.connect() as client:
        job = await client.start("true")
        await client.wait(job.id)
        with pytest.raises(JobNotRunning) as not_running:
            await client.stop(job.id)
        assert (not_running.value.job_id, not_running.value.state) == (job.id, "exited")
        with pytest.raises(InvalidRequest) as invalid:
            await client.start("")
        assert invalid.value.field == "command"


async def test_a_huge_job_id_is_described_not_echoed(server: Server) -> None:
    huge = "x" * (512 * 1024)
    async with server.connect() as client:
        with trio.fail_after(10):
            with pytest.raises(JobNotFound) as info:
                await client.status(huge)
    assert info.value.job_id == huge  # the client's own id, not one read back from the server
    assert len(str(info.value)) < 200


async def test_calls_follow_the_callers_deadline(server: Server) -> None:
    """No timeout= keywords: the caller's cancel scope is the deadline, sent to the server as
    grpc-timeout, and expiring is trio's own Cancelled, caught by the caller's scope."""
    async with server.connect() as client:
        job = await client.start("sleep", ["30"])
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as wait_scope:
                await client.wait(job.id)
        assert wait_scope.cancelled_caught
        with trio.fail_after(5):
            with trio.move_on_after(0.2) as output_scope:
                async for _ in client.output(job.id):
                    pass
        assert output_scope.cancelled_caught
        assert (await client.status(job.id)).state is JobState.RUNNING  # connection fine
        await stop_quietly(client, job.id)


async def test_errors_in_the_block_are_not_wrapped(server: Server) -> None:
    with pytest.raises(JobNotFound):
        async with server.connect() as client:
            await client.status("nope")
    with pytest.raises(KeyError):
        async with server.connect():
            raise KeyError("mine")


# --- connecting ------------------------------------------------------------------------------


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_connection_refused(certs: Certs) -> None:
    port = _unused_port()
    files = certs.clients["admin"]
    with pytest.raises(ConnectionFailed) as info:
        async with connect(f"127.0.0.1:{port}", ca=certs.ca, cert=files.cert, key=files.key):
            pass
    assert str(info.value) == f"cannot connect to 127.0.0.1:{port}: connection refused"


async def test_unresolvable_host(certs: Certs) -> None:
    files = certs.clients["admin"]
    with pytest.raises(ConnectionFailed) as info:
        async with connect(
            "no-such-host.invalid:50051", ca=certs.ca, cert=files.cert, key=files.key
        ):
            pass
    assert str(info.value).startswith(
        "cannot connect to no-such-host.invalid:50051: cannot resolve"
    )


@pytest.mark.parametrize("addr", ["localhost", "localhost:http", "::1:50051", "[::1]:0", ":1"])
async def test_malformed_address(certs: Certs, addr: str) -> None:
    files = certs.clients["admin"]
    with pytest.raises(InvalidRequest) as info:
        async with connect(addr, ca=certs.ca, cert=files.cert, key=files.key):
            pass
    assert info.value.field == "addr"


async def test_wrong_ca_is_tls_failure(server: Server) -> None:
    files = server.certs.clients["admin"]
    with pytest.raises(ConnectionFailed) as info:
        async with connect(server.addr, ca=server.certs.foreign_ca, cert=files.cert, key=files.key):
            pass
    message = str(info.value)
    assert message.startswith(f"TLS handshake with {server.addr} failed: certificate verify failed")
    assert "\n" not in message


async def test_wrong_host_name_is_tls_failure(server: Server) -> None:
    files = server.certs.clients["admin"]
    with pytest.raises(ConnectionFailed) as info:
        async with connect(
            server.addr,
            ca=server.certs.ca,
            cert=files.cert,
            key=files.key,
            server_hostname="elsewhere.example",
        ):
            pass
    assert "certificate verify failed" in str(info.value)
    assert "elsewhere.example" in str(info.value)


async def test_server_refusing_our_certificate(server: Server) -> None:
    """The server's alert is what we report, every time: also when its close meets our
    first write before we read the alert (half the tries on a loaded machine, once)."""
    foreign = server.certs.foreign_client
    for _ in range(20):
        with pytest.raises(Refused) as info:
            async with connect(server.addr, ca=server.certs.ca, cert=foreign.cert, key=foreign.key):
                pass
        message = str(info.value)
        refused = f"TLS handshake with {server.addr} failed: the server refused our certificate ("
        assert message.startswith(refused), message
        assert "alert" in message


async def test_not_a_tls_server(certs: Certs) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await stream.aclose()

    files = certs.clients["admin"]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, silent, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ConnectionFailed) as info:
            async with connect(f"127.0.0.1:{port}", ca=certs.ca, cert=files.cert, key=files.key):
                pass
        assert str(info.value).startswith(f"TLS handshake with 127.0.0.1:{port} failed")
        nursery.cancel_scope.cancel()


async def test_handshake_timeout(certs: Certs) -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    files = certs.clients["admin"]
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, mute, 0)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(5), pytest.raises(ConnectionFailed) as info:
            async with connect(
                f"127.0.0.1:{port}", ca=certs.ca, cert=files.cert, key=files.key, timeout=0.3
            ):
                pass
        assert "timed out" in str(info.value)
        nursery.cancel_scope.cancel()


# --- losing the connection -------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_cut_connection_fails_follower_and_pending_call(server: Server, reset: bool) -> None:
    async with tcp_proxy(server.port) as proxy, server.connect(port=proxy.port) as client:
        job = await client.start("sh", ["-c", "echo started; sleep 30"])
        errors: dict[str, BaseException] = {}
        streaming = trio.Event()

        async def follow() -> None:
            try:
                async for _ in client.output(job.id):
                    streaming.set()
            except ConnectionFailed as exc:
                errors["follow"] = exc

        async def wait() -> None:
            try:
                await client.wait(job.id)
            except ConnectionFailed as exc:
                errors["wait"] = exc

        # Within 5 s, half the keepalive's PING_AFTER: the cut is what ends the calls.
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                nursery.start_soon(wait)
                await streaming.wait()  # the follower has its first chunk
                # and the Wait is in flight: every task here, the server's too, is parked.
                await trio.testing.wait_all_tasks_blocked()
                proxy.cut(reset=reset)
        assert set(errors) == {"follow", "wait"}
        for exc in errors.values():
            assert str(exc).startswith(f"lost the connection to 127.0.0.1:{proxy.port}: ")
        # The next call dials again (through the proxy, which accepts new connections).
        assert (await client.status(job.id)).state is JobState.RUNNING
        await stop_quietly(client, job.id)


async def _follow_until_server_cancelled(certs: Certs, tmp_path: Path) -> BaseException | None:
    """Follow a quiet job, cancel the whole server under it; return how the stream ended."""
    async with running_server(certs, tmp_path / "state") as srv, srv.connect() as client:
        job = await client.start("sh", ["-c", "echo started; sleep 30"])
        outcome: list[BaseException | None] = []
        streaming = trio.Event()

        async def follow() -> None:
            try:
                async for _ in client.output(job.id):
                    streaming.set()
                outcome.append(None)
            except (ConnectionFailed, ShuttingDown) as exc:
                outcome.append(exc)

        # Never a hang: within 5 s, half the keepalive's PING_AFTER.
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await streaming.wait()  # mid-stream: the follower has its first chunk
                srv.scope.cancel()
            # Gone, its listener closed: a dial while it was going away could still reach
            # it, and be reset ("TLS handshake ... failed: connection reset").
            await srv.stopped.wait()
        assert len(outcome) == 1
        # Sent on the old connection before its EOF is read, or on a new one: both fail.
        with pytest.raises(ConnectionFailed, match=r"cannot connect|lost the connection"):
            await client.status(job.id)
        return outcome[0]


async def test_server_cancelled_mid_stream_never_hangs(certs: Certs, tmp_path: Path) -> None:
    await _follow_until_server_cancelled(certs, tmp_path)


async def test_server_cancelled_mid_stream_is_an_error(certs: Certs, tmp_path: Path) -> None:
    # Cut short, the stream ends UNAVAILABLE (or the connection is gone): never a normal end.
    outcome = await _follow_until_server_cancelled(certs, tmp_path)
    assert isinstance(outcome, ShuttingDown | ConnectionFailed)


async def test_silent_peer_detected_by_keepalive(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel, "PING_AFTER", 0.2)
    monkeypatch.setattr(channel, "PING_TIMEOUT", 0.3)
    async with tcp_proxy(server.port) as proxy, server.connect(port=proxy.port) as client:
        job = await client.start("sleep", ["30"])
        proxy.frozen = True  # nothing gets through any more, and nothing is closed
        with trio.fail_after(5), pytest.raises(ConnectionFailed, match="no answer"):
            await client.wait(job.id)
    async with server.connect() as admin:
        await stop_quietly(admin, job.id)


async def test_idle_goaway_then_new_connection(certs: Certs, tmp_path: Path) -> None:
    transport = TransportConfig(idle_timeout=0.2)
    async with running_server(certs, tmp_path / "state", transport) as srv, srv.connect() as c:
        job = await c.start("true")
        first = c._conn
        assert first is not None
        with trio.fail_after(10):  # the server sends GOAWAY once idle for 0.2 s, and closes
            await first.finished.wait()
        assert not first.accepting
        assert (await c.status(job.id)).id == job.id
        assert c._conn is not first


async def test_calls_after_the_block_fail(server: Server) -> None:
    async with server.connect() as client:
        pass
    with pytest.raises(ConnectionFailed):
        await client.status("x")


# --- flow control and early close --------------------------------------------------------------


async def test_slow_consumer_keeps_buffer_bounded(server: Server) -> None:
    size = 64 * 1024 * 1024
    # What the client documents: the ack threshold, one stream window, one message.
    bound = wire_calls.ACK_BELOW + wire_client.STREAM_WINDOW + SERVER_CHUNK + 64
    async with server.connect() as client:
        job = await client.start("head", ["-c", str(size), "/dev/zero"])
        total = 0
        seen_ahead = 0
        async with client.output(job.id) as stream:
            async for chunk in stream:
                total += len(chunk.data)
                seen_ahead = max(seen_ahead, stream.buffered_bytes)
                assert stream.buffered_bytes <= bound
                if total < size // 4:
                    await trio.sleep(0.004)  # slow at first: the server gets far ahead
            peak = stream.peak_buffered_bytes
        assert total == size
        assert peak <= bound
        assert seen_ahead >= SERVER_CHUNK  # it did read ahead, up to the bound


async def test_closing_output_early_keeps_connection(server: Server) -> None:
    code = (
        "import sys,time\n"
        "while True:\n"
        " sys.stdout.buffer.write(b'x' * 65536); sys.stdout.flush(); time.sleep(0.01)"
    )
    async with server.connect() as client:
        job = await client.start(*py_job(code))
        conn = client._conn
        assert conn is not None
        stream = client.output(job.id)
        got = 0
        async for chunk in stream:
            got += len(chunk.data)
            if got > 256 * 1024:
                break
        await stream.aclose()
        assert not conn._calls
        # Dropped without closing: reset when collected.
        abandoned = client.output(job.id)
        await abandoned.__anext__()
        assert conn._calls
        del abandoned
        gc.collect()
        await trio.sleep(0.05)
        assert not conn._calls
        # The same connection serves everyone else.
        assert (await client.status(job.id)).state is JobState.RUNNING
        again = client.output(job.id, offset=0)
        first = await again.__anext__()
        assert first.offset == 0
        await again.aclose()
        assert client._conn is conn
        assert conn.accepting
        stopped = await client.stop(job.id, grace=0)
        assert stopped.state is JobState.KILLED


async def test_cancelled_next_loses_nothing(server: Server) -> None:
    code = "import time\nfor i in range(3):\n print(i, flush=True); time.sleep(0.3)"
    async with server.connect() as client:
        job = await client.start(*py_job(code))
        stream = client.output(job.id)
        data = b""
        while True:
            with trio.move_on_after(0.05):
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    break
                data += chunk.data
        assert data == b"0\n1\n2\n"


def test_grpc_timeout_format() -> None:
    fmt = wire_client.grpc_timeout
    assert fmt(0.05) == "50000000n"
    assert fmt(0.5) == "500000u"
    assert fmt(1.5) == "1500000u"
    assert fmt(30) == "30000000u"
    assert fmt(3600) == "3600000m"
    assert fmt(10**9) == "16666667M"


def test_local_and_remote_apis_agree() -> None:
    """WorkerClient's methods take what Supervisor's take, with the same defaults (stop's
    grace, start's args), and neither takes a timeout: the caller's cancel scope is it."""
    import inspect

    from trio_worker import Supervisor

    for name in ("start", "stop", "signal", "status", "wait", "remove", "output"):
        local = inspect.signature(getattr(Supervisor, name)).parameters
        remote = inspect.signature(getattr(WorkerClient, name)).parameters
        assert "timeout" not in remote
        # The same arguments, passed the same ways (sup.remove(id, True) works remotely too).
        assert set(remote) <= set(local), name
        keyword = inspect.Parameter.KEYWORD_ONLY
        positional = [p for p, spec in remote.items() if spec.kind is not keyword]
        assert positional == [p for p, spec in local.items() if spec.kind is not keyword], name
        for parameter in remote:
            assert remote[parameter].default == local[parameter].default, (name, parameter)
            assert remote[parameter].kind == local[parameter].kind, (name, parameter)


async def test_output_of_an_unknown_job_raises_when_iterated_locally_too(tmp_path: Path) -> None:
    from trio_worker import open_supervisor

    async with open_supervisor(state_dir=tmp_path / "state") as sup:
        stream = sup.output("nope")  # no error yet, as client.output("nope")
        with pytest.raises(JobNotFound):
            await anext(stream)


#: What a library user's ``import trio_worker.client`` must not load: the server side (the
#: supervisor and a job's parts, the host's mechanisms, the services and the transport), and
#: what only the server uses (SQLite, X.509 parsing).
_SERVER_SIDE = (
    "trio_worker._jobs",
    "trio_worker._host",
    "trio_worker.server",
    "trio_worker.cli",
    "trio_worker._net._transport",
    "trio_worker._net._budget",
    "trio_worker._identity",
    "trio_worker._revocation",
    "trio_worker.pki",
    "sqlite3",
    "cryptography",
)
_SERVER_SIDE_PACKAGES = tuple(f"{name}." for name in _SERVER_SIDE)


def test_importing_the_client_loads_nothing_of_the_server_side() -> None:
    import json
    import subprocess

    code = "import json, sys, trio_worker.client; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(out.stdout)
    assert "trio_worker._net._channel" in modules  # the probe imported the client
    loaded = [m for m in modules if m in _SERVER_SIDE or m.startswith(_SERVER_SIDE_PACKAGES)]
    assert loaded == [], loaded
