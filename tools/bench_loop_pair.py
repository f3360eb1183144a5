"""The loop thread's CPU per Start `true` + Wait of several trees, paired: a view that a
shared machine's load moves less than one tree's run after another's.

    python tools/bench_loop_pair.py --server base=WRAPPER --server mine=WRAPPER
        [--rounds 30] [--batch 100] [--peer-dir ../shared/bench] [--client-python PY]

Every server is up at once (``bench_peer.SERVER``, each from its wrapper, run from a
neutral directory). Each round runs a batch of Start `true` + Wait (the peer's client
code, ``bench.py``, one grpcio channel per server) on every server in a new random
order, and reads the loop thread's time on a CPU before and after the batch
(``/proc/PID/task/PID/schedstat``: nanoseconds, where ``stat``'s ticks are 10 ms). Prints
each server's median per cycle (and quartiles) and its batches' Start + Wait p50; with two
servers, the paired difference (second minus first) per round: its median and how many
rounds the second was lower in. A wrapper is ``#!/bin/sh`` +
``PYTHONPATH=<tree> exec <python> "$@"`` (the tree built with ``build_ext --inplace``).
Needs grpcio: it runs itself again with ``--client-python`` when this Python lacks it.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_peer import SERVER, add_peer_arguments


def _loop_cpu_ms(pid: int) -> float:
    """The main thread's time on a CPU (the event loop's), in ms."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    add_peer_arguments(parser, server_help="NAME=WRAPPER (at least one)")
    args = parser.parse_args()
    if not args.server:
        parser.error("give --server NAME=WRAPPER at least once")
    try:
        import grpc  # noqa: F401
    except ImportError:
        if os.environ.get("_LOOP_PAIR_AGAIN"):
            raise SystemExit("needs grpcio: give --client-python") from None
        os.environ["_LOOP_PAIR_AGAIN"] = "1"
        os.execv(args.client_python, [args.client_python, *sys.argv])
    sys.path.insert(0, str(args.peer_dir))
    import bench  # the peer's client: its proto loading and Start as the benchmark does them

    proto = Path(__file__).resolve().parent.parent / "worker.proto"
    scratch = tempfile.mkdtemp(prefix="loop-pair-")
    procs: dict[str, subprocess.Popen[str]] = {}
    clients: dict[str, tuple[object, object]] = {}
    try:
        for spec in args.server:
            name, wrapper = spec.split("=", 1)
            state = tempfile.mkdtemp(dir=scratch)
            proc = procs[name] = subprocess.Popen(
                [wrapper, "-c", SERVER, state], stdout=subprocess.PIPE, text=True, cwd="/"
            )
            assert proc.stdout is not None
            port, pki = proc.stdout.readline().split()
            options = types.SimpleNamespace(
                proto=str(proto),
                ca=f"{pki}/ca.pem",
                key=f"{pki}/admin.key",
                cert=f"{pki}/admin.pem",
                target_name=None,
                addr=f"127.0.0.1:{port}",
            )
            client = bench.Bench(options)
            clients[name] = (client, client.stub(client.channel()))

        def cycles(name: str, n: int) -> list[float]:
            client, stub = clients[name]
            latencies = []
            for _ in range(n):
                t = time.perf_counter()
                job = client.start(stub, "true")
                stub.Wait(client.pb.WaitRequest(id=job.id), timeout=30)
                latencies.append((time.perf_counter() - t) * 1e3)
            return latencies

        for name in clients:
            cycles(name, 50)  # warm-up
        cpu: dict[str, list[float]] = {name: [] for name in clients}
        p50: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(args.rounds):
            order = list(clients)
            random.shuffle(order)
            for name in order:
                pid = procs[name].pid
                before = _loop_cpu_ms(pid)
                latencies = cycles(name, args.batch)
                cpu[name].append((_loop_cpu_ms(pid) - before) / args.batch)
                p50[name].append(statistics.median(latencies))
        with open("/proc/loadavg") as f:
            load = f.read().split()[0]
        for name in cpu:
            q = statistics.quantiles(cpu[name], n=4)
            print(
                f"{name}: the loop's CPU {statistics.median(cpu[name]):.3f} ms a cycle "
                f"(quartiles {q[0]:.3f}-{q[2]:.3f}), Start + Wait p50 "
                f"{statistics.median(p50[name]):.3f} ms"
            )
        names = list(cpu)
        if len(names) == 2:
            first, second = names
            diff = [b - a for a, b in zip(cpu[first], cpu[second], strict=True)]
            lower = sum(d < 0 for d in diff)
            print(
                f"paired {second} - {first}: {statistics.median(diff):+.3f} ms a cycle "
                f"(median), {second} lower in {lower} of {len(diff)} rounds; load {load}"
            )
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
