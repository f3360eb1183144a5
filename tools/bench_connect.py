"""Benchmark: a new connection's set-up, as a short command pays it once per run.

Starts one development server per tree given (``--server NAME=TREE``: the tree's
``trio_worker`` is imported through ``PYTHONPATH``, so an old commit's checkout with its
extension built in place will do), then, in rounds whose order is shuffled each time, makes
``--per-round`` connections to each: a blocking client's dial and one ``List`` (what
``trio-worker list`` does after its imports), then a bare TLS handshake and the wait for
the server's first bytes (its HTTP/2 SETTINGS). Prints medians and first quartiles of each,
and the server's own CPU per connection (user + system, from ``/proc``; ticks of 10 ms,
summed over every round): on a shared machine the wall times follow the load, the
server's CPU much less. Asserts nothing.

    python tools/bench_connect.py [--rounds 15] [--server before=../old --server after=.]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from trio_worker._blocking_client import connect_blocking
from trio_worker._tls import client_context
from trio_worker.cli._settings import dev_pki_paths


def start_server(tree: str, state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    argv = [sys.executable, "-m", "trio_worker.cli", "serve", "--listen", "127.0.0.1:0"]
    server = subprocess.Popen(
        [*argv, "--state-dir", str(state_dir)],
        env=env,
        cwd="/",
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:
        found = re.search(r"--addr (\S+)", line)
        if found:
            return server, found[1]
    raise SystemExit(f"the server of {tree} did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument(
        "--server",
        action="append",
        metavar="NAME=TREE",
        help="a tree to serve from (repeat to compare); by default this one",
    )
    args = parser.parse_args()
    here = f"this={Path(__file__).resolve().parent.parent}"
    trees = dict(item.split("=", 1) for item in args.server or [here])
    figures: dict[str, dict[str, list[float]]] = {
        name: {"call": [], "handshake": [], "settings": [], "cpu": []} for name in trees
    }
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            name: (*start_server(tree, Path(tmp) / name), Path(tmp) / name)
            for name, tree in trees.items()
        }
        try:
            for round_ in range(args.rounds + 1):  # the first warms caches, dropped
                order = list(servers)
                random.shuffle(order)
                for name in order:
                    server, addr, state_dir = servers[name]
                    ca, cert, key = dev_pki_paths(str(state_dir))
                    context = client_context(ca=ca, cert=cert, key=key)
                    host, port = addr.rsplit(":", 1)
                    used = cpu_seconds(server.pid)
                    for _ in range(args.per_round):
                        begin = time.perf_counter()
                        with connect_blocking(addr, ca=ca, cert=cert, key=key) as client:
                            client.list()
                        called = time.perf_counter() - begin
                        raw = socket.create_connection((host, int(port)))
                        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        begin = time.perf_counter()
                        tls = context.wrap_socket(raw, server_hostname="localhost")
                        shaken = time.perf_counter()
                        tls.recv(100)
                        settings = time.perf_counter()
                        tls.close()
                        if round_:
                            figures[name]["call"].append(called)
                            figures[name]["handshake"].append(shaken - begin)
                            figures[name]["settings"].append(settings - shaken)
                        time.sleep(0.01)
                    time.sleep(0.05)  # the closes' work counted in this batch
                    if round_:
                        spent = cpu_seconds(server.pid) - used
                        figures[name]["cpu"].append(spent / (2 * args.per_round))
        finally:
            for server, _, _ in servers.values():
                server.terminate()
                server.wait()
    print(
        f"{args.rounds} rounds x {args.per_round} connections per server, interleaved "
        f"(ms; load average {os.getloadavg()[0]:.1f} at the end)"
    )
    print(
        f"{'':10} {'dial+List':>16} {'TLS handshake':>16} {'SETTINGS after':>16} {'server CPU':>11}"
    )
    for name, runs in figures.items():
        cells = []
        for key in ("call", "handshake", "settings"):
            q1, median, _q3 = statistics.quantiles(runs[key], n=4)
            cells.append(f"{median * 1e3:7.2f} (q1 {q1 * 1e3:5.2f})")
        cpu = statistics.mean(runs["cpu"]) * 1e3
        print(f"{name:10} " + " ".join(f"{cell:>19}" for cell in cells) + f" {cpu:11.2f}")


if __name__ == "__main__":
    main()
