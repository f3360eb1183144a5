"""How late a live follower sees a job's lines, on each server, interleaved.

    python tools/bench_follow_latency.py [--server NAME=PYTHON ...] [--interval S ...]
        [--lines 200] [--rounds 2] [--pin CPUS] [--hogs N]

The job prints its ``CLOCK_MONOTONIC`` time, a line every ``--interval`` seconds (one
``write`` each; ``--lines`` of them, at most 10 s worth, at least 5); a grpcio client
follows it (``Output``, ``follow``) and takes, for each line, the time it got it less the
time in it. Prints per server and interval the messages and the delay's median, 90th
percentile and maximum in ms. Each round starts every (server, interval) pair on a fresh
server, in a new random order. ``--pin`` and ``--hogs`` as in ``bench_follow_phases.py``.
The machine is shared: read ranges, and say the load. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_follow_phases
import bench_peer

#: The job: argv = lines interval.
JOB = textwrap.dedent(
    """
    import os, sys, time
    lines, interval = int(sys.argv[1]), float(sys.argv[2])
    for _ in range(lines):
        os.write(1, b"%.6f\\n" % time.monotonic())
        time.sleep(interval)
    """
)

#: The follower, in the client's Python: argv = peer_dir addr ca cert key proto python
#: lines interval.
FOLLOW = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import bench, grpc
    addr, ca, cert, key, proto, python, job, lines, interval = sys.argv[2:11]
    pb, pb_grpc = bench.load_proto(proto)
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                         open(cert, "rb").read())
    opts = [("grpc.use_local_subchannel_pool", 1),
            ("grpc.ssl_target_name_override", "localhost")]
    channel = grpc.secure_channel(addr, creds, options=opts)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.WorkerStub(channel)
    started = stub.Start(pb.StartRequest(command=python, args=["-c", job, lines, interval]),
                         timeout=60)
    delays, rest, messages = [], b"", 0
    for chunk in stub.Output(pb.OutputRequest(id=started.id, offset=0, follow=True),
                             timeout=600):
        now = time.monotonic()
        messages += 1
        *done, rest = (rest + chunk.data).split(b"\\n")
        delays += [now - float(line) for line in done]
    delays.sort()
    n = len(delays)
    print(json.dumps({"lines": n, "messages": messages,
                      "p50_ms": round(delays[n // 2] * 1e3, 3),
                      "p90_ms": round(delays[9 * n // 10] * 1e3, 3),
                      "max_ms": round(delays[-1] * 1e3, 3),
                      "load": round(os.getloadavg()[0], 1)}), flush=True)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_peer.add_peer_arguments(parser)
    parser.add_argument("--interval", type=float, action="append", default=[])
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pin", help="CPUS: the servers (and their jobs) under taskset -c")
    parser.add_argument("--hogs", type=int, default=0, help="busy loops meanwhile (pinned too)")
    args = parser.parse_args()
    servers = [(n, p) for n, _, p in (s.partition("=") for s in args.server or [])] or [
        ("this", sys.executable)
    ]
    intervals = args.interval or [1.0, 0.005]
    hogs = bench_follow_phases.start_hogs(args)
    try:
        with tempfile.TemporaryDirectory(prefix="follow-latency-") as scratch:
            args.scratch = scratch
            for rnd in range(args.rounds):
                order = [(s, i) for s in servers for i in intervals]
                random.shuffle(order)
                for (name, python), interval in order:
                    proc, addr, pki, proto, _ = bench_follow_phases._start(args, name, python)
                    try:
                        cmd = [args.client_python, "-c", FOLLOW, str(args.peer_dir), addr]
                        cmd += [pki["ca"], pki["cert"], pki["key"], proto, sys.executable]
                        lines = min(args.lines, max(5, int(10 / interval)))
                        cmd += [JOB, str(lines), str(interval)]
                        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=120)
                    rec = json.loads(out.stdout)
                    print(
                        f"r{rnd} {name:8} every {interval * 1e3:7.1f} ms: {rec['lines']} lines "
                        f"in {rec['messages']} messages; delay p50 {rec['p50_ms']:.2f} ms, "
                        f"p90 {rec['p90_ms']:.2f}, max {rec['max_ms']:.2f}; load {rec['load']}",
                        flush=True,
                    )
    finally:
        for p in hogs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
