"""The official grpc-js client (Node) against ``run_server`` over TLS 1.3 and mTLS.

The contract says any official gRPC client must work; grpcio is tested everywhere else,
this runs ``@grpc/grpc-js`` (pinned by ``tests/interop_js/package-lock.json``, installed by
``.ci/run``). ``interop_js/client.js`` uses the generic client with identity serializers: the
requests are built and the responses read here, with ``trio_worker._pb``.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]

from trio_worker import pki
from trio_worker._identity import Role
from trio_worker._pb import worker_pb2 as pb
from trio_worker.server._run import ServerSettings, run_server

from .conftest import require_program

W = "/trioworker.v1.Worker/"
CLIENT_DIR = Path(__file__).parent / "interop_js"
NOT_FOUND, PERMISSION_DENIED, UNAVAILABLE = 5, 7, 14


@pytest.fixture(scope="module")
def node() -> str:
    """node, with grpc-js installed; in CI (which installs both) a missing one fails.

    A plain fixture: a skip raised inside a trio fixture loses its reason."""
    path = require_program("node", "the grpc-js interop test")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        message = "the grpc-js interop test needs `npm ci --prefix tests/interop_js`"
        if os.environ.get("TRIO_WORKER_REQUIRE_ROOT") == "1":
            pytest.fail(f"{message} (.ci/run runs it), and CI forbids skipping")
        pytest.skip(message)
    return path


@dataclass
class Result:
    """One call as grpc-js saw it: the status, trailers, and the messages received."""

    code: int
    details: str
    metadata: dict[str, list[str]]
    responses: list[bytes]

    def one(self, kind: type[Any]) -> Any:
        assert self.code == 0, (self.code, self.details)
        assert len(self.responses) == 1
        return kind.FromString(self.responses[0])

    def error_info(self) -> error_details_pb2.ErrorInfo:
        """The ErrorInfo in ``grpc-status-details-bin``, as grpc-js hands it to users."""
        (raw,) = self.metadata["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(base64.b64decode(raw))
        assert status.code == self.code
        (detail,) = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
        info = error_details_pb2.ErrorInfo()
        detail.Unpack(info)
        return info


@dataclass
class Call:
    method: str
    request: Message
    stream: bool = False


@dataclass
class Node:
    """Runs ``client.js`` with one plan: its calls share a channel and run concurrently."""

    node: str
    port: int
    ca: Path
    clients: dict[str, pki.CertFiles]

    async def __call__(
        self, who: str, *calls: Call, host: str = "127.0.0.1", server_name: str = ""
    ) -> list[Result]:
        files = self.clients[who]
        plan = {
            "target": f"{host}:{self.port}",
            "ca": str(self.ca),
            "cert": str(files.cert),
            "key": str(files.key),
            "serverName": server_name,
            "deadlineMs": 60_000,
            "calls": [
                {
                    "method": W + c.method,
                    "request": base64.b64encode(c.request.SerializeToString()).decode(),
                    "stream": c.stream,
                }
                for c in calls
            ],
        }
        with trio.fail_after(120):
            done = await trio.run_process(
                [self.node, str(CLIENT_DIR / "client.js")],
                stdin=json.dumps(plan).encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return [
            Result(
                code=r["code"],
                details=r["details"],
                metadata=r["metadata"],
                responses=[base64.b64decode(m) for m in r["responses"]],
            )
            for r in json.loads(done.stdout)
        ]


@asynccontextmanager
async def _serve(node: str, tmp_path: Path, hosts: list[str]) -> AsyncIterator[Node]:
    certs = tmp_path / "pki"
    ca = pki.init_ca(certs)
    server = pki.issue_server(certs, hosts)
    clients = {
        "alice": pki.issue_client(certs, "alice", Role.FULL),
        "reader": pki.issue_client(certs, "reader", Role.READONLY),
    }
    settings = ServerSettings(
        ca=ca.cert, cert=server.cert, key=server.key, state_dir=tmp_path / "state", port=0
    )
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await run_server(settings, handle_signals=False, task_status=task_status)

        port = await nursery.start(serve)
        yield Node(node, port, ca.cert, clients)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def js(node: str, tmp_path: Path) -> AsyncIterator[Node]:
    """A server whose certificate names localhost and 127.0.0.1."""
    async with _serve(node, tmp_path, ["localhost", "127.0.0.1"]) as running:
        yield running


@pytest.fixture
async def js_named(node: str, tmp_path: Path) -> AsyncIterator[Node]:
    """A server whose certificate names only ``worker.test``, not the address dialled."""
    async with _serve(node, tmp_path, ["worker.test"]) as running:
        yield running


# Binary bytes, a pause (so Output follows a live job), then more than one HTTP/2 window.
SCRIPT = "printf 'a\\000\\377\\n'; sleep 0.5; head -c 300000 /dev/zero | tr '\\000' x"
EXPECTED = b"a\x00\xff\n" + b"x" * 300_000


async def test_grpc_js_start_output_wait_status_list(js: Node) -> None:
    (started,) = await js(
        "alice", Call("Start", pb.StartRequest(command="sh", args=["-c", SCRIPT]))
    )
    job = started.one(pb.Job)
    assert (job.owner, job.command, list(job.args)) == ("alice", "sh", ["-c", SCRIPT])
    assert job.state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_EXITED)

    # On one channel, at once: Output follows the job live while Wait waits for its end.
    output, waited = await js(
        "alice",
        Call("Output", pb.OutputRequest(id=job.id, follow=True), stream=True),
        Call("Wait", pb.WaitRequest(id=job.id)),
    )
    assert output.code == 0, (output.code, output.details)
    chunks = [pb.OutputChunk.FromString(m) for m in output.responses]
    assert b"".join(c.data for c in chunks) == EXPECTED
    offsets = [c.offset for c in chunks]
    assert offsets == [sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))]
    assert {c.stream for c in chunks} == {pb.OUTPUT_STREAM_STDOUT}
    end = waited.one(pb.Job)
    assert (end.id, end.state, end.exit_code) == (job.id, pb.JOB_STATE_EXITED, 0)
    assert end.output_bytes == len(EXPECTED)

    status, listed, tail = await js(
        "alice",
        Call("Status", pb.StatusRequest(id=job.id)),
        Call("List", pb.ListRequest()),
        Call("Output", pb.OutputRequest(id=job.id, offset=len(EXPECTED) - 3), stream=True),
    )
    assert status.one(pb.Job) == end
    assert [j.id for j in listed.one(pb.ListResponse).jobs] == [job.id]
    assert b"".join(pb.OutputChunk.FromString(m).data for m in tail.responses) == b"xxx"


async def test_grpc_js_reads_not_found_and_its_error_info(js: Node) -> None:
    (missing,) = await js("alice", Call("Status", pb.StatusRequest(id="no-such-job")))
    assert missing.code == NOT_FOUND
    assert missing.responses == []
    assert missing.details  # a short message, never the unbounded id
    info = missing.error_info()
    assert (info.reason, info.domain) == ("JOB_NOT_FOUND", "trioworker.v1")


async def test_grpc_js_readonly_may_not_start(js: Node) -> None:
    refused, listed = await js(
        "reader",
        Call("Start", pb.StartRequest(command="true")),
        Call("List", pb.ListRequest()),
    )
    assert refused.code == PERMISSION_DENIED
    assert refused.error_info().reason == "PERMISSION_DENIED"
    assert listed.one(pb.ListResponse).jobs == []  # nothing ran


async def test_grpc_js_checks_the_server_name(js_named: Node) -> None:
    """The certificate names worker.test: dialling 127.0.0.1 fails the host-name check, unless
    the client is told the name to expect (``grpc.ssl_target_name_override``)."""
    probe = Call("Status", pb.StatusRequest(id="probe"))
    (wrong_name,) = await js_named("alice", probe)
    assert wrong_name.code == UNAVAILABLE
    assert "ERR_TLS_CERT_ALTNAME_INVALID" in wrong_name.details  # Node's host-name check
    (named,) = await js_named("alice", probe, server_name="worker.test")
    assert named.code == NOT_FOUND
    assert named.error_info().reason == "JOB_NOT_FOUND"
