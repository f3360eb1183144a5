"""Where a follow's time goes, seen from inside the server: capture, the loop, the disk.

    python tools/bench_follow_anatomy.py [--server NAME=PYTHON ...] [--rounds 2]
        [--follows 3] [--bytes 268435456] [--replay] [--peer-dir ../shared/bench]
        [--client-python PYTHON]

Does what ``bench.py``'s follow row does (Start ``head -c BYTES /dev/zero``, Output with
follow from 0, through the grpcio client) ``--follows`` times on each server, the peer
too, in a new random order each round (``--replay``: what its replay row does, a job's
output read without follow once the job has ended, and only the client's and the
server's figures). Our servers run with a hook (prepended to
``bench_peer.py``'s server script, so wrappers that set ``PYTHONPATH`` keep it). Prints,
for each server, ranges and medians of:

- the follow's MB/s, the client's and the server's CPU, the messages'
  average size (a follower that keeps up reads the tail's chunks, as small as the pipe
  reads were; one that lags reads 256 KiB pieces from disk);
- (from the hook) when its job's output was all captured (the log finished) and when
  the follower had its last byte, from the first byte appended;
- the loop thread's CPU over that time; the flush threads' CPU and wall time in
  ``OutputLog._write`` and how many flushes; how often and how long the job's pipes
  were paused for the disk (``JobRunner._pause``); the lagging reader's disk reads
  (``_read_cut``: count, CPU, wall) and its reads from memory.

How to read it: capture ending just before the last byte means the follower waited for
capture (then: flush CPU high for its bytes means the host's first touch of new page
cache, see ``bench_peer.py``'s page-cache line; the loop's CPU near the whole time means
the loop thread); capture ending long before means sending was the bound (the loop's
TLS and writes, or the client). Hooks internal names (``_jobs._output``,
``_jobs._runner``); asserts nothing. The machine is shared: read directions and ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer  # (the server script, the peer's start)

HOOK = textwrap.dedent(
    """
    import json as _json, os as _os, time as _time
    from trio_worker._jobs import _output as _o, _runner as _r

    _OUT = open(_os.environ["FOLLOW_ANATOMY_OUT"], "a", buffering=1)
    _logs = {}

    def _of(log):
        return _logs.setdefault(id(log), {
            "flushes": 0, "flush_cpu": 0.0, "flush_wall": 0.0, "pauses": 0, "paused": 0.0,
            "disk_reads": 0, "disk_cpu": 0.0, "disk_wall": 0.0, "mem_reads": 0})

    _append = _o.OutputLog.append
    def append(self, stream, data, *, notify=True):
        if self._end == 0 and data:
            s = _of(self)
            s["t0"], s["cpu0"] = _time.perf_counter(), _time.thread_time()
        _append(self, stream, data, notify=notify)
    _o.OutputLog.append = append

    _finish = _o.OutputLog.finish
    def finish(self):
        _finish(self)
        s = _logs.get(id(self))
        if s is not None and "t0" in s:
            s["captured"] = _time.perf_counter() - s["t0"]
    _o.OutputLog.finish = finish

    _write = _o.OutputLog._write
    def _write_timed(self, job):
        t, c = _time.perf_counter(), _time.thread_time()
        try:
            _write(self, job)
        finally:
            s = _of(self)
            s["flushes"] += 1
            s["flush_cpu"] += _time.thread_time() - c
            s["flush_wall"] += _time.perf_counter() - t
    _o.OutputLog._write = _write_timed

    _read_cut = _o._read_cut
    def _read_cut_timed(data_path, *args):
        t, c = _time.perf_counter(), _time.thread_time()
        try:
            return _read_cut(data_path, *args)
        finally:
            s = _by_path.get(str(data_path))
            if s is not None:
                s["disk_reads"] += 1
                s["disk_cpu"] += _time.thread_time() - c
                s["disk_wall"] += _time.perf_counter() - t
    _o._read_cut = _read_cut_timed
    _by_path = {}

    _read_disk = _o.OutputLog._read_disk
    async def _read_disk_keyed(self, *args):
        _by_path[str(self.data_path)] = _of(self)
        return await _read_disk(self, *args)
    _o.OutputLog._read_disk = _read_disk_keyed

    _read_memory = _o.OutputLog._read_memory
    def _read_memory_counted(self, *args):
        _of(self)["mem_reads"] += 1
        return _read_memory(self, *args)
    _o.OutputLog._read_memory = _read_memory_counted

    _pause = _r.JobRunner._pause
    def _pause_timed(self, watch):
        s = _of(watch.job.log)
        s["pauses"] += 1
        s["paused_at"] = _time.perf_counter()
        _pause(self, watch)
    _r.JobRunner._pause = _pause_timed

    _resume = _r.JobRunner._resume
    def _resume_timed(self, watch):
        s = _logs.get(id(watch.job.log))
        if s is not None and s.get("paused_at"):
            s["paused"] += _time.perf_counter() - s.pop("paused_at")
        _resume(self, watch)
    _r.JobRunner._resume = _resume_timed

    _anext = _o.LogReader.__anext__
    async def __anext__(self):
        try:
            return await _anext(self)
        except StopAsyncIteration:
            s = _logs.pop(id(self._log), None)
            if self._follow and s is not None and "t0" in s:
                s["followed"] = _time.perf_counter() - s["t0"]
                s["loop_cpu"] = _time.thread_time() - s["cpu0"]
                s["bytes"] = self._log.end
                s.pop("paused_at", None)
                _OUT.write(_json.dumps(s) + "\\n")
            raise
    _o.LogReader.__anext__ = __anext__
    """
)

#: The follows, through the peer's grpcio client; one JSON line each.
CLIENT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, sys.argv[1])
    import bench
    addr, ca, cert, key, proto, pid, n, size, replay = sys.argv[2:11]
    replay = replay == "replay"
    class A: pass
    a = A()
    a.addr, a.ca, a.cert, a.key, a.proto, a.target_name = addr, ca, cert, key, proto, "localhost"
    b = bench.Bench(a)
    st = b.stub(b.channel())
    pid, size = int(pid), int(size)
    for _ in range(int(n)):
        if replay:  # the job's output all written first: only the replay is measured
            job = b.start(st, "head", "-c", str(size), "/dev/zero")
            st.Wait(b.pb.WaitRequest(id=job.id), timeout=600)
        s0, c0 = bench.proc_cpu(pid), bench.self_cpu()
        t0 = time.perf_counter()
        if not replay:
            job = b.start(st, "head", "-c", str(size), "/dev/zero")
        got, msgs, ok, t1 = b.read_all(st, job.id, not replay, size)
        if not ok:
            raise SystemExit(f"incomplete read: {got} of {size}")
        s1, c1 = bench.proc_cpu(pid), bench.self_cpu()
        print(json.dumps({"MBps": size / (t1 - t0) / 1e6, "client_cpu": c1 - c0,
                          "server_cpu": s1 - s0, "message_KiB": size / msgs / 1024}),
              flush=True)
        st.Wait(b.pb.WaitRequest(id=job.id), timeout=600)
    """
)


def _follows(
    args: argparse.Namespace, addr: str, pki: dict[str, str], proto: str, pid: int
) -> list[dict[str, float]]:
    cmd = [args.client_python, "-c", CLIENT, str(args.peer_dir), addr, pki["ca"], pki["cert"]]
    cmd += [pki["key"], proto, str(pid), str(args.follows), str(args.bytes)]
    cmd += ["replay" if args.replay else "follow"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"# follows failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def one_run(
    args: argparse.Namespace, name: str, python: str | None, scratch: Path
) -> list[dict[str, float]]:
    """The follows on one server (``python`` None: the peer), each with the server's view."""
    if python is None:
        peer, addr, pki, proto, pid = bench_peer.start_peer(args, scratch)
        try:
            return _follows(args, addr, pki, proto, pid)
        finally:
            peer.terminate()
            peer.wait(timeout=60)
    out = scratch / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    state = scratch / f"state-{name}"
    shutil.rmtree(state, ignore_errors=True)
    server = subprocess.Popen(
        [python, "-c", HOOK + bench_peer.SERVER, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
        env=dict(os.environ, FOLLOW_ANATOMY_OUT=str(out)),
    )
    try:
        port, pki_path = bench_peer._line_with(server, "").split()
        d = Path(pki_path)
        pki = {"ca": str(d / "ca.pem"), "cert": str(d / "admin.pem"), "key": str(d / "admin.key")}
        proto = str(bench_peer.REPO / "worker.proto")
        runs = _follows(args, f"127.0.0.1:{port}", pki, proto, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=120)
    inside = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    for run, seen in zip(runs, inside, strict=False):
        run.update(seen)
    return runs


def _line(name: str, runs: list[dict[str, float]]) -> str:
    def med(key: str) -> str:
        values = [r[key] for r in runs if key in r]
        return f"{statistics.median(values):.2f}" if values else "-"

    def span(key: str) -> str:
        values = [r[key] for r in runs if key in r]
        return f"{min(values):.0f}-{max(values):.0f}" if values else "-"

    text = (
        f"{name:>12}: {span('MBps')} MB/s (median {med('MBps')}); "
        f"CPU client {med('client_cpu')} s, server {med('server_cpu')} s; "
        f"messages of {med('message_KiB')} KiB on average"
    )
    if any("captured" in r for r in runs):
        text += (
            f"\n{'':14}captured at {med('captured')} s, last byte at {med('followed')} s; "
            f"loop thread {med('loop_cpu')} s CPU; flushes {med('flushes')} "
            f"({med('flush_cpu')} s CPU, {med('flush_wall')} s wall); paused {med('pauses')} "
            f"times ({med('paused')} s); disk reads {med('disk_reads')} ({med('disk_cpu')} s "
            f"CPU, {med('disk_wall')} s wall), memory reads {med('mem_reads')}"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--follows", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=256 * 1024 * 1024)
    parser.add_argument(
        "--replay",
        action="store_true",
        help="replay each job once it has ended (Output without follow), instead of following",
    )
    bench_peer.add_peer_arguments(parser)
    args, _ = parser.parse_known_args()  # (nox passes its posargs to every tool)
    if not (args.peer_dir / "bench.py").exists():
        print(f"no peer harness in {args.peer_dir} (--peer-dir): nothing to compare with")
        return
    servers: list[tuple[str, str | None]] = [("peer", None)]
    servers += [(n, p) for n, p in (s.split("=", 1) for s in args.server)] or [
        ("trio-worker", sys.executable)
    ]
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in servers}
    with tempfile.TemporaryDirectory(prefix="bench-follow-") as tmp:
        for round_ in range(args.rounds):
            order = servers[:]
            random.shuffle(order)
            print(f"# round {round_ + 1}: {', '.join(n for n, _ in order)}", file=sys.stderr)
            for name, python in order:
                results[name] += one_run(args, name, python, Path(tmp))
    print(
        f"{'replay' if args.replay else 'follow'} {args.bytes >> 20} MiB, {args.rounds} round(s) "
        f"x {args.follows}: ranges and "
        f"medians; load average {os.getloadavg()[0]:.1f} (shared machine)"
    )
    for name, runs in results.items():
        print(_line(name, runs))


if __name__ == "__main__":
    main()
