"""The event loop's thread asks for a short slice (``_host._sched``), and nothing it
starts inherits it: not its threads, not the seeds, not the jobs."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import require_root
from trio_worker import JobState, Limits, open_supervisor
from trio_worker._host._sched import LOOP_SLICE_NS, loop_slice, slice_of

T = TypeVar("T")


def _scheduling(pid: int) -> tuple[int, int, int]:
    """(policy, nice, slice in ns) of a process, as the kernel reports them."""
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid), slice_of(pid)


def _in_a_thread(work: Callable[[], T]) -> T:
    seen: list[T] = []
    thread = threading.Thread(target=lambda: seen.append(work()))
    thread.start()
    thread.join()
    return seen[0]


def _child_sees() -> tuple[int, int, int]:
    child = subprocess.Popen(["sleep", "60"])
    try:
        return _scheduling(child.pid)
    finally:
        child.kill()
        child.wait()


def test_only_the_thread_that_asks_gets_the_short_slice() -> None:
    def run() -> list[object]:
        default = slice_of()
        with loop_slice() as took:
            if not took:
                return ["not taken", default]
            seen = [slice_of(), _in_a_thread(slice_of), _child_sees()[2]]
        return [default, *seen, slice_of()]

    seen = _in_a_thread(run)
    if seen[0] == "not taken":
        pytest.skip("this kernel has no custom slices (Linux 6.12)")
    default = seen[0]
    assert default != LOOP_SLICE_NS
    assert seen[1:] == [LOOP_SLICE_NS, default, default, default]


def test_an_administrators_nice_value_stays_and_a_negative_one_is_left_alone() -> None:
    # (Each in a thread of its own: raising a nice value needs no privilege, undoing it would.)
    def at(nice: int) -> tuple[bool, int, int]:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        with loop_slice() as took:
            return took, os.getpriority(os.PRIO_PROCESS, 0), _child_sees()[1]

    _, mine, childs = _in_a_thread(lambda: at(3))
    assert (mine, childs) == (3, 3)

    def batch() -> tuple[bool, int]:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        before = slice_of()
        with loop_slice() as took:
            return took, slice_of() - before

    assert _in_a_thread(batch) == (False, 0)


@pytest.mark.root
async def test_jobs_are_scheduled_as_without_it(tmp_path: Path) -> None:
    """A job's policy, nice value and slice are what a plain child of the server's gets,
    through a seed (made by the refill's thread) and through the thread path."""
    require_root("cgroups")
    plain = _child_sees()
    parent = "tw-slice-" + secrets.token_hex(4)
    with loop_slice():
        async with open_supervisor(tmp_path / "state", cgroup_parent=parent) as sup:
            jobs = [await sup.start("sleep", ["60"]) for _ in range(3)]
            jobs.append(await sup.start("sleep", ["60"], limits=Limits(memory_bytes=1 << 30)))
            for job in jobs:
                assert job.pid is not None
                assert _scheduling(job.pid) == plain
                await sup.stop(job.id, grace=0)
                assert (await sup.wait(job.id)).state is JobState.KILLED


_SERVER = textwrap.dedent(
    """
    import sys, trio
    from pathlib import Path
    from trio_worker import pki
    from trio_worker._host._sched import slice_of
    from trio_worker.server._run import ServerSettings, run_server

    d = Path(sys.argv[1])
    pki.init_ca(d)
    pki.issue_server(d, ["localhost"])
    settings = ServerSettings(
        ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
        state_dir=Path(sys.argv[2]), port=0, cgroup_parent=sys.argv[3],
    )

    async def main():
        before = slice_of()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: run_server(
                    settings, handle_signals=False, task_status=task_status
                )
            )
            serving = slice_of()
            worker = await trio.to_thread.run_sync(slice_of)
            nursery.cancel_scope.cancel()
        print(before, serving, worker, slice_of(), flush=True)

    trio.run(main)
    """
)


@pytest.mark.root
def test_the_server_asks_for_it_while_serving(tmp_path: Path) -> None:
    require_root("cgroups")
    parent = "tw-slice-" + secrets.token_hex(4)
    out = subprocess.run(
        [sys.executable, "-c", _SERVER, str(tmp_path / "pki"), str(tmp_path / "state"), parent],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, serving, worker, after = (int(n) for n in out.stdout.split())
    if serving == before:
        pytest.skip("this kernel has no custom slices (Linux 6.12)")
    assert (serving, worker, after) == (LOOP_SLICE_NS, before, before)
