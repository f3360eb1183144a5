"""Faults and exhaustion never stop the supervisor: a full disk, SQLite errors,
an interrupted Stop.

The disk tests mount a small tmpfs (root) and really fill it: no fault is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import cgroup_parent, process_alive, require_root
from tests.grpc_support import eventually
from tests.test_client import Server, certs, server
from trio_worker import (
    Isolation,
    JobNotFound,
    JobState,
    Limits,
    ResourceExhausted,
    Retention,
    Supervisor,
    open_supervisor,
)

__all__ = ["certs", "server"]  # fixtures shared with test_client

#: Retention that never runs on its own: the tests call ``housekeep``.
_MANUAL = Retention(interval=3600.0, keep_ended=None, max_ended_age=timedelta(days=1))


@contextlib.contextmanager
def small_tmpfs(where: Path, options: str) -> Iterator[Path]:
    require_root("mounting a tmpfs")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def until_full(step: Callable[[], object]) -> None:
    """Call ``step`` until the filesystem says ENOSPC."""
    failure: int | None = None
    while failure is None:
        try:
            step()
        except OSError as exc:
            failure = exc.errno
    assert failure == errno.ENOSPC


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no room left; return it."""
    path = directory / f"filler-{uuid.uuid4().hex}"
    with open(path, "wb", buffering=0) as f:
        until_full(lambda: f.write(b"\0" * 65536))
        until_full(lambda: f.write(b"\0" * 512))  # to the very last byte
    return path


def fill_inodes(directory: Path) -> list[Path]:
    made: list[Path] = []

    def make() -> None:
        path = directory / f"inode-{len(made)}"
        path.touch()
        made.append(path)

    until_full(make)
    return made


def recorded(db: Path) -> dict[str, str]:
    """Job id -> state, as a second reader of ``jobs.db`` sees it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        conn.close()


async def wait_ended(sup: Supervisor, job_id: str) -> JobState:
    with trio.fail_after(30):
        return (await sup.wait(job_id)).state


@pytest.mark.root
async def test_full_disk_jobs_run_end_and_their_records_land_later(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "size=4m") as disk:
        state = disk / "state"
        async with open_supervisor(state, retention=_MANUAL) as sup:
            unrelated = await sup.start("sleep", ["600"])
            assert unrelated.pid is not None
            before = await sup.start("cat", stdin=True)  # ends once its stdin is closed
            await sup.housekeep()  # (their records are in)
            filler = fill(disk)
            # The first Start once the disk is full runs, answered before its record's
            # commit: the commit finds the disk full, gives up the store's reserve and
            # goes in, in its room (and the job's end, written once it ended).
            short = await sup.start("sh", ["-c", "echo hello; exit 0"])
            assert short.state is JobState.RUNNING
            end = await sup.wait(short.id)
            assert (end.state, end.exit_code) == (JobState.EXITED, 0)
            assert end.output_bytes == 6  # counted, written or not
            assert sup.status(short.id).state is JobState.EXITED
            await sup._records.commit_queued()
            assert recorded(state / "jobs.db")[short.id] == "exited"
            assert not sup._store.reserved
            # Without the reserve, a Start commits its record before anything runs, and
            # once the disk is full again it is refused: a crash would erase a job whose
            # record is not written.
            assert sup._records.refusing
            refill = fill(disk)
            listed = [j.id for j in sup.list()]
            with pytest.raises(ResourceExhausted, match="its record cannot be written"):
                await sup.start("true")
            assert [j.id for j in sup.list()] == listed
            # A job that started before the disk filled ends too; its end is pending.
            await sup.close_stdin(before.id)  # (its start was recorded: its end is not)
            assert await wait_ended(sup, before.id) is JobState.EXITED
            await sup.housekeep()  # a retry while still full changes nothing, raises nothing
            assert not sup._store.reserved
            assert sup.status(unrelated.id).state is JobState.RUNNING
            assert process_alive(unrelated.pid)

            filler.unlink()
            refill.unlink()
            # With room again, a Start commits its record before its spawn (the store
            # has no reserve yet: housekeeping makes it): one that cannot run is FAILED,
            # its end an update of that record; the next goes as usual.
            missing = await sup.start("/no/such/command")
            assert missing.state is JobState.FAILED
            back = await sup.start("sh", ["-c", "exit 4"])
            assert (await sup.wait(back.id)).exit_code == 4
            await sup.housekeep()
            assert sup._store.reserved
            assert not sup._records.refusing
            rows = recorded(state / "jobs.db")
            assert rows[short.id] == "exited"
            assert rows[before.id] == "exited"
            assert rows[unrelated.id] == "running"
            assert (rows[back.id], rows[missing.id]) == ("exited", "failed")
            assert process_alive(unrelated.pid)
            await sup.stop(unrelated.id, grace=0)
        # After a restart the jobs are there as they ended.
        async with open_supervisor(state, retention=_MANUAL) as sup:
            assert sup.status(short.id).exit_code == 0
            assert sup.status(before.id).state is JobState.EXITED
            assert sup.status(unrelated.id).state is JobState.KILLED
            assert sup.status(back.id).exit_code == 4
            assert sup.status(missing.id).state is JobState.FAILED


@pytest.mark.root
async def test_a_job_filling_the_disk_leaves_room_for_every_clients_starts(
    tmp_path: Path,
) -> None:
    """tools/probe_hostile.py full-disk: one job's output filled the state directory's
    disk, and while it went on writing every Start (any client's) was refused, its record
    unwritable. Output leaves KEEP_FREE of the disk free (here 1/16 of 16 MiB): the job's
    output past it is lost, counted, and the records of the Starts meanwhile are written."""
    with small_tmpfs(tmp_path / "disk", "size=16m") as disk:
        state = disk / "state"
        async with open_supervisor(state, retention=_MANUAL) as sup:
            hog = await sup.start("cat", ["/dev/zero"])  # writes until stopped
            await eventually(lambda: sup.status(hog.id).output_bytes >= 48 * 1024 * 1024, 30)
            starts = []
            for _ in range(20):
                job = await sup.start("sh", ["-c", "exit 3"])
                starts.append(job.id)
                assert (await sup.wait(job.id)).exit_code == 3
            await sup.stop(hog.id, grace=0)
            await sup._records.commit_queued()
            assert not sup._records.refusing
            assert sup._store.reserved
            rows = recorded(state / "jobs.db")
            assert [rows[i] for i in [hog.id, *starts]] == ["killed"] + ["exited"] * 20
            room = os.statvfs(disk)
            assert room.f_bavail * room.f_frsize >= 512 * 1024


@pytest.mark.root
async def test_starts_on_a_disk_out_of_inodes_run_and_only_their_output_is_lost(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "disk", "size=4m,nr_inodes=64") as disk:
        state = disk / "state"
        jobs = state / "jobs"
        async with open_supervisor(state, retention=_MANUAL) as sup:
            running = await sup.start("sleep", ["600"])
            made = fill_inodes(disk)
            entries = set(os.listdir(jobs))
            # A job's directory and files come with its first output: a Start needs no
            # inode, plain or with limits; what it prints is lost, counted, skipped.
            silent = await sup.start("true")
            talky = await sup.start("sh", ["-c", "echo lost"])
            limited = await sup.start("sh", ["-c", "echo lost"], limits=Limits(pids=16))
            for job in (silent, talky, limited):
                assert await wait_ended(sup, job.id) is JobState.EXITED
                assert [c async for c in sup.output(job.id)] == []
            assert sup.status(talky.id).output_bytes == 5
            assert set(os.listdir(jobs)) == entries
            # One whose helper needs the directory (isolation's report) is refused, and
            # leaves nothing.
            with pytest.raises(ResourceExhausted, match="state directory"):
                await sup.start("true", isolation=Isolation(pid=True))
            assert set(os.listdir(jobs)) == entries
            assert [j.id for j in sup.list()] == [running.id, silent.id, talky.id, limited.id]
            for path in made:
                path.unlink()
            job = await sup.start("echo", ["back"])
            assert await wait_ended(sup, job.id) is JobState.EXITED
            assert b"".join([c.data async for c in sup.output(job.id)]) == b"back\n"
            assert (jobs / job.id / "output.log").read_bytes() == b"back\n"
            assert sup.status(running.id).state is JobState.RUNNING
            await sup.stop(running.id, grace=0)
        # No file holds the lost output: after a restart it is counted all the same (a
        # counter never goes back), and lost as it was.
        async with open_supervisor(state, retention=_MANUAL) as sup:
            for lost in (talky, limited):
                assert sup.status(lost.id).output_bytes == 5
                assert [c async for c in sup.output(lost.id)] == []
            assert sup.status(silent.id).output_bytes == 0
            assert b"".join([c.data async for c in sup.output(job.id)]) == b"back\n"


@pytest.mark.root
async def test_removing_a_job_frees_a_disk_its_output_filled(tmp_path: Path) -> None:
    # The record's delete needs room on the disk (SQLite's WAL grows) that the job's own
    # output holds: Remove (rm, prune) must not be refused for want of the room it frees.
    with small_tmpfs(tmp_path / "disk", "size=4m") as disk:
        state = disk / "state"
        async with open_supervisor(state, retention=_MANUAL) as sup:
            job = await sup.start("head", ["-c", "8M", "/dev/zero"])
            assert await wait_ended(sup, job.id) is JobState.EXITED
            # Its output leaves KEEP_FREE of the disk free (1/16 of it here): the rest is
            # filled by someone else.
            fill(disk)
            assert shutil.disk_usage(disk).free == 0
            assert job.id in recorded(state / "jobs.db")
            gone = await sup.remove(job.id)
            assert gone.id == job.id
            with pytest.raises(JobNotFound):
                sup.status(job.id)
            assert not (state / "jobs" / job.id).exists()
            assert job.id not in recorded(state / "jobs.db")
            assert shutil.disk_usage(disk).free > 0


async def test_records_pending_at_shutdown_are_written_on_the_way_out(state_dir: Path) -> None:
    async with open_supervisor(state_dir, retention=_MANUAL) as sup:
        store = sup._store
        assert store is not None
        store._conn.execute("PRAGMA query_only = 1")
        job = await sup.start("true")
        assert await wait_ended(sup, job.id) is JobState.EXITED
        assert recorded(state_dir / "jobs.db") == {}
        store._conn.execute("PRAGMA query_only = 0")  # the disk has room again
    assert recorded(state_dir / "jobs.db") == {job.id: "exited"}


async def test_sqlite_errors_never_escape_and_records_are_written_later(state_dir: Path) -> None:
    async with open_supervisor(state_dir, retention=_MANUAL) as sup:
        store = sup._store
        assert store is not None
        conn = store._conn  # a real SQLite error: writes refused by the connection
        conn.execute("PRAGMA query_only = 1")
        unrelated = await sup.start("sleep", ["600"])
        await sup.housekeep()  # (its record refused: from now on Starts are)
        with pytest.raises(ResourceExhausted, match="its record cannot be written"):
            await sup.start("sh", ["-c", "exit 3"])
        assert [j.id for j in sup.list()] == [unrelated.id]
        await sup.housekeep()
        assert recorded(state_dir / "jobs.db") == {}
        assert sup.status(unrelated.id).state is JobState.RUNNING
        conn.execute("PRAGMA query_only = 0")
        # Its record committed before its spawn, the pid with the next commit.
        first = await sup.start("sh", ["-c", "exit 3"])
        assert recorded(state_dir / "jobs.db") == {first.id: "running"}
        assert await wait_ended(sup, first.id) is JobState.EXITED
        await sup.housekeep()
        assert recorded(state_dir / "jobs.db") == {first.id: "exited", unrelated.id: "running"}
        await sup.stop(unrelated.id, grace=0)
    async with open_supervisor(state_dir, retention=_MANUAL) as sup:
        assert sup.status(first.id).exit_code == 3
        assert sup.status(unrelated.id).state is JobState.KILLED


_IGNORES_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


async def test_cancelled_stop_still_kills_after_the_grace() -> None:
    # Real time (the job is a real process), kept short: a 1 s grace.
    async with open_supervisor() as sup:
        job = await sup.start("python3", ["-c", _IGNORES_TERM])
        async for chunk in sup.output(job.id):
            if b"ready" in chunk.data:
                break
        with trio.move_on_after(0.2) as scope:
            await sup.stop(job.id, grace=1)
        assert scope.cancelled_caught
        assert sup.status(job.id).state is JobState.RUNNING  # TERM was ignored
        with trio.fail_after(30):  # (only so that a regression fails instead of hanging)
            end = await sup.wait(job.id)
        assert (end.state, end.signal) == (JobState.KILLED, 9)


async def test_a_stop_whose_caller_disconnects_still_kills(server: Server) -> None:
    """Through the server: the client gives up on its Stop (as a second Ctrl-C of
    ``run`` does); the server still SIGKILLs the job after the grace."""
    async with server.connect() as client:
        job = await client.start(sys.executable, ["-c", _IGNORES_TERM])
        async with client.output(job.id) as stream:
            async for chunk in stream:
                if b"ready" in chunk.data:
                    break
        with trio.move_on_after(0.3) as scope:
            await client.stop(job.id, grace=1.0)
        assert scope.cancelled_caught
    async with server.connect() as client:
        with trio.fail_after(30):  # (only so that a regression fails instead of hanging)
            end = await client.wait(job.id)
        assert (end.state, end.signal) == (JobState.KILLED, 9)


async def _ignoring_term(sup: Supervisor) -> str:
    job = await sup.start("python3", ["-c", _IGNORES_TERM])
    async for chunk in sup.output(job.id):
        if b"ready" in chunk.data:
            break
    return job.id


async def test_a_later_stop_with_a_shorter_grace_kills_at_its_own_deadline() -> None:
    async with open_supervisor() as sup:
        job_id = await _ignoring_term(sup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.stop, job_id, 600.0)
            await trio.sleep(0.1)
            with trio.fail_after(30):  # (only so that a regression fails instead of hanging)
                end = await sup.stop(job_id, grace=0.2)
        assert (end.state, end.signal) == (JobState.KILLED, 9)


async def test_stops_whose_kill_cannot_fire_do_not_pile_up() -> None:
    # Each Stop with a shorter grace moves the job's SIGKILL earlier; what the earlier
    # ones asked for can no longer fire and must not be kept for their whole grace.
    async with open_supervisor() as sup:
        job_id = await _ignoring_term(sup)
        for i in range(300):
            with trio.CancelScope() as scope:
                scope.cancel()  # the caller gives up at once: the kill stays promised
                await sup.stop(job_id, grace=600.0 - i)
        assert sup.status(job_id).state is JobState.RUNNING
        assert len(sup._kills._heap) <= 65
        with trio.fail_after(30):
            end = await sup.stop(job_id, grace=0)
        assert (end.state, end.signal) == (JobState.KILLED, 9)


_END_ON_AN_ALL_BUT_FULL_DISK = r"""
import secrets, sys
import trio
from trio_worker import open_supervisor

async def main():
    parent = sys.argv[3]
    async with open_supervisor(sys.argv[1], cgroup_parent=parent, persist=True) as sup:
        # Its output takes whatever room the disk has left once its start is recorded,
        # before its end is noted.
        job = await sup.start("sh", ["-c", "sleep 0.5; head -c $0 /dev/zero", sys.argv[2]])
        end = await sup.wait(job.id)
        print(end.state.name, end.exit_code, flush=True)

trio.run(main)
"""


def test_a_server_on_a_disk_with_no_room_for_its_end_notes_goes_on(tmp_path: Path) -> None:
    # The end notes (``_endnotes``) are a file mapped into memory: on a disk with room
    # for the lock and the database but not the notes' 128 KiB, their blocks could not
    # be allocated (an error that was ignored), and once a job's output had taken the
    # rest, the first end noted wrote into a page with no block: SIGBUS, the server
    # gone. Now: no notes, and a warning.
    state = tmp_path / "disk" / "state"
    parent = cgroup_parent("tw-notes")

    def run(output: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", _END_ON_AN_ALL_BUT_FULL_DISK, str(state), str(output), parent],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )

    with small_tmpfs(tmp_path / "disk", "size=4m") as disk:
        first = run(0)  # the state directory and its database made
        assert (first.returncode, first.stdout) == (0, "EXITED 0\n"), first.stderr[-2000:]
        (state / "ends").unlink()
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 96 * 1024)  # 96 KiB left
        second = run(1 << 20)
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])  # -7: SIGBUS
    assert second.stdout == "EXITED 0\n"
    assert "ends are not noted" in second.stderr
