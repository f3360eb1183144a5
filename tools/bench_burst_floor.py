"""How much of the Start burst's Status ratio the client makes, for our server and the peer.

    python tools/bench_burst_floor.py [--server NAME=PYTHON ...] [--rounds 3] [--seconds 3]
        [--peer-dir ../shared/bench] [--client-python PYTHON]

Issue 11 asks for Status p99 during a Start burst at most 2x idle (``bench_peer.py``'s
burst: one grpcio client process calls Status in a loop, idle for ``--seconds``, then
while a second thread of the same process Starts ``true`` back to back). This runs that
burst and two variants of it against each server (ours, and the grpcio peer), in a new
random order each round, a fresh server each run:

- ``start``: the burst as ``bench_peer.py`` runs it;
- ``status``: the second thread calls Status back to back instead of Start: the same
  client, the same two connections, no job work in the server at all. What this reads
  is what the client's second busy thread and a second connection's calls cost a
  Status, whatever the server does for a Start;
- ``2proc``: the Start burst, with the Status loop in a client process of its own (no
  GIL shared with the Starting thread): what the benchmark's one-process client adds.

Prints each run's idle and burst p99 and their ratio, then per server and variant the
median ratio and its range. The machine is shared: read it with its load, and run it on
a quiet one to judge the 2x target (ARCHITECTURE.md, "The loop during a Start burst").
Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer  # (the server script and the burst client)

#: The burst with its second thread calling Status (on its own connection) back to back.
STATUS_BURST = bench_peer.BURST.replace(
    'j = starter.Start(pb.StartRequest(command="true"), timeout=30)\n        started.append(j.id)',
    "starter.Status(req, timeout=30)",
).replace("for i in started:", "for i in []:")
assert "starter.Status(req" in STATUS_BURST
assert "for i in []:" in STATUS_BURST

#: The Status loop alone (idle, then its "burst" phase with no thread of its own): it says
#: ``BUSY`` when its burst phase begins, for ``STARTER`` to start then.
STATUS_ALONE = bench_peer.BURST.replace(
    "t = threading.Thread(target=burst); t.start()",
    "print('BUSY', flush=True); t = threading.Thread(target=lambda: None); t.start()",
).replace("time.sleep(0.2)", "time.sleep(0.5)")  # (the starter's own start-up)
assert "print('BUSY'" in STATUS_ALONE
assert "time.sleep(0.5)" in STATUS_ALONE

#: Starts ``true`` back to back for ``seconds`` + 1 s in a process of its own.
STARTER = (
    bench_peer.BURST.split("req = pb.StatusRequest")[0]
    + "started = []\n"
    + "end = time.monotonic() + float(seconds) + 1.0\n"
    + "while time.monotonic() < end:\n"
    + '    started.append(starter.Start(pb.StartRequest(command="true"), timeout=30).id)\n'
    + "for i in started:\n"
    + "    starter.Wait(pb.WaitRequest(id=i), timeout=60)\n"
)

VARIANTS = ("start", "status", "2proc")


def _figures(out: str) -> dict[str, float]:
    return {
        r["figure"]: r["median"]
        for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))
    }


def _run(variant: str, client: str, args: list[str]) -> dict[str, float]:
    if variant != "2proc":
        script = bench_peer.BURST if variant == "start" else STATUS_BURST
        done = subprocess.run([client, "-c", script, *args], capture_output=True, text=True)
        return _figures(done.stdout)
    status = subprocess.Popen(
        [client, "-c", STATUS_ALONE, *args], stdout=subprocess.PIPE, text=True
    )
    assert status.stdout is not None
    if "BUSY" not in status.stdout.readline():
        status.kill()
        return {}
    starter = subprocess.Popen([client, "-c", STARTER, *args], stdout=subprocess.DEVNULL)
    out, _ = status.communicate()
    starter.wait()
    return _figures(out)


def _ours(python: str, scratch: Path) -> tuple[subprocess.Popen[str], list[str]]:
    state = Path(tempfile.mkdtemp(dir=scratch))
    proc = subprocess.Popen(
        [python, "-c", bench_peer.SERVER, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
    )
    port, pki = bench_peer._line_with(proc, "").split()
    d = Path(pki)
    files = [str(d / "ca.pem"), str(d / "admin.pem"), str(d / "admin.key")]
    return proc, [f"127.0.0.1:{port}", *files, str(bench_peer.REPO / "worker.proto")]


def _peer(args: argparse.Namespace, scratch: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc, addr, pki, proto, _pid = bench_peer.start_peer(args, scratch)
    return proc, [addr, pki["ca"], pki["cert"], pki["key"], proto]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    bench_peer.add_peer_arguments(parser, "NAME=PYTHON")
    args = parser.parse_args()
    if not (args.peer_dir / "bench.py").exists():
        print(f"no peer harness in {args.peer_dir} (--peer-dir): its client is needed")
        return
    servers: list[tuple[str, str | None]] = [("peer", None)]
    servers += [(n, p) for n, p in (s.split("=", 1) for s in args.server)] or [
        ("this", sys.executable)
    ]
    ratios: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="burst-floor-") as tmp:
        scratch = Path(tmp)
        for round_ in range(args.rounds):
            order = list(servers)
            random.shuffle(order)
            for name, python in order:
                for variant in VARIANTS:
                    proc, where = _peer(args, scratch) if python is None else _ours(python, scratch)
                    try:
                        where = [str(args.peer_dir), *where, str(args.seconds)]
                        f = _run(variant, args.client_python, where)
                    finally:
                        proc.terminate()
                        proc.wait(timeout=120)
                    idle = f.get("status_p99_idle", float("nan"))
                    busy = f.get("status_p99_during_starts", float("nan"))
                    ratios.setdefault((name, variant), []).append(busy / idle)
                    print(
                        f"round {round_ + 1} {name} {variant} (load {os.getloadavg()[0]:.1f}): "
                        f"idle p99 {idle:.2f} ms, burst p99 {busy:.2f} ms, {busy / idle:.2f}x",
                        flush=True,
                    )
    print("burst p99 over idle p99, median (range) over the rounds:")
    for name, _ in servers:
        cells = []
        for variant in VARIANTS:
            values = ratios[(name, variant)]
            cells.append(
                f"{variant} {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
            )
        print(f"  {name:12} " + "   ".join(cells))


if __name__ == "__main__":
    main()
