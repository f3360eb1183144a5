"""Micro-benchmark of the gRPC transport alone (no supervisor, no jobs).

    python tools/bench_transport.py [--calls N] [--mib M] [--size BYTES] [--server grpcio]

Starts the server in a child process (our transport, mTLS, a dev PKI in a temporary
directory) and drives it with the official grpcio client from this process:

* tiny unary RPC latency, sequential on one channel: p50 / p99, with an async handler
  (``UnaryMethod``) and a plain-function one (``SyncUnaryMethod``);
* server-streaming throughput to one client: ``--mib`` MiB as ``--size``-byte messages.

``--server grpcio`` serves the same methods from grpcio's C-core server instead, as the
reference to compare with on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ECHO = "/bench.Bench/Echo"
SYNC_ECHO = "/bench.Bench/SyncEcho"
STREAM = "/bench.Bench/Stream"


def serve(directory: Path) -> None:
    import trio
    from google.protobuf import wrappers_pb2 as w

    from trio_worker._net._transport import Server, StreamMethod, SyncUnaryMethod, UnaryMethod
    from trio_worker._tls import server_context

    async def echo(req: w.StringValue, ctx: object) -> w.StringValue:
        return req

    def sync_echo(req: w.StringValue, ctx: object) -> w.StringValue:
        return req

    async def stream(req: w.StringValue, ctx: object):  # type: ignore[no-untyped-def]
        size, total = map(int, req.value.split())
        chunk = w.BytesValue(value=b"x" * size)
        for _ in range(total // size):
            yield chunk

    async def main() -> None:
        ctx = server_context(
            ca=directory / "ca.pem", cert=directory / "server.pem", key=directory / "server.key"
        )
        server = Server(
            {
                ECHO: UnaryMethod(w.StringValue, w.StringValue, echo),
                SYNC_ECHO: SyncUnaryMethod(w.StringValue, w.StringValue, sync_echo),
                STREAM: StreamMethod(w.StringValue, w.BytesValue, stream),
            },
            ctx,
        )
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
            nursery.cancel_scope.cancel()

    trio.run(main)


def serve_grpcio(directory: Path) -> None:
    """The reference: the same methods on grpcio's (C-core) server, same mTLS."""
    from concurrent import futures

    import grpc
    from google.protobuf import wrappers_pb2 as w

    def echo(req: w.StringValue, ctx: object) -> w.StringValue:
        return req

    def stream(req: w.StringValue, ctx: object):  # type: ignore[no-untyped-def]
        size, total = map(int, req.value.split())
        chunk = w.BytesValue(value=b"x" * size)
        for _ in range(total // size):
            yield chunk

    unary = grpc.unary_unary_rpc_method_handler(
        echo,
        request_deserializer=w.StringValue.FromString,
        response_serializer=w.StringValue.SerializeToString,
    )
    handlers = grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Echo": unary,
            "SyncEcho": unary,
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=w.StringValue.FromString,
                response_serializer=w.BytesValue.SerializeToString,
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handlers,))
    creds = grpc.ssl_server_credentials(
        [((directory / "server.key").read_bytes(), (directory / "server.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)


def bench(calls: int, mib: int, size: int, server_kind: str) -> None:
    import grpc
    from google.protobuf import wrappers_pb2 as w

    from trio_worker import pki
    from trio_worker._identity import Role

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki.init_ca(d)
        pki.issue_server(d, ["localhost", "127.0.0.1"])
        client = pki.issue_client(d, "bench", Role.ADMIN)
        server = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "serve-grpcio" if server_kind == "grpcio" else "serve",
                str(d),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            creds = grpc.ssl_channel_credentials(
                (d / "ca.pem").read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
            )
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
                request = w.StringValue(value="ping")
                for path, what in ((ECHO, "async handler"), (SYNC_ECHO, "sync handler")):
                    echo = ch.unary_unary(
                        path,
                        request_serializer=w.StringValue.SerializeToString,
                        response_deserializer=w.StringValue.FromString,
                    )
                    for _ in range(500):
                        echo(request)
                    samples = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        echo(request)
                        samples.append(time.perf_counter() - t0)
                    samples.sort()
                    p50 = samples[len(samples) // 2] * 1e3
                    p99 = samples[int(len(samples) * 0.99)] * 1e3
                    print(
                        f"unary echo ({what}), {calls} sequential calls: "
                        f"p50 {p50:.3f} ms, p99 {p99:.3f} ms"
                    )

                stream = ch.unary_stream(
                    STREAM,
                    request_serializer=w.StringValue.SerializeToString,
                    response_deserializer=w.BytesValue.FromString,
                )
                total = mib << 20
                rates = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    got = 0
                    for message in stream(w.StringValue(value=f"{size} {total}")):
                        got += len(message.value)
                    elapsed = time.perf_counter() - t0
                    assert got == total - total % size
                    rates.append(got / elapsed / 1e6)
                print(
                    f"stream {mib} MiB as {size}-byte messages: "
                    f"median {statistics.median(rates):.0f} MB/s "
                    f"(runs: {', '.join(f'{r:.0f}' for r in rates)})"
                )
        finally:
            if server.stdin is not None:
                server.stdin.close()
            server.wait(timeout=10)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(Path(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "serve-grpcio":
        serve_grpcio(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--server", choices=["trio-worker", "grpcio"], default="trio-worker")
    args = parser.parse_args()
    print(f"server: {args.server}")
    bench(args.calls, args.mib, args.size, args.server)


if __name__ == "__main__":
    main()
