"""trio-worker next to the grpcio reference peer, interleaved, as ratios (>= 1 is better).

    python tools/bench_peer.py [--rounds 2] [--repeat 1] [--only joblat,spawn,...]
        [--spawn 500] [--spawn-runs 1] [--server NAME=PYTHON ...] [--peer-dir ../shared/bench]

Runs the peer (``grpcio_peer.py``) and each trio-worker server (by default this
tree, with this Python; ``--server before=/path/to/old/.venv/bin/python`` adds
another tree) in turn, ``--rounds`` times, in a new random order each round (a
fixed order lets load that drifts during a sitting favour whoever runs first),
and drives each with the peer's own harness (``bench.py``, the official grpcio
client). Then it measures Status latency on one connection while idle and while
another connection starts jobs back to back. Last in each round, each server is
started again for issue 11's scale figures (``--scale``, 1,000 by default): that
many ``sleep`` jobs at once, ours under a stock soft fd limit of 1,024 (the server
raises its own at start; the peer raises nothing, so it keeps the bench's), with
the server's RSS per job and fds. Prints one line per figure: each
server's median, the peer's, and the ratio (throughputs: server/peer; latencies
and memory: peer/server); then, with several rounds, each figure's range over the
rounds, to tell a difference from the noise. The machine is shared: read ratios,
not absolute figures. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Starts a trio-worker server of whatever tree ``sys.executable`` imports; prints
#: "PORT PKI_DIR". Old trees kept ``run_server`` in ``trio_worker._server``.
SERVER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from trio_worker import pki
    try:
        from trio_worker.server._run import ServerSettings, run_server
    except ImportError:
        from trio_worker._server import ServerSettings, run_server
    state = Path(sys.argv[1])
    dev = pki.ensure_dev_pki(state)
    settings = ServerSettings(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key,
                              state_dir=state, port=0)
    async def main():
        async with trio.open_nursery() as n:
            port = await n.start(run_server, settings)
            print(port, dev.directory, flush=True)
    trio.run(main)
    """
)

#: Figures of the issue's table: bench.py name -> (row, True if higher is better).
FIGURES = {
    "job_true_start_wait_p50": ("Start `true` + Wait, p50 (ms)", False),
    "job_true_start_wait_p99": ("Start `true` + Wait, p99 (ms)", False),
    "job_true_start_only_p50": ("Start `true` alone, p50 (ms)", False),
    "spawn_500_sleep_start_rate": ("500 x Start `sleep`, sequential (jobs/s)", True),
    "spawn_500_sleep_rss_per_job": ("server RSS per sleeping job (KiB)", False),
    "spawn_500_stop_all_16_threads": ("Stop 500 jobs from 16 threads (s)", False),
    "stream_replay_256MiB": ("replay a finished 256 MiB job (MB/s)", True),
    "fanout_16x64MiB_aggregate": ("16 followers x 64 MiB, aggregate (MB/s)", True),
    "stream_follow_256MiB": ("follow a 256 MiB job (MB/s)", True),
    "unary_status_seq_p50": ("Status p50 (ms)", False),
    "unary_status_seq_p99": ("Status p99 (ms)", False),
    "unary_status_8callers": ("Status, 8 callers (calls/s)", True),
    "status_p99_idle": ("Status p99, idle (ms)", False),
    "status_p99_during_starts": ("Status p99 during a Start burst (ms)", False),
}


#: Suffix of a figure's server CPU (s per run) as bench.py measures it.
SERVER_CPU = "__server_cpu"
#: Rows whose server CPU is printed.
CPU_ROWS = ("stream_follow_256MiB", "stream_replay_256MiB", "fanout_16x64MiB_aggregate")


def table_rows(spawn: int, scale: int) -> dict[str, tuple[str, bool]]:
    """FIGURES with the spawn rows for ``--spawn`` jobs, then the scale rows (``--scale``)."""
    rows: dict[str, tuple[str, bool]] = {}
    for name, (row, higher) in FIGURES.items():
        if name.startswith("spawn_500_"):
            name = name.replace("500", str(spawn), 1)
            row = row.replace("500", str(spawn), 1)
        rows[name] = (row, higher)
    if scale:
        rows[f"scale_{scale}_running"] = (
            f"{scale:,} sleeping jobs running, fd limit {STOCK_NOFILE:,}",
            True,
        )
        rows[f"scale_{scale}_rss_per_job"] = (
            f"server RSS per sleeping job, {scale:,} (KiB)",
            False,
        )
        rows[f"scale_{scale}_server_fds"] = (f"server fds with {scale:,} sleeping jobs", False)
    return rows


#: The soft fd limit of a stock host (the hard one: 4,096, or the bench's own if lower).
#: Issue 11: 1,000 sleeping jobs under it; the server raises its own at start (jobs keep
#: the stock one). The peer runs with the bench's limit: it raises nothing.
STOCK_NOFILE = 1024


#: Status latency next to a start burst, with the peer's stubs (bench.py's loader).
BURST = textwrap.dedent(
    """
    import json, sys, threading, time
    sys.path.insert(0, sys.argv[1])
    import bench, grpc
    addr, ca, cert, key, proto, seconds = sys.argv[2:8]
    pb, grpc_mod = bench.load_proto(proto)
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                         open(cert, "rb").read())
    opts = [("grpc.use_local_subchannel_pool", 1),
            ("grpc.ssl_target_name_override", "localhost")]
    def stub():
        return grpc_mod.WorkerStub(grpc.secure_channel(addr, creds, options=opts))
    status, starter = stub(), stub()
    job = starter.Start(pb.StartRequest(command="true"), timeout=30)
    starter.Wait(pb.WaitRequest(id=job.id), timeout=30)
    req = pb.StatusRequest(id=job.id)
    def p99(stop):
        lat = []
        while not stop():
            t = time.perf_counter()
            status.Status(req, timeout=30)
            lat.append((time.perf_counter() - t) * 1e3)
        lat.sort()
        return lat[int(len(lat) * 0.99)], len(lat)
    for _ in range(50):
        status.Status(req, timeout=30)
    end = time.monotonic() + float(seconds)
    idle = p99(lambda: time.monotonic() > end)
    done = threading.Event()
    started = []
    def burst():
        while not done.is_set():
            j = starter.Start(pb.StartRequest(command="true"), timeout=30)
            started.append(j.id)
    t = threading.Thread(target=burst); t.start()
    time.sleep(0.2)
    end = time.monotonic() + float(seconds)
    busy = p99(lambda: time.monotonic() > end)
    done.set(); t.join()
    for i in started:
        starter.Wait(pb.WaitRequest(id=i), timeout=60)
    print(json.dumps({"figure": "status_p99_idle", "median": idle[0], "calls": idle[1]}))
    print(json.dumps({"figure": "status_p99_during_starts", "median": busy[0], "calls": busy[1],
                      "starts": len(started)}))
    """
)


#: bench.py's spawn figure, paging-aware: its check lists the jobs with one List call,
#: which a server that pages List (the contract allows it) answers with one page.
SPAWN = textwrap.dedent(
    """
    import concurrent.futures, json, os, sys, time
    sys.path.insert(0, sys.argv[1])
    import bench, grpc
    from google.protobuf.duration_pb2 import Duration
    addr, ca, cert, key, proto, n, pid, prefix = sys.argv[2:10]
    n, pid = int(n), int(pid)
    pb, grpc_mod = bench.load_proto(proto)
    creds = grpc.ssl_channel_credentials(open(ca, "rb").read(), open(key, "rb").read(),
                                         open(cert, "rb").read())
    opts = [("grpc.use_local_subchannel_pool", 1),
            ("grpc.ssl_target_name_override", "localhost")]
    st = grpc_mod.WorkerStub(grpc.secure_channel(addr, creds, options=opts))
    time.sleep(0.5)
    rss0 = bench.proc_status(pid, "VmRSS")
    t0 = time.perf_counter()
    ids = [st.Start(pb.StartRequest(command="sleep", args=["60"]), timeout=60).id
           for _ in range(n)]
    rate = n / (time.perf_counter() - t0)
    time.sleep(1.0)
    rss1 = bench.proc_status(pid, "VmRSS")
    running = sum(st.Status(pb.StatusRequest(id=i), timeout=60).state
                  == pb.JOB_STATE_RUNNING for i in ids)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: st.Stop(pb.StopRequest(id=i, grace=Duration(seconds=5)),
                                      timeout=60), ids))
    stop = time.perf_counter() - t0
    if prefix == "spawn":
        print(json.dumps({"figure": f"spawn_{n}_sleep_start_rate", "median": rate,
                          "running": running}))
        print(json.dumps({"figure": f"spawn_{n}_sleep_rss_per_job", "median": (rss1 - rss0) / n}))
        print(json.dumps({"figure": f"spawn_{n}_stop_all_16_threads", "median": stop}))
    else:
        print(json.dumps({"figure": f"{prefix}_{n}_running", "median": running}))
        print(json.dumps({"figure": f"{prefix}_{n}_rss_per_job", "median": (rss1 - rss0) / n}))
        print(json.dumps({"figure": f"{prefix}_{n}_server_fds", "median": fds}))
    """
)


def _line_with(proc: subprocess.Popen[str], word: str) -> str:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"server exited before printing {word!r}")
        if word in line or word == "":
            return line


def _figures(cmd: list[str], label: str, what: str) -> dict[str, float]:
    """Run one client command; its figures are its JSON lines' medians (a failure is said,
    with what it printed, and gives what it had measured)."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"# {label}: {what} failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    figures = {record["figure"]: record["median"] for record in records}
    for record in records:  # the follow's: whether it ran in the small-message mode
        if "messages" in record:
            figures[f"{record['figure']}:messages"] = record["messages"]
    # bench.py's server CPU per run (the output rows): robust to load where rates are not.
    figures |= {
        f"{record['figure']}{SERVER_CPU}": record["server_cpu_s"]
        for record in records
        if "server_cpu_s" in record
    }
    return figures


def _spawn(
    args: argparse.Namespace,
    addr: str,
    pki: dict[str, str],
    proto: str,
    pid: int,
    label: str,
    n: int,
    prefix: str,
) -> dict[str, float]:
    spawn = [args.client_python, "-c", SPAWN, str(args.peer_dir), addr]
    spawn += [pki["ca"], pki["cert"], pki["key"], proto, str(n), str(pid), prefix]
    return _figures(spawn, label, prefix)


def _run_harness(
    args: argparse.Namespace,
    addr: str,
    pki: dict[str, str],
    proto: str,
    pid: int,
    label: str,
    scale: bool = False,
    spawn_only: bool = False,
) -> dict[str, float]:
    if scale:  # a server of its own: its RSS per job is that of a fresh server
        return _spawn(args, addr, pki, proto, pid, label, args.scale, "scale")
    if spawn_only:  # another run of the spawn phase (``--spawn-runs``), on a fresh server
        return _spawn(args, addr, pki, proto, pid, label, args.spawn, "spawn")
    figures: dict[str, float] = {}
    # First, on a fresh server: RSS per job is only meaningful before big outputs.
    if args.spawn > 0:
        figures |= _spawn(args, addr, pki, proto, pid, label, args.spawn, "spawn")
    if args.only:
        cmd = [
            args.client_python,
            str(args.peer_dir / "bench.py"),
            "--addr",
            addr,
            "--ca",
            pki["ca"],
            "--cert",
            pki["cert"],
            "--key",
            pki["key"],
            "--proto",
            proto,
            "--server-pid",
            str(pid),
            "--label",
            label,
            "--repeat",
            str(args.repeat),
            "--only",
            args.only,
            "--target-name",
            "localhost",
        ]
        figures |= _figures(cmd, label, "bench.py")
    if args.burst_seconds > 0:
        burst = [args.client_python, "-c", BURST, str(args.peer_dir), addr]
        burst += [pki["ca"], pki["cert"], pki["key"], proto, str(args.burst_seconds)]
        figures |= _figures(burst, label, "burst")
    return figures


def peer_pki(args: argparse.Namespace, scratch: Path) -> Path:
    """The peer's PKI in ``scratch`` (made by its ``pki.py`` the first time)."""
    pki_dir = scratch / "peer-pki"
    if not pki_dir.exists():
        subprocess.run(
            [args.client_python, str(args.peer_dir / "pki.py"), str(pki_dir)],
            check=True,
            capture_output=True,
        )
    return pki_dir


def start_peer(
    args: argparse.Namespace, scratch: Path
) -> tuple[subprocess.Popen[str], str, dict[str, str], str, int]:
    """Start the grpcio peer on an ephemeral port; its process, address, the admin
    client's PKI files (``ca``, ``cert``, ``key``), its ``worker.proto`` and its pid."""
    pki_dir = peer_pki(args, scratch)
    cmd = [args.client_python, str(args.peer_dir / "grpcio_peer.py"), "--listen", "127.0.0.1:0"]
    cmd += ["--ca", str(pki_dir / "ca.pem"), "--cert", str(pki_dir / "server.pem")]
    cmd += ["--key", str(pki_dir / "server.key")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        words = _line_with(proc, "LISTENING").split()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    pki = {
        k: str(pki_dir / f)
        for k, f in (("ca", "ca.pem"), ("cert", "admin.pem"), ("key", "admin.key"))
    }
    return proc, words[1], pki, str(args.peer_dir / "worker.proto"), int(words[3])


def _peer_round(
    args: argparse.Namespace, scratch: Path, scale: bool = False, spawn_only: bool = False
) -> dict[str, float]:
    proc, addr, pki, proto, pid = start_peer(args, scratch)
    try:
        return _run_harness(args, addr, pki, proto, pid, "peer", scale, spawn_only)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _page_cache_cost(scratch: Path) -> tuple[float, float]:
    """CPU ms to write 64 MiB into new page cache: after 4 s idle, then at once again.

    On a VM whose freed memory goes back to its host (free page reporting, as on this
    Firecracker guest), pages that sat free for ~2 s cost a host fault at their first
    touch: writing a job's log then costs several times the CPU, and capture (and so
    follow) slows with it. The peer pays the same for its heap. Printed so that a
    sitting's output rows can be read knowing which kind of sitting it was.
    """
    block = b"\0" * (1 << 20)
    costs = []
    for idle in (4.0, 0.0):
        time.sleep(idle)
        path = scratch / "page-cache-cost"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            start = time.thread_time()
            for i in range(64):
                os.pwrite(fd, block, i << 20)
            costs.append((time.thread_time() - start) * 1e3)
        finally:
            os.close(fd)
            path.unlink()
    return costs[0], costs[1]


def _stock_nofile() -> None:
    """In the server's child, before exec: a stock host's fd limits."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(STOCK_NOFILE, hard), hard))


def _server_round(
    args: argparse.Namespace,
    scratch: Path,
    name: str,
    python: str,
    scale: bool = False,
    spawn_only: bool = False,
) -> dict[str, float]:
    state = scratch / f"state-{name}"
    shutil.rmtree(state, ignore_errors=True)
    proc = subprocess.Popen(
        [python, "-c", SERVER, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
        preexec_fn=_stock_nofile if scale else None,
    )
    try:
        port, pki_dir = _line_with(proc, "").split()
        d = Path(pki_dir)
        pki = {"ca": str(d / "ca.pem"), "cert": str(d / "admin.pem"), "key": str(d / "admin.key")}
        if not Path(pki["cert"]).exists():  # older layouts name the client files differently
            pems = sorted(p for p in d.glob("*.pem") if p.name not in ("ca.pem", "server.pem"))
            pki["cert"] = str(pems[0])
            pki["key"] = str(pems[0].with_suffix(".key"))
        proto = str(REPO / "worker.proto")
        return _run_harness(
            args, f"127.0.0.1:{port}", pki, proto, proc.pid, name, scale, spawn_only
        )
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def _more_spawn_runs(
    args: argparse.Namespace,
    scratch: Path,
    order: list[tuple[str, str | None]],
    results: dict[str, list[dict[str, float]]],
) -> None:
    """``--spawn-runs``: the spawn phase ``args.spawn_runs - 1`` more times per server, in
    the round's order, each on a fresh server; the round's spawn figures become the
    medians of all its runs."""
    runs: dict[str, list[dict[str, float]]] = {name: [results[name][-1]] for name, _ in order}
    for _ in range(args.spawn_runs - 1):
        for name, python in order:
            if python is None:
                runs[name].append(_peer_round(args, scratch, spawn_only=True))
            else:
                runs[name].append(_server_round(args, scratch, name, python, spawn_only=True))
    prefix = f"spawn_{args.spawn}_"
    for name, figures in runs.items():
        for figure in {f for run in figures for f in run if f.startswith(prefix)}:
            values = [run[figure] for run in figures if figure in run]
            results[name][-1][figure] = statistics.median(values)


def add_peer_arguments(
    parser: argparse.ArgumentParser, server_help: str = "NAME=PYTHON (default: this tree)"
) -> None:
    """``--peer-dir``, ``--client-python`` and ``--server``, as every tool that runs the
    peer's client against our servers takes them."""
    parser.add_argument(
        "--peer-dir",
        type=Path,
        default=Path(os.environ.get("TRIO_WORKER_PEER_BENCH", REPO.parent / "shared" / "bench")),
        help="the peer's folder (default: ../shared/bench, or $TRIO_WORKER_PEER_BENCH)",
    )
    parser.add_argument("--client-python", default=sys.executable)
    parser.add_argument("--server", action="append", default=[], help=server_help)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="bench.py --repeat")
    parser.add_argument("--only", default="joblat,unary,stream,fanout", help="bench.py --only")
    parser.add_argument("--spawn", type=int, default=500, help="sleeping jobs (0: skip)")
    parser.add_argument(
        "--spawn-runs",
        type=int,
        default=1,
        help="runs of the spawn phase per server and round, each on a fresh server; the "
        "round's spawn figures are their medians (one run's rate swings by where the "
        "server's background work and the machine's fall: ARCHITECTURE.md)",
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1000,
        help="sleeping jobs on a server of their own, ours under a stock soft fd limit "
        f"of {STOCK_NOFILE} (0: skip)",
    )
    parser.add_argument("--burst-seconds", type=float, default=3.0)
    add_peer_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="one round, smaller outputs")
    args, _ = parser.parse_known_args()  # nox -s bench passes its posargs to every tool
    if args.quick:
        args.rounds = 1
    if not (args.peer_dir / "bench.py").exists():
        print(f"no peer harness in {args.peer_dir} (--peer-dir): nothing to compare with")
        return
    servers = [tuple(s.split("=", 1)) for s in args.server] or [("trio-worker", sys.executable)]
    results: dict[str, list[dict[str, float]]] = {"peer": []}
    for name, _ in servers:
        results[name] = []
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        scratch = Path(tmp)
        pages = [_page_cache_cost(scratch)]
        for round_ in range(args.rounds):
            order: list[tuple[str, str | None]] = [("peer", None), *servers]
            random.shuffle(order)
            print(
                f"# round {round_ + 1}/{args.rounds}: {', '.join(n for n, _ in order)}",
                file=sys.stderr,
                flush=True,
            )
            for name, python in order:
                if python is None:
                    results["peer"].append(_peer_round(args, scratch))
                else:
                    results[name].append(_server_round(args, scratch, name, python))
            if args.spawn > 0 and args.spawn_runs > 1:
                _more_spawn_runs(args, scratch, order, results)
            if args.scale > 0:
                for name, python in order:
                    if python is None:
                        results["peer"][-1] |= _peer_round(args, scratch, scale=True)
                    else:
                        scaled = _server_round(args, scratch, name, python, scale=True)
                        results[name][-1] |= scaled

        pages.append(_page_cache_cost(scratch))

    def median(name: str, figure: str) -> float | None:
        values = [r[figure] for r in results[name] if figure in r]
        return statistics.median(values) if values else None

    load = os.getloadavg()[0]
    print(f"trio-worker vs grpcio peer: {args.rounds} interleaved round(s), medians;")
    print(f"ratio >= 1 is better. Load average at the end: {load:.1f} (shared machine).")
    print(
        "new page cache, CPU ms per 64 MiB after 4 s idle / at once (output rows pay it): "
        + ", then ".join(f"{cold:.0f} / {warm:.0f}" for cold, warm in pages)
    )
    header = f"{'figure':44}" + "".join(f"{n:>14}{'ratio':>7}" for n, _ in servers)
    print(header + f"{'peer':>12}")
    rows = table_rows(args.spawn, args.scale)
    for figure, (row, higher) in rows.items():
        peer = median("peer", figure)
        cells = ""
        seen = False
        for name, _ in servers:
            value = median(name, figure)
            if value is None or peer is None or value == 0:
                cells += f"{'-':>14}{'-':>7}"
                continue
            seen = True
            ratio = value / peer if higher else peer / value
            cells += f"{value:>14.2f}{ratio:>7.2f}"
        if seen:
            print(f"{row:44}{cells}{peer:>12.2f}")
    counts = []
    for name in results:
        for figure in sorted({f for r in results[name] for f in r if f.endswith(":messages")}):
            values = " ".join(f"{r[figure]:.0f}" for r in results[name] if figure in r)
            counts.append(f"{name} {values}")
    if counts:
        # A follower that keeps up with the job sends each pipe read as a message: many
        # more than whole pieces make costs many times the CPU, on either server
        # (ARCHITECTURE "What the phases change, on both sides").
        print(
            "follow's messages in each round (whole pieces: 1,025 per 256 MiB for ours, "
            "4,096 for the peer): " + "   ".join(counts)
        )
    cpu_lines = []
    for figure in CPU_ROWS:
        cells = [
            f"{name} {value:.2f}"
            for name in results
            if (value := median(name, figure + SERVER_CPU)) is not None
        ]
        if cells:
            cpu_lines.append(f"{FIGURES[figure][0].split(' (')[0]:44}{'   '.join(cells)}")
    if cpu_lines:
        print("the server's CPU per run (s), medians (robust to load where the rates are not):")
        print("\n".join(cpu_lines))
    if args.rounds > 1:
        print("range over the rounds (min-max):")
        for figure, (row, _) in rows.items():
            spans = []
            for name in results:
                values = [r[figure] for r in results[name] if figure in r]
                if values:
                    spans.append(f"{name} {min(values):.2f}-{max(values):.2f}")
            if spans:
                print(f"{row:44}{'   '.join(spans)}")
        # Each round's ratio is of two runs a minute apart: load that drifts over a
        # sitting moves both, so these say more than the medians' ratio whether a row
        # holds in every round.
        print("ratio to the peer in each round (>= 1 is better):")
        for figure, (row, higher) in rows.items():
            line = []
            for name, _ in servers:
                ratios = []
                for ours, theirs in zip(results[name], results["peer"], strict=True):
                    if ours.get(figure) and theirs.get(figure):
                        ratio = ours[figure] / theirs[figure]
                        ratios.append(ratio if higher else 1 / ratio)
                if ratios:
                    line.append(f"{name} " + " ".join(f"{r:.2f}" for r in ratios))
            if line:
                print(f"{row:44}{'   '.join(line)}")


if __name__ == "__main__":
    main()
