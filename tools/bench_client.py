"""Our trio client against one server, for comparing client trees, interleaved.

    python tools/bench_client.py [--rounds 3] [--client NAME=PYTHON ...] [--server-python PY]

Starts one trio-worker server (``--server-python``'s tree, default this one) with a dev PKI,
and a finished job with 64 MiB of output. Then, ``--rounds`` times, runs each client tree
(``--client NAME=PYTHON``, default this tree) in a child process that measures with
``trio_worker.client``: Status p50 sequential on one connection, Status calls/s from 8
tasks sharing one connection, replay of the 64 MiB job (MB/s), and the client's CPU time
per sequential Status. Prints medians per tree. bench_peer.py measures the server with the
official grpcio client; this one measures our client. The machine is shared: read ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap

SERVER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from trio_worker import pki
    from trio_worker.server._run import ServerSettings, run_server
    state = Path(sys.argv[1])
    dev = pki.ensure_dev_pki(state)
    settings = ServerSettings(ca=dev.ca.cert, cert=dev.server.cert, key=dev.server.key,
                              state_dir=state, port=0)
    async def main():
        async with trio.open_nursery() as n:
            port = await n.start(run_server, settings)
            print(port, dev.directory, flush=True)
    trio.run(main)
    """
)

CLIENT = textwrap.dedent(
    """
    import json, statistics, sys, time, trio
    from pathlib import Path
    from trio_worker.client import connect
    port, pki_dir, job_id = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    kw = dict(ca=pki_dir / "ca.pem", cert=pki_dir / "admin.pem", key=pki_dir / "admin.key")
    async def main():
        out = {}
        async with connect(f"127.0.0.1:{port}", **kw) as c:
            for _ in range(100):
                await c.status(job_id)
            lat = []
            cpu0 = time.process_time()
            for _ in range(1000):
                t = time.perf_counter()
                await c.status(job_id)
                lat.append(time.perf_counter() - t)
            out["client CPU per Status (us)"] = (time.process_time() - cpu0) / 1000 * 1e6
            out["Status p50 (ms)"] = statistics.median(lat) * 1e3
            count = 0
            end = time.perf_counter() + 2.0
            async def caller():
                nonlocal count
                while time.perf_counter() < end:
                    await c.status(job_id)
                    count += 1
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(caller)
            out["Status, 8 callers (calls/s)"] = count / 2.0
            t = time.perf_counter()
            total = 0
            async for chunk in c.output(job_id, follow=False):
                total += len(chunk.data)
            out["replay 64 MiB (MB/s)"] = total / (time.perf_counter() - t) / 1e6
        print(json.dumps(out))
    trio.run(main)
    """
)

MAKE_JOB = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from trio_worker.client import connect
    port, pki_dir = sys.argv[1], Path(sys.argv[2])
    kw = dict(ca=pki_dir / "ca.pem", cert=pki_dir / "admin.pem", key=pki_dir / "admin.key")
    async def main():
        async with connect(f"127.0.0.1:{port}", **kw) as c:
            job = await c.start("head", ["-c", str(64 << 20), "/dev/zero"])
            await c.wait(job.id)
            print(job.id)
    trio.run(main)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", action="append", default=[], help="NAME=PYTHON")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args()
    clients = [c.split("=", 1) for c in args.client] or [["this", sys.executable]]
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [args.server_python, "-c", SERVER, tmp], stdout=subprocess.PIPE, text=True, cwd=tmp
        )
        try:
            assert server.stdout is not None
            port, pki_dir = server.stdout.readline().split()
            job = subprocess.run(
                [clients[0][1], "-c", MAKE_JOB, port, pki_dir],
                capture_output=True,
                text=True,
                check=True,
                cwd=tmp,
            ).stdout.strip()
            results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in clients}
            for _ in range(args.rounds):
                for name, python in clients:
                    out = subprocess.run(
                        [python, "-c", CLIENT, port, pki_dir, job],
                        capture_output=True,
                        text=True,
                        check=True,
                        cwd=tmp,  # (-c puts the working directory first on sys.path)
                    ).stdout
                    for key, value in json.loads(out).items():
                        results[name].setdefault(key, []).append(value)
        finally:
            server.terminate()
            server.wait()
    names = [name for name, _ in clients]
    print(f"{'figure':34}" + "".join(f"{n:>12}" for n in names))
    for key in results[names[0]]:
        row = "".join(f"{statistics.median(results[n][key]):12.2f}" for n in names)
        print(f"{key:34}{row}")


if __name__ == "__main__":
    main()
