"""End-to-end benchmark of the server: real jobs, mTLS on loopback, the official
grpcio client as the load generator in its own process.

    python tools/bench_server.py [--quick]

Figures (medians where repeated), each next to a baseline from the same run:

(a) Output of a 256 MiB job to one follower, MB/s, and replaying it after it
    ended; baseline: a raw ``trio.SSLStream`` copy of 256 MiB with the same
    TLS policy between two processes.
(b) 16 followers of one 64 MiB job: aggregate MB/s, each got every byte.
(c) Status latency p50/p99 on one connection; calls/s with 8 concurrent callers.
(d) Start + Wait of ``true``: p50/p99.
(e) server RSS per running ``sleep`` job, with 500 of them.

Reference (a grpcio C-core server implementing the same proto, measured on a
machine like ours with a grpcio client; medians of noisy runs): (a) 197 MB/s
following, 323 MB/s replaying; (b) 284 MB/s; (c) p50 0.57 ms, p99 0.9-2 ms,
2,450 calls/s; (d) p50 2.5 ms; (e) 7.3 KiB per job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

SERVER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from trio_worker import pki
    from trio_worker.server._run import ServerSettings, run_server
    state = Path(sys.argv[1])
    dev = pki.ensure_dev_pki(state)
    settings = ServerSettings(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key,
                              state_dir=state, port=0)
    async def main():
        async with trio.open_nursery() as n:
            port = await n.start(run_server, settings)
            print(port, flush=True)
    trio.run(main)
    """
)

LOAD = textwrap.dedent(
    """
    import json, statistics, sys, threading, time
    from pathlib import Path
    import grpc
    from trio_worker._pb import worker_pb2 as pb
    port, pki_dir, what, arg = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    W = "/trioworker.v1.Worker/"
    def channel():
        creds = grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes(),
            (pki_dir / "admin.key").read_bytes(), (pki_dir / "admin.pem").read_bytes())
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        return grpc.secure_channel(f"localhost:{port}", creds, options=opts)
    def stubs(ch):
        u = lambda m, q, r: ch.unary_unary(W + m, q.SerializeToString, r.FromString)
        return (u("Start", pb.StartRequest, pb.Job), u("Wait", pb.WaitRequest, pb.Job),
                u("Status", pb.StatusRequest, pb.Job),
                ch.unary_stream(W + "Output", pb.OutputRequest.SerializeToString,
                                pb.OutputChunk.FromString))
    ch = channel(); start, wait, status, output = stubs(ch)
    def follow(job_id, out, i, chan=None):
        o = stubs(chan)[3] if chan else output
        n = 0; pos = 0
        for c in o(pb.OutputRequest(id=job_id, follow=True)):
            assert c.offset == pos; pos += len(c.data)
        out[i] = pos
    res = {}
    if what == "follow":
        size = int(arg)
        t = time.perf_counter()
        job = start(pb.StartRequest(command="head", args=["-c", str(size), "/dev/zero"]))
        got = [0]; follow(job.id, got, 0)
        res["follow_bps"] = size / (time.perf_counter() - t)
        assert got[0] == size, got
        t = time.perf_counter(); got = [0]; follow(job.id, got, 0)
        res["replay_bps"] = size / (time.perf_counter() - t)
    elif what == "fanout":
        size = int(arg); n = 16
        chans = [channel() for _ in range(n)]
        script = f"sleep 0.5; head -c {size} /dev/zero"
        job = start(pb.StartRequest(command="sh", args=["-c", script]))
        got = [0] * n
        threads = [threading.Thread(target=follow, args=(job.id, got, i, chans[i]))
                   for i in range(n)]
        t = time.perf_counter()
        for th in threads: th.start()
        for th in threads: th.join()
        el = time.perf_counter() - t - 0.5
        assert all(g == size for g in got), got
        res["fanout_bps"] = size * n / el
    elif what == "status":
        job = start(pb.StartRequest(command="true")); wait(pb.WaitRequest(id=job.id))
        req = pb.StatusRequest(id=job.id)
        for _ in range(200): status(req)
        lat = []
        for _ in range(int(arg)):
            t = time.perf_counter(); status(req); lat.append(time.perf_counter() - t)
        lat.sort()
        res["p50"] = lat[len(lat) // 2]; res["p99"] = lat[int(len(lat) * 0.99)]
        count = [0] * 8; stop = time.perf_counter() + 3
        def hammer(i):
            s = stubs(channel())[2]
            while time.perf_counter() < stop:
                s(req); count[i] += 1
        ths = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
        t = time.perf_counter()
        for th in ths: th.start()
        for th in ths: th.join()
        res["calls_per_s"] = sum(count) / (time.perf_counter() - t)
    elif what == "startwait":
        lat = []
        for _ in range(int(arg)):
            t = time.perf_counter()
            job = start(pb.StartRequest(command="true")); wait(pb.WaitRequest(id=job.id))
            lat.append(time.perf_counter() - t)
        lat.sort()
        res["p50"] = lat[len(lat) // 2]; res["p99"] = lat[int(len(lat) * 0.99)]
    elif what == "sleepers":
        for _ in range(int(arg)):
            start(pb.StartRequest(command="sleep", args=["1000"]))
        res["started"] = int(arg)
    print(json.dumps(res))
    """
)

RAW_TLS = textwrap.dedent(
    """
    import sys, time, trio
    from pathlib import Path
    from trio_worker._tls import server_context, client_context
    pki_dir, size, role = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    async def serve():
        ctx = server_context(ca=pki_dir / "ca.pem", cert=pki_dir / "server.pem",
                             key=pki_dir / "server.key")
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        tcp = await listeners[0].accept()
        s = trio.SSLStream(tcp, ctx, server_side=True)
        block = b"x" * (256 * 1024)
        for _ in range(size // len(block)):
            await s.send_all(block)
        await s.aclose()
    async def client(port):
        ctx = client_context(ca=pki_dir / "ca.pem", cert=pki_dir / "admin.pem",
                             key=pki_dir / "admin.key")
        s = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx,
                           server_hostname="localhost")
        t = time.perf_counter(); n = 0
        while data := await s.receive_some(1 << 20):
            n += len(data)
        print(n / (time.perf_counter() - t))
    if role == "server": trio.run(serve)
    else: trio.run(client, int(sys.argv[4]))
    """
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def load(port: int, pki_dir: Path, what: str, arg: object) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(port), str(pki_dir), what, str(arg)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def raw_tls(pki_dir: Path, size: int) -> float:
    server = subprocess.Popen(
        [sys.executable, "-c", RAW_TLS, str(pki_dir), str(size), "server"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert server.stdout is not None
    port = server.stdout.readline().strip()
    out = subprocess.run(
        [sys.executable, "-c", RAW_TLS, str(pki_dir), str(size), "client", port],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    server.wait()
    return float(out.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    big = (64 if args.quick else 256) * MiB
    fan = (16 if args.quick else 64) * MiB
    with tempfile.TemporaryDirectory(prefix="bench-server-", dir=REPO) as tmp:
        state = Path(tmp) / "state"
        env = dict(os.environ, PYTHONPATH=str(REPO))
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(state)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            pki_dir = state / "pki"
            rows: dict[str, list[float]] = {}
            for _ in range(rounds):
                for key, value in [
                    *load(port, pki_dir, "follow", big).items(),
                    *load(port, pki_dir, "fanout", fan).items(),
                    *{
                        f"status_{k}": v for k, v in load(port, pki_dir, "status", 2000).items()
                    }.items(),
                    *{
                        f"sw_{k}": v for k, v in load(port, pki_dir, "startwait", 300).items()
                    }.items(),
                ]:
                    rows.setdefault(key, []).append(value)
                rows.setdefault("raw_tls_bps", []).append(raw_tls(pki_dir, big))
            med = {k: statistics.median(v) for k, v in rows.items()}
            before = rss_kib(server.pid)
            n = 100 if args.quick else 500
            load(port, pki_dir, "sleepers", n)
            time.sleep(1)
            per_job = (rss_kib(server.pid) - before) / n
        finally:
            server.terminate()
            server.wait(timeout=60)
    mb = 1e6
    print(f"server benchmark, {rounds} round(s), medians; grpcio C-core reference in brackets")
    print(
        f"(a) follow {big // MiB} MiB job      {med['follow_bps'] / mb:7.0f} MB/s  [197]  "
        f"raw trio.SSLStream copy {med['raw_tls_bps'] / mb:.0f} MB/s, "
        f"ratio {med['follow_bps'] / med['raw_tls_bps']:.2f}"
    )
    print(f"    replay after end       {med['replay_bps'] / mb:7.0f} MB/s  [323]")
    fanout = med["fanout_bps"] / mb
    print(f"(b) 16 followers x {fan // MiB} MiB   {fanout:7.0f} MB/s  [284]  aggregate")
    p50, p99 = med["status_p50"] * 1e3, med["status_p99"] * 1e3
    print(f"(c) Status p50 / p99       {p50:7.2f} / {p99:.2f} ms  [0.57 / 0.9-2]")
    print(f"    Status, 8 callers      {med['status_calls_per_s']:7.0f} calls/s  [2450]")
    p50, p99 = med["sw_p50"] * 1e3, med["sw_p99"] * 1e3
    print(f"(d) Start+Wait true p50/p99 {p50:6.2f} / {p99:.2f} ms  [2.5]")
    print(f"(e) RSS per sleep job      {per_job:7.1f} KiB  [7.3]  ({n} jobs)")


if __name__ == "__main__":
    main()
