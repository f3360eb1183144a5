"""The transport's CPU per async unary call, two or more trees paired.

    python tools/bench_async_unary.py --server base=/path/to/python --server mine=/path/to/python
        [--rounds 12] [--batch 300] [--spy DIR]

Each ``--server NAME=PYTHON`` serves, from whatever tree that Python imports (a wrapper
setting PYTHONPATH will do), one ``UnaryMethod`` over mTLS whose handler yields to the loop
once (``await trio.lowlevel.checkpoint()``) before it answers, as a Start or a Wait that
has to wait does: the call's task, its cancel scope, its deadline (the client sends
``grpc-timeout``) and its reply written by the task, with nothing of the job side.
One grpcio client makes ``--batch`` sequential calls per server per round, the servers in
a new random order each round, and reads each server's main-thread CPU time
(``/proc/PID/task/PID/schedstat``) around its batch: load that drifts during a sitting hits
every server alike. Prints per server the median over rounds of CPU per call (us) and
of the batch's latency p50 (ms), and each round's CPU difference against the first
server. ``--spy DIR`` records a py-spy profile (``--gil``) of each server. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SERVE = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from google.protobuf import wrappers_pb2 as w
    from trio_worker._net._transport import Server, UnaryMethod
    from trio_worker._tls import server_context

    d = Path(sys.argv[1])

    async def echo(req, ctx):
        await trio.lowlevel.checkpoint()
        return req

    async def main():
        ctx = server_context(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
        server = Server({"/bench.Bench/Echo": UnaryMethod(w.StringValue, w.StringValue, echo)}, ctx)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


def _cpu(pid: int) -> float:
    """The main thread's CPU seconds (schedstat: nanoseconds, not clock ticks)."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", action="append", default=[], help="NAME=PYTHON")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=300)
    parser.add_argument("--spy", help="directory for py-spy profiles (py-spy on PATH or $PYSPY)")
    args = parser.parse_args()
    servers = [s.split("=", 1) for s in args.server]

    import grpc
    from google.protobuf import wrappers_pb2 as w

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from trio_worker import pki
    from trio_worker._identity import Role

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pki.init_ca(d)
        pki.issue_server(d, ["localhost", "127.0.0.1"])
        client = pki.issue_client(d, "bench", Role.ADMIN)
        creds = grpc.ssl_channel_credentials(
            (d / "ca.pem").read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
        )
        procs, calls, spies = {}, {}, []
        try:
            for name, python in servers:
                proc = subprocess.Popen(
                    [python, "-c", SERVE, str(d)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert proc.stdout is not None
                port = int(proc.stdout.readline())
                procs[name] = proc
                channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
                calls[name] = channel.unary_unary(
                    "/bench.Bench/Echo",
                    request_serializer=w.StringValue.SerializeToString,
                    response_deserializer=w.StringValue.FromString,
                )
            request = w.StringValue(value="x" * 26)
            for name in calls:
                for _ in range(300):
                    calls[name](request, timeout=30)
            if args.spy:
                for name, proc in procs.items():
                    spies.append(
                        subprocess.Popen(
                            [
                                *(os.environ.get("PYSPY", "py-spy"), "record", "-p", str(proc.pid)),
                                *("-r", "400", "-f", "raw", "--gil"),
                                *("-o", f"{args.spy}/spy-{name}.txt"),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                    )
                time.sleep(1)
            cpu: dict[str, list[float]] = {name: [] for name in calls}
            p50: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                order = list(calls)
                random.shuffle(order)
                for name in order:
                    pid = procs[name].pid
                    lat = []
                    before = _cpu(pid)
                    for _ in range(args.batch):
                        t = time.perf_counter()
                        calls[name](request, timeout=30)
                        lat.append(time.perf_counter() - t)
                    cpu[name].append((_cpu(pid) - before) / args.batch * 1e6)
                    p50[name].append(statistics.median(lat) * 1e3)
            first = servers[0][0]
            for name in calls:
                diffs = [b - a for a, b in zip(cpu[first], cpu[name], strict=True)]
                print(
                    f"{name}: CPU per call median {statistics.median(cpu[name]):.0f} us "
                    f"(rounds {', '.join(f'{c:.0f}' for c in cpu[name])}); "
                    f"p50 median {statistics.median(p50[name]):.3f} ms"
                    + (
                        f"; vs {first} per round median {statistics.median(diffs):+.0f} us, "
                        f"more in {sum(x > 0 for x in diffs)} of {len(diffs)}"
                        if name != first
                        else ""
                    )
                )
        finally:
            for spy in spies:
                spy.send_signal(2)
                spy.wait()
            for proc in procs.values():
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=10)


if __name__ == "__main__":
    main()
