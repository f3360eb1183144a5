"""The event loop's thread runs ahead of the server's other work (``_host._sched``), and
nothing it starts inherits that: not its threads, not the jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import trio

from tests.conftest import require_root
from trio_worker import JobState, open_supervisor
from trio_worker._host._sched import LOOP_NICE, loop_ahead


def _nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _in_new_thread() -> int:
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.root
async def test_the_loop_thread_alone_runs_ahead(state_dir: Path) -> None:
    require_root("a negative nice value")
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0
    with loop_ahead() as took:
        assert took
        assert os.getpriority(os.PRIO_PROCESS, 0) == LOOP_NICE
        assert _in_new_thread() == 0
        child = await trio.run_process(["cat", "/proc/self/stat"], capture_stdout=True)
        assert int(child.stdout.rsplit(b")", 1)[1].split()[16]) == 0
        async with open_supervisor(state_dir) as sup:
            for _ in range(3):  # a seed's job, and those of places made meanwhile
                info = await sup.start("sleep", ["1000"])
                assert info.pid is not None
                assert _nice_of(info.pid) == 0
                await sup.stop(info.id, grace=0)
                assert (await sup.wait(info.id)).state is JobState.KILLED
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # (the reset-on-fork flag gone too)


def test_an_administrators_choice_stays() -> None:
    """A loop thread already at another nice value (``nice -n 2 trio-worker serve``)
    keeps it. (In a thread of its own: raising a nice value needs no privilege,
    undoing it would.)"""
    seen: list[object] = []

    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, 2)
        with loop_ahead() as took:
            seen.extend([took, os.getpriority(os.PRIO_PROCESS, 0)])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False, 2]


_SERVER = textwrap.dedent(
    """
    import os, sys, trio
    from pathlib import Path
    from trio_worker import pki
    from trio_worker.server._run import ServerSettings, run_server

    d = Path(sys.argv[1])
    pki.init_ca(d)
    pki.issue_server(d, ["localhost"])
    settings = ServerSettings(
        ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
        state_dir=Path(sys.argv[2]), port=0,
    )

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_server(
                    settings, handle_signals=False, task_status=task_status
                )
            )
            serving = os.getpriority(os.PRIO_PROCESS, 0)
            worker = await trio.to_thread.run_sync(os.getpriority, os.PRIO_PROCESS, 0)
            nursery.cancel_scope.cancel()
        print(serving, worker, os.getpriority(os.PRIO_PROCESS, 0), flush=True)

    trio.run(main)
    """
)


@pytest.mark.root
def test_the_server_runs_its_loop_ahead_while_serving(tmp_path: Path) -> None:
    require_root("a negative nice value")
    out = subprocess.run(
        [sys.executable, "-c", _SERVER, str(tmp_path / "pki"), str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    serving, worker, after = (int(n) for n in out.stdout.split())
    assert (serving, worker, after) == (LOOP_NICE, 0, 0)
