"""Benchmark: capturing a job's output into the log, alone and with followers.

Prints figures next to a baseline measured in the same run on the same disk:
``head -c SIZE /dev/zero | cat > FILE``. Each scenario runs in a fresh child
process so its peak RSS is its own. Tests never assert times; this does not
either -- it prints, and flags targets missed.

    python tools/bench_capture.py [--size BYTES] [--followers N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3


def baseline(size: int, directory: Path) -> float:
    target = directory / "baseline.out"
    settle()
    start = time.perf_counter()
    subprocess.run(f"head -c {size} /dev/zero | cat > {target}", shell=True, check=True)
    elapsed = time.perf_counter() - start
    target.unlink()
    return size / elapsed


def scenario(size: int, followers: int, directory: Path) -> dict[str, float]:
    import trio

    import trio_worker

    trio.run(trio.sleep, 0)  # warm up trio's own allocations before measuring
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    async def main() -> dict[str, float]:
        async with trio_worker.open_supervisor(directory / "state") as sup:
            received = [0] * followers
            start = time.perf_counter()
            job = await sup.start("head", ["-c", str(size), "/dev/zero"])
            capture_done = 0.0

            async def follow(i: int) -> None:
                position = 0
                async for chunk in sup.output(job.id):
                    if chunk.offset != position:
                        raise SystemExit(f"follower {i}: gap or overlap at {position}")
                    position = chunk.end
                received[i] = position

            async def capture() -> None:
                nonlocal capture_done
                await sup.wait(job.id)
                capture_done = time.perf_counter()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(capture)
                for i in range(followers):
                    nursery.start_soon(follow, i)
            all_done = time.perf_counter()
            end = sup.status(job.id)
            if end.output_bytes != size or any(r != size for r in received):
                raise SystemExit(f"lost bytes: job {end.output_bytes}, followers {received}")
            return {
                "capture_bps": size / (capture_done - start),
                "followers_bps": (size * followers) / (all_done - start) if followers else 0.0,
            }

    result = trio.run(main)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["rss_growth"] = rss_after - rss_before
    result["rss_peak"] = rss_after
    return result


def settle() -> None:
    """Start each scenario with no dirty pages left by the one before: otherwise
    the kernel's writeback of earlier output throttles whichever runs next."""
    os.sync()


def run_child(size: int, followers: int, directory: Path) -> dict[str, float]:
    settle()
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "--size",
            str(size),
            "--followers",
            str(followers),
            "--dir",
            str(directory),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    shutil.rmtree(directory, ignore_errors=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=GiB)
    parser.add_argument("--followers", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scenario(args.size, args.followers, args.dir)))
        return
    base_dir = Path(tempfile.mkdtemp(prefix="bench-capture-", dir=args.dir or Path.cwd()))
    try:
        mb = 1e6
        rows = []
        for _ in range(args.rounds):  # interleave, so drift hits all alike
            rows.append(
                (
                    baseline(args.size, base_dir),
                    run_child(args.size, 0, base_dir / "a"),
                    run_child(args.size, args.followers, base_dir / "b"),
                )
            )

        def med(values: list[float]) -> float:
            return sorted(values)[len(values) // 2]

        base = med([r[0] for r in rows])
        alone = med([r[1]["capture_bps"] for r in rows])
        with_f = med([r[2]["capture_bps"] for r in rows])
        agg = med([r[2]["followers_bps"] for r in rows])
        rss = max(max(r[1]["rss_growth"], r[2]["rss_growth"]) for r in rows)
        print(
            f"output size: {args.size / GiB:.2f} GiB, {args.rounds} rounds, medians, "
            f"disk of {base_dir}"
        )
        print(f"baseline  head | cat > FILE        {base / mb:8.0f} MB/s")
        print(
            f"capture   (no followers)          {alone / mb:8.0f} MB/s   "
            f"ratio {alone / base:.2f}  (target >= 0.80)"
        )
        print(
            f"capture   ({args.followers} followers)          {with_f / mb:8.0f} MB/s   "
            f"ratio to alone {with_f / alone:.2f}  (target >= 0.80)"
        )
        print(
            f"followers aggregate               {agg / mb:8.0f} MB/s   "
            f"(every follower got every byte)"
        )
        print(f"peak RSS growth (worst scenario)  {rss / 2**20:8.1f} MiB   (target < 64 MiB)")
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
