"""What a Status waits for during a Start burst, seen from inside the server.

    python tools/bench_burst_anatomy.py [--server NAME=PYTHON ...] [--rounds 2]
        [--seconds 3] [--rate 0] [--peer-dir ../shared/bench] [--client-python PYTHON]

Runs ``bench_peer.py``'s burst (one grpcio connection calls Status in a loop, idle,
then while another Starts ``true`` back to back) against each server in turn, in a new
random order each round (``--rate``: the Starts paced, so that a faster server is not
given a denser burst), with a ``sitecustomize`` hook in the server that records:

- each Status request's arrival: the kernel's receive timestamp (``SO_TIMESTAMPNS``,
  read with ``MSG_PEEK`` when the TLS stream reads), and the write of its reply;
- each task step of the loop: wall time, thread CPU, and the run-queue wait
  (``/proc/self/task/TID/schedstat``), and each wait in the I/O poll.

Prints per run: the client's p99s (as ``bench_peer.py``), the server-side Status latency
(arrival to reply written) idle and in the burst, the loop's CPU spent ahead of each
burst Status (its own step left out; a view that depends little on the machine's load)
with what it was in the slowest 2%, and for those slowest 2% where their time went:
the loop's CPU in steps, its run-queue wait in steps, the rest (trio between steps, the
GIL, a blocking call), the poll (a wakeup that waited for a CPU shows there).
``--sched`` also records the scheduler over the burst (``perf sched record -a``, root)
and prints who had the CPUs while the loop thread was runnable but not running: the
client (its grpcio and Python threads), the server's other threads, its seeds and jobs,
other processes, an idle CPU waking; and who preempted it. That view needs no clock offset
and is the one to read on a loaded machine: it says whose CPU time the tail waits for.
The client records each Status call (its wall-clock send time and latency), joined to
the server's receive and reply times: for the client's slowest 1% in the burst, how much
was on the client's side (send to the kernel's receive stamp, reply written to the call
returned: the client's threads and the CPUs) and how much in the server; and how many of
them overlapped one of the server's cyclic garbage collections (``gc.callbacks``).
``BURST_ANATOMY_SWITCH=SECONDS`` in a server's environment sets the GIL's switch interval
(``sys.setswitchinterval``), for an A/B of that. Hooks
internal names (``_net._tlsstream``); asserts nothing. The machine is shared: read
directions and ranges over rounds.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer  # (the server script and the burst client)

HOOK = textwrap.dedent(
    """
    import atexit, os, pickle, socket, struct, threading, time
    import trio
    from trio_worker._net import _tlsstream

    _out = os.environ["BURST_ANATOMY_OUT"]
    if os.environ.get("BURST_ANATOMY_SWITCH"):  # the GIL's switch interval, seconds
        import sys
        sys.setswitchinterval(float(os.environ["BURST_ANATOMY_SWITCH"]))
    _pc, _tc = time.perf_counter_ns, time.thread_time_ns
    _SO_TIMESTAMPNS = 35  # (Linux; not in Python 3.11's socket module)
    _steps, _arrivals, _socks, _last = [], [], {}, {}

    class _Steps(trio.abc.Instrument):
        fd = None

        def _queued(self):
            if self.fd is None:
                tid = threading.get_native_id()
                self.fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
            return int(os.pread(self.fd, 100, 0).split()[1])

        def before_task_step(self, task):
            self.q0 = self._queued()
            self.t0, self.c0 = _pc(), _tc()

        def after_task_step(self, task):
            t, c = _pc(), _tc()
            if len(_steps) < 500_000:
                _steps.append((self.t0, t - self.t0, c - self.c0, task.name,
                               self._queued() - self.q0))

        def before_io_wait(self, timeout):
            self.w0 = _pc()

        def after_io_wait(self, timeout):
            if len(_steps) < 500_000:
                _steps.append((self.w0, _pc() - self.w0, 0, "<poll>", 0))

    _run = trio.run

    def run(*args, **kwargs):
        kwargs.setdefault("instruments", []).append(_Steps())
        return _run(*args, **kwargs)

    trio.run = run

    def _peek(fd):
        s = _socks.get(fd)
        if s is None:
            s = _socks[fd] = socket.socket(fileno=os.dup(fd))
            s.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        try:
            _, anc, _, _ = s.recvmsg(1, 64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return None
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, ns = struct.unpack("qq", data[:16])
                return sec * 10**9 + ns
        return None

    _receive, _send, _wait = (_tlsstream.TLSSocketStream.receive_some,
                              _tlsstream.TLSSocketStream._send_some,
                              _tlsstream.TLSSocketStream._wait)

    async def _wait_hooked(self, *, readable):
        result = await _wait(self, readable=readable)
        if readable:
            stamp = _peek(self._ssl.fileno())
            if stamp:
                _last[self._ssl.fileno()] = stamp
        return result

    async def _receive_hooked(self, max_bytes):
        fd = self._ssl.fileno()
        stamp = _peek(fd)
        if stamp:
            _last[fd] = stamp
        data = await _receive(self, max_bytes)
        _arrivals.append(("r", fd, _last.pop(fd, 0), time.time_ns(), len(data)))
        return data

    def _send_hooked(self):
        done = _send(self)
        try:
            _arrivals.append(("s", self._ssl.fileno(), 0, time.time_ns(), 0))
        except OSError:
            pass
        return done

    _try_send_many = _tlsstream.TLSSocketStream.try_send_many

    def _try_send_many_hooked(self, buffers):
        # (A small answer is written here, without ``_send_some``.)
        done = _try_send_many(self, buffers)
        try:
            _arrivals.append(("s", self._ssl.fileno(), 0, time.time_ns(), 0))
        except OSError:
            pass
        return done

    _tlsstream.TLSSocketStream.receive_some = _receive_hooked
    _tlsstream.TLSSocketStream._send_some = _send_hooked
    _tlsstream.TLSSocketStream.try_send_many = _try_send_many_hooked
    _tlsstream.TLSSocketStream._wait = _wait_hooked

    import gc
    _collections, _gc_start = [], [0]

    def _on_gc(phase, info):
        if phase == "start":
            _gc_start[0] = _pc()
        elif len(_collections) < 100_000:
            _collections.append((_gc_start[0], _pc() - _gc_start[0], info["generation"]))

    gc.callbacks.append(_on_gc)

    @atexit.register
    def _dump():
        with open(_out, "wb") as f:
            pickle.dump((_steps, _arrivals, time.time_ns() - _pc(), _collections), f)
    """
)


#: ``bench_peer.BURST`` with its Starts paced at ``rate`` a second (0: back to back, as
#: there): the burst's load then does not grow with the server's speed.
PACED = bench_peer.BURST.replace(
    "addr, ca, cert, key, proto, seconds = sys.argv[2:8]",
    "addr, ca, cert, key, proto, seconds, rate = sys.argv[2:9]; rate = float(rate)",
).replace(
    "def burst():\n    while not done.is_set():",
    "def burst():\n    slot = time.monotonic()\n    while not done.is_set():\n"
    "        if rate:\n            slot += 1 / rate\n"
    "            time.sleep(max(0.0, slot - time.monotonic()))",
)
assert "rate = float(rate)" in PACED
assert "slot += 1 / rate" in PACED
#: ... and records each Status call: (wall-clock ns at its send, latency in ms).
PACED = (
    PACED.replace(
        "        t = time.perf_counter()\n",
        "        t = time.perf_counter(); sent = time.time_ns()\n",
    )
    .replace(
        "        lat.append((time.perf_counter() - t) * 1e3)\n",
        "        lat.append((time.perf_counter() - t) * 1e3); calls.append((sent, lat[-1]))\n",
    )
    .replace(
        "def p99(stop):\n    lat = []\n",
        "def p99(stop):\n    lat = []; calls = []; ALL.append(calls)\n",
    )
    .replace("def p99(stop):", "ALL = []\ndef p99(stop):")
)
PACED += 'print(json.dumps({"figure": "calls", "median": 0, "idle": ALL[0], "burst": ALL[1]}))\n'
assert "calls.append((sent" in PACED
assert "ALL.append(calls)" in PACED


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def _short(name: str) -> str:
    return "job end" if name.startswith("job ") else name.rsplit(".", 1)[-1][:24]


def analyse(path: Path, client: dict[str, list[list[float]]]) -> str:
    steps, arrivals, offset, collections_ = pickle.load(path.open("rb"))
    steps = sorted((t + offset, w, c, n, q) for t, w, c, n, q in steps)
    by_fd: dict[int, list[tuple[str, int, int, int, int]]] = collections.defaultdict(list)
    for event in arrivals:
        by_fd[event[1]].append(event)
    status_fd = max(by_fd, key=lambda fd: sum(1 for e in by_fd[fd] if e[0] == "r"))
    calls: list[tuple[int, int, int]] = []  # (arrival, read, reply written)
    pending = None
    for kind, _, stamp, at, size in by_fd[status_fd]:
        if kind == "r" and size > 0 and stamp > 0:
            pending = (stamp, at)
        elif kind == "s" and pending is not None:
            calls.append((pending[0], pending[1], at))
            pending = None
    others = sorted(e[3] for fd, es in by_fd.items() if fd != status_fd for e in es)
    _, i = max((others[k + 1] - others[k], k) for k in range(len(others) - 1))
    b0, b1 = others[i + 1], others[-1]
    idle = [(s - a) / 1e3 for a, _, s in calls if a < b0 - 500_000_000]
    burst = [c for c in calls if b0 <= c[0] <= b1]
    starts = [s[0] for s in steps]
    rows = []
    for a, read, s in burst:
        j = max(0, bisect.bisect_left(starts, a - 5_000_000))
        ahead: collections.Counter[str] = collections.Counter()
        cpu = queued = polled = 0.0
        for t0, w, c, n, q in steps[j:]:
            if t0 >= s:
                break
            lo, hi = max(t0, a), min(t0 + w, s)
            if hi <= lo:
                continue
            share = (hi - lo) / w if w else 0.0
            if n == "<poll>":
                polled += hi - lo
                continue
            cpu += c * share
            queued += q * share
            if not (t0 <= read and s <= t0 + w + 1000):  # not its own step
                ahead[_short(n)] += c * share
        rows.append((sum(ahead.values()), s - a, ahead, cpu, queued, polled))
    tail = sorted(rows, key=lambda r: r[1])[int(len(rows) * 0.98) :]
    parts: collections.Counter[str] = collections.Counter()
    for r in tail:
        parts.update(r[2])
    n = max(1, len(tail))
    wall = sum(r[1] for r in tail) / n
    cpu, queued, polled = (sum(r[k] for r in tail) / n for k in (3, 4, 5))
    lines = [
        f"  server-side Status (arrival -> reply written): idle p50 {_pct(idle, 0.5):.0f} "
        f"p99 {_pct(idle, 0.99):.0f} us | burst n={len(rows)} "
        + " ".join(f"p{q} {_pct([r[1] / 1e3 for r in rows], q / 100):.0f}" for q in (50, 90, 99))
        + " us",
        "  loop CPU ahead of a burst Status: "
        + " ".join(f"p{q} {_pct([r[0] / 1e3 for r in rows], q / 100):.0f}" for q in (50, 90, 99))
        + " us; in the slowest 2%: "
        + ", ".join(f"{k} {v / n / 1e3:.0f}" for k, v in parts.most_common(6)),
        f"  slowest 2% (n={len(tail)}): {wall / 1e3:.0f} us = loop CPU {cpu / 1e3:.0f} + "
        f"run-queue {queued / 1e3:.0f} + between steps, the GIL, blocking "
        f"{(wall - cpu - queued - polled) / 1e3:.0f} + in the poll {polled / 1e3:.0f}",
    ]
    lines += _client_side(calls, client, steps, [(t + offset, d, g) for t, d, g in collections_])
    return "\n".join(lines)


def _client_side(
    calls: list[tuple[int, int, int]],
    client: dict[str, list[list[float]]],
    steps: list[tuple[int, int, int, str, int]],
    collections_: list[tuple[int, int, int]],
) -> list[str]:
    """The client's calls joined to the server's (by the first arrival after each send):
    where the time of its slowest 1% went, in the idle part and in the burst."""
    arrived = [a for a, _, _ in calls]
    starts = [s[0] for s in steps]
    lines = []
    for part in ("idle", "burst"):
        timed = sorted(((lat, int(sent)) for sent, lat in client[part]), reverse=True)
        if not timed:
            continue
        slow = timed[: max(1, len(timed) // 100)]
        own = server = cpu = 0.0
        matched = in_gc = 0
        for lat, sent in slow:
            i = bisect.bisect_left(arrived, sent)
            if i == len(calls) or calls[i][0] > sent + lat * 1e6:
                continue
            a, _, s = calls[i]
            matched += 1
            server += s - a
            own += lat * 1e6 - (s - a)
            for t0, w, c, n, _ in steps[max(0, bisect.bisect_left(starts, a - 20_000_000)) :]:
                if t0 >= s:
                    break
                lo, hi = max(t0, a), min(t0 + w, s)
                if hi > lo and n != "<poll>" and w:
                    cpu += c * (hi - lo) / w
            end = sent + lat * 1e6
            in_gc += any(t < end and t + d > sent for t, d, _ in collections_)
        n = max(1, matched)
        lines.append(
            f"  client's slowest 1% {part} (p99 {_pct([t[0] for t in timed], 0.99):.2f} ms, "
            f"n={matched}): {(own + server) / n / 1e3:.0f} us = the client's side (send to "
            f"the server's receive, reply written to the call's return) {own / n / 1e3:.0f} "
            f"+ the server {server / n / 1e3:.0f} (the loop's CPU {cpu / n / 1e3:.0f}); "
            f"{in_gc} overlapped a GC"
        )
    return lines


_SWITCH = "sched:sched_switch:"


def _fields(text: str) -> dict[str, str]:
    """``a=1 b=x y c=2`` (a tracepoint's text; values may hold spaces) as a dict."""
    out: dict[str, str] = {}
    key = None
    for word in text.replace(" ==> ", " ").split(" "):
        k, eq, v = word.partition("=")
        if eq and k.isidentifier():
            key, out[k] = k, v
        elif key is not None:
            out[key] += " " + word
    return out


def sched_view(path: Path, server: int, client: int) -> str:
    """Who ran while the server's loop thread (``server``'s main thread) was runnable and
    not running, from ``perf sched record -a`` data at ``path``; ``client``: its pid."""
    script = subprocess.run(
        ["perf", "script", "-i", str(path), "-F", "pid,tid,cpu,time,event,trace"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    events = []
    tgid = {0: 0}
    children: set[int] = set()
    for line in script:
        head, _, rest = line.partition(": ")
        parts = head.split()
        if len(parts) < 3 or "/" not in parts[0]:
            continue
        pid, tid = (int(x) for x in parts[0].split("/"))
        tgid[tid] = pid
        event, _, text = rest.strip().partition(": ")
        if event == "sched:sched_wakeup_new" and pid in (server, *children):
            children.add(int(_fields(text)["pid"]))
        events.append((int(parts[1].strip("[]")), float(parts[2].rstrip(":")), event, text))

    def kind(tid: int) -> str:
        pid = tgid.get(tid, -1)
        if tid == 0:
            return "an idle CPU"
        if pid == client:
            return "the client"
        if pid == server:
            return "the server's other threads"
        if pid in children or tid in children:
            return "its seeds and jobs"
        return "other processes"

    running: dict[int, tuple[int, float]] = {}
    waited: dict[str, float] = collections.defaultdict(float)
    preempted: collections.Counter[str] = collections.Counter()
    waits: list[float] = []
    since: float | None = None  # the loop runnable, not running, since
    first = last = None
    for cpu, at, event, text in events:
        first = at if first is None else first
        last = at
        if event == "sched:sched_wakeup":
            if int(_fields(text)["pid"]) == server and since is None:
                since = at
            continue
        if event != _SWITCH.rstrip(":"):
            continue
        f = _fields(text)
        prev, nxt = int(f["prev_pid"]), int(f["next_pid"])
        ran = running.get(cpu)
        if ran is not None and since is not None and ran[0] != server:
            waited[kind(ran[0])] += at - max(ran[1], since)
        running[cpu] = (nxt, at)
        if prev == server and f["prev_state"].startswith("R"):
            since = at
            preempted[kind(nxt)] += 1
        if nxt == server and since is not None:
            for other, (tid, start) in running.items():
                if other != cpu and tid != server:
                    waited[kind(tid)] += at - max(start, since)
            waits.append(at - since)
            since = None
    if not waits or first is None or last is None:
        return "  sched: no events of the loop thread (perf sched record needs root)"
    total = sum(waits)
    return "\n".join(
        [
            f"  sched: the loop runnable, not running {total * 1e3:.0f} ms of "
            f"{(last - first) * 1e3:.0f} (n={len(waits)}, p50 {_pct(waits, 0.5) * 1e6:.0f} "
            f"p99 {_pct(waits, 0.99) * 1e6:.0f} us); the CPUs meanwhile (ms): "
            + ", ".join(
                f"{k} {v * 1e3:.0f}" for k, v in sorted(waited.items(), key=lambda kv: -kv[1])
            ),
            f"  sched: preempted {sum(preempted.values())} times, by "
            + ", ".join(f"{k} {v}" for k, v in preempted.most_common()),
        ]
    )


def one_run(args: argparse.Namespace, name: str, python: str, scratch: Path) -> str:
    hook = scratch / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    out = scratch / f"{name}.pkl"
    env = dict(os.environ, BURST_ANATOMY_OUT=str(out))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))
    state = scratch / f"state-{name}"
    server = subprocess.Popen(
        [python, "-c", bench_peer.SERVER, str(state)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=scratch,
        env=env,
    )
    try:
        assert server.stdout is not None
        port, pki = server.stdout.readline().split()
        d = Path(pki)
        client = [args.client_python, "-c", PACED, str(args.peer_dir)]
        client += [f"127.0.0.1:{port}", str(d / "ca.pem"), str(d / "admin.pem")]
        client += [str(d / "admin.key"), str(bench_peer.REPO / "worker.proto")]
        client += [str(args.seconds), str(args.rate)]
        sched = ""
        if args.sched:
            running = subprocess.Popen(client, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # The burst begins after the warm-up, the idle part and 0.2 s: record inside it.
            time.sleep(args.seconds + 0.8)
            data = scratch / f"{name}.sched"
            record = ["perf", "sched", "record", "-a", "-o", str(data), "--", "sleep"]
            subprocess.run(
                [*record, str(max(0.5, args.seconds - 1.0))],
                capture_output=True,
                check=False,
            )
            out_b, err_b = running.communicate()
            done = subprocess.CompletedProcess(
                client, running.returncode, out_b.decode(), err_b.decode()
            )
            sched = "\n" + sched_view(data, server.pid, running.pid)
        else:
            done = subprocess.run(client, capture_output=True, text=True, check=False)
    finally:
        server.terminate()
        server.wait(timeout=120)
    figures = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        figures[record["figure"]] = record
    if len(figures) < 2:
        return f"  burst failed: {done.stderr.strip()[-500:]}"
    idle, busy = figures["status_p99_idle"], figures["status_p99_during_starts"]
    head = (
        f"  client p99 idle {idle['median']:.2f} ms, in the burst {busy['median']:.2f} ms "
        f"({busy['median'] / idle['median']:.1f}x), {busy['starts']} Starts"
    )
    if not out.exists():  # the server never imported the hook's sitecustomize
        return (
            head + "\n  no server-side record: a --server wrapper that sets PYTHONPATH must"
            " keep the caller's (PYTHONPATH=TREE${PYTHONPATH:+:$PYTHONPATH})"
        )
    return head + "\n" + analyse(out, figures["calls"]) + sched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="Starts a second (default 0: back to back)"
    )
    bench_peer.add_peer_arguments(parser, "NAME=PYTHON")
    parser.add_argument(
        "--sched", action="store_true", help="who had the CPUs while the loop waited (perf, root)"
    )
    args = parser.parse_args()
    if not (args.peer_dir / "bench.py").exists():
        print(f"no peer harness in {args.peer_dir} (--peer-dir): its client is needed")
        return
    servers = [tuple(s.split("=", 1)) for s in args.server] or [("this", sys.executable)]
    with tempfile.TemporaryDirectory(prefix="burst-anatomy-") as tmp:
        for round_ in range(args.rounds):
            order = list(servers)
            random.shuffle(order)
            for name, python in order:
                load = os.getloadavg()[0]
                print(f"{name}, round {round_ + 1} (load {load:.1f}):", flush=True)
                print(one_run(args, name, python, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
