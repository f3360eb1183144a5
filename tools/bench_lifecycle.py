"""Restart and shutdown figures of a persistent supervisor.

    python tools/bench_lifecycle.py [--jobs 10000] [--running 100]

* restart: a state directory holding ``--jobs`` recorded jobs (each with a small
  output log; a tenth of them recorded as running, as after a crash) — time for
  ``open_supervisor`` to be ready, and for ``list()``.
* shutdown: ``--running`` running ``sleep`` jobs — time from leaving the block
  to every job ended and the store flushed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import trio

from trio_worker import JobInfo, JobState, OutputStream, open_supervisor
from trio_worker._jobs._output import OutputLog
from trio_worker._jobs._store import SqliteJobStore
from trio_worker._model import JobIdGenerator


async def populate(state: Path, count: int) -> None:
    state.mkdir(parents=True)
    new_id = JobIdGenerator()
    now = datetime.now(UTC)
    async with await SqliteJobStore.open(state / "jobs.db") as store:
        for i in range(count):
            job_id = new_id()
            directory = state / "jobs" / job_id
            directory.mkdir(parents=True)
            log = OutputLog(directory)
            log.append(OutputStream.STDOUT, b"line %d\n" % i)
            log.finish()
            await log.flush()
            log.close()
            running = i % 10 == 0
            info = JobInfo(
                id=job_id,
                owner="bench",
                command="echo",
                args=(str(i),),
                state=JobState.RUNNING if running else JobState.EXITED,
                pid=None if running else 1000 + i,
                exit_code=None if running else 0,
                signal=None,
                error="",
                started_at=now,
                ended_at=None if running else now,
                output_bytes=log.end,
            )
            await store.record_start(info, env_keys=(), cwd=None, pid_start_time=None)


async def main(jobs: int, running: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        state = Path(tmp) / "state"
        t = time.perf_counter()
        await populate(state, jobs)
        print(f"populated {jobs} jobs in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        async with open_supervisor(state) as sup:
            ready = time.perf_counter() - t
            t = time.perf_counter()
            listed = sup.list()
            listing = time.perf_counter() - t
            lost = sum(j.state is JobState.LOST for j in listed)
        print(
            f"restart with {jobs} recorded jobs: ready in {ready:.2f} s "
            f"({lost} marked lost), list() {listing * 1000:.0f} ms"
        )
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        async with open_supervisor(Path(tmp) / "state") as sup:
            for _ in range(running):
                await sup.start("sleep", ["1000"])
            t = time.perf_counter()
        print(f"shutdown with {running} running jobs: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--running", type=int, default=100)
    args = parser.parse_args()
    trio.run(main, args.jobs, args.running)
