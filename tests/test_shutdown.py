"""Graceful shutdown of a real server process: SIGTERM with running jobs and a follower."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from tests.conftest import process_alive
from trio_worker import JobState
from trio_worker.client import connect

# The stubborn job below needs the whole grace and its SIGKILL: 2 s, not the default 5.
SERVE = [sys.executable, "-m", "trio_worker.cli", "serve", "--listen", "127.0.0.1:0"]
SERVE += ["--shutdown-grace", "2"]


def _start_server(home: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_WORKER_")}
    env.update(HOME=str(home), XDG_STATE_HOME=str(home / "state"), XDG_CONFIG_HOME=str(home))
    proc = subprocess.Popen(SERVE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    said: list[bytes] = []
    for raw in proc.stderr:
        if match := re.search(rb"serving on 127\.0\.0\.1:(\d+)", raw):
            return proc, int(match[1])
        said.append(raw)
        if time.monotonic() >= deadline:
            break
    # Not left running (nor its pipes open) for a later test's garbage collection.
    proc.kill()
    _, rest = proc.communicate(timeout=30)
    raise AssertionError(f"the server did not start ({proc.returncode}): {b''.join(said) + rest!r}")


async def test_sigterm_finishes_followers_stops_jobs_and_exits_0(tmp_path: Path) -> None:
    proc, port = await trio.to_thread.run_sync(_start_server, tmp_path)
    pki_dir = tmp_path / "state" / "trio-worker" / "pki"
    try:
        async with connect(
            f"127.0.0.1:{port}",
            ca=pki_dir / "ca.pem",
            cert=pki_dir / "admin.pem",
            key=pki_dir / "admin.key",
        ) as client:
            # One job that says goodbye on SIGTERM, one that ignores it.
            polite = await client.start(
                "sh",
                ["-c", "trap 'echo bye; exit 0' TERM; echo hello; while :; do sleep 0.05; done"],
            )
            stubborn = await client.start("sh", ["-c", "trap '' TERM; echo $$; sleep 1000"])
            received = bytearray()
            positions = []

            async def follow() -> None:
                async for chunk in client.output(polite.id):
                    positions.append(chunk.offset)
                    received.extend(chunk.data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                with trio.fail_after(10):
                    while b"hello" not in received:  # noqa: ASYNC110 - waiting on another process
                        await trio.sleep(0.02)
                pids = [polite.pid, stubborn.pid]
                proc.send_signal(signal.SIGTERM)
            # Every byte, without gaps, including what the job wrote after SIGTERM
            # (sh may also report its sleep child's "Terminated" on stderr).
            assert received.startswith(b"hello\n")
            assert b"bye\n" in received
            assert positions[0] == 0
            assert len(set(positions)) == len(positions)
        code = await trio.to_thread.run_sync(lambda: proc.wait(timeout=30))
        assert code == 0
        assert not any(pid and process_alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    # The records say how each ended.
    from trio_worker import open_supervisor

    async with open_supervisor(tmp_path / "state" / "trio-worker") as sup:
        assert sup.status(polite.id).state is JobState.EXITED
        assert sup.status(stubborn.id).state is JobState.KILLED
        assert sup.status(stubborn.id).signal == signal.SIGKILL
