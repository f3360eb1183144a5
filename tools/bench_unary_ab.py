"""Unary latency of two or more trees, paired: all servers up at once, batches in random order.

    python tools/bench_unary_ab.py --server before=/path/to/python --server after=/path/to/python
        [--rounds 40] [--batch 200] [--method Status|Wait] [--peer-dir ../shared/bench]

Each ``--server NAME=PYTHON`` starts a trio-worker server of whatever tree that Python
imports (a wrapper setting PYTHONPATH will do; bench_peer's server script is used). One
grpcio client (the peer harness' stubs) opens a channel to each, finishes a `true` job
and warms up; then, each round, it makes ``--batch`` sequential Status calls (or, with
``--method Wait``, Waits on that finished job: an async handler's call, in a task) on every
server, in a new random order. A batch's p50 is compared with the first server's in the
same round, so load that drifts during a sitting (a shared machine) hits both alike:
bench_peer, which runs one server after another, cannot tell 0.1 ms from that drift.

Inside each server it also measures, from the read that brought a request (a TLS record
over 60 bytes) to the write of its reply (over 150 bytes): wall time, the loop thread's CPU
time, and the trio loop turns in between (a reply written in the step that read its
request: 0). Printed when the servers stop. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import REPO, SERVER

#: SERVER, with the read-to-write probe around TLSSocketStream (the same in every tree
#: since the server's own TLS stream), reported on exit.
PROBED = (
    """
import atexit, statistics, sys, time, trio
from trio_worker._net import _tlsstream
_T = _tlsstream.TLSSocketStream
_state = {"t": None, "cpu": 0.0, "turns": 0}
_gaps, _cpus, _turns = [], [], []
_receive, _try_send = _T.receive_some, _T.try_send
async def _probed_receive(self, max_bytes=None):
    data = await _receive(self, max_bytes)
    if data and len(data) > 60:
        _state.update(t=time.perf_counter(), cpu=time.thread_time(), turns=0)
    return data
def _probed_try_send(self, data):
    if _state["t"] is not None and len(data) > 150:
        _gaps.append(time.perf_counter() - _state["t"])
        _cpus.append(time.thread_time() - _state["cpu"])
        _turns.append(_state["turns"])
        _state["t"] = None
    return _try_send(self, data)
_T.receive_some, _T.try_send = _probed_receive, _probed_try_send
if hasattr(_T, "try_send_many"):  # trees since 17515df write through it
    _try_send_many = _T.try_send_many
    def _probed_try_send_many(self, buffers):
        buffers = list(buffers)
        if _state["t"] is not None and sum(len(b) for b in buffers) > 150:
            _gaps.append(time.perf_counter() - _state["t"])
            _cpus.append(time.thread_time() - _state["cpu"])
            _turns.append(_state["turns"])
            _state["t"] = None
        return _try_send_many(self, buffers)
    _T.try_send_many = _probed_try_send_many
class _Turns(trio.abc.Instrument):
    def before_io_wait(self, timeout):
        _state["turns"] += 1
_trio_run = trio.run
def _run(fn, *args, **kw):
    kw.setdefault("instruments", []).append(_Turns())
    return _trio_run(fn, *args, **kw)
trio.run = _run
def _report():
    if _gaps:
        g, c = sorted(_gaps), sorted(_cpus)
        p = lambda v, q: v[int(len(v) * q)] * 1e6
        print(f"PROBE {len(g)} {p(g, .5):.0f} {p(g, .1):.0f} {p(c, .5):.0f} {p(c, .1):.0f} "
              f"{max(_turns)} {statistics.fmean(_turns):.4f}", file=sys.stderr, flush=True)
atexit.register(_report)
"""
    + SERVER
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", action="append", default=[], help="NAME=PYTHON (2 or more)")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=200, help="calls per batch")
    parser.add_argument(
        "--method",
        choices=["Status", "Wait"],
        default="Status",
        help="Status (answered in the reader) or Wait on the finished job (an async handler's"
        " task)",
    )
    parser.add_argument(
        "--peer-dir",
        type=Path,
        default=Path(os.environ.get("TRIO_WORKER_PEER_BENCH", REPO.parent / "shared" / "bench")),
        help="the peer's folder, for its grpcio stubs (default: ../shared/bench)",
    )
    args, _ = parser.parse_known_args()
    servers = [tuple(s.split("=", 1)) for s in args.server]
    if len(servers) < 2:
        print("give two or more --server NAME=PYTHON to compare")
        return
    if not (args.peer_dir / "bench.py").exists():
        print(f"no peer harness in {args.peer_dir} (--peer-dir)")
        return
    sys.path.insert(0, str(args.peer_dir))
    import bench  # type: ignore[import-not-found]
    import grpc

    pb, pb_grpc = bench.load_proto(str(REPO / "worker.proto"))
    procs: dict[str, subprocess.Popen[str]] = {}
    calls: dict[str, Any] = {}
    p50s: dict[str, list[float]] = {name: [] for name, _ in servers}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        try:
            for name, python in servers:
                proc = subprocess.Popen(
                    [python, "-c", PROBED, str(Path(tmp) / name)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=tmp,
                )
                procs[name] = proc
                assert proc.stdout is not None
                port, pki_dir = proc.stdout.readline().split()
                d = Path(pki_dir)
                creds = grpc.ssl_channel_credentials(
                    (d / "ca.pem").read_bytes(),
                    (d / "admin.key").read_bytes(),
                    (d / "admin.pem").read_bytes(),
                )
                options = [
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.ssl_target_name_override", "localhost"),
                ]
                stub = pb_grpc.WorkerStub(grpc.secure_channel(f"127.0.0.1:{port}", creds, options))
                job = stub.Start(pb.StartRequest(command="true"), timeout=30)
                stub.Wait(pb.WaitRequest(id=job.id), timeout=30)
                request = getattr(pb, f"{args.method}Request")(id=job.id)
                method = getattr(stub, args.method)
                for _ in range(100):
                    method(request, timeout=30)
                calls[name] = (method, request)
            for round_ in range(args.rounds):
                order = [name for name, _ in servers]
                random.shuffle(order)
                for name in order:
                    method, request = calls[name]
                    lat = []
                    for _ in range(args.batch):
                        t = time.perf_counter()
                        method(request, timeout=30)
                        lat.append(time.perf_counter() - t)
                    p50s[name].append(statistics.median(lat) * 1e3)
                print(f"# round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        finally:
            probes = {}
            for name, proc in procs.items():
                proc.terminate()
                _, err = proc.communicate(timeout=60)
                probes[name] = next(
                    (line.split()[1:] for line in err.splitlines() if line.startswith("PROBE")),
                    None,
                )
    load = os.getloadavg()[0]
    print(f"{args.method}, {args.rounds} rounds of {args.batch} calls per server, batch p50s (ms);")
    print(f"load average at the end: {load:.1f} (shared machine).")
    base = servers[0][0]
    for name, _ in servers:
        values = p50s[name]
        line = (
            f"{name:12} median {statistics.median(values):.3f}  "
            f"q1-q3 {_pct(values, 0.25):.3f}-{_pct(values, 0.75):.3f}"
        )
        if name != base:
            diffs = [a - b for a, b in zip(values, p50s[base], strict=True)]
            slower = sum(d > 0 for d in diffs)
            line += (
                f"  paired vs {base}: median {statistics.median(diffs) * 1e3:+.0f} us, "
                f"slower in {slower}/{len(diffs)} rounds"
            )
        print(line)
    print("in the server, request read -> reply write (us): wall p50/p10, CPU p50/p10, loop turns")
    for name, probe in probes.items():
        if probe:
            n, g50, g10, c50, c10, most, mean = probe
            print(f"{name:12} {n} calls: {g50}/{g10}, {c50}/{c10}, max {most} mean {mean}")


if __name__ == "__main__":
    main()
