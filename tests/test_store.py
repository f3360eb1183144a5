"""The SQLite job store: real files in tmp_path, no mocks."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_worker import Isolation, JobInfo, JobNotFound, JobState, Limits, StateDirError, Usage
from trio_worker._jobs._store import (
    APPLICATION_ID,
    RESERVE_BYTES,
    SCHEMA_VERSION,
    SqliteJobStore,
    StoredJob,
    _Encoder,
    _in_thread,
    _json,
    process_start_time,
)
from trio_worker._model import JobIdGenerator

from .test_faults import fill, small_tmpfs

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
_ids = JobIdGenerator()


def running(job_id: str | None = None, **kw: object) -> JobInfo:
    fields: dict[str, object] = {
        "id": job_id or _ids(),
        "owner": "alice",
        "command": "sh",
        "args": ("-c", "echo hi"),
        "state": JobState.RUNNING,
        "pid": 4242,
        "exit_code": None,
        "signal": None,
        "error": "",
        "started_at": T0,
        "ended_at": None,
        "output_bytes": 0,
    }
    fields.update(kw)
    return JobInfo(**fields)  # type: ignore[arg-type]


def ended(info: JobInfo, **kw: object) -> JobInfo:
    fields: dict[str, object] = {"state": JobState.EXITED, "exit_code": 0, "ended_at": T0}
    fields.update(kw)
    return dataclasses.replace(info, **fields)  # type: ignore[arg-type]


def files(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` with its bytes."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def exists(path: str) -> bool:
    return os.path.exists(path)


async def start(store: SqliteJobStore, info: JobInfo, **kw: object) -> None:
    params: dict[str, object] = {"env_keys": (), "cwd": None, "pid_start_time": None}
    params.update(kw)
    await store.record_start(info, **params)  # type: ignore[arg-type]


async def by_id(store: SqliteJobStore) -> dict[str, StoredJob]:
    return {job.info.id: job for job in await store.load_all()}


# -- round trips ---------------------------------------------------------------


async def test_every_field_round_trips_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    full = JobInfo(
        id=_ids(),
        owner="Zoë 🛠 operator",
        command="/opt/bin/ünïcode\udcff",  # a lone surrogate, as os.fsdecode makes
        args=("naïve", "", "tab\tnew\nline", "'quote\"", "\udc80raw", "NUL\0inside"),
        state=JobState.KILLED,
        pid=123456,
        exit_code=None,
        signal=9,
        error="killed: mémoire épuisée",
        started_at=datetime(2025, 1, 2, 3, 4, 5, 600, tzinfo=timezone(timedelta(hours=5))),
        ended_at=datetime(2025, 1, 2, 3, 4, 6, tzinfo=UTC),
        output_bytes=2**40 + 7,
        limits=Limits(
            cpus=0.1 + 0.2, memory_bytes=2**64 - 1, io_read_bps=1, io_write_bps=2, pids=3
        ),
        isolation=Isolation(pid=True, mount=False, network=True),
        oom_killed=True,
        spawn_errno=None,
        output_start=1024,
        usage=Usage(cpu_seconds=1.25, memory_peak_bytes=2**33),
    )
    minimal = JobInfo(
        id=_ids(),
        owner="",
        command="x",
        args=(),
        state=JobState.FAILED,
        pid=None,
        exit_code=None,
        signal=None,
        error="",
        started_at=T0,
        ended_at=T0,
        output_bytes=0,
        spawn_errno=2,
    )
    live = running(exit_code=None, usage=Usage())
    async with await SqliteJobStore.open(path) as store:
        await store.record_start(
            full, env_keys=["KEY_é", "PATH"], cwd="/tmp/dïr\udcfe", pid_start_time=987654321
        )
        await store.record_start(minimal, env_keys=[], cwd=None, pid_start_time=None)
        await store.record_start(live, env_keys={"A": "1"}, cwd="/", pid_start_time=1)
        first = await by_id(store)
    async with await SqliteJobStore.open(path) as store:
        again = await by_id(store)
    assert first == again
    assert again[full.id] == StoredJob(full, ("KEY_é", "PATH"), "/tmp/dïr\udcfe", 987654321, 0)
    assert again[minimal.id] == StoredJob(minimal, (), None, None, 0)
    assert again[live.id] == StoredJob(live, ("A",), "/", 1, 0)
    assert again[full.id].info.started_at.tzinfo is not None
    assert again[full.id].info.started_at == full.started_at  # the same instant, now in UTC
    assert [j.info.id for j in await _reload(path)] == sorted([full.id, minimal.id, live.id])


async def test_a_queued_start_is_the_same_record(tmp_path: Path) -> None:
    """``queue_start`` makes its row in the writer's thread: the same row, mistakes
    still raised at the call, with nothing queued."""
    info = running(
        command="/opt/bin/ünïcode\udcff",
        args=("naïve", "\udc80raw", "NUL\0inside"),
        started_at=datetime(2025, 1, 2, 3, 4, 5, 600, tzinfo=timezone(timedelta(hours=5))),
        limits=Limits(cpus=0.5, memory_bytes=2**30, pids=7),
        isolation=Isolation(pid=True, network=True),
        usage=Usage(cpu_seconds=0.5, memory_peak_bytes=4096),
    )
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        queued = store.queue_start(
            info, env_keys=("KEY_é",), cwd="/tmp/dïr\udcfe", pid_start_time=9
        )
        for bad, why in [
            (running(state=JobState.LOST), "no ended_at"),
            (running(started_at=datetime(2025, 1, 1)), "naive"),
        ]:
            with pytest.raises(ValueError, match=why):
                store.queue_start(bad, env_keys=(), cwd=None, pid_start_time=None)
        with pytest.raises(ValueError, match="strings"):
            store.queue_start(running(), env_keys=[1], cwd=None, pid_start_time=None)  # type: ignore[list-item]
        before = store.transactions
        await store.flush()
        assert store.transactions == before + 1
        assert queued.done
        assert queued.error is None
        assert await by_id(store) == {info.id: StoredJob(info, ("KEY_é",), "/tmp/dïr\udcfe", 9, 0)}


async def _reload(path: Path) -> list[StoredJob]:
    async with await SqliteJobStore.open(path) as store:
        return await store.load_all()


async def test_env_values_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    secret = "hunter2-SECRET-value"
    async with await SqliteJobStore.open(path) as store:
        env = {"API_TOKEN": secret, "OTHER": secret + "2"}
        await start(store, running(), env_keys=env)
        (job,) = await store.load_all()
        assert job.env_keys == ("API_TOKEN", "OTHER")
        on_disk = b"".join(files(tmp_path).values())
        assert secret.encode() not in on_disk
        assert b"API_TOKEN" in on_disk
    assert secret.encode() not in path.read_bytes()


async def test_record_end_writes_the_end(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        info = running()
        await start(store, info, pid_start_time=77)
        end = ended(
            info,
            state=JobState.KILLED,
            exit_code=None,
            signal=15,
            ended_at=T0 + timedelta(seconds=3),
            output_bytes=500,
            output_start=100,
            oom_killed=True,
            usage=Usage(0.5, 1 << 20),
        )
        await store.record_end(end, dropped_bytes=42)
        (job,) = await store.load_all()
        assert job.info == end
        assert job.dropped_bytes == 42
        assert job.pid_start_time == 77


async def test_queued_ends_go_out_with_the_next_transaction(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        infos = [running() for _ in range(3)]
        # Queued after its start, in the same transaction: the start goes first.
        first = store.queue_start(infos[0], env_keys=(), cwd=None, pid_start_time=None)
        for info in infos[1:]:
            await start(store, info)
        ends = [ended(info, output_bytes=9) for info in infos]
        writes = [store.queue_end(end, dropped_bytes=3) for end in ends]
        unknown = store.queue_end(ended(running()))
        assert not any(w.done for w in writes)
        before = store.transactions
        await store.flush()
        assert store.transactions == before + 1
        assert first.done
        assert first.error is None
        assert all(w.done and w.error is None for w in writes)
        assert unknown.done
        assert isinstance(unknown.error, JobNotFound)
        stored = await by_id(store)
        assert [stored[e.id].info for e in ends] == ends
        assert {stored[e.id].dropped_bytes for e in ends} == {3}
        with pytest.raises(ValueError, match="ended job"):
            store.queue_end(infos[0])


async def test_write_mistakes_are_reported_per_call(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        info = running()
        await start(store, info)
        with pytest.raises(ValueError, match="already recorded"):
            await start(store, info)
        with pytest.raises(JobNotFound):
            await store.record_end(ended(running()))
        with pytest.raises(ValueError, match="ended job"):
            await store.record_end(info)
        with pytest.raises(ValueError, match="no ended_at"):
            await start(store, running(state=JobState.LOST))
        with pytest.raises(ValueError, match="naive"):
            await start(store, running(started_at=datetime(2025, 1, 1)))
        with pytest.raises(JobNotFound):
            await store.record_spawned("nope", 1, 2)

        # One bad call in a batch does not sink the others sharing its transaction.
        others = [running() for _ in range(5)]
        errors: list[Exception] = []

        async def duplicate() -> None:
            try:
                await start(store, info)
            except ValueError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for other in others[:2]:
                nursery.start_soon(start, store, other)
            nursery.start_soon(duplicate)
            for other in others[2:]:
                nursery.start_soon(start, store, other)
        assert len(errors) == 1
        assert set(await by_id(store)) == {info.id, *(o.id for o in others)}


async def test_record_before_spawn_then_spawned(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        info = running(pid=None)
        await start(store, info)
        assert (await store.load_all())[0].info.pid is None
        await store.record_spawned(info.id, 555, 12345)
        (job,) = await store.load_all()
        assert (job.info.pid, job.pid_start_time) == (555, 12345)


async def test_a_noted_pid_rides_along_with_the_next_commit(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with await SqliteJobStore.open(path) as store:
        first, second, done = running(pid=None), running(pid=None), running(pid=None)
        for info in (first, second, done):
            await start(store, info)
        store.note_spawned(first.id, 555, 12345)
        with closing(sqlite3.connect(path)) as other:  # noted only: not written yet
            assert other.execute("SELECT count(pid) FROM jobs").fetchone() == (0,)
        before = store.transactions
        await start(store, running())  # the next commit of any kind carries it
        assert store.transactions == before + 1
        with closing(sqlite3.connect(path)) as other:
            assert other.execute(
                "SELECT pid, pid_start_time FROM jobs WHERE id = ?", (first.id,)
            ).fetchone() == (555, 12345)
        # A job that has ended keeps the pid its end wrote.
        await store.record_end(ended(done, pid=7))
        store.note_spawned(done.id, 8, 1)
        # A failed commit keeps the note for the next one.
        store.note_spawned(second.id, 666, 1)
        store._conn.execute("PRAGMA query_only = 1")
        with pytest.raises(StateDirError):
            await start(store, running())
        store._conn.execute("PRAGMA query_only = 0")
        await store.flush()
        jobs = await by_id(store)
        assert (jobs[second.id].info.pid, jobs[second.id].pid_start_time) == (666, 1)
        assert jobs[done.id].info.pid == 7


async def test_a_lone_record_is_a_transaction_of_its_own(tmp_path: Path) -> None:
    # A batch of one start or one end runs without BEGIN/COMMIT (one statement is its own
    # transaction); it must succeed, fail and be refused as it does within one.
    path = tmp_path / "jobs.db"
    async with await SqliteJobStore.open(path) as store:
        info = running()
        write = store.queue_start(info, env_keys=["HOME"], cwd="/srv", pid_start_time=7)
        await store.flush()
        assert (write.done, write.error) == (True, None)
        with closing(sqlite3.connect(path)) as other:  # committed: another reader sees it
            assert other.execute("SELECT id FROM jobs").fetchall() == [(info.id,)]
        again = store.queue_start(info, env_keys=[], cwd=None, pid_start_time=None)
        await store.flush()
        assert isinstance(again.error, ValueError)
        assert "already recorded" in str(again.error)
        missing = store.queue_end(ended(running()))
        await store.flush()
        assert isinstance(missing.error, JobNotFound)
        before = store.transactions
        store._conn.execute("PRAGMA query_only = 1")
        refused = store.queue_start(running(), env_keys=[], cwd=None, pid_start_time=None)
        with pytest.raises(StateDirError):
            await store.flush()
        assert isinstance(refused.error, StateDirError)
        end = store.queue_end(ended(info))
        with pytest.raises(StateDirError):
            await store.flush()
        assert isinstance(end.error, StateDirError)
        assert store.transactions == before
        store._conn.execute("PRAGMA query_only = 0")
        await store.record_end(ended(info))
        assert [j.info for j in await store.load_all()] == [ended(info)]


class _Steps(trio.abc.Instrument):
    """Counts the steps of each task."""

    def __init__(self) -> None:
        self.steps: dict[trio.lowlevel.Task, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task] = self.steps.get(task, 0) + 1


async def test_a_flush_with_none_in_flight_starts_its_transaction_at_once(tmp_path: Path) -> None:
    # The committer's flush: what it commits was queued before the call, so it takes no
    # turn of the loop before the thread's call (a lock's acquire would be one): one step
    # to start it, one when it is done. Behind a transaction in flight, it waits for it.
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        counter = _Steps()
        flushed: list[trio.lowlevel.Task] = []

        async def flush() -> None:
            flushed.append(trio.lowlevel.current_task())
            await store.flush()

        first = store.queue_start(running(), env_keys=[], cwd=None, pid_start_time=None)
        trio.lowlevel.add_instrument(counter)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush)
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert (first.done, first.error) == (True, None)
        assert counter.steps[flushed[0]] == 2

        # Behind another transaction: it waits, then commits what was queued meanwhile.
        second = store.queue_start(running(), env_keys=[], cwd=None, pid_start_time=None)
        async with trio.open_nursery() as nursery, store._lock:
            nursery.start_soon(store.flush)
            await trio.testing.wait_all_tasks_blocked()
            assert not second.done
        assert (second.done, second.error) == (True, None)
        assert len(await store.load_all()) == 2


async def test_the_stores_thread_call_returns_raises_and_is_not_abandoned() -> None:
    # The store's own round trip through trio's thread cache (_in_thread): its result, its
    # exception, and a cancel that waits for the thread instead of leaving it running.
    assert await _in_thread(lambda: threading.current_thread() is not threading.main_thread())
    with pytest.raises(ZeroDivisionError):
        await _in_thread(lambda: 1 // 0)
    done = threading.Event()

    def slow() -> str:
        time.sleep(0.05)
        done.set()
        return "finished"

    with trio.CancelScope() as scope:
        scope.cancel()
        assert await _in_thread(slow) == "finished"
        assert done.is_set()
        await trio.lowlevel.checkpoint()
    assert scope.cancelled_caught


# -- output counters -------------------------------------------------------------


async def test_output_counters_only_grow(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        info = running()
        await start(store, info)
        await store.update_output(info.id, 100, 0, 0)
        await store.update_output(info.id, 50, 0, 0)  # stale: ignored
        job = (await store.load_all())[0]
        assert (job.info.output_bytes, job.info.output_start, job.dropped_bytes) == (100, 0, 0)

        store.note_output(info.id, 300, 10, 5)
        store.note_output(info.id, 200, 20, 1)  # merged with the pending note: max of each
        store.note_output("unknown-job", 1, 1, 1)  # ignored, not an error
        before = store.transactions
        await store.flush()
        assert store.transactions == before + 1
        await store.flush()  # nothing pending: no transaction
        assert store.transactions == before + 1
        job = (await store.load_all())[0]
        assert (job.info.output_bytes, job.info.output_start, job.dropped_bytes) == (300, 20, 5)

        # A note still pending when the end is written cannot move the end backwards.
        store.note_output(info.id, 301, 20, 5)
        await store.record_end(ended(info, output_bytes=400, output_start=30), dropped_bytes=6)
        store.note_output(info.id, 350, 25, 5)
        job = (await store.load_all())[0]
        assert (job.info.output_bytes, job.info.output_start, job.dropped_bytes) == (400, 30, 6)


async def test_notes_ride_along_with_other_writes(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    async with await SqliteJobStore.open(path) as store:
        info = running()
        await start(store, info)
        store.note_output(info.id, 77, 0, 0)
        await start(store, running())
        with closing(sqlite3.connect(path)) as other:
            assert other.execute("SELECT max(output_bytes) FROM jobs").fetchone() == (77,)
        store.note_output(info.id, 99, 0, 0)
    # aclose wrote the last note
    assert {j.info.output_bytes for j in await _reload(path)} == {99, 0}


# -- recovery and retention ----------------------------------------------------------


async def test_mark_lost_only_touches_running_jobs(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        live = [running() for _ in range(3)]
        done = ended(running())
        for info in [*live, done]:
            await start(store, info)
        at = T0 + timedelta(hours=1)
        changed = await store.mark_lost(
            [live[0].id, live[1].id, done.id, "missing"], "the server stopped while it ran", at
        )
        assert changed == 2
        jobs = await by_id(store)
        for info in live[:2]:
            assert jobs[info.id].info == dataclasses.replace(
                info, state=JobState.LOST, error="the server stopped while it ran", ended_at=at
            )
        assert jobs[live[2].id].info == live[2]
        assert jobs[done.id].info == done
        assert await store.mark_lost([live[0].id], "again", at) == 0


async def test_retention_by_count_and_age(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        # Ended one minute apart, recorded in shuffled order: order is by end, not id.
        order = [3, 0, 4, 1, 2]
        jobs = {i: ended(running(), ended_at=T0 + timedelta(minutes=i)) for i in order}
        for i in order:
            await start(store, jobs[i])
        await start(store, running())  # running: never selected

        def ids(*minutes: int) -> list[str]:
            return [jobs[i].id for i in minutes]

        now = T0 + timedelta(minutes=10)
        sel = store.ended_for_retention
        assert await sel(keep_count=None, max_age=None, now=now) == []
        assert await sel(keep_count=2, max_age=None, now=now) == ids(0, 1, 2)
        assert await sel(keep_count=0, max_age=None, now=now) == ids(0, 1, 2, 3, 4)
        assert await sel(keep_count=99, max_age=None, now=now) == []
        # ended at minute 3 is exactly 7 minutes old: kept; strictly older goes
        assert await sel(keep_count=None, max_age=timedelta(minutes=7), now=now) == ids(0, 1, 2)
        assert await sel(keep_count=None, max_age=timedelta(0), now=now) == ids(0, 1, 2, 3, 4)
        # both caps: the union, oldest first
        assert await sel(keep_count=4, max_age=timedelta(minutes=8), now=now) == ids(0, 1)
        assert await sel(keep_count=1, max_age=timedelta(minutes=8), now=now) == ids(0, 1, 2, 3)
        # a non-UTC "now" is the same instant
        cet = now.astimezone(timezone(timedelta(hours=1)))
        assert await sel(keep_count=None, max_age=timedelta(minutes=7), now=cet) == ids(0, 1, 2)
        with pytest.raises(ValueError, match="keep_count"):
            await sel(keep_count=-1, max_age=None, now=now)
        with pytest.raises(ValueError, match="max_age"):
            await sel(keep_count=None, max_age=timedelta(seconds=-1), now=now)

        assert await store.delete(ids(0, 1, 2)) == 3
        assert await sel(keep_count=2, max_age=None, now=now) == []
        assert len(await store.load_all()) == 3


async def test_delete_many(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        infos = [running() for _ in range(1203)]
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(start, store, info)
        assert await store.delete([i.id for i in infos[:1201]] + ["missing"]) == 1201
        assert [j.info.id for j in await store.load_all()] == sorted(i.id for i in infos[1201:])
        assert await store.delete([]) == 0


# -- the file -------------------------------------------------------------------------


async def test_wal_mode_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    store = await SqliteJobStore.open(path)
    info = running()
    await start(store, info)
    assert store.journal_mode == "wal"
    assert exists(f"{path}-wal")
    with closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert other.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert other.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert other.execute("SELECT id FROM jobs").fetchall() == [(info.id,)]
        indexes = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "jobs_by_end" in indexes
        assert "jobs_by_owner" not in indexes  # no query used it
    assert await store._submit(lambda c: c.execute("PRAGMA synchronous").fetchone()) == (1,)
    await store.aclose()
    await store.aclose()  # idempotent
    assert not exists(f"{path}-wal")  # checkpointed on close
    with pytest.raises(trio.ClosedResourceError):
        await store.load_all()
    assert [j.info for j in await _reload(path)] == [info]


async def test_empty_file_is_a_fresh_store(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.touch()
    async with await SqliteJobStore.open(path) as store:
        assert await store.load_all() == []
        await start(store, running())
    assert len(await _reload(path)) == 1


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE foo (x)")
        conn.execute("INSERT INTO foo VALUES (1)")
    conn.close()


def _foreign_wal(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE jobs (id)")  # even a table with our name
    conn.commit()
    conn.close()


def _ours(path: Path) -> None:
    async def fill() -> None:
        async with await SqliteJobStore.open(path) as store, trio.open_nursery() as nursery:
            for _ in range(400):
                nursery.start_soon(start, store, running(args=("x" * 300,)))

    trio.run(fill)


def _truncated(path: Path) -> None:
    _ours(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_header(path: Path) -> None:
    _ours(path)
    path.write_bytes(path.read_bytes()[:50])


def _newer(path: Path) -> None:
    _ours(path)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def _flipped(path: Path) -> None:
    _ours(path)
    data = bytearray(path.read_bytes())
    for at in range(4096, len(data), 4096):  # overwrite every page header after the first
        data[at : at + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_garbage, "not an SQLite database"),
        (_foreign, "another application"),
        (_foreign_wal, "another application"),
        (_truncated, "corrupt"),
        (_truncated_header, "not an SQLite database"),
        (_newer, "newer trio-worker"),
        (_flipped, "corrupt"),
        (_directory, "not a regular file"),
    ],
)
async def test_unusable_file_is_refused_and_left_untouched(
    tmp_path: Path, make: Callable[[Path], None], reason: str
) -> None:
    path = tmp_path / "jobs.db"
    await trio.to_thread.run_sync(make, path)
    before = files(tmp_path)
    with pytest.raises(StateDirError, match=reason) as caught:
        await SqliteJobStore.open(path)
    assert str(path) in str(caught.value)
    assert "untouched" in str(caught.value)
    after = files(tmp_path)
    assert after == before  # byte-identical, and no -wal/-shm left behind


async def test_newer_schema_message_names_both_versions(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    await trio.to_thread.run_sync(_newer, path)
    with pytest.raises(StateDirError) as caught:
        await SqliteJobStore.open(path)
    message = str(caught.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert f"reads up to {SCHEMA_VERSION}" in message


async def test_a_damaged_row_is_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    info = running()
    async with await SqliteJobStore.open(path) as store:
        await start(store, info)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET args = 'not json'")
    conn.close()
    async with await SqliteJobStore.open(path) as store:
        with pytest.raises(StateDirError, match=info.id) as caught:
            await store.load_all()
        assert str(path) in str(caught.value)


_CRASH_CHILD = """
import os, sys, trio
from datetime import UTC, datetime
from trio_worker import JobInfo, JobState
from trio_worker._jobs._store import SqliteJobStore

async def main():
    store = await SqliteJobStore.open(sys.argv[1])
    for i in range(50):
        info = JobInfo(id=f"JOB{i:04d}", owner="o", command="c", args=(), state=JobState.RUNNING,
                       pid=i, exit_code=None, signal=None, error="",
                       started_at=datetime.now(UTC), ended_at=None, output_bytes=0)
        await store.record_start(info, env_keys=(), cwd=None, pid_start_time=None)
    print("recorded", flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_committed_records_survive_a_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    root = ROOT
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CRASH_CHILD, str(path)],
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert child.stdout is not None
    with trio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            data = await child.stdout.receive_some()
            assert data, f"the child died: {line!r}"
            line += data
    assert line == b"recorded\n"
    child.send_signal(signal.SIGKILL)
    await child.wait()
    await child.stdout.aclose()
    assert exists(f"{path}-wal")  # nothing was checkpointed: recovery reads the WAL
    jobs = await _reload(path)
    assert [j.info.id for j in jobs] == [f"JOB{i:04d}" for i in range(50)]


async def test_a_full_disk_fails_the_batch_and_the_store_recovers(tmp_path: Path) -> None:
    """SQLITE_FULL, provoked with max_page_count (what a full filesystem looks like to SQLite)."""
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        kept = running()
        await start(store, kept)
        pages = await store._submit(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
        await store._submit(lambda c: c.execute(f"PRAGMA max_page_count = {pages}"))
        big = [running(args=("x" * 20_000,)) for _ in range(5)]
        failures: list[StateDirError] = []

        async def try_start(info: JobInfo) -> None:
            try:
                await start(store, info)
            except StateDirError as exc:
                failures.append(exc)

        store.note_output(kept.id, 10, 0, 0)
        async with trio.open_nursery() as nursery:
            for info in big:
                nursery.start_soon(try_start, info)
        assert len(failures) == 5  # one batch, one failure for all its calls
        assert "full" in str(failures[0])
        assert str(tmp_path / "jobs.db") in str(failures[0])
        assert [j.info.id for j in await store.load_all()] == [kept.id]
        await store._submit(lambda c: c.execute("PRAGMA max_page_count = 1000000"))
        await store.flush()  # the note that failed with the batch was kept for the next one
        (job,) = await store.load_all()
        assert job.info.output_bytes == 10
        await start(store, big[0])
        assert len(await store.load_all()) == 2


@pytest.mark.root
async def test_a_commit_that_finds_the_disk_full_goes_in_the_reserves_room(tmp_path: Path) -> None:
    # Records queued without waiting (Starts answered first) met a full disk: the batch
    # was refused and the records waited in memory, lost to a crash until the disk had
    # room. The store's reserve is given up for that commit instead; the next one the
    # full disk refuses is refused; the reserve comes back once there is room.
    with small_tmpfs(tmp_path / "disk", "size=4m") as disk:
        reserve = disk / "jobs.db-reserve"
        async with await SqliteJobStore.open(disk / "jobs.db") as store:
            assert store.reserved
            assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES
            await start(store, running())
            filler = fill(disk)
            queued = [running(args=(str(n),)) for n in range(20)]
            writes = [
                store.queue_start(i, env_keys=[], cwd=None, pid_start_time=None) for i in queued
            ]
            await store.flush()
            assert [(w.done, w.error) for w in writes] == [(True, None)] * 20
            assert not store.reserved
            assert not reserve.exists()
            refill = fill(disk)  # (the reserve's room, but what the commit took)
            big = running(args=("x" * 20_000,))  # pages the WAL has no room for
            with pytest.raises(StateDirError, match="full"):
                await start(store, big)
            assert not await store.reserve()  # no room for it yet
            assert not reserve.exists()
            filler.unlink()
            refill.unlink()
            assert await store.reserve()
            assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES
            await start(store, big)
        async with await SqliteJobStore.open(disk / "jobs.db") as store:
            assert store.reserved  # (the file kept from the last run)
            assert {j.info.id for j in await store.load_all()} >= {i.id for i in queued}


@pytest.mark.root
async def test_on_a_full_disk_the_store_opens_without_its_reserve_or_says_the_disk_is_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Room for the database's -shm but not for the reserve: it opens, with no reserve
    # (each Start then commits its record first), and says so in one line. No room at
    # all: the read-only check cannot make its -shm. That was "corrupt or not an SQLite
    # database (disk I/O error) ... move it away": advice that throws the records away.
    with small_tmpfs(tmp_path / "disk", "size=4m") as disk:
        db = disk / "jobs.db"
        async with await SqliteJobStore.open(db) as store:
            await start(store, running())
        (disk / "jobs.db-reserve").unlink()
        filler = fill(disk)
        os.truncate(filler, filler.stat().st_size - 256 * 1024)
        async with await SqliteJobStore.open(db) as store:
            assert not store.reserved
            assert len(await store.load_all()) == 1
        said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(said) == 1, said
        assert said[0].startswith("cannot keep the job database's reserve (1024 KiB)"), said
        assert "No space left on device" in said[0]
        fill(disk)
        before = db.read_bytes()
        with pytest.raises(StateDirError) as refused:
            await SqliteJobStore.open(db)
        assert str(refused.value).startswith(f"cannot read the job database {db} (")
        assert str(refused.value).endswith("): is its disk full?")
        assert db.read_bytes() == before
        filler.unlink()
        async with await SqliteJobStore.open(db) as store:
            assert store.reserved
            assert len(await store.load_all()) == 1


# -- concurrency ---------------------------------------------------------------------


async def test_many_tasks_are_serialized_and_batched(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        infos = [running(args=(str(n),)) for n in range(300)]
        threads: set[int] = set()

        async def one_job(info: JobInfo) -> None:
            await start(store, info, env_keys=[f"K{info.args[0]}"])
            for size in range(1, 4):
                await store.update_output(info.id, size * 10, 0, 0)
                await trio.lowlevel.checkpoint()
            await store.record_end(ended(info, output_bytes=int(info.args[0])))

        async def reader() -> None:
            for _ in range(20):
                jobs = await store.load_all()
                threads.add(await store._submit(lambda c: threading.get_ident()))
                for job in jobs:  # every record read is whole: a start, or an end
                    assert job.info.state in (JobState.RUNNING, JobState.EXITED)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(one_job, info)
            for _ in range(3):
                nursery.start_soon(reader)

        jobs = await by_id(store)
        assert len(jobs) == 300
        for info in infos:
            job = jobs[info.id]
            assert job.info.state is JobState.EXITED
            assert job.info.output_bytes == max(30, int(info.args[0]))
            assert job.env_keys == (f"K{info.args[0]}",)
        # 300 * 5 writes + 120 reads went through far fewer transactions
        assert store.transactions < 300
        assert threading.get_ident() not in threads  # sqlite never ran on the event loop


async def test_cancelled_callers_leave_the_store_consistent(tmp_path: Path) -> None:
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        infos = [running() for _ in range(200)]
        with trio.move_on_after(0.0005):
            async with trio.open_nursery() as nursery:
                for info in infos:
                    nursery.start_soon(start, store, info)
                    await trio.lowlevel.checkpoint()
        recorded = await by_id(store)
        assert set(recorded) <= {i.id for i in infos}
        for job in recorded.values():
            assert job.info in infos
        # still usable afterwards
        extra = running()
        await start(store, extra)
        assert extra.id in await by_id(store)


# -- a model-based check ---------------------------------------------------------------


@dataclasses.dataclass
class Start:
    command: str
    args: list[str]
    keys: list[str]
    at: datetime
    failed: bool


@dataclasses.dataclass
class End:
    n: int
    code: int
    at: datetime
    size: int
    dropped: int


@dataclasses.dataclass
class Output:
    n: int
    size: int
    first: int
    dropped: int
    buffered: bool


@dataclasses.dataclass
class Lose:
    ns: list[int]
    error: str
    at: datetime


@dataclasses.dataclass
class Delete:
    ns: list[int]


@dataclasses.dataclass
class Reopen:
    pass


Op = Start | End | Output | Lose | Delete | Reopen

_TEXT = st.text(st.characters(exclude_categories=()), max_size=8)
_TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
_N = st.integers(0, 30)
_OPS = st.lists(
    st.one_of(
        st.builds(Start, _TEXT, st.lists(_TEXT, max_size=3), st.lists(_TEXT, max_size=3), _TIMES,
                  st.booleans()),
        st.builds(End, _N, st.integers(-64, 255), _TIMES, st.integers(0, 2**50),
                  st.integers(0, 1000)),
        st.builds(Output, _N, st.integers(0, 2**50), st.integers(0, 2**40),
                  st.integers(0, 2**30), st.booleans()),
        st.builds(Lose, st.lists(_N, max_size=4), _TEXT, _TIMES),
        st.builds(Delete, st.lists(_N, max_size=3)),
        st.just(Reopen()),
    ),
    max_size=25,
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS)
def test_store_matches_a_dict_model(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        trio.run(_run_model, Path(directory) / "jobs.db", ops)


def _grow(job: StoredJob, size: int, first: int, dropped: int) -> StoredJob:
    """The model of the counters: each only grows."""
    info = dataclasses.replace(
        job.info,
        output_bytes=max(job.info.output_bytes, size),
        output_start=max(job.info.output_start, first),
    )
    return dataclasses.replace(job, info=info, dropped_bytes=max(job.dropped_bytes, dropped))


async def _run_model(path: Path, ops: list[Op]) -> None:
    model: dict[str, StoredJob] = {}
    created: list[str] = []  # ids in creation order, deleted ones included

    def pick(ns: list[int]) -> list[str]:
        return [created[n % len(created)] for n in ns] if created else []

    store = await SqliteJobStore.open(path)
    try:
        for op in ops:
            if isinstance(op, Start):
                info = running(command=op.command, args=tuple(op.args), started_at=op.at)
                if op.failed:
                    info = dataclasses.replace(
                        info, state=JobState.FAILED, pid=None, ended_at=op.at, error="no",
                        spawn_errno=2,
                    )  # fmt: skip
                await store.record_start(info, env_keys=op.keys, cwd=op.command, pid_start_time=9)
                model[info.id] = StoredJob(info, tuple(op.keys), op.command, 9, 0)
                created.append(info.id)
            elif isinstance(op, End):
                for job_id in pick([op.n]):
                    if job_id not in model or model[job_id].info.ended:
                        continue
                    end = ended(
                        model[job_id].info,
                        state=JobState.EXITED if op.code >= 0 else JobState.KILLED,
                        exit_code=op.code if op.code >= 0 else None,
                        signal=None if op.code >= 0 else -op.code,
                        ended_at=op.at,
                    )
                    await store.record_end(
                        dataclasses.replace(end, output_bytes=op.size), dropped_bytes=op.dropped
                    )
                    model[job_id] = _grow(
                        dataclasses.replace(model[job_id], info=end), op.size, 0, op.dropped
                    )
            elif isinstance(op, Output):
                for job_id in pick([op.n]):
                    if op.buffered:
                        store.note_output(job_id, op.size, op.first, op.dropped)
                    else:
                        await store.update_output(job_id, op.size, op.first, op.dropped)
                    if job_id in model:
                        model[job_id] = _grow(model[job_id], op.size, op.first, op.dropped)
            elif isinstance(op, Lose):
                ids = pick(op.ns)
                expected = {i for i in ids if i in model and not model[i].info.ended}
                assert await store.mark_lost(ids, op.error, op.at) == len(expected)
                for i in expected:
                    lost = dataclasses.replace(
                        model[i].info, state=JobState.LOST, error=op.error, ended_at=op.at
                    )
                    model[i] = dataclasses.replace(model[i], info=lost)
            elif isinstance(op, Delete):
                ids = pick(op.ns)
                assert await store.delete(ids) == len(set(ids) & set(model))
                for i in ids:
                    model.pop(i, None)
            else:
                await store.aclose()
                store = await SqliteJobStore.open(path)
            assert await store.load_all() == [model[i] for i in sorted(model)]
    finally:
        await store.aclose()
    assert await _reload(path) == [model[i] for i in sorted(model)]


# -- process start time ------------------------------------------------------------------


def test_process_start_time(tmp_path: Path) -> None:
    mine = process_start_time(os.getpid())
    assert isinstance(mine, int)
    assert mine > 0
    assert process_start_time(os.getpid()) == mine
    # A command name with spaces and parentheses does not confuse the parser.
    odd = tmp_path / "a) b (c"
    odd.write_bytes(Path("/bin/sleep").read_bytes())
    odd.chmod(0o755)
    child = subprocess.Popen([str(odd), "30"])
    try:
        started = process_start_time(child.pid)
        assert started is not None
        assert started >= mine
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert "(a) b (c)" in stat
    finally:
        child.kill()
        child.wait()
    assert process_start_time(child.pid) is None


async def test_user_round_trips(tmp_path: Path) -> None:
    info = running(user="build")
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        await start(store, info)
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        assert (await by_id(store))[info.id].info.user == "build"


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    """Version 1 had no run_as column: it is added (empty for old jobs) in place."""
    path = tmp_path / "jobs.db"
    info = running()
    async with await SqliteJobStore.open(path) as store:
        await start(store, info)
    with closing(sqlite3.connect(path)) as conn:  # make it what version 1 wrote
        conn.executescript(
            "ALTER TABLE jobs DROP COLUMN tty; ALTER TABLE jobs DROP COLUMN stdin;"
            "ALTER TABLE jobs DROP COLUMN run_as; PRAGMA user_version = 1;"
        )
    async with await SqliteJobStore.open(path) as store:
        assert (await by_id(store))[info.id].info.user == ""
        later = running(user="alice")
        await start(store, later)
        assert (await by_id(store))[later.id].info.user == "alice"
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    assert columns[-3:] == ["run_as", "stdin", "tty"]


async def test_the_unused_owner_index_of_older_files_is_dropped(tmp_path: Path) -> None:
    """Files made before kept an index by owner that no query read: it goes, the jobs stay."""
    path = tmp_path / "jobs.db"
    info = running()
    async with await SqliteJobStore.open(path) as store:
        await start(store, info)
    with closing(sqlite3.connect(path)) as conn:  # what the file held before
        conn.execute("CREATE INDEX jobs_by_owner ON jobs (owner, id)")
    async with await SqliteJobStore.open(path) as store:
        assert [j.info for j in await store.load_all()] == [info]
        await start(store, running())
    with closing(sqlite3.connect(path)) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert "jobs_by_owner" not in names
    assert {"jobs", "jobs_by_end"} <= names


async def test_stdin_and_tty_round_trip(tmp_path: Path) -> None:
    """A restarted server still knows which jobs had stdin or a terminal."""
    piped, terminal, plain = running(stdin=True), running(stdin=True, tty=True), running()
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        for info in (piped, terminal, plain):
            await start(store, info)
    async with await SqliteJobStore.open(tmp_path / "jobs.db") as store:
        stored = await by_id(store)
    assert [(stored[i.id].info.stdin, stored[i.id].info.tty) for i in (piped, terminal, plain)] == [
        (True, False),
        (True, True),
        (False, False),
    ]


async def test_a_version_2_database_is_migrated(tmp_path: Path) -> None:
    """Version 2 had no stdin/tty columns: they are added (false for old jobs) in place."""
    path = tmp_path / "jobs.db"
    info = running(user="alice")
    async with await SqliteJobStore.open(path) as store:
        await start(store, info)
    with closing(sqlite3.connect(path)) as conn:  # make it what version 2 wrote
        conn.executescript(
            "ALTER TABLE jobs DROP COLUMN tty; ALTER TABLE jobs DROP COLUMN stdin;"
            "PRAGMA user_version = 2;"
        )
    async with await SqliteJobStore.open(path) as store:
        old = (await by_id(store))[info.id].info
        assert (old.user, old.stdin, old.tty) == ("alice", False, False)
        later = running(stdin=True, tty=True)
        await start(store, later)
        assert (await by_id(store))[later.id].info.tty
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# -- rows ----------------------------------------------------------------------------


_LIMITS = st.builds(
    Limits,
    cpus=st.one_of(st.floats(0, 64), st.integers(0, 64)),
    memory_bytes=st.integers(0, 2**63),
    pids=st.integers(0, 2**20),
)


@settings(max_examples=100, deadline=None)
@given(
    args=st.lists(_TEXT, max_size=4),
    keys=st.lists(_TEXT, max_size=4),
    limits=st.lists(_LIMITS, min_size=1, max_size=3),
    isolation=st.builds(Isolation),
)
@example(args=[], keys=[], limits=[Limits(cpus=0), Limits(cpus=0.0)], isolation=Isolation())
def test_a_rows_json_is_its_values_whatever_the_encoder_kept(
    args: list[str], keys: list[str], limits: list[Limits], isolation: Isolation
) -> None:
    # The encoder keeps the JSON of limits, isolation and env keys it made before; a row
    # must still say exactly this job's values (0 and 0.0 are equal, but not as JSON).
    encoder = _Encoder()
    for kept in limits:
        encoder.start_row(running(limits=kept), ["OTHER"], None, None)
    info = running(args=tuple(args), limits=limits[-1], isolation=isolation)
    row = encoder.start_row(info, keys, None, None)
    assert row[3] == _json(args)
    assert row[4] == _json(keys)
    assert row[6] == _json(dataclasses.asdict(limits[-1]))
    assert row[7] == _json(dataclasses.asdict(isolation))
    assert row == _Encoder().start_row(info, keys, None, None)
