"""Benchmark: the job store at restart, with many recorded jobs.

Fills a store with ``--jobs`` records (half still RUNNING, half ended, by
default), closes it, then times what a restarting server does with it: open
(including the integrity check), ``load_all``, marking every RUNNING job LOST,
and selecting ended jobs for retention. Each restart round starts from a fresh
copy of the same file. It also times record_start one at a time and in a burst
from many tasks (group commit), and the CPU a job's records cost a serving server:
``--cycles`` times a start's record queued with the previous job's end and committed
together, as the supervisor's committer does for Start `true` + Wait back to back
(the event loop's CPU and the store's thread's, per job). Prints figures; asserts nothing.

    python tools/bench_store.py [--jobs N] [--running-fraction F] [--rounds R] [--dir DIR]
    python tools/bench_store.py --only cycles [--cycles N] [--rounds R]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trio_worker import JobInfo, JobState, Limits, Usage
from trio_worker._jobs._store import SqliteJobStore
from trio_worker._model import JobIdGenerator

_new_id = JobIdGenerator()
_T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _job(n: int) -> JobInfo:
    return JobInfo(
        id=_new_id(),
        owner=f"user{n % 17}",
        command="/usr/bin/python3",
        args=("-c", f"import time; print({n}); time.sleep(1)", "--flag", "x" * 40),
        state=JobState.RUNNING,
        pid=10_000 + n,
        exit_code=None,
        signal=None,
        error="",
        started_at=_T0 + timedelta(seconds=n),
        ended_at=None,
        output_bytes=0,
        limits=Limits(cpus=0.5, memory_bytes=256 << 20),
    )


def _ended(info: JobInfo, n: int) -> JobInfo:
    return JobInfo(
        **{
            **{f: getattr(info, f) for f in info.__dataclass_fields__},
            "state": JobState.EXITED,
            "exit_code": n % 3,
            "ended_at": info.started_at + timedelta(seconds=5),
            "output_bytes": 1000 + n,
            "usage": Usage(0.25, 50 << 20),
        }
    )


async def _timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    start = time.perf_counter()
    result = await fn()
    return time.perf_counter() - start, result


async def populate(path: Path, jobs: int, running_fraction: float) -> dict[str, float]:
    """Record ``jobs`` starts (bursts of 500 tasks) and end the non-running ones."""
    infos = [_job(n) for n in range(jobs)]
    env_keys = ["HOME", "PATH", "API_TOKEN"]
    figures: dict[str, float] = {}
    async with await SqliteJobStore.open(path) as store:
        start = time.perf_counter()
        for first in range(0, jobs, 500):
            async with trio.open_nursery() as nursery:
                for info in infos[first : first + 500]:
                    nursery.start_soon(
                        partial(
                            store.record_start,
                            info,
                            env_keys=env_keys,
                            cwd="/srv/work",
                            pid_start_time=123456,
                        )
                    )
        figures["record_start (bursts of 500), per second"] = jobs / (time.perf_counter() - start)
        ending = infos[int(jobs * running_fraction) :]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n, info in enumerate(ending):
                nursery.start_soon(store.record_end, _ended(info, n))
        if ending:
            figures["record_end (one burst), per second"] = len(ending) / (
                time.perf_counter() - start
            )
        figures["transactions to fill"] = store.transactions
    return figures


async def latency(path: Path, count: int = 1000) -> dict[str, float]:
    """One record_start at a time (each waits for its commit) vs one burst of ``count`` tasks."""
    figures: dict[str, float] = {}
    async with await SqliteJobStore.open(path) as store:
        times = []
        for n in range(count):
            info = _job(n)
            start = time.perf_counter()
            await store.record_start(info, env_keys=(), cwd=None, pid_start_time=None)
            times.append(time.perf_counter() - start)
        times.sort()
        figures["record_start alone, median ms"] = statistics.median(times) * 1e3
        figures["record_start alone, p99 ms"] = times[int(len(times) * 0.99)] * 1e3
        before = store.transactions
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(
                    partial(store.record_start, _job(n), env_keys=(), cwd=None, pid_start_time=None)
                )
        elapsed = time.perf_counter() - start
        figures[f"burst of {count} record_start, ms"] = elapsed * 1e3
        figures[f"burst of {count} record_start, transactions"] = store.transactions - before
        store_notes = 100
        start = time.perf_counter()
        for _round in range(100):
            for n in range(store_notes):
                store.note_output(f"job{n}", _round, 0, 0)
            await store.flush()
        figures["flush of 100 noted counters, ms"] = (time.perf_counter() - start) * 10
    return figures


async def cycles(path: Path, count: int) -> dict[str, float]:
    """``count`` jobs recorded as a server does for Start `true` + Wait back to back: each
    start's record is queued with the previous job's end, and both are committed in one
    transaction (``flush``, as the committer). CPU per job: the event loop's thread, and
    the rest of the process (the store's thread)."""
    started = [
        dataclasses.replace(_job(n), command="true", args=(), limits=Limits()) for n in range(count)
    ]
    ended = [
        dataclasses.replace(
            info, state=JobState.EXITED, exit_code=0, ended_at=info.started_at, usage=Usage(0, 1)
        )
        for info in started
    ]
    async with await SqliteJobStore.open(path) as store:
        loop, process = time.thread_time(), time.process_time()
        for n, info in enumerate(started):
            if n:
                store.queue_end(ended[n - 1])
            store.queue_start(info, env_keys=["HOME", "PATH"], cwd=None, pid_start_time=1234)
            await store.flush()
        loop, process = time.thread_time() - loop, time.process_time() - process
        return {
            "event loop, us per job": loop / count * 1e6,
            "store's thread, us per job": (process - loop) / count * 1e6,
            "transactions per job": store.transactions / count,
        }


async def restart(path: Path) -> dict[str, float]:
    """What a restarting server does with the store, step by step."""
    figures: dict[str, float] = {}
    start = time.perf_counter()
    store = await SqliteJobStore.open(path)
    figures["open + integrity check"] = time.perf_counter() - start
    try:
        elapsed, jobs = await _timed(store.load_all)
        assert isinstance(jobs, list)
        figures["load_all"] = elapsed
        running = [j.info.id for j in jobs if j.info.state is JobState.RUNNING]
        at = datetime.now(UTC)
        elapsed, changed = await _timed(
            lambda: store.mark_lost(running, "the server stopped while it ran", at)
        )
        assert changed == len(running)
        figures[f"mark_lost of {len(running)}"] = elapsed
        elapsed, old = await _timed(
            lambda: store.ended_for_retention(
                keep_count=1000, max_age=timedelta(days=7), now=datetime.now(UTC)
            )
        )
        assert isinstance(old, list)
        figures[f"ended_for_retention ({len(old)} selected)"] = elapsed
        figures["jobs loaded"] = len(jobs)
    finally:
        start = time.perf_counter()
        await store.aclose()
        figures["aclose (checkpoint)"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--running-fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to put the files")
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--only", choices=["cycles"], default=None)
    options = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-store-", dir=options.dir))
    try:
        runs: dict[str, list[float]] = {}
        for n in range(options.rounds):
            for name, value in trio.run(
                cycles, directory / f"cycles{n}.db", options.cycles
            ).items():
                runs.setdefault(name, []).append(value)
        print(f"records of {options.cycles} jobs, an end + a start per commit "
              f"(min-median-max of {options.rounds} rounds):")  # fmt: skip
        for name, values in runs.items():
            print(f"  {name}: {min(values):.1f} {statistics.median(values):.1f} {max(values):.1f}")
        if options.only == "cycles":
            return
        source = directory / "filled.db"
        print(f"filling {source} with {options.jobs} jobs "
              f"({options.running_fraction:.0%} running) ...")  # fmt: skip
        for name, value in trio.run(
            populate, source, options.jobs, options.running_fraction
        ).items():
            print(f"  {name}: {value:,.0f}")
        print(f"  file size: {source.stat().st_size / 1e6:.1f} MB")

        rounds: dict[str, list[float]] = {}
        for _ in range(options.rounds):
            copy = directory / "restart.db"
            shutil.copyfile(source, copy)
            for name, value in trio.run(restart, copy).items():
                rounds.setdefault(name, []).append(value)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
        print(f"restart with {options.jobs} recorded jobs (median of {options.rounds} rounds):")
        total = 0.0
        for name, values in rounds.items():
            if name == "jobs loaded":
                continue
            median = statistics.median(values)
            if name != "aclose (checkpoint)":
                total += median
            print(f"  {name}: {median * 1e3:.1f} ms  (min {min(values) * 1e3:.1f})")
        print(f"  total before the server can serve: {total * 1e3:.1f} ms")

        print("write latency (empty store):")
        for name, value in trio.run(latency, directory / "latency.db").items():
            print(f"  {name}: {value:,.2f}")
        print(f"(python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, "
              f"{os.cpu_count()} CPUs, files in {directory})")  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
