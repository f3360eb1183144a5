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

``--against OTHER/bin/trio-worker`` runs another install's commands too (e.g. of the commit
before a change, installed with ``pip install`` into its own venv and byte-compiled), in
the same rounds, each command of one right after the same command of the other, against
the same server: on a shared machine only figures taken side by side compare.

    python tools/bench_cli_startup.py [--runs N] [--against OTHER/bin/trio-worker]
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


def cases(trio_worker: list[str]) -> tuple[tuple[str, list[str], float | None], ...]:
    """(name, command line, target median in seconds) of each command measured."""
    python = trio_worker[0] if len(trio_worker) > 1 else sys.executable
    return (
        ("python -c pass", [python, "-c", "pass"], None),
        ("trio-worker --help", [*trio_worker, "--help"], 0.10),
        ("trio-worker list", [*trio_worker, "list"], 0.15),
        ("trio-worker run -- true", [*trio_worker, "run", "--", "true"], 0.20),
    )


#: The commands of the install this runs in.
CASES = cases(TRIO_WORKER)


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
    parser.add_argument(
        "--against",
        metavar="TRIO_WORKER",
        help="another install's trio-worker script, measured in the same rounds",
    )
    args = parser.parse_args()
    import trio_worker

    compileall.compile_dir(Path(trio_worker.__file__).parent, quiet=1)
    installs = {"this": cases(TRIO_WORKER)}
    if args.against:
        other = Path(args.against)
        installs["against"] = cases([str(other.with_name("python")), str(other)])
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        server, addr = start_server(state_dir)
        env = {**os.environ, "TRIO_WORKER_STATE_DIR": str(state_dir), "TRIO_WORKER_ADDR": addr}
        times: dict[tuple[str, str], list[float]] = {
            (which, name): [] for which, rows in installs.items() for name, _, _ in rows
        }
        cpu: dict[tuple[str, str], list[float]] = {key: [] for key in times}
        try:
            for _ in range(args.runs + 1):  # the first round warms caches and is dropped
                for index in range(len(installs["this"])):
                    for which, rows in installs.items():
                        name, argv, _target = rows[index]
                        used = _children_cpu()
                        begin = time.perf_counter()
                        subprocess.run(argv, env=env, capture_output=True, check=True)
                        times[which, name].append(time.perf_counter() - begin)
                        cpu[which, name].append(_children_cpu() - used)
        finally:
            server.terminate()
            server.wait()
    print(
        f"trio-worker start-up, {args.runs} runs each, interleaved (seconds; "
        f"load average {os.getloadavg()[0]:.1f} at the end)"
    )
    for which, rows in installs.items():
        if len(installs) > 1:
            print(f"{which}: {rows[1][1][-2]}")
        print(
            f"{'command':<26} {'min':>7} {'q1':>7} {'median':>7} {'q3':>7} {'target':>7} {'cpu':>7}"
        )
        for name, _, target in rows:
            runs = times[which, name][1:]
            q1, median, q3 = statistics.quantiles(runs, n=4)
            goal = f"{target:7.2f}" if target is not None else "      -"
            print(
                f"{name:<26} {min(runs):7.3f} {q1:7.3f} {median:7.3f} {q3:7.3f} {goal} "
                f"{statistics.median(cpu[which, name][1:]):7.3f}"
            )


def _children_cpu() -> float:
    """User + system seconds of the children waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
