"""Durability: restarts, crashes, the state-directory lock, corrupt databases, retention."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import trio
import trio.testing

from tests.conftest import job_dirs, process_alive, require_root
from trio_worker import JobNotFound, JobState, StateDirError, open_supervisor
from trio_worker._jobs._records import END_COMMIT_AFTER
from trio_worker._jobs._supervisor import LOST_ERROR, Retention

CRASHING_SERVER = textwrap.dedent(
    """
    import json, os, sys, trio, trio_worker

    async def main(state):
        async with trio_worker.open_supervisor(state) as sup:
            streamer = await sup.start(
                "sh", ["-c", "i=0; while :; do i=$((i+1)); echo line $i; sleep 0.01; done"]
            )
            sleeper = await sup.start("sh", ["-c", "sleep 1000 & sleep 1000"])
            done = await sup.start("sh", ["-c", "echo finished"])
            await sup.wait(done.id)
            # On disk, not only appended: bytes not yet flushed when a server is
            # SIGKILLed are lost, as the flusher writes from a worker thread.
            log = os.path.join(state, "jobs", streamer.id, "output.log")
            while os.path.getsize(log) < 2000:
                await trio.sleep(0.01)
            await sup._store.flush()
            print(json.dumps({"streamer": streamer.id, "sleeper": sleeper.id,
                              "done": done.id, "pids": [streamer.pid, sleeper.pid]}), flush=True)
            await trio.sleep_forever()

    trio.run(main, sys.argv[1])
    """
)


def _run_and_crash(state: Path) -> dict[str, object]:
    """Run a supervisor in a child process until its jobs are going, then SIGKILL it."""
    with subprocess.Popen(
        [sys.executable, "-c", CRASHING_SERVER, str(state)], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            ids: dict[str, object] = json.loads(server.stdout.readline())
        finally:
            server.kill()  # SIGKILL: no cleanup of any kind
    return ids


async def test_restart_keeps_jobs_and_output(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with open_supervisor(state) as sup:
        a = await sup.start("sh", ["-c", "printf 'out\\000'; printf err >&2; exit 4"], owner="al")
        await sup.wait(a.id)
        b = await sup.start("echi")
        before = {j.id: j for j in sup.list()}
        out_before = [c async for c in sup.output(a.id)]
    async with open_supervisor(state) as sup:
        after = {j.id: j for j in sup.list()}
        assert after.keys() == before.keys()
        for job_id, job in before.items():
            restored = after[job_id]
            assert (restored.state, restored.exit_code, restored.error, restored.owner) == (
                job.state,
                job.exit_code,
                job.error,
                job.owner,
            )
            assert restored.output_bytes == job.output_bytes
        assert [c async for c in sup.output(a.id)] == out_before
        assert after[b.id].state is JobState.FAILED
        # New jobs get ids that sort after the old ones.
        c = await sup.start("true")
        assert c.id > max(before)


async def test_jobs_that_print_nothing_have_no_directory_before_and_after_a_restart(
    tmp_path: Path,
) -> None:
    """A job's directory and log files come with its first output (a silent job costs
    no inode): a silent job's output reads empty, live, followed and after a restart;
    a job that prints only later is followed from its start all the same; Remove and
    retention take jobs with and without files."""
    state = tmp_path / "state"
    jobs = state / "jobs"
    retention = Retention(keep_ended=1, max_ended_age=None, interval=3600)
    async with open_supervisor(state, retention=retention) as sup:
        silent = await sup.start("true")
        late = await sup.start("sh", ["-c", "read x; echo late; echo err >&2"], stdin=True)
        await sup.wait(silent.id)
        assert not (jobs / silent.id).exists()
        assert [c async for c in sup.output(silent.id)] == []
        assert [c async for c in sup.output(silent.id, follow=False)] == []
        assert not (jobs / late.id).exists()  # nothing printed yet

        async def follow(into: list[bytes]) -> None:
            async for chunk in sup.output(late.id):
                into.append(chunk.data)

        followed: list[list[bytes]] = [[], [], []]
        async with trio.open_nursery() as nursery:
            for into in followed:
                nursery.start_soon(follow, into)
            await trio.testing.wait_all_tasks_blocked()
            await sup.write_stdin(late.id, b"go\n")
        assert {b"".join(f) for f in followed} == {b"late\nerr\n"}
        assert {p.name for p in (jobs / late.id).iterdir()} >= {"output.log", "output.idx"}
        late_chunks = [c async for c in sup.output(late.id)]
    async with open_supervisor(state, retention=retention) as sup:
        assert sup.status(silent.id).output_bytes == 0
        assert [c async for c in sup.output(silent.id)] == []
        assert [c async for c in sup.output(late.id)] == late_chunks
        assert not (jobs / silent.id).exists()  # (a restart makes none either)
        await sup.remove(silent.id)
        assert sup.list() == [sup.status(late.id)]
        another = await sup.start("echo", ["kept"])
        await sup.wait(another.id)
        await sup.housekeep()  # keeps the newest ended job only
        assert [j.id for j in sup.list()] == [another.id]
        assert await job_dirs(sup) == {another.id}


async def test_crash_makes_running_jobs_lost_kills_them_and_keeps_output(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ids = await trio.to_thread.run_sync(_run_and_crash, state)
    async with open_supervisor(state) as sup:
        streamer = sup.status(ids["streamer"])
        sleeper = sup.status(ids["sleeper"])
        assert streamer.state is JobState.LOST
        assert sleeper.state is JobState.LOST
        assert streamer.error == LOST_ERROR
        assert sup.status(ids["done"]).state is JobState.EXITED
        for pid in ids["pids"]:
            assert not process_alive(pid)
        data = b"".join([c.data async for c in sup.output(streamer.id)])
        assert len(data) >= 2000
        lines = data.split(b"\n")[:-1]
        assert lines[:3] == [b"line 1", b"line 2", b"line 3"]
        assert all(line == b"line %d" % (i + 1) for i, line in enumerate(lines))
        middle = len(data) // 2
        assert b"".join([c.data async for c in sup.output(streamer.id, middle)]) == data[middle:]
        assert await sup.wait(streamer.id) == sup.status(streamer.id)


ANSWERED_THEN_CRASHING = textwrap.dedent(
    """
    import json, sys, trio, trio_worker

    async def main(state):
        async with trio_worker.open_supervisor(state) as sup:
            stopped = await sup.start("sleep", ["1000"])
            waited = await sup.start("sh", ["-c", "echo done; exit 3"])
            await sup._records.commit_queued()  # the starts' records
            async with sup._store._lock:  # no commit from here on
                stop = await sup.stop(stopped.id, grace=5)
                wait = await sup.wait(waited.id)
                print(json.dumps({"stopped": stopped.id, "waited": waited.id,
                                  "signal": stop.signal, "code": wait.exit_code,
                                  "cpu": wait.usage is not None}), flush=True)
                await trio.sleep_forever()

    trio.run(main, sys.argv[1])
    """
)


def _told_then_killed(
    script: str,
    state: Path,
    before_the_kill: Callable[[dict[str, object]], None] = lambda told: None,
) -> dict[str, object]:
    """Blocking: run ``script`` on ``state`` in a server process, read the first line it
    prints (JSON), pass it to ``before_the_kill``, then SIGKILL the server."""
    with subprocess.Popen(
        [sys.executable, "-c", script, str(state)], stdout=subprocess.PIPE, text=True
    ) as server:
        try:
            assert server.stdout is not None
            told: dict[str, object] = json.loads(server.stdout.readline())
            before_the_kill(told)
        finally:
            server.kill()
    return told


async def test_an_end_answered_before_its_commit_survives_a_crash(tmp_path: Path) -> None:
    """Stop and Wait answer before the end's record commits; a server SIGKILLed in
    between comes back with the ends it told (noted on disk), not LOST jobs."""
    require_root("a job's cgroup")
    state = tmp_path / "state"

    told = await trio.to_thread.run_sync(_told_then_killed, ANSWERED_THEN_CRASHING, state)
    assert (told["signal"], told["code"]) == (15, 3)
    assert (_row(state, str(told["stopped"])) or ("",))[0] == "running"
    async with open_supervisor(state) as sup:
        stopped = sup.status(str(told["stopped"]))
        waited = sup.status(str(told["waited"]))
        assert (stopped.state, stopped.signal) == (JobState.KILLED, 15)
        assert (waited.state, waited.exit_code) == (JobState.EXITED, 3)
        assert waited.ended_at is not None
        assert waited.usage is not None
        assert b"".join([c.data async for c in sup.output(waited.id)]) == b"done\n"
    assert (_row(state, stopped.id) or ("",))[0] == "killed"
    assert (_row(state, waited.id) or ("",))[0] == "exited"


async def test_an_end_is_noted_until_its_record_is_in_or_its_job_removed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        notes = sup._records._notes
        store = sup._store
        assert notes is not None
        assert store is not None
        kept, gone = await sup.start("sleep", ["60"]), await sup.start("sleep", ["60"])
        await sup._records.commit_queued()
        store._conn.execute("DELETE FROM jobs WHERE id = ?", (gone.id,))
        async with store._lock:  # no commit meanwhile
            await sup.stop(kept.id, grace=0)
            await sup.stop(gone.id, grace=0)
            assert len(notes) == 2
        await sup._records.commit_queued()
        assert len(notes) == 1  # kept's end is in; gone's found no row (written later)
        assert gone.id in sup._records.unsaved
        await sup.remove(gone.id)
        assert len(notes) == 0


class _CommitterSteps(trio.abc.Instrument):
    """Counts the steps of the records' committer task."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("run_committer"):
            self.steps += 1


async def test_the_committer_commits_a_start_in_two_steps(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Woken by the Start's record, it starts the store's thread at once (no turn of the
    # loop for its own lock or the store's while none is in flight), and settles when
    # the thread is done: two steps per Start on the loop, not four. (Each Start after a
    # quiet spell: within END_COMMIT_AFTER of the last commit its record would wait.)
    async with open_supervisor(tmp_path / "state", retention=Retention(interval=3600)) as sup:
        store = sup._store
        assert store is not None
        await sup.start("sleep", ["60"])  # (the first: places, imports)
        await store.flush()
        await trio.testing.wait_all_tasks_blocked()
        counter = _CommitterSteps()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(3):
                mock_clock.jump(END_COMMIT_AFTER)
                job = await sup.start("sleep", ["60"])
                await trio.testing.wait_all_tasks_blocked()  # (the committer's call is out)
                await store.flush()  # (waits for it: the store's lock)
                await trio.testing.wait_all_tasks_blocked()
                assert _row(tmp_path / "state", job.id) is not None
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 3 * 2


async def test_a_start_committed_after_its_job_ended_keeps_the_end_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    # The job ends (its end noted, queued for the next transaction) while the transaction
    # holding its start's record runs in the store's thread: settling that one must not
    # free the end's note, or a crash before the next makes the job LOST.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        notes = sup._records._notes
        store = sup._store
        assert notes is not None
        assert store is not None
        gate = threading.Event()
        execute = store._execute

        def paused(*args: Any) -> bool:  # the real transaction, once the test says go
            gate.wait(20)
            return execute(*args)

        monkeypatch.setattr(store, "_execute", paused)
        mock_clock.jump(END_COMMIT_AFTER)  # (a quiet spell: the start's record goes at once)
        job = await sup.start("sleep", ["60"])
        await trio.testing.wait_all_tasks_blocked()  # its transaction is in the thread
        await sup.stop(job.id, grace=0)
        assert len(notes) == 1
        gate.set()
        await _until(lambda: _row(state, job.id) is not None)
        await trio.testing.wait_all_tasks_blocked()
        assert _row(state, job.id) == ("running", job.pid, ANY)  # the end waits its turn
        assert len(notes) == 1
        mock_clock.jump(END_COMMIT_AFTER)
        await _until(lambda: (_row(state, job.id) or ("",))[0] == "killed")
        await trio.testing.wait_all_tasks_blocked()
        assert len(notes) == 0


async def test_second_supervisor_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    async with open_supervisor(tmp_path / "state"):
        with pytest.raises(StateDirError, match="state"):
            async with open_supervisor(tmp_path / "state"):
                pass


async def test_corrupt_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    db = state / "jobs.db"
    garbage = os.urandom(8192)
    db.write_bytes(garbage)
    with pytest.raises(StateDirError, match=str(db)):
        async with open_supervisor(state):
            pass
    assert db.read_bytes() == garbage


async def test_retention_keeps_the_newest_ended_jobs(tmp_path: Path) -> None:
    retention = Retention(keep_ended=2, max_ended_age=None, interval=3600)
    async with open_supervisor(tmp_path / "state", retention=retention) as sup:
        ids = []
        for i in range(5):
            job = await sup.start("echo", [str(i)])
            await sup.wait(job.id)
            ids.append(job.id)
        running = await sup.start("sleep", ["1000"])
        await sup.housekeep()
        assert [j.id for j in sup.list()] == [*ids[-2:], running.id]
        # (The sleeping job printed nothing: it has no directory.)
        assert await job_dirs(sup) == set(ids[-2:])
    async with open_supervisor(tmp_path / "state", retention=retention) as sup:
        assert [j.id for j in sup.list()] == [*ids[-2:], running.id]


async def test_age_retention(tmp_path: Path) -> None:
    retention = Retention(keep_ended=None, max_ended_age=timedelta(0), interval=3600)
    async with open_supervisor(tmp_path / "state", retention=retention) as sup:
        job = await sup.start("true")
        await sup.wait(job.id)
        await sup.housekeep()
        assert sup.list() == []


async def test_a_running_jobs_record_has_no_usage_and_its_end_has_it(tmp_path: Path) -> None:
    # The start record skips the cgroup's accounting (a read per hierarchy on the
    # loop, for every Start); the end's record carries what the job used.
    import sqlite3

    state = tmp_path / "state"

    def usage_row(job_id: str) -> tuple[object, object]:
        with contextlib.closing(
            sqlite3.connect(f"file:{state / 'jobs.db'}?mode=ro", uri=True)
        ) as db:
            row = db.execute(
                "SELECT cpu_seconds, memory_peak_bytes FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        assert row is not None
        return row[0], row[1]

    async with open_supervisor(state) as sup:
        job = await sup.start("sleep", ["60"])
        assert sup._store is not None
        await sup._records.commit_queued()  # the start's record, queued by the Start
        assert usage_row(job.id) == (None, None)
        await sup.stop(job.id, grace=0)
        end = await sup.wait(job.id)
    # (Wait answers before the end is written; leaving the block waits for it.)
    if end.usage is None:
        pytest.skip("no cgroups here: no usage to record")
    assert usage_row(job.id) == (end.usage.cpu_seconds, end.usage.memory_peak_bytes)


def _row(state: Path, job_id: str) -> tuple[object, ...] | None:
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{state / 'jobs.db'}?mode=ro", uri=True)) as db:
        row: tuple[object, ...] | None = db.execute(
            "SELECT state, pid, pid_start_time FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return row


async def test_a_started_jobs_record_is_committed_right_after_the_start(tmp_path: Path) -> None:
    # The Start queues the job's record (RUNNING, with its pid) and answers; the
    # supervisor's committer commits it right after, without anyone asking.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        job = await sup.start("sleep", ["60"])
        with trio.fail_after(10):
            # Nothing announces the commit: watch the database, as a restart would.
            while _row(state, job.id) is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        row = _row(state, job.id)
        assert row is not None
        assert row[0] == "running"
        assert row[1] == job.pid
        assert row[2] is not None  # its start time: recovery tells it from a reused pid
        # A spawn error is recorded the same way, FAILED.
        failed = await sup.start("/nonexistent/command")
        assert failed.state is JobState.FAILED
        assert sup._store is not None
        await sup._records.commit_queued()
        assert _row(state, failed.id) == ("failed", None, None)
        await sup.stop(job.id, grace=0)


CRASH_BEFORE_RECORD = textwrap.dedent(
    """
    import json, sys, trio, trio_worker
    from trio_worker._jobs._supervisor import Retention

    async def main(state):
        retention = Retention(interval=3600)  # no housekeeping commit meanwhile
        async with trio_worker.open_supervisor(state, retention=retention) as sup:
            async with sup._store._lock:  # no commit: the record stays queued
                job = await sup.start("sh", ["-c", "echo up; sleep 1000 & exec sleep 1000"])
                print(json.dumps({"id": job.id, "pid": job.pid}), flush=True)
                await trio.sleep_forever()

    trio.run(main, sys.argv[1])
    """
)


async def test_a_crash_before_the_record_is_committed_still_kills_the_job(
    tmp_path: Path,
) -> None:
    # The window the queued record opens: a running job with no record. It is
    # killed all the same (the reapers, then the cleanup of leftover groups, find
    # it by its cgroup), and the restarted server leaves nothing of it: no job,
    # no directory.
    state = tmp_path / "state"

    def before_the_kill(started: dict[str, object]) -> None:
        started["row"] = _row(state, str(started["id"]))
        children = Path(f"/proc/{started['pid']}/task/{started['pid']}/children")
        deadline = time.monotonic() + 60  # a bound for a hang, not a measure (10: short, loaded)
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)  # the shell forks its background sleep
        started["children"] = children.read_text().split()
        directory = state / "jobs" / str(started["id"])  # made with its first output
        while not directory.is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)

    started = await trio.to_thread.run_sync(
        _told_then_killed, CRASH_BEFORE_RECORD, state, before_the_kill
    )
    assert started["row"] is None
    assert (state / "jobs" / str(started["id"])).is_dir()
    children = started["children"]
    assert isinstance(children, list)
    assert children
    pids = [int(str(started["pid"])), *(int(p) for p in children)]
    async with open_supervisor(state) as sup:
        with pytest.raises(JobNotFound):
            sup.status(str(started["id"]))
        for pid in pids:
            assert not process_alive(pid)
        assert not (state / "jobs" / str(started["id"])).exists()


async def test_a_jobs_end_does_not_wait_for_its_record(tmp_path: Path) -> None:
    # The end's record is queued for the committer: while no transaction can run,
    # Stop is answered and the job's group removed (or recycled) all the same; the record lands
    # once the store takes writes, without anyone asking.
    require_root("a job's cgroup")
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        job = await sup.start("sleep", ["60"])
        store = sup._store
        assert store is not None
        await sup._records.commit_queued()  # the start's record
        group = sup._jobs.get(job.id).cgroup
        assert group is not None
        assert group.tracked
        async with store._lock:  # no transaction while held
            end = await sup.stop(job.id, grace=0)
            assert end.state is JobState.KILLED
            launcher = sup._admission.launcher
            with trio.fail_after(20):
                await launcher.settled()
            # Removed, or recycled for the next places.
            spares = launcher.spare_groups() + [p.group for p in launcher.ready_places()]
            kept = {d for g in spares for d in g.dirs}
            assert not any(d.exists() for d in group.dirs if d not in kept)
            assert _row(state, job.id) == ("running", job.pid, ANY)
        with trio.fail_after(20):
            while (_row(state, job.id) or ("",))[0] != "killed":  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_an_end_whose_row_is_gone_is_written_whole(tmp_path: Path) -> None:
    # A queued end finds no row to update (JobNotFound): the next try inserts the
    # whole record, as the job ended.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        job = await sup.start("sleep", ["60"])
        store = sup._store
        assert store is not None
        await sup._records.commit_queued()
        store._conn.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
        await sup.stop(job.id, grace=0)
        with trio.fail_after(20):
            while job.id not in sup._records.unsaved:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert sup._records.unsaved[job.id] is False  # no row: an insert next time
        await sup.housekeep()
        assert job.id not in sup._records.unsaved
        assert _row(state, job.id) == ("killed", job.pid, ANY)


async def _until(done: Callable[[], bool]) -> None:
    """Wait in real time (trio's clock stands still in these tests) for ``done``."""
    for _ in range(2000):
        if done():
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)
    raise AssertionError("not done in 20 s")


async def _first_record_committed(sup: Any, clock: trio.testing.MockClock) -> tuple[Any, Any]:
    """The store, and a first job whose record went at once (the start-up's commits
    END_COMMIT_AFTER behind it): the records queued next wait END_COMMIT_AFTER of it."""
    store = sup._store
    assert store is not None
    clock.jump(END_COMMIT_AFTER)  # (the start-up's commits are behind)
    before = store.transactions
    first = await sup.start("sleep", ["1000"])
    await _until(lambda: store.transactions > before)  # at once: after a quiet spell
    await trio.testing.wait_all_tasks_blocked()
    return store, first


async def test_a_burst_of_ends_is_one_transaction_and_a_start_is_not_held(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # Ended jobs' records wait END_COMMIT_AFTER of trio's clock (standing still here
    # until the test moves it) for more; a start's record after a quiet spell (no commit
    # for END_COMMIT_AFTER) is committed at once.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        store = sup._store
        assert store is not None
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(10)]
        await sup._records.commit_queued()
        before = store.transactions
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(sup.stop, job.id, 5)
        await trio.testing.wait_all_tasks_blocked()
        assert store.transactions == before
        assert {(_row(state, job.id) or ("",))[0] for job in jobs} == {"running"}
        mock_clock.jump(END_COMMIT_AFTER)
        await _until(lambda: store.transactions > before)
        assert store.transactions == before + 1
        assert {(_row(state, job.id) or ("",))[0] for job in jobs} == {"killed"}
        mock_clock.jump(END_COMMIT_AFTER)
        started = await sup.start("sleep", ["1000"])
        await _until(lambda: _row(state, started.id) is not None)
        await sup.stop(started.id, grace=0)


async def test_a_burst_of_starts_is_one_transaction(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # A start's record queued within END_COMMIT_AFTER of trio's clock (standing still
    # here) of the committer's last commit waits for it to pass, and the records the
    # burst queued meanwhile go with it: one transaction, not one per Start.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        store, first = await _first_record_committed(sup, mock_clock)
        assert _row(state, first.id) is not None
        before = store.transactions
        burst = [await sup.start("sleep", ["1000"]) for _ in range(5)]
        await trio.testing.wait_all_tasks_blocked()
        assert store.transactions == before
        assert all(_row(state, job.id) is None for job in burst)
        mock_clock.jump(END_COMMIT_AFTER)
        await _until(lambda: store.transactions > before)
        await trio.testing.wait_all_tasks_blocked()
        assert store.transactions == before + 1
        assert all(_row(state, job.id) == ("running", job.pid, ANY) for job in burst)
        for job in [first, *burst]:
            await sup.stop(job.id, grace=0)


async def test_the_committer_wakes_once_per_commit_in_a_burst_of_starts(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # A start's record within END_COMMIT_AFTER of the last commit brings the committer's
    # wait to its due time; the starts after it change nothing: two steps of the
    # committer for the burst's one transaction (woken at the due time, the thread's
    # return), not a wake for the first record and another when a sleep until then ends.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        # The first record goes at once, and sets the burst's due time.
        store, first = await _first_record_committed(sup, mock_clock)
        before = store.transactions
        counter = _CommitterSteps()
        trio.lowlevel.add_instrument(counter)
        try:
            burst = [await sup.start("sleep", ["1000"]) for _ in range(5)]
            await trio.testing.wait_all_tasks_blocked()
            assert (counter.steps, store.transactions) == (0, before)
            mock_clock.jump(END_COMMIT_AFTER)
            await _until(lambda: store.transactions > before)
            await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert (counter.steps, store.transactions) == (2, before + 1)
        assert all(_row(state, job.id) == ("running", job.pid, ANY) for job in burst)
        for job in [first, *burst]:
            await sup.stop(job.id, grace=0)


async def test_a_commit_with_none_in_flight_is_not_cancellable(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # With no transaction in flight, a commit has no cancel point (the store's thread
    # call is none) and so needs no shield: called in a cancelled scope, it still
    # commits its batch (the records left the queue with it) and raises nothing.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        store, first = await _first_record_committed(sup, mock_clock)
        # Queued within END_COMMIT_AFTER of that commit: they wait (the clock stands still).
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert all(_row(state, job.id) is None for job in jobs)
        assert not store.busy
        with trio.CancelScope() as scope:
            scope.cancel()
            await sup._records.commit_queued()
        assert not scope.cancelled_caught
        assert all(_row(state, job.id) == ("running", job.pid, ANY) for job in jobs)
        for job in [first, *jobs]:
            await sup.stop(job.id, grace=0)


async def test_a_start_cuts_short_the_wait_of_ended_jobs_records(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    # An end's record waits END_COMMIT_AFTER of trio's clock (standing still here) for
    # company; a start's record queued meanwhile goes at once, and takes the end with it.
    state = tmp_path / "state"
    async with open_supervisor(state, retention=Retention(interval=3600)) as sup:
        store = sup._store
        assert store is not None
        ended = await sup.start("sleep", ["1000"])
        await sup._records.commit_queued()
        mock_clock.jump(END_COMMIT_AFTER)  # a quiet spell: the next start's record goes at once
        await sup.stop(ended.id, grace=0)
        await trio.testing.wait_all_tasks_blocked()
        assert (_row(state, ended.id) or ("",))[0] == "running"
        started = await sup.start("sleep", ["1000"])
        await _until(lambda: _row(state, started.id) is not None)
        assert (_row(state, ended.id) or ("",))[0] == "killed"
        await sup.stop(started.id, grace=0)
