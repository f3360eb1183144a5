"""No job outlives the server: a supervisor in a real subprocess, SIGKILLed, with jobs
that left their process group (setsid, double fork) and grandchildren. Its reaper must
kill them all within 5 s, without a restart, and touch nothing of another server."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.conftest import (
    _default_parents,
    parent_group_dirs,
    process_alive,
    remove_parent_groups,
    require_root,
)
from trio_worker import JobState, open_supervisor
from trio_worker._jobs._supervisor import _cgroup_parent_for

pytestmark = pytest.mark.root

#: A supervisor that starts jobs of every shape, prints their pids on one line, and waits.
SERVER = """
import sys, trio
from trio_worker import open_supervisor

SCRIPTS = [
    "sleep 600",
    "sleep 600 & echo $!; wait",                       # a grandchild in the group
    "setsid sh -c 'sleep 600 & echo $!; wait' & echo $!; sleep 600 & echo $!; wait",
    "(setsid sleep 600 & echo $!) ; sh -c 'sleep 600 & echo $!'; exec sleep 600",  # double fork
]

async def main(state):
    async with open_supervisor(state) as sup:
        pids = []
        for script in SCRIPTS:
            job = await sup.start("sh", ["-c", script])
            pids.append(job.pid)
            want, buf = script.count("echo"), b""
            if not want:
                continue
            async for chunk in sup.output(job.id):
                buf += chunk.data
                if buf.count(b"\\n") >= want:
                    break
            pids += [int(x) for x in buf.split()]
        # A Start answers before its record's commit (group commit, right after):
        # the crash below comes once every job is on record.
        await sup._store.flush()
        print(" ".join(map(str, pids)), flush=True)
        await trio.sleep_forever()

trio.run(main, sys.argv[1])
"""


@contextmanager
def server_process(state: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    require_root("cgroups")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(state)], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server printed no pids"
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 10, line
        assert all(process_alive(p) for p in pids)
        yield proc, pids
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def reapers_of(state: Path) -> list[int]:
    """The reapers the server noted in its lock file, in slot order."""
    pids = []
    for line in (state / "lock").read_text().splitlines()[1:]:
        kind, pid, _ = line.split()
        assert kind == "reaper"
        pids.append(int(pid))
    return pids


def reaper_of(state: Path) -> int:
    return reapers_of(state)[0]


def wait_dead(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after up to ``seconds`` (checked every 20 ms)."""
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if process_alive(p)]
    return alive


def test_sigkill_of_the_server_leaves_no_job_process(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with server_process(state) as (proc, pids):
        reaper = reaper_of(state)
        assert process_alive(reaper)
        proc.kill()
        proc.wait()
        assert wait_dead(pids, 5.0) == []
        assert wait_dead([reaper], 5.0) == []  # it did its work and left


def test_the_parent_groups_a_killed_server_left_are_removed_after_its_test(
    tmp_path: Path,
) -> None:
    # Its reapers kill its jobs and remove their groups; its parent group (one per state
    # directory, in every hierarchy) stays, empty: ~1,200 of them piled up over a
    # session of tests. The fixture after each test removes them (``conftest``).
    state = tmp_path / "state"
    parent = _cgroup_parent_for(state)
    with server_process(state) as (proc, pids):
        proc.kill()
        proc.wait()
        assert wait_dead(pids, 5.0) == []
    assert any(d.exists() for d in parent_group_dirs(parent))  # left by the dead server
    assert _default_parents(tmp_path) == [parent]  # found from the test's tmp_path
    assert remove_parent_groups(parent) == []
    assert not any(d.exists() for d in parent_group_dirs(parent))


def test_the_reaper_touches_no_other_server(tmp_path: Path) -> None:
    with (
        server_process(tmp_path / "a") as (victim, doomed),
        server_process(tmp_path / "b") as (_, spared),
    ):
        victim.kill()
        victim.wait()
        assert wait_dead(doomed, 5.0) == []
        time.sleep(0.2)
        assert [p for p in spared if not process_alive(p)] == []


def test_a_server_killed_right_after_its_reaper_leaves_no_job_process(tmp_path: Path) -> None:
    """A reaper that dies is replaced about a second later; a server SIGKILLed within
    that window is still covered: its other reaper kills every job."""
    state = tmp_path / "state"
    with server_process(state) as (proc, pids):
        reapers = reapers_of(state)
        assert len(reapers) == 2
        assert all(process_alive(r) for r in reapers)
        os.kill(reapers[0], signal.SIGKILL)
        proc.kill()
        proc.wait()
        assert wait_dead(pids, 5.0) == []
        assert wait_dead(reapers, 5.0) == []


async def test_a_restart_right_after_sigkill_waits_for_the_old_reaper(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with server_process(state) as (proc, pids):
        old_reapers = reapers_of(state)
        proc.kill()
        proc.wait()
        # At once, as systemd's Restart= would: the old reapers may be at work.
        async with open_supervisor(state) as sup:
            assert not any(process_alive(r) for r in old_reapers)
            assert [p for p in pids if process_alive(p)] == []
            lost = [j for j in sup.list() if j.state is JobState.LOST]
            assert len(lost) == 4
            job = await sup.start("sleep", ["600"])
            await trio.sleep(0.3)
            assert sup.status(job.id).state is JobState.RUNNING
            assert job.pid is not None
            assert process_alive(job.pid)
            await sup.stop(job.id, grace=0)


async def test_leaving_the_supervisor_stops_its_reaper_quietly(tmp_path: Path) -> None:
    require_root("cgroups")
    state = tmp_path / "state"
    async with open_supervisor(state) as sup:
        reaper = reaper_of(state)
        job = await sup.start("sleep", ["600"])
        ended = await sup.start("true")
        await sup.wait(ended.id)
    assert wait_dead([reaper], 5.0) == []
    assert (state / "lock").read_text() == ""
    async with open_supervisor(state) as sup:
        assert sup.status(job.id).state is JobState.KILLED  # stopped, not lost
        assert sup.status(ended.id).state is JobState.EXITED


def test_a_killed_reaper_is_started_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with server_process(state) as (proc, pids):
        first = reaper_of(state)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while reaper_of(state) == first and time.monotonic() < deadline:
            time.sleep(0.05)
        second = reaper_of(state)
        assert second != first
        assert process_alive(second)
        assert all(process_alive(p) for p in pids)  # a dead reaper kills nothing
        proc.kill()
        proc.wait()
        assert wait_dead(pids, 5.0) == []


#: A supervisor that keeps starting jobs of every kind (short, chatty, stopped, escaping)
#: and prints "ID PID..." for each once it knows its pids and its record is in, until it is killed.
BUSY_SERVER = """
import sys, trio
from trio_worker import open_supervisor

COUNT = "i=0; while [ $i -lt 300 ]; do echo $i; i=$((i+1)); done"
TICK = "i=0; while :; do echo $i; i=$((i+1)); sleep 0.01; done"
ESCAPE = "setsid sleep 600 & echo $!; " + TICK

async def main(state):
    async with open_supervisor(state) as sup:
        async with trio.open_nursery() as nursery:
            n = 0
            while True:
                n += 1
                script = [COUNT, TICK, ESCAPE, "sleep 600"][n % 4]
                job = await sup.start("sh", ["-c", script])
                pids = [job.pid]
                if script is ESCAPE:
                    async for chunk in sup.output(job.id):
                        pids.append(int(chunk.data.split(b"\\n")[0]))
                        break
                # A Start answers before its record's commit (group commit, right
                # after; under load, some Starts later): printed once on record.
                await sup._store.flush()
                print(job.id, *pids, flush=True)
                if n % 5 == 0:
                    nursery.start_soon(sup.stop, job.id, 0.05)
                await trio.sleep(0.02)

trio.run(main, sys.argv[1])
"""

_COUNTING = b"".join(b"%d\n" % i for i in range(100_000))


def crash_busy_server(state: Path, delay: float) -> tuple[list[str], dict[str, bytes]]:
    """Run BUSY_SERVER for ``delay`` seconds, snapshot its logs on disk, SIGKILL it.

    Returns the lines it printed and each job's ``output.log`` as it was just
    before the kill.
    """
    require_root("cgroups")
    proc = subprocess.Popen(
        [sys.executable, "-c", BUSY_SERVER, str(state)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready
        time.sleep(delay)
        on_disk = {
            d.name: (d / "output.log").read_bytes()
            for d in (state / "jobs").iterdir()
            if (d / "output.log").exists()
        }
        proc.kill()
        proc.wait()
        return proc.stdout.read().decode().splitlines(), on_disk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_sigkill_at_random_points_loses_no_output_and_leaves_no_process(
    tmp_path: Path, seed: int
) -> None:
    state = tmp_path / "state"
    delay = random.Random(seed).uniform(0.3, 2.0)
    printed, on_disk = await trio.to_thread.run_sync(crash_busy_server, state, delay)
    pids = [int(p) for line in printed for p in line.split()[1:]]
    assert pids
    assert wait_dead(pids, 5.0) == []  # the reaper's work: no restart needed

    async with open_supervisor(state) as sup:
        jobs = sup.list()
        assert {j.id for j in jobs} >= {line.split()[0] for line in printed}
        for job in jobs:
            assert job.state in (JobState.LOST, JobState.EXITED, JobState.KILLED), job
            data = b"".join([c.data async for c in sup.output(job.id, follow=False)])
            assert data.startswith(on_disk.get(job.id, b"").rstrip(b"\0")), job.id
            script = job.args[1]
            if "setsid" in script:  # the escapee's pid, then counting
                data = data.partition(b"\n")[2]
            # What the job printed, cut where the crash (or a stop) came: never garbled.
            assert _COUNTING.startswith(data) if script != "sleep 600" else data == b"", job.id
