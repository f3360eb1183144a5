"""grpc-go, the official Go client, works against our server (the contract: any official
gRPC client). The Go program (``tests/interop_go/main.go``) knows no message types: it sends
the bytes this test encodes with ``trio_worker._pb`` through a pass-through codec, over
``credentials.NewTLS`` with TLS 1.3, our CA and a client certificate, and returns the reply
bytes and the status it decoded (code, message, ``grpc-status-details-bin``).

Go and grpc-go come from Debian (``golang-go``, ``golang-google-grpc-dev``, installed by
``.ci/run``): the build is GOPATH mode over ``/usr/share/gocode`` and needs no network.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from trio_worker import pki
from trio_worker._identity import Role
from trio_worker._pb import worker_pb2 as pb

from .conftest import require_program
from .test_cli import ServerProcess, clean_env, own_cgroup

SOURCE = Path(__file__).parent / "interop_go" / "main.go"
GOPATH = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go sources
SERVICE = "/trioworker.v1.Worker/"
OK, NOT_FOUND, PERMISSION_DENIED = 0, 5, 7  # gRPC status codes, as grpc-go numbers them

M = TypeVar("M", bound=Message)


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go client, built once per test session (GOCACHE: Go's own, or the caller's)."""
    go = require_program("go", "the grpc-go interop test")
    if not (GOPATH / "src" / "google.golang.org" / "grpc").is_dir():
        message = f"the grpc-go interop test needs grpc-go under {GOPATH} (golang-google-grpc-dev)"
        if os.environ.get("TRIO_WORKER_REQUIRE_ROOT") == "1":
            pytest.fail(f"{message}, and TRIO_WORKER_REQUIRE_ROOT=1 forbids skipping")
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("interop_go")
    binary = directory / "interop_go"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOPROXY": "off",
        "CGO_ENABLED": "0",
    }
    subprocess.run(
        [go, "build", "-o", str(binary), str(SOURCE)],
        cwd=directory,
        env=env,
        check=True,
        timeout=600,
    )
    return binary


@dataclass(frozen=True)
class Reply:
    code: int
    message: str
    responses: list[bytes]
    status: status_pb2.Status
    cipher: str

    def one(self, kind: type[M]) -> M:
        assert self.code == OK, (self.code, self.message)
        (data,) = self.responses
        message = kind()
        message.ParseFromString(data)
        return message

    def error_info(self) -> error_details_pb2.ErrorInfo:
        found = [d for d in self.status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        assert len(found) == 1, self.status
        info = error_details_pb2.ErrorInfo()
        found[0].Unpack(info)
        return info


@dataclass(frozen=True)
class GoClient:
    binary: Path
    addr: str
    ca: Path
    cert: Path
    key: Path

    def call(self, method: str, request: Message, *, stream: bool = False) -> Reply:
        result = subprocess.run(
            [
                str(self.binary),
                self.addr,
                str(self.ca),
                str(self.cert),
                str(self.key),
                SERVICE + method,
                "stream" if stream else "unary",
            ],
            input=request.SerializeToString().hex().encode(),
            capture_output=True,
            timeout=90,
            check=False,
        )
        assert result.returncode == 0, (result.returncode, result.stderr.decode())
        out = json.loads(result.stdout)
        return Reply(
            code=out["code"],
            message=out["message"],
            responses=[bytes.fromhex(r) for r in out["responses"]],
            status=status_pb2.Status.FromString(bytes.fromhex(out["status"])),
            cipher=out["cipher"],
        )


@dataclass(frozen=True)
class Clients:
    admin: GoClient
    reader: GoClient


@pytest.fixture(scope="module")
def clients(go_client: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    """A real ``trio-worker serve`` with its development PKI, and Go clients for an admin
    and a readonly certificate from that PKI's CA."""
    home = tmp_path_factory.mktemp("home")
    state = home / "state"
    dev = pki.ensure_dev_pki(state)
    reader = pki.issue_client(dev.directory, "reader", Role.READONLY)
    env = clean_env(home)
    server = ServerProcess.start(
        ["--listen", "127.0.0.1:0", "--state-dir", state, *own_cgroup(home)], env
    )
    try:
        addr = f"127.0.0.1:{server.port()}"

        def client(files: pki.CertFiles) -> GoClient:
            return GoClient(go_client, addr, dev.ca.cert, files.cert, files.key)

        yield Clients(admin=client(dev.client), reader=client(reader))
    finally:
        assert server.stop() == 0, server.stderr


# Every byte value, NUL and invalid UTF-8 included, more than one chunk's worth.
PAYLOAD = b"out:\x00\xff\xfe" + bytes(range(256)) * 64 + b"end\n"
# printf with octal escapes only: no quoting issue, whatever the bytes.
SCRIPT = "printf '" + "".join(f"\\{b:03o}" for b in PAYLOAD) + "'"


def test_start_output_wait_status_list(clients: Clients) -> None:
    go = clients.admin
    started = go.call("Start", pb.StartRequest(command="sh", args=["-c", SCRIPT]))
    assert started.cipher == "TLS_AES_256_GCM_SHA384 h2"
    job = started.one(pb.Job)
    assert job.id
    assert job.command == "sh"

    output = go.call("Output", pb.OutputRequest(id=job.id, follow=True), stream=True)
    assert output.code == OK, (output.code, output.message)
    chunks = [pb.OutputChunk.FromString(r) for r in output.responses]
    assert chunks, "no output chunk"
    assert b"".join(c.data for c in chunks) == PAYLOAD
    assert [c.offset for c in chunks] == [
        sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))
    ]
    assert {c.stream for c in chunks} == {pb.OUTPUT_STREAM_STDOUT}

    ended = go.call("Wait", pb.WaitRequest(id=job.id)).one(pb.Job)
    assert ended.state == pb.JOB_STATE_EXITED
    assert ended.HasField("exit_code")
    assert ended.exit_code == 0
    assert ended.output_bytes == len(PAYLOAD)

    status = go.call("Status", pb.StatusRequest(id=job.id)).one(pb.Job)
    assert status == ended

    listed = go.call("List", pb.ListRequest()).one(pb.ListResponse)
    assert job.id in [j.id for j in listed.jobs]

    # A readonly certificate sees the job too.
    seen = clients.reader.call("Status", pb.StatusRequest(id=job.id)).one(pb.Job)
    assert seen.id == job.id


def test_unknown_id_is_not_found_with_error_info(clients: Clients) -> None:
    reply = clients.admin.call("Status", pb.StatusRequest(id="no-such-job"))
    assert reply.code == NOT_FOUND, (reply.code, reply.message)
    assert reply.responses == []
    assert reply.status.code == NOT_FOUND
    info = reply.error_info()
    assert (info.reason, info.domain) == ("JOB_NOT_FOUND", "trioworker.v1")


def test_readonly_certificate_may_not_start(clients: Clients) -> None:
    reply = clients.reader.call("Start", pb.StartRequest(command="true"))
    assert reply.code == PERMISSION_DENIED, (reply.code, reply.message)
    assert reply.error_info().reason == "PERMISSION_DENIED"
    listed = clients.admin.call("List", pb.ListRequest()).one(pb.ListResponse)
    assert all(j.command != "true" for j in listed.jobs)


def test_output_follows_a_running_job_to_its_end(clients: Clients) -> None:
    """Output with ``follow`` on a job still running: grpc-go gets the later bytes live, then
    the end of the stream (status OK) once the job has ended."""
    go = clients.admin
    script = "printf first; sleep 2; printf second >&2"
    job = go.call("Start", pb.StartRequest(command="sh", args=["-c", script])).one(pb.Job)
    assert job.state == pb.JOB_STATE_RUNNING
    output = go.call("Output", pb.OutputRequest(id=job.id, follow=True), stream=True)
    assert output.code == OK, (output.code, output.message)
    chunks = [pb.OutputChunk.FromString(r) for r in output.responses]
    assert [(c.stream, c.data) for c in chunks] == [
        (pb.OUTPUT_STREAM_STDOUT, b"first"),
        (pb.OUTPUT_STREAM_STDERR, b"second"),
    ]
    assert [c.offset for c in chunks] == [0, 5]
    assert go.call("Status", pb.StatusRequest(id=job.id)).one(pb.Job).state == pb.JOB_STATE_EXITED
