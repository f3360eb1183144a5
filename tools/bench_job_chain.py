"""Where a Start `true` + Wait's time goes after the Start's reply, seen from inside the server.

    python tools/bench_job_chain.py --server NAME=PYTHON [--server ...] [--rounds 3]
        [--jobs 300] [--peer-dir ../shared/bench] [--client-python PYTHON]

Runs the peer's ``bench.py --only joblat`` (one grpcio channel: Start `true`, then Wait,
``--jobs`` times) against each server in turn, in a new random order each round, with a
``sitecustomize`` hook in the server that stamps ``CLOCK_MONOTONIC`` at: the Start
handler's return, each TLS send (the first after a handler is its reply), the seeded
launch (go byte to exec seen), the watcher's ``_exited`` (a job's end, whoever calls it),
and the Wait's ``wait_ended`` (in the reader; whether it answered) and ``wait`` (the task).

Prints per run: the client's p50s (Start + Wait, Start alone: their difference is the
Wait part), the share of Waits answered in the reader, and server-side p50/p90 of: Start
reply to Wait reply, Start reply to the Wait's arrival (the client's turn and the loop's
read), the Wait's arrival to its reply, the job's end step. For the kernel's side (the
seed's wakeup, exec, exit) run ``perf record -a -k CLOCK_MONOTONIC -e
sched:sched_process_exec,sched:sched_process_exit`` beside it: same clock. Hooks internal
names; asserts nothing. The machine is shared: read directions and ranges over rounds.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer  # (the server script)

HOOK = textwrap.dedent(
    """
    import atexit, importlib.abc, importlib.util, os, pickle, sys, time
    _out = os.environ["JOB_CHAIN_OUT"]
    _ev = []
    _t = time.monotonic_ns
    atexit.register(lambda: pickle.dump(_ev, open(_out, "wb")))

    def _patch():
        from trio_worker.server import _service as S
        from trio_worker._jobs import _launch as L, _runner as R
        from trio_worker._net import _tlsstream as T
        start = S.WorkerService.start
        async def _start(self, request, ctx):
            reply = await start(self, request, ctx)
            _ev.append(("start", _t(), _t(), reply.id, reply.pid))
            return reply
        S.WorkerService.start = _start
        wait_ended = S.WorkerService.wait_ended
        def _wait_ended(self, request, ctx):
            a = _t()
            reply = wait_ended(self, request, ctx)
            _ev.append(("wait_ended", a, _t(), request.id, reply is not None))
            return reply
        S.WorkerService.wait_ended = _wait_ended
        wait = S.WorkerService.wait
        async def _wait(self, request, ctx):
            a = _t()
            reply = await wait(self, request, ctx)
            _ev.append(("wait", a, _t(), request.id, None))
            return reply
        S.WorkerService.wait = _wait
        exited = R.JobRunner._exited
        def _exited(self, watch):
            a = _t()
            exited(self, watch)
            _ev.append(("exited", a, _t(), watch.job.id, watch.process.pid))
        R.JobRunner._exited = _exited
        send = T.TLSSocketStream.try_send_many
        def _send(self, buffers):
            a = _t()
            sent = send(self, buffers)
            _ev.append(("send", a, _t(), None, None))
            return sent
        T.TLSSocketStream.try_send_many = _send

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "trio_worker.server._run":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module
            def exec_module(module):
                load(module)
                _patch()
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
    """
)


def _pct(values: list[int], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] / 1e3 if values else float("nan")


def analyse(events: list[tuple[object, ...]]) -> dict[str, list[int]]:
    sends = sorted(int(e[1]) for e in events if e[0] == "send")  # type: ignore[call-overload]
    by: dict[object, dict[str, tuple[object, ...]]] = {}
    for e in events:
        if e[0] in ("start", "wait_ended", "wait", "exited"):
            by.setdefault(e[3], {})[str(e[0])] = e
    rows: dict[str, list[int]] = {k: [] for k in ROWS}
    answered = 0
    for got in list(by.values())[5:]:  # (bench.py's warm-up)
        if not all(k in got for k in ("start", "wait_ended")):
            continue
        start, early = got["start"], got["wait_ended"]
        if not early[4] and "wait" not in got:
            continue
        i = bisect.bisect_left(sends, int(start[2]))  # type: ignore[call-overload]
        done = int(early[2] if early[4] else got["wait"][2])  # type: ignore[call-overload]
        j = bisect.bisect_left(sends, done)
        if i >= len(sends) or j >= len(sends):
            continue
        answered += bool(early[4])
        start_reply, wait_reply = sends[i], sends[j]
        arrival = int(early[1])  # type: ignore[call-overload]
        rows["Start reply -> Wait reply"].append(wait_reply - start_reply)
        rows["Start reply -> Wait arrives"].append(arrival - start_reply)
        rows["Wait arrives -> Wait reply"].append(wait_reply - arrival)
        if "exited" in got:
            end = got["exited"]
            rows["the end's step"].append(int(end[2]) - int(end[1]))  # type: ignore[call-overload]
    rows["answered in the reader (count)"] = [answered]
    return rows


ROWS = (
    "Start reply -> Wait reply",
    "Start reply -> Wait arrives",
    "Wait arrives -> Wait reply",
    "the end's step",
)


def run_one(
    python: str, args: argparse.Namespace, hook: str
) -> tuple[dict[str, float], dict[str, list[int]]]:
    state = tempfile.mkdtemp(prefix="job-chain-")
    out = os.path.join(state, "events.pkl")
    env = dict(os.environ, JOB_CHAIN_OUT=out)
    # Run first in the server's script (a wrapper may set its own PYTHONPATH).
    code = f"exec(open({hook!r}).read())\n" + bench_peer.SERVER
    server = subprocess.Popen(
        [python, "-c", code, state], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert server.stdout is not None
        port, pki = server.stdout.readline().split()
        peer = Path(args.peer_dir)
        cmd = [
            args.client_python, str(peer / "bench.py"), "--addr", f"127.0.0.1:{port}",
            "--ca", f"{pki}/ca.pem", "--cert", f"{pki}/admin.pem", "--key", f"{pki}/admin.key",
            "--label", "x", "--proto", str(peer / "worker.proto"), "--only", "joblat",
            "--jobs", str(args.jobs), "--repeat", "1",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        server.send_signal(2)  # KeyboardInterrupt: atexit writes the events
        server.wait()
    client = {}
    for line in done.stdout.splitlines():
        try:
            figure = json.loads(line)
        except ValueError:
            continue
        client[figure["figure"]] = figure["median"]
    with open(out, "rb") as f:
        events = pickle.load(f)
    subprocess.run(["rm", "-rf", state], check=False)
    return client, analyse(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", action="append", required=True, help="NAME=PYTHON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=300)
    here = Path(__file__).resolve().parent
    parser.add_argument("--peer-dir", default=str(here.parent.parent / "shared" / "bench"))
    parser.add_argument("--client-python", default=sys.executable)
    args = parser.parse_args()
    servers = dict(s.split("=", 1) for s in args.server)
    with tempfile.TemporaryDirectory() as hook_dir:
        hook = os.path.join(hook_dir, "job_chain_hook.py")
        Path(hook).write_text(HOOK)
        for round_ in range(1, args.rounds + 1):
            order = list(servers)
            random.shuffle(order)
            for name in order:
                client, rows = run_one(servers[name], args, hook)
                n = len(rows["Start reply -> Wait reply"])
                answered = rows.pop("answered in the reader (count)")[0]
                load = os.getloadavg()[0]
                sw = client.get("job_true_start_wait_p50", float("nan"))
                s = client.get("job_true_start_only_p50", float("nan"))
                print(
                    f"round {round_} {name}: load {load:.1f}; client Start + Wait p50 {sw:.2f} ms,"
                    f" Start alone {s:.2f}, the Wait part {sw - s:.2f}; Waits answered in the"
                    f" reader {answered}/{n}"
                )
                for row, values in rows.items():
                    p50, p90 = _pct(values, 0.5), _pct(values, 0.9)
                    print(f"    {row:30s} p50 {p50:7.0f}  p90 {p90:7.0f} us")


if __name__ == "__main__":
    main()
