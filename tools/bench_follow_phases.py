"""The follow row after given phases, one follow at a time, with what each one cost.

    python tools/bench_follow_phases.py [--server NAME=PYTHON ...] [--peer]
        [--cond NAME=PHASE,PHASE ...] [--rounds 4] [--follows 2] [--jobs 200]
        [--out FILE.jsonl] [--perf DIR] [--pin CPUS] [--hogs N]

For each round, every (server, condition) pair in a new random order: a fresh server,
the condition's phases (each in a client process of its own), then ``--follows``
follows of ``head -c 256M /dev/zero`` from a fresh grpcio client (what ``bench.py``'s
follow row does). A phase is a ``bench.py`` phase (``joblat`` with ``--jobs`` jobs,
``unary``, ``stream``, ``fanout``), ``spawn`` (500 sleeping jobs started and stopped, as
``bench_peer.py`` does), ``burst``, ``sleepN`` (N seconds idle) or ``prewarm`` (512 MiB
of page cache made and freed by ``dd``: the next follow's log takes pages just freed).

Prints one line per follow: MB/s, the server's CPU by thread name (ours: ``python`` is
the loop, ``Trio thread`` the flush and disk-read threads), its minor faults, the
client's CPU and faults, and the messages (256 MiB in 256 KiB disk pieces is 1,024;
many more means the follower kept up with the job and sent the tail as the pipe reads
made it; ``small``: how many held under 64 KiB, ``p50``: the median message's size).
``--perf DIR`` records ``perf record -g`` of the server during the follows.
``--pin CPUS`` starts the servers under ``taskset -c CPUS`` (their jobs inherit it), and
``--hogs N`` runs N busy loops for the whole run (pinned alike): load of a kind that
comes again, to set a server and its job on one CPU, where a job writing steadily and
the loop take turns (ARCHITECTURE "Why the follow fell into small messages").
ARCHITECTURE "The follow row depends on the sitting's phases" says what these showed.
The machine is shared: read ranges, and say the load. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer

#: The follows, in the client's Python: argv = peer_dir addr ca cert key proto pid n bytes.
FOLLOW = textwrap.dedent(
    """
    import collections, json, os, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    import bench, grpc
    addr, ca, cert, key, proto, pid, follows, size = sys.argv[2:10]
    pid, follows, size = int(pid), int(follows), int(size)
    pb, pb_grpc = bench.load_proto(proto)
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                         open(cert, "rb").read())
    opts = [("grpc.use_local_subchannel_pool", 1),
            ("grpc.ssl_target_name_override", "localhost")]
    channel = grpc.secure_channel(addr, creds, options=opts)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = pb_grpc.WorkerStub(channel)
    tick = os.sysconf("SC_CLK_TCK")

    def server():
        cpu = collections.Counter()
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")].rstrip("0123456789 ")
            fields = text.rsplit(")", 1)[1].split()
            cpu[name] += (int(fields[11]) + int(fields[12])) / tick
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return cpu, (int(fields[11]) + int(fields[12])) / tick, int(fields[7])

    for i in range(follows):
        cpu0, total0, faults0 = server()
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        job = stub.Start(pb.StartRequest(command="head", args=["-c", str(size), "/dev/zero"]),
                         timeout=60)
        got = messages = 0
        sizes = collections.Counter()
        for chunk in stub.Output(pb.OutputRequest(id=job.id, offset=0, follow=True),
                                 timeout=300):
            got += len(chunk.data)
            messages += 1
            sizes[len(chunk.data)] += 1
        small = sum(n for k, n in sizes.items() if k < 65536)
        seen = 0
        for p50, n in sorted(sizes.items()):
            seen += n
            if 2 * seen >= messages:
                break
        t1 = time.perf_counter()
        cpu1, total1, faults1 = server()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        if got != size:
            raise SystemExit(f"follow incomplete: {got} of {size}")
        stub.Wait(pb.WaitRequest(id=job.id), timeout=60)
        threads = {k: round(v - cpu0[k], 3) for k, v in cpu1.items() if v - cpu0[k] > 0.005}
        print(json.dumps({
            "i": i, "MBps": round(size / (t1 - t0) / 1e6, 1),
            "server_cpu_s": round(total1 - total0, 3), "server_threads": threads,
            "server_minflt": faults1 - faults0,
            "client_cpu_s": round(usage1.ru_utime + usage1.ru_stime
                                  - usage0.ru_utime - usage0.ru_stime, 3),
            "client_minflt": usage1.ru_minflt - usage0.ru_minflt,
            "messages": messages, "small": small, "p50": p50,
            "load": round(os.getloadavg()[0], 1)}), flush=True)
        time.sleep(0.3)
    """
)


def _phase(
    args: argparse.Namespace, phase: str, addr: str, pki: dict[str, str], proto: str, pid: int
) -> None:
    client = [args.client_python]
    keys = [pki["ca"], pki["cert"], pki["key"], proto]
    if phase == "spawn":
        cmd = [*client, "-c", bench_peer.SPAWN, str(args.peer_dir), addr, *keys]
        cmd += ["500", str(pid), "spawn"]
    elif phase == "burst":
        cmd = [*client, "-c", bench_peer.BURST, str(args.peer_dir), addr, *keys, "3"]
    elif phase.startswith("sleep"):
        time.sleep(float(phase[5:]))
        return
    elif phase == "prewarm":
        scratch = Path(args.scratch) / "prewarm"
        cmd = ["dd", "if=/dev/zero", f"of={scratch}", "bs=1M", "count=512"]
        subprocess.run(cmd, check=True, capture_output=True)
        scratch.unlink()
        return
    else:
        cmd = [*client, str(args.peer_dir / "bench.py"), "--addr", addr, "--ca", pki["ca"]]
        cmd += ["--cert", pki["cert"], "--key", pki["key"], "--proto", proto]
        cmd += ["--server-pid", str(pid), "--repeat", "1", "--only", phase]
        cmd += ["--target-name", "localhost", "--jobs", str(args.jobs)]
    subprocess.run(cmd, check=True, capture_output=True)


def _start(
    args: argparse.Namespace, name: str, python: str | None
) -> tuple[subprocess.Popen[str], str, dict[str, str], str, int]:
    scratch = Path(args.scratch)
    if python is None:
        return bench_peer.start_peer(args, scratch)
    state = scratch / f"state-{name}"
    shutil.rmtree(state, ignore_errors=True)
    cmd = [python, "-c", bench_peer.SERVER, str(state)]
    if args.pin:
        cmd = ["taskset", "-c", args.pin, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=scratch)
    port, pki_dir = bench_peer._line_with(proc, "").split()
    d = Path(pki_dir)
    pki = {"ca": str(d / "ca.pem"), "cert": str(d / "admin.pem"), "key": str(d / "admin.key")}
    proto = str(bench_peer.REPO / "worker.proto")
    return proc, f"127.0.0.1:{port}", pki, proto, proc.pid


def _one(
    args: argparse.Namespace, name: str, python: str | None, cond: str, phases: list[str], rnd: int
) -> None:
    proc, addr, pki, proto, pid = _start(args, name, python)
    try:
        for phase in phases:
            _phase(args, phase, addr, pki, proto, pid)
        perf = None
        if args.perf:
            out = Path(args.perf) / f"{name}-{cond}-r{rnd}.data"
            cmd = ["perf", "record", "-g", "-p", str(pid), "-o", str(out)]
            perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        cmd = [args.client_python, "-c", FOLLOW, str(args.peer_dir), addr]
        cmd += [pki["ca"], pki["cert"], pki["key"], proto, str(pid), str(args.follows)]
        cmd += [str(args.bytes)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        if perf is not None:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        for line in result.stdout.splitlines():
            rec = json.loads(line) | {"server": name, "cond": cond, "round": rnd}
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            print(
                f"r{rnd} {name:8} {cond:8} #{rec['i']} {rec['MBps']:6.1f} MB/s "
                f"server {rec['server_cpu_s']:.2f} s {rec['server_threads']} "
                f"faults {rec['server_minflt']}; client {rec['client_cpu_s']:.2f} s "
                f"faults {rec['client_minflt']}; messages {rec['messages']} (small {rec['small']}, "
                f"p50 {rec['p50'] // 1024} KiB) load {rec['load']}",
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def start_hogs(args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    """``--hogs`` busy loops, on the ``--pin`` CPUs if given: the other load of a sitting."""
    hog = [sys.executable, "-c", "while True: pass"]
    if args.pin:
        hog = ["taskset", "-c", args.pin, *hog]
    return [subprocess.Popen(hog) for _ in range(args.hogs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench_peer.add_peer_arguments(parser)
    parser.add_argument("--peer", action="store_true", help="the grpcio peer too")
    parser.add_argument("--cond", action="append", default=[], help="NAME=PHASE,PHASE")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--follows", type=int, default=2)
    parser.add_argument("--bytes", type=int, default=256 << 20)
    parser.add_argument("--jobs", type=int, default=200, help="bench.py joblat's jobs")
    parser.add_argument("--out", help="also append each follow's JSON line here")
    parser.add_argument("--perf", help="a directory for perf record files")
    parser.add_argument("--pin", help="CPUS: the servers (and their jobs) under taskset -c")
    parser.add_argument("--hogs", type=int, default=0, help="busy loops meanwhile (pinned too)")
    args = parser.parse_args()
    servers: list[tuple[str, str | None]] = [
        (n, p) for n, _, p in (s.partition("=") for s in args.server or [])
    ] or [("this", sys.executable)]
    if args.peer:
        servers.append(("peer", None))
    conds = [(c.partition("=")[0], c.partition("=")[2]) for c in args.cond or ["fresh="]]
    hogs = start_hogs(args)
    try:
        with tempfile.TemporaryDirectory(prefix="follow-phases-") as scratch:
            args.scratch = scratch
            for rnd in range(args.rounds):
                order = [(s, c) for s in servers for c in conds]
                random.shuffle(order)
                for (name, python), (cond, phases) in order:
                    _one(args, name, python, cond, [p for p in phases.split(",") if p], rnd)
    finally:
        for proc in hogs:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
