"""N followers of one live job on ONE connection (our trio client): how many see the job's
first line while it runs, and what they cost a running server (its VmRSS and descriptors
before, and with the N streams open and idle).

    python tools/follow_one_connection.py HOST:PORT N SERVER_PID --pki DIR

``DIR`` holds ca.pem, admin.pem and admin.key (the bench PKI, e.g. /tmp/s10/pki). The job
is ``sh -c 'echo hello; sleep 8; echo bye'``; a follower "saw" it if its first line came
within 7 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from trio_worker.client import connect


def usage(pid: int) -> tuple[int, int]:
    """The process's VmRSS (KiB) and open descriptors."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = int(next(line for line in status if line.startswith("VmRSS")).split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def main(addr: str, n: int, pid: int, pki: Path) -> None:
    async with connect(
        addr,
        ca=pki / "ca.pem",
        cert=pki / "admin.pem",
        key=pki / "admin.key",
        server_hostname="localhost",
    ) as client:
        job = await client.start("sh", ["-c", "echo hello; sleep 8; echo bye"])
        await trio.sleep(0.5)
        before = usage(pid)
        began = time.monotonic()
        first: list[float | None] = [None] * n

        async def follow(i: int) -> None:
            async for chunk in client.output(job.id, follow=True):
                if b"hello" in chunk.data and first[i] is None:
                    first[i] = time.monotonic() - began

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(follow, i)
            await trio.sleep(5)
            during = usage(pid)
    seen = [f for f in first if f is not None and f < 7]
    figures = {
        "followers": n,
        "saw_first_while_running": len(seen),
        "last_first_s": round(max(seen), 2) if seen else None,
        "rss_kib_per_stream": round((during[0] - before[0]) / n, 1),
        "fds_per_stream": round((during[1] - before[1]) / n, 2),
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("addr")
    ap.add_argument("n", type=int)
    ap.add_argument("pid", type=int)
    ap.add_argument("--pki", type=Path, required=True)
    args = ap.parse_args()
    trio.run(main, args.addr, args.n, args.pid, args.pki)
