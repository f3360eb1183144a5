"""Benchmark: what a sleeping job costs the supervisor's process, and where it goes.

Starts N ``sleep`` jobs in-process (after a few to warm up), then prints the RSS
growth per job, trio's living tasks and epoll waits, and with ``--trace`` the
Python heap per job (tracemalloc snapshots diffed over the N starts) by source
line and by the innermost trio_worker frame that allocated it.

    python tools/bench_jobmem.py [-n 1000] [--trace] [--top 30]

``tools/bench_peer.py`` gives the figure that counts (the server's RSS, next to
the grpcio peer's); this one says why.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import tracemalloc
from collections import Counter

import trio

from trio_worker import open_supervisor


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int, top: int) -> None:
    lines = after.compare_to(before, "lineno")
    total = sum(d.size_diff for d in lines)
    blocks = sum(d.count_diff for d in lines)
    print(f"python heap: {total / n / 1024:.2f} KiB/job in {blocks / n:.0f} blocks/job")
    print("by source line:")
    for d in lines[:top]:
        print(f"  {d.size_diff / n:7.0f} B/job {d.count_diff / n:5.1f} blocks  {d.traceback[0]}")
    by_frame: Counter[str] = Counter()
    for d in after.compare_to(before, "traceback"):
        own = [f for f in d.traceback if "trio_worker" in f.filename]
        key = f"{own[-1].filename.split('trio_worker/')[-1]}:{own[-1].lineno}" if own else "?"
        by_frame[key] += d.size_diff
    print("by the innermost trio_worker frame:")
    for key, size in by_frame.most_common(top):
        print(f"  {size / n:7.0f} B/job  {key}")


async def main(n: int, trace: bool, top: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-jobmem-") as tmp:
        async with open_supervisor(tmp + "/state") as sup:
            warm = [await sup.start("sleep", ["600"]) for _ in range(20)]
            async with trio.open_nursery() as nursery:
                for job in warm:
                    nursery.start_soon(sup.stop, job.id, 0)
            gc.collect()
            if trace:
                tracemalloc.start(25)
            before = tracemalloc.take_snapshot() if trace else None
            rss0 = rss_kib()
            ids = [(await sup.start("sleep", ["600"])).id for _ in range(n)]
            await trio.sleep(1.0)
            gc.collect()
            rss1 = rss_kib()
            stats = trio.lowlevel.current_statistics()
            print(
                f"{n} sleeping jobs: RSS {(rss1 - rss0) / n:.1f} KiB/job"
                f"{' (tracemalloc on: inflated)' if trace else ''}; "
                f"{stats.tasks_living} living tasks, "
                f"{stats.io_statistics.tasks_waiting_read} epoll waits"
            )
            if before is not None:
                report(before, tracemalloc.take_snapshot(), n, top)
                tracemalloc.stop()
            async with trio.open_nursery() as nursery:
                for job_id in ids:
                    nursery.start_soon(sup.stop, job_id, 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--top", type=int, default=30)
    args, _ = parser.parse_known_args()  # nox -s bench passes its posargs to every tool
    trio.run(main, args.n, args.trace, args.top)
