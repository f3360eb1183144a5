"""Benchmark: how long a ``trio-worker`` command takes, start to exit, next to bare Python.

Starts a development server (its own temporary state directory, a free port), then runs
each command ``--runs`` times in turn, as a person would from a shell, and prints the
minimum, median and quartiles of the wall time of each next to ``python -c pass`` measured
in the same rounds (the interpreter's own floor on this machine, at this moment), and the
median CPU time (user + system) the command itself used: on a shared machine the wall time
follows the load, the CPU time much less, so it is what to compare between two changes.
The issue's targets (medians of wall time): ``--help`` 0.10 s, ``list`` 0.15 s,
``run -- true`` 0.20 s. Asserts nothing.

The package is byte-compiled first, as ``pip install`` leaves it: an editable checkout under
``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module from source on every
run (60 ms and more on a loaded 2-core machine), which no installed copy does.

    python tools/bench_cli_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import compileall
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SCRIPT = Path(sys.executable).with_name("trio-worker")
TRIO_WORKER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "trio_worker.cli"]

CASES: tuple[tuple[str, list[str], float | None], ...] = (
    ("python -c pass", [sys.executable, "-c", "pass"], None),
    ("trio-worker --help", [*TRIO_WORKER, "--help"], 0.10),
    ("trio-worker list", [*TRIO_WORKER, "list"], 0.15),
    ("trio-worker run -- true", [*TRIO_WORKER, "run", "--", "true"], 0.20),
)


def start_server(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [*TRIO_WORKER, "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    for line in server.stdout:
        found = re.search(r"--addr (\S+)", line)
        if found:
            return server, found[1]
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    import trio_worker

    compileall.compile_dir(Path(trio_worker.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        server, addr = start_server(state_dir)
        env = {**os.environ, "TRIO_WORKER_STATE_DIR": str(state_dir), "TRIO_WORKER_ADDR": addr}
        times: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
        try:
            for _ in range(args.runs + 1):  # the first round warms caches and is dropped
                for name, argv, _target in CASES:
                    used = _children_cpu()
                    begin = time.perf_counter()
                    subprocess.run(argv, env=env, capture_output=True, check=True)
                    times[name].append(time.perf_counter() - begin)
                    cpu[name].append(_children_cpu() - used)
        finally:
            server.terminate()
            server.wait()
    print(
        f"trio-worker start-up, {args.runs} runs each, interleaved (seconds; "
        f"load average {os.getloadavg()[0]:.1f} at the end)"
    )
    print(f"{'command':<26} {'min':>7} {'q1':>7} {'median':>7} {'q3':>7} {'target':>7} {'cpu':>7}")
    for name, _, target in CASES:
        runs = times[name][1:]
        q1, median, q3 = statistics.quantiles(runs, n=4)
        goal = f"{target:7.2f}" if target is not None else "      -"
        print(
            f"{name:<26} {min(runs):7.3f} {q1:7.3f} {median:7.3f} {q3:7.3f} {goal} "
            f"{statistics.median(cpu[name][1:]):7.3f}"
        )


def _children_cpu() -> float:
    """User + system seconds of the children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
