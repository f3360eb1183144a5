"""Job records that outlive the server: a small store interface and its SQLite backend.

The supervisor keeps its live view of jobs in memory; the store is the copy on
disk that a restarted server recovers from. It holds one row per job, written
when the job starts and when it ends, plus output counters updated on the way.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A commit
is an append to the WAL through the OS page cache, with no fsync, so a commit
that returned survives the *server* crashing (SIGKILL, OOM kill, a bug). If the
*machine* loses power, the last commits before it may be lost (fsyncs happen
only at WAL checkpoints), but the file stays consistent. That is the trade we
want: jobs die with the machine anyway, and their output logs are not fsynced
either.

Every call runs on one dedicated connection in a worker thread (trio's thread
cache, one call at a time: ``_threads.in_thread``), never on the event loop. Calls use
*group commit*: each caller queues its operation, and whoever holds the lock runs
everything queued so far in one transaction (one thread round trip, one WAL
append): a burst of 1,000 records from 1,000 tasks shares one transaction instead
of costing 1,000; a lone start or end is one statement, its own transaction.
``queue_start`` does not even wait: the supervisor queues a new job's record and
answers the Start, and its committer task commits what was queued right after (see
``_jobs/_records``).
Output counters are cheaper still: ``note_output`` only buffers them, and they
ride along with the next transaction or ``flush``.

A full disk: the store keeps ``RESERVE_BYTES`` of it for itself, a file allocated
beside the database (``jobs.db-reserve``). A transaction the disk refuses for want of
room (``SQLITE_FULL``) gives the reserve up and is tried once more, at once, in the
room it held: the records of Starts already answered (queued, not yet committed) go
in. Until ``reserve`` makes it again (housekeeping, once the disk has room),
``reserved`` is False, and the supervisor commits each Start's record before its job
runs (``_jobs/_records``: ``JobRecords.refusing``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, Self, TypeVar, cast

import trio

from .._errors import JobNotFound, StateDirError
from .._model import Isolation, JobInfo, JobState, Limits, Usage
from ._threads import in_thread as _in_thread

__all__ = [
    "RESERVE_BYTES",
    "SCHEMA_VERSION",
    "JobStore",
    "Queued",
    "SqliteJobStore",
    "StoredJob",
    "disk_full",
    "process_start_time",
]

#: ``PRAGMA user_version`` of the schema this code writes. Bump it (and add a
#: migration in ``_migrate``) whenever the table changes.
SCHEMA_VERSION = 3
#: ``PRAGMA application_id`` ("twrk"): tells our database from another program's.
APPLICATION_ID = 0x7477726B

#: The room (bytes) the store keeps on its disk for the commit that finds it full: 256
#: WAL frames of 4 KiB, the records of ~2,500 Starts (a batch's inserts share their
#: pages) or ~250 ends (an update's page each). A batch larger than that is refused
#: as before; the room comes back when the disk has it (``SqliteJobStore.reserve``).
RESERVE_BYTES = 1 << 20

_log = logging.getLogger("trio_worker.supervisor")

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY NOT NULL,  -- ULID-like: sorts by creation
    owner             TEXT NOT NULL,
    command           TEXT NOT NULL,
    args              TEXT NOT NULL,              -- JSON array of strings
    env_keys          TEXT NOT NULL,              -- JSON array: keys only, never values
    cwd               TEXT,
    limits            TEXT NOT NULL,              -- JSON object (uint64 values fit)
    isolation         TEXT NOT NULL,              -- JSON object
    state             TEXT NOT NULL
        CHECK (state IN ('running', 'exited', 'killed', 'failed', 'lost')),
    pid               INTEGER,
    pid_start_time    INTEGER,                    -- /proc/PID/stat field 22
    exit_code         INTEGER,
    signal            INTEGER,
    error             TEXT NOT NULL,
    spawn_errno       INTEGER,
    started_at        TEXT NOT NULL,              -- ISO 8601 UTC, fixed width
    ended_at          TEXT,
    output_bytes      INTEGER NOT NULL,
    output_start      INTEGER NOT NULL,
    dropped_bytes     INTEGER NOT NULL,
    oom_killed        INTEGER NOT NULL,
    cpu_seconds       REAL,
    memory_peak_bytes INTEGER,
    run_as            TEXT NOT NULL DEFAULT '',   -- Job.user (version 2)
    stdin             INTEGER NOT NULL DEFAULT 0, -- Job.stdin (version 3)
    tty               INTEGER NOT NULL DEFAULT 0, -- Job.tty (version 3)
    CHECK ((state = 'running') = (ended_at IS NULL))
);
CREATE INDEX jobs_by_end ON jobs (ended_at, id) WHERE ended_at IS NOT NULL;
"""

_COLUMNS = (
    "id, owner, command, args, env_keys, cwd, limits, isolation, state, pid, pid_start_time,"
    " exit_code, signal, error, spawn_errno, started_at, ended_at, output_bytes, output_start,"
    " dropped_bytes, oom_killed, cpu_seconds, memory_peak_bytes, run_as, stdin, tty"
)
_INSERT = f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 26)})"
_END = """
UPDATE jobs SET state = ?, pid = ?, exit_code = ?, signal = ?, error = ?, spawn_errno = ?,
    ended_at = ?, output_bytes = max(output_bytes, ?), output_start = max(output_start, ?),
    dropped_bytes = max(dropped_bytes, ?), oom_killed = ?, cpu_seconds = ?,
    memory_peak_bytes = ?
WHERE id = ?
"""
_SPAWNED = "UPDATE jobs SET pid = ?, pid_start_time = ? WHERE id = ? AND state = 'running'"
_OUTPUT = """
UPDATE jobs SET output_bytes = max(output_bytes, ?), output_start = max(output_start, ?),
    dropped_bytes = max(dropped_bytes, ?)
WHERE id = ?
"""
#: Ids per statement when a call names many jobs (SQLite's variable limit).
_ID_BATCH = 500


@dataclass(frozen=True, slots=True)
class StoredJob:
    """One recovered record: the job as last written plus what only the store keeps.

    ``env_keys`` are the names of the variables the client set (the values may
    be secrets and are never stored); ``pid_start_time`` lets recovery tell the
    job's process from an unrelated one that reused its pid.
    """

    info: JobInfo
    env_keys: tuple[str, ...]
    cwd: str | None
    pid_start_time: int | None
    dropped_bytes: int = 0


#: Output counters waiting to be written: (output_bytes, output_start, dropped_bytes).
_Counters = tuple[int, int, int]


class JobStore(Protocol):
    """What the supervisor needs from a job store, so another database can replace SQLite.

    All methods are safe to call from many tasks at once. A call that returned
    has been committed; a call that was cancelled may or may not have been.
    """

    async def record_start(
        self,
        info: JobInfo,
        *,
        env_keys: Iterable[str],
        cwd: str | None,
        pid_start_time: int | None,
    ) -> None: ...

    def queue_start(
        self,
        info: JobInfo,
        *,
        env_keys: Iterable[str],
        cwd: str | None,
        pid_start_time: int | None,
    ) -> Queued: ...

    async def record_spawned(self, job_id: str, pid: int, pid_start_time: int | None) -> None: ...

    def note_spawned(self, job_id: str, pid: int, pid_start_time: int | None) -> None: ...

    async def record_end(self, info: JobInfo, *, dropped_bytes: int = 0) -> None: ...

    def queue_end(self, info: JobInfo, *, dropped_bytes: int = 0) -> Queued: ...

    def note_output(
        self, job_id: str, output_bytes: int, output_start: int, dropped_bytes: int
    ) -> None: ...

    async def update_output(
        self, job_id: str, output_bytes: int, output_start: int, dropped_bytes: int
    ) -> None: ...

    async def flush(self) -> None: ...

    @property
    def busy(self) -> bool: ...

    @property
    def reserved(self) -> bool: ...

    async def reserve(self) -> bool: ...

    async def load_all(self) -> list[StoredJob]: ...

    async def mark_lost(self, job_ids: Iterable[str], error: str, at: datetime) -> int: ...

    async def delete(self, job_ids: Iterable[str]) -> int: ...

    async def ended_for_retention(
        self,
        *,
        keep_count: int | None,
        max_age: timedelta | None,
        now: datetime | None = None,
    ) -> list[str]: ...

    async def aclose(self) -> None: ...


class Queued(Protocol):
    """A write queued without waiting (``queue_start``): read once ``done``."""

    @property
    def done(self) -> bool: ...

    @property
    def error(self) -> BaseException | None: ...


class _Op(Generic[_T]):
    """One queued call: run in the writer thread, its outcome read back by its caller."""

    __slots__ = ("done", "error", "fn", "result", "single")

    def __init__(self, fn: Callable[[sqlite3.Connection], _T], *, single: bool = False) -> None:
        self.fn = fn
        #: ``fn`` writes with one statement (a start's insert, an end's update): the
        #: batch's only write needs no transaction around it (``_execute``).
        self.single = single
        self.done = False
        self.result: _T | None = None
        self.error: BaseException | None = None


class SqliteJobStore:
    """The embedded job store: one SQLite file, no server to install.

    Get one with ``await SqliteJobStore.open(path)``; use it as an async context
    manager or call ``aclose``. See the module docstring for what a returned
    call guarantees.
    """

    def __init__(
        self, path: Path, connection: sqlite3.Connection, journal_mode: str, *, reserved: bool
    ) -> None:
        """Use ``open``: this only wraps a connection that is already checked."""
        self.path = path
        #: The reserve's file (``RESERVE_BYTES``), while ``_reserved``.
        self._reserve_path = _reserve_path(path)
        #: Written by the writer's thread (a transaction that gave the reserve up) and
        #: by ``reserve``, each holding ``_lock``.
        self._reserved = reserved
        #: "wal" normally; a filesystem without shared memory may refuse WAL.
        self.journal_mode = journal_mode
        #: Transactions committed so far (tests and benchmarks watch batching).
        self.transactions = 0
        self._conn = connection
        self._lock = trio.Lock()
        self._queue: list[_Op[Any]] = []
        self._notes: dict[str, _Counters] = {}
        #: Pids noted for records written before their spawn: job id -> (pid, start time).
        self._spawned: dict[str, tuple[int, int | None]] = {}
        self._closed = False
        self._encoder = _Encoder()

    # -- opening -------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str]) -> Self:
        """Open (creating if missing) the job database at ``path``.

        Raises ``StateDirError`` naming the file if it is corrupt, belongs to
        another program or has a newer schema; such a file is never modified.
        """
        db_path = Path(os.fspath(path))
        db_path, connection, mode = await trio.to_thread.run_sync(_open_sync, db_path)
        failed = await trio.to_thread.run_sync(_make_reserve, _reserve_path(db_path))
        if failed is not None:
            _log.warning(
                "cannot keep the job database's reserve (%d KiB) beside it (%s): each "
                "Start writes its job's record before the job runs until it can",
                RESERVE_BYTES >> 10,
                failed.strerror or failed,
            )
        return cls(db_path, connection, mode, reserved=failed is None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Write everything still queued, then close (checkpointing the WAL).

        Shielded: closing is bounded and must finish even in a cancelled scope,
        or buffered counters would be lost.
        """
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            async with self._lock:
                await self._run_queue()
                await _in_thread(self._conn.close)

    # -- writes --------------------------------------------------------------

    async def record_start(
        self,
        info: JobInfo,
        *,
        env_keys: Iterable[str],
        cwd: str | None,
        pid_start_time: int | None,
    ) -> None:
        """Insert the job's record as it is now; returns once committed.

        Call it before telling anyone the job exists. A job that failed to
        spawn is recorded whole by this call alone (no ``record_end`` needed).
        ``env_keys`` may be the env mapping itself: only its keys are read.
        """
        keys = list(env_keys)
        _check_start(info, keys)
        await self._submit(
            _inserter(info, partial(self._encoder.start_row, info, keys, cwd, pid_start_time)),
            single=True,
        )

    def queue_start(
        self,
        info: JobInfo,
        *,
        env_keys: Iterable[str],
        cwd: str | None,
        pid_start_time: int | None,
    ) -> Queued:
        """``record_start`` without the wait: the insert is queued, no I/O, and goes
        out with the next transaction of any kind (``flush``, or another call's).

        Calls queued later (the job's end) run after it, in the same transaction
        or a later one. The returned handle says when it is ``done`` and its
        ``error`` (the transaction failed, or the row was rejected).
        """
        if self._closed:
            raise trio.ClosedResourceError("the job store is closed")
        keys = list(env_keys)
        _check_start(info, keys)  # a caller's mistake is raised here, not in the thread
        # The row itself (JSON texts, two times) is made in the writer's thread, off the
        # event loop's path of every Start.
        op = _Op(
            _inserter(info, partial(self._encoder.start_row, info, keys, cwd, pid_start_time)),
            single=True,
        )
        self._queue.append(op)
        return op

    async def record_spawned(self, job_id: str, pid: int, pid_start_time: int | None) -> None:
        """Set the pid of a job recorded before its spawn (RUNNING with no pid).

        Recording before spawning closes the window in which a crash would leave
        a process with no record; recovery treats RUNNING-without-pid as LOST.
        """

        def update(conn: sqlite3.Connection) -> None:
            cursor = conn.execute(
                "UPDATE jobs SET pid = ?, pid_start_time = ? WHERE id = ?",
                (pid, pid_start_time, job_id),
            )
            if cursor.rowcount == 0:
                raise JobNotFound(job_id)

        await self._submit(update)

    def note_spawned(self, job_id: str, pid: int, pid_start_time: int | None) -> None:
        """Buffer the pid of a job recorded before its spawn; no I/O.

        ``record_spawned`` without the wait: the pid goes out with the next commit of
        any kind (the next Start's record, or ``flush``), so a start costs the loop
        no second transaction. Until then a crash leaves the record RUNNING without
        a pid, which recovery makes LOST like a record whose spawn never completed;
        so only a caller that can kill the job without its pid (its cgroup) may
        defer the pid. A record that has ended already is left as it is.
        """
        self._spawned[job_id] = (pid, pid_start_time)

    async def record_end(self, info: JobInfo, *, dropped_bytes: int = 0) -> None:
        """Write the job's end (state, codes, times, counters, usage); returns once committed.

        Raises ``JobNotFound`` if the job was never recorded.
        """
        _check_end(info)
        await self._submit(_updater(info.id, partial(_end_row, info, dropped_bytes)), single=True)

    def queue_end(self, info: JobInfo, *, dropped_bytes: int = 0) -> Queued:
        """``record_end`` without the wait: the update is queued, no I/O, and goes out
        with the next transaction of any kind, after the calls queued before it (the
        job's start). The handle's ``error`` is ``JobNotFound`` if the job has no row."""
        if self._closed:
            raise trio.ClosedResourceError("the job store is closed")
        _check_end(info)  # a caller's mistake is raised here, not in the thread
        # The row (a time's text, ~15 us) is made in the writer's thread.
        op = _Op(_updater(info.id, partial(_end_row, info, dropped_bytes)), single=True)
        self._queue.append(op)
        return op

    def note_output(
        self, job_id: str, output_bytes: int, output_start: int, dropped_bytes: int
    ) -> None:
        """Buffer a job's output counters; no I/O, safe to call on every flush.

        They go out with the next commit of any kind (or ``flush``). The three
        counters only ever grow: the larger value wins, so a late, stale note
        can never move a record backwards.
        """
        old = self._notes.get(job_id)
        if old is not None:
            output_bytes = max(output_bytes, old[0])
            output_start = max(output_start, old[1])
            dropped_bytes = max(dropped_bytes, old[2])
        self._notes[job_id] = (output_bytes, output_start, dropped_bytes)

    async def update_output(
        self, job_id: str, output_bytes: int, output_start: int, dropped_bytes: int
    ) -> None:
        """``note_output`` then commit; calls from many tasks share one transaction."""
        self.note_output(job_id, output_bytes, output_start, dropped_bytes)
        await self._submit(_nothing)  # (not ``flush``: a turn first, for the others)

    async def flush(self) -> None:
        """Commit every buffered output counter and queued write (a no-op when there are
        none). With no transaction in flight it starts at once: what it commits is what
        was queued before the call, so no turn of the loop first (for more callers to
        join, as ``_submit``'s other calls do)."""
        await self._submit(_nothing, at_once=True)

    @property
    def busy(self) -> bool:
        """A transaction is in flight: ``flush`` would wait for it (else it has no cancel
        point: its thread call is not one)."""
        return self._lock.locked()

    @property
    def reserved(self) -> bool:
        """The store holds its reserve: a commit that finds the disk full still goes
        through (in the reserve's room) and gives it up."""
        return self._reserved

    async def reserve(self) -> bool:
        """Make the reserve again if it was given up (the disk may have room again);
        return whether it is held. After the transaction in flight."""
        if self._reserved or self._closed:
            return self._reserved
        async with self._lock:
            if not self._reserved:
                failed = await _in_thread(partial(_make_reserve, self._reserve_path))
                self._reserved = failed is None
                if self._reserved:
                    _log.info("the job database's reserve is back: Starts answer first again")
        return self._reserved

    async def mark_lost(self, job_ids: Iterable[str], error: str, at: datetime) -> int:
        """Mark the RUNNING ones among ``job_ids`` LOST; return how many changed.

        Jobs already ended are left alone, so recovery can pass every id it
        found running without re-checking.
        """
        ids = list(job_ids)
        values = (_text(error), _ts(at))

        def update(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            for start in range(0, len(ids), _ID_BATCH):
                part = ids[start : start + _ID_BATCH]
                conn.execute(
                    "UPDATE jobs SET state = 'lost', error = ?, ended_at = ?"
                    f" WHERE state = 'running' AND id IN ({', '.join('?' * len(part))})",
                    (*values, *part),
                )
            return conn.total_changes - before

        return await self._submit(update)

    async def delete(self, job_ids: Iterable[str]) -> int:
        """Forget these jobs' records; return how many existed. Their logs are the caller's."""
        ids = list(job_ids)

        def remove(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            for start in range(0, len(ids), _ID_BATCH):
                part = ids[start : start + _ID_BATCH]
                conn.execute(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(part))})", part)
            return conn.total_changes - before

        return await self._submit(remove)

    # -- reads ---------------------------------------------------------------

    async def load_all(self) -> list[StoredJob]:
        """Every record, oldest first (ids sort by creation). Used once, at recovery."""
        path = self.path

        def select(conn: sqlite3.Connection) -> list[StoredJob]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id").fetchall()
            decode = _Decoder(path)
            return [decode(row) for row in rows]

        return await self._submit(select)

    async def ended_for_retention(
        self,
        *,
        keep_count: int | None,
        max_age: timedelta | None,
        now: datetime | None = None,
    ) -> list[str]:
        """Ids of ended jobs beyond the caps, oldest end first.

        Beyond ``keep_count``: all but the ``keep_count`` most recently ended.
        Beyond ``max_age``: ended strictly more than ``max_age`` before ``now``
        (default: the current time). ``None`` disables a cap. Running jobs are
        never selected.
        """
        if keep_count is not None and keep_count < 0:
            raise ValueError(f"keep_count must be >= 0, got {keep_count}")
        if max_age is not None and max_age < timedelta(0):
            raise ValueError(f"max_age must be >= 0, got {max_age}")
        cutoff = None if max_age is None else _ts((now or datetime.now(UTC)) - max_age)

        def select(conn: sqlite3.Connection) -> list[str]:
            found: dict[str, str] = {}
            if keep_count is not None:
                found.update(
                    conn.execute(
                        "SELECT id, ended_at FROM jobs"
                        " WHERE ended_at IS NOT NULL AND state != 'running'"
                        " ORDER BY ended_at DESC, id DESC LIMIT -1 OFFSET ?",
                        (keep_count,),
                    ).fetchall()
                )
            if cutoff is not None:
                found.update(
                    conn.execute(
                        "SELECT id, ended_at FROM jobs"
                        " WHERE ended_at IS NOT NULL AND ended_at < ? AND state != 'running'",
                        (cutoff,),
                    ).fetchall()
                )
            return sorted(found, key=lambda job_id: (found[job_id], job_id))

        return await self._submit(select)

    # -- group commit ----------------------------------------------------------

    async def _submit(
        self, fn: Callable[[sqlite3.Connection], _T], *, single: bool = False, at_once: bool = False
    ) -> _T:
        """Queue ``fn`` and return its result once the transaction holding it committed.

        ``at_once``: with no transaction in flight, start one now, without the turn of
        the loop a lock's ``acquire`` takes (in which calls of other tasks would join it).
        """
        if self._closed:
            raise trio.ClosedResourceError("the job store is closed")
        op = _Op(fn, single=single)
        self._queue.append(op)
        lock = self._lock
        if at_once and not lock.locked():
            # Nothing to withdraw once it runs: the thread's call is not cancellable.
            lock.acquire_nowait()
            try:
                await self._run_queue()
            finally:
                lock.release()
        else:
            await self._wait_and_run(op)
        if op.error is not None:
            raise op.error
        return cast(_T, op.result)

    async def _wait_and_run(self, op: _Op[Any]) -> None:
        """``_submit``'s wait for the transaction in flight, then its own (unless that
        one took ``op``); cancelled while it waits, ``op`` is withdrawn."""
        try:
            async with self._lock:
                if not op.done:
                    await self._run_queue()
        except BaseException:
            # Cancelled while waiting: withdraw the call if nobody has taken it yet.
            if not op.done and op in self._queue:
                self._queue.remove(op)
            raise

    async def _run_queue(self) -> None:
        """Run every queued call and buffered note in one transaction (lock held)."""
        batch, self._queue = self._queue, []
        notes, self._notes = self._notes, {}
        spawned, self._spawned = self._spawned, {}
        if not notes and not spawned and all(op.fn is _nothing for op in batch):
            for op in batch:  # flushes with nothing to flush: no transaction
                op.done = True
            return
        # Not cancellable (``in_thread``): the batch holds other tasks' calls, which
        # must run now that they left the queue.
        committed = await _in_thread(partial(self._execute, batch, notes, spawned))
        if committed:
            self.transactions += 1
        else:
            for job_id, counters in notes.items():
                self.note_output(job_id, *counters)
            for job_id, (pid, start_time) in spawned.items():
                self._spawned.setdefault(job_id, (pid, start_time))

    def _execute(
        self,
        batch: Sequence[_Op[Any]],
        notes: dict[str, _Counters],
        spawned: dict[str, tuple[int, int | None]],
    ) -> bool:
        """In the worker thread: one transaction for the whole batch; if the disk has no
        room for it, once more in the reserve's room (given up for it)."""
        try:
            try:
                self._transaction(batch, notes, spawned)
            except Exception as exc:
                if not (self._reserved and _no_room(exc)):
                    raise
                self._give_up_reserve()
                for op in batch:
                    op.result, op.error = None, None
                self._transaction(batch, notes, spawned)
        except Exception as exc:  # sqlite3.Error, MemoryError, a bug: nothing was written
            error = StateDirError(f"cannot write the job database {self.path}: {exc}")
            error.__cause__ = exc  # (``disk_full`` reads it)
            for op in batch:
                op.result, op.error = None, error
            return False
        finally:
            for op in batch:
                op.done = True
        return True

    def _transaction(
        self,
        batch: Sequence[_Op[Any]],
        notes: dict[str, _Counters],
        spawned: dict[str, tuple[int, int | None]],
    ) -> None:
        """Run the batch in one transaction; raise (rolled back) if it failed."""
        conn = self._conn
        writes = [op for op in batch if op.fn is not _nothing]
        # One statement is a transaction of its own (SQLite's autocommit): a batch of one
        # start or one end (a lone Start's record) then costs the thread one statement,
        # not three, each of which lets go of the GIL and takes it back from the loop.
        alone = not spawned and not notes and len(writes) == 1 and writes[0].single
        try:
            if not alone:
                conn.execute("BEGIN IMMEDIATE")
            if spawned:
                conn.executemany(_SPAWNED, [(*p, job_id) for job_id, p in spawned.items()])
            if notes:
                conn.executemany(_OUTPUT, [(*c, job_id) for job_id, c in notes.items()])
            for op in batch:
                try:
                    op.result = op.fn(conn)
                except (ValueError, JobNotFound, StateDirError) as exc:
                    op.error = exc  # this call's own failure: it wrote nothing
            if not alone:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def _give_up_reserve(self) -> None:
        """In the writer's thread: free the reserve's room for the transaction that
        found the disk full."""
        self._reserved = False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._reserve_path)
        _log.warning(
            "the job database's disk is full: its reserve (%d KiB) is given up for the "
            "records in flight; each Start writes its job's record before the job runs "
            "until the disk has room again",
            RESERVE_BYTES >> 10,
        )


if TYPE_CHECKING:

    def _conforms(store: SqliteJobStore) -> JobStore:
        return store  # mypy checks that SqliteJobStore implements the protocol


def disk_full(error: StateDirError) -> bool:
    """Whether the store refused a write for want of room (SQLite's ``SQLITE_FULL``: a
    WAL that must grow on a full disk), which freeing space on that disk may cure."""
    return _no_room(error.__cause__)


def _no_room(exc: BaseException | None) -> bool:
    return isinstance(exc, sqlite3.Error) and exc.sqlite_errorcode == sqlite3.SQLITE_FULL


def _reserve_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-reserve")


def _make_reserve(path: Path) -> OSError | None:
    """Allocate ``RESERVE_BYTES`` of the disk to the file ``path`` (kept from an earlier
    run, or made); the error, leaving no file, if the disk has no room for it (or the
    file cannot be made or allocated ahead: then the store keeps no reserve)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return exc
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)  # (a partial allocation goes with it)
        return exc
    finally:
        os.close(fd)
    return None


def _inserter(
    info: JobInfo, make_row: Callable[[], Sequence[object]]
) -> Callable[[sqlite3.Connection], None]:
    """The call that inserts a job's row, made by ``make_row`` in the writer's thread
    (``ValueError`` if it is there already)."""

    def insert(conn: sqlite3.Connection) -> None:
        row = make_row()
        try:
            conn.execute(_INSERT, row)
        except sqlite3.IntegrityError as exc:
            if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (info.id,)).fetchone():
                raise ValueError(f"job {info.id} is already recorded") from None
            raise ValueError(f"job {info.id}: record rejected: {exc}") from None

    return insert


def _check_end(info: JobInfo) -> None:
    if not info.ended or info.ended_at is None:
        raise ValueError(f"job {info.id}: record_end needs an ended job with ended_at")


def _end_row(info: JobInfo, dropped_bytes: int) -> tuple[object, ...]:
    """The values of ``_END`` for an ended job (``_check_end`` passed)."""
    assert info.ended_at is not None
    usage = info.usage
    return (
        info.state.value,
        info.pid,
        info.exit_code,
        info.signal,
        _text(info.error),
        info.spawn_errno,
        _ts(info.ended_at),
        info.output_bytes,
        info.output_start,
        dropped_bytes,
        int(info.oom_killed),
        None if usage is None else usage.cpu_seconds,
        None if usage is None else usage.memory_peak_bytes,
        info.id,
    )


def _updater(
    job_id: str, make_row: Callable[[], Sequence[object]]
) -> Callable[[sqlite3.Connection], None]:
    """The call that writes a job's end, its row made by ``make_row`` in the writer's
    thread (``JobNotFound`` if the job has no row)."""

    def update(conn: sqlite3.Connection) -> None:
        if conn.execute(_END, make_row()).rowcount == 0:
            raise JobNotFound(job_id)

    return update


def _nothing(conn: sqlite3.Connection) -> None:
    """The call ``flush`` queues: the batch's notes are the whole point."""


# -- opening and checking the file --------------------------------------------


def _refuse(path: Path, why: str) -> StateDirError:
    return StateDirError(
        f"the job database {path} {why}; trio-worker leaves it untouched: "
        "move it (with any -wal and -shm files beside it) away to start with an empty job store"
    )


def _open_sync(path: Path) -> tuple[Path, sqlite3.Connection, str]:
    """Check the file read-only, then open the connection the store keeps."""
    path = path.absolute()
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise _refuse(path, "is not a regular file")
        _check_existing(path)
    try:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    except sqlite3.Error as exc:
        raise StateDirError(f"cannot open the job database {path}: {exc}") from exc
    try:
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA busy_timeout = 5000")
        app_id, version = _identity(conn)
        if app_id == 0 and version == 0:
            _create(conn)
        _migrate(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise StateDirError(f"cannot open the job database {path}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return path, conn, mode


def _create(conn: sqlite3.Connection) -> None:
    """Create the schema and stamp the file as ours, in one transaction."""
    conn.executescript(
        f"BEGIN IMMEDIATE; {_SCHEMA}"
        f"PRAGMA application_id = {APPLICATION_ID};"
        f"PRAGMA user_version = {SCHEMA_VERSION};"
        "COMMIT;"
    )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring an older schema up to date, one version at a time, each in a transaction."""
    _, version = _identity(conn)
    if version == 1:  # version 2 records the Unix user a job runs as
        conn.executescript(
            "BEGIN IMMEDIATE;"
            "ALTER TABLE jobs ADD COLUMN run_as TEXT NOT NULL DEFAULT '';"
            "PRAGMA user_version = 2;"
            "COMMIT;"
        )
        _, version = _identity(conn)
    if version == 2:  # version 3 records whether a job has stdin and a terminal
        conn.executescript(
            "BEGIN IMMEDIATE;"
            "ALTER TABLE jobs ADD COLUMN stdin INTEGER NOT NULL DEFAULT 0;"
            "ALTER TABLE jobs ADD COLUMN tty INTEGER NOT NULL DEFAULT 0;"
            "PRAGMA user_version = 3;"
            "COMMIT;"
        )
        _, version = _identity(conn)
    if version != SCHEMA_VERSION:
        raise _refuse(path, f"has schema version {version}, expected {SCHEMA_VERSION}")
    # Files made by earlier servers (the same schema version) have an index by owner that
    # no query used (List reads the supervisor's memory): each start's insert paid a
    # b-tree for it, each commit a page. An older server never reads it either.
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs_by_owner'").fetchone():
        conn.execute("DROP INDEX jobs_by_owner")


def _identity(conn: sqlite3.Connection) -> tuple[int, int]:
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    return app_id, version


def _check_existing(path: Path) -> None:
    """Refuse a corrupt, foreign or too-new file, reading it only (mode=ro).

    On refusal, the -wal/-shm files SQLite may have created for the check are
    removed again (only those that were not there before, and an empty -wal),
    so the directory is left as it was found.
    """
    sides = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    existed = [side.exists() for side in sides]
    try:
        _inspect(path)
    except StateDirError:
        for side, was_there in zip(sides, existed, strict=True):
            with contextlib.suppress(OSError):
                if not was_there and (side.name.endswith("-shm") or side.stat().st_size == 0):
                    side.unlink()
        raise


def _unreadable(path: Path, exc: sqlite3.Error) -> StateDirError | None:
    """The error for a file the check could not read for want of room or an I/O error
    (its ``-shm`` cannot be made on a full disk): not a corrupt one, which the advice
    to move it away is for. None for any other error."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or code & 0xFF not in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL):
        return None
    return StateDirError(f"cannot read the job database {path} ({exc}): is its disk full?")


def _inspect(path: Path) -> None:
    uri = "file:" + urllib.parse.quote(str(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise _unreadable(path, exc) or _refuse(path, f"cannot be opened ({exc})") from exc
    try:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise _refuse(path, "is corrupt: " + "; ".join(problems))
        app_id, version = _identity(conn)
        objects = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) or _refuse(
            path, f"is corrupt or not an SQLite database ({exc})"
        ) from exc
    finally:
        conn.close()
    if app_id == 0 and version == 0 and objects == 0:
        return  # empty: a fresh file, maybe left by a crash during the first start
    if app_id != APPLICATION_ID:
        raise _refuse(path, f"belongs to another application (application_id {app_id:#x})")
    if version > SCHEMA_VERSION:
        raise _refuse(
            path,
            f"was written by a newer trio-worker (schema version {version}, "
            f"this one reads up to {SCHEMA_VERSION})",
        )


# -- encoding ------------------------------------------------------------------


def _text(value: str) -> str | bytes:
    """Text for SQLite: as is when it is valid UTF-8, else its surrogatepass bytes.

    File names and arguments may hold lone surrogates (``os.fsdecode`` of
    non-UTF-8 bytes) that SQLite cannot store as TEXT; a BLOB keeps them exact.
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def _untext(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    if not isinstance(value, str):
        raise TypeError(f"expected text, found {type(value).__name__}")
    return value


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: A string's JSON as ``_dumps`` writes it (quoted, escaped, not ASCII-only).
_quote: Callable[[str], str] = json.encoder.encode_basestring


def _json(value: object) -> str | bytes:
    return _text(_dumps(value))


def _ts(value: datetime) -> str:
    """Fixed-width ISO 8601 UTC, so text order is time order (retention relies on it)."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: times must carry a time zone")
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:"
        f"{v.second:02d}.{v.microsecond:06d}Z"
    )


def _parse_ts(value: object) -> datetime:
    result = datetime.fromisoformat(_untext(value))
    if result.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return result


def _check_start(info: JobInfo, env_keys: list[str]) -> None:
    if info.ended and info.ended_at is None:
        raise ValueError(f"job {info.id} is {info.state.value} but has no ended_at")
    if not info.ended and info.ended_at is not None:
        raise ValueError(f"job {info.id} is running but has an ended_at")
    if not all(isinstance(key, str) for key in env_keys):
        raise ValueError("env_keys must be strings")
    if info.started_at.tzinfo is None:
        raise ValueError(f"naive datetime {info.started_at!r}: times must carry a time zone")


#: Distinct limits, isolation and env keys whose JSON an ``_Encoder`` keeps.
_MEMO = 64


class _Encoder:
    """Jobs into rows, in the writer's thread (one store's: its calls run one at a time).

    Limits, isolation and env keys repeat across most jobs: each distinct value's JSON is
    kept (up to ``_MEMO`` of them), so a start's row costs one JSON text (its args), not
    four (json.dumps made a new encoder each: ~10 us apiece, ~30-60 us for the row).
    """

    def __init__(self) -> None:
        self._memo: dict[object, str | bytes] = {}

    def _shared(self, key: object, make: Callable[[], object]) -> str | bytes:
        try:
            return self._memo[key]
        except KeyError:
            if len(self._memo) >= _MEMO:
                self._memo.clear()
            value = self._memo[key] = _json(make())
            return value

    def start_row(
        self, info: JobInfo, env_keys: list[str], cwd: str | None, pid_start_time: int | None
    ) -> tuple[object, ...]:
        """The values of ``_INSERT`` (``_check_start`` passed)."""
        limits, isolation, usage = info.limits, info.isolation, info.usage
        return (
            info.id,
            _text(info.owner),
            _text(info.command),
            _strings_json(info.args),
            self._shared(("env", *env_keys), lambda: env_keys),
            None if cwd is None else _text(cwd),
            # (cpus' type in the key: 0 and 0.0 are equal, their JSON is not)
            self._shared(
                (limits, type(limits.cpus)),
                lambda: {
                    "cpus": limits.cpus,
                    "memory_bytes": limits.memory_bytes,
                    "io_read_bps": limits.io_read_bps,
                    "io_write_bps": limits.io_write_bps,
                    "pids": limits.pids,
                },
            ),
            self._shared(
                isolation,
                lambda: {
                    "pid": isolation.pid,
                    "mount": isolation.mount,
                    "network": isolation.network,
                },
            ),
            info.state.value,
            info.pid,
            pid_start_time,
            info.exit_code,
            info.signal,
            _text(info.error),
            info.spawn_errno,
            _ts(info.started_at),
            None if info.ended_at is None else _ts(info.ended_at),
            info.output_bytes,
            info.output_start,
            0,
            int(info.oom_killed),
            None if usage is None else usage.cpu_seconds,
            None if usage is None else usage.memory_peak_bytes,
            _text(info.user),
            int(info.stdin),
            int(info.tty),
        )


def _strings_json(items: Sequence[str]) -> str | bytes:
    """``_json(list(items))`` for strings, without an encoder's set-up (a job's args)."""
    return _text("[" + ",".join(map(_quote, items)) + "]")


_loads = json.JSONDecoder().decode


def _strings(value: object) -> tuple[str, ...]:
    items = _loads(_untext(value))
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError("expected a JSON array of strings")
    return tuple(items)


def _limits(value: object) -> Limits:
    return Limits(**_loads(_untext(value)))


def _isolation(value: object) -> Isolation:
    return Isolation(**_loads(_untext(value)))


class _Decoder:
    """Rows back into ``StoredJob``s, for one read.

    Limits, isolation and env keys repeat across most jobs: each distinct
    value is decoded once (this halves ``load_all`` on 10,000 jobs).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._memo: dict[tuple[Callable[[object], object], object], object] = {}

    def _shared(self, decode: Callable[[object], _T], raw: object) -> _T:
        key = (decode, raw)
        try:
            return cast(_T, self._memo[key])
        except KeyError:
            value = self._memo[key] = decode(raw)
            return value

    def __call__(self, row: Sequence[Any]) -> StoredJob:
        """One row; a damaged one is a ``StateDirError`` naming the file and the job."""
        (
            job_id, owner, command, args, env_keys, cwd, limits, isolation, state, pid,
            pid_start_time, exit_code, signal, error, spawn_errno, started_at, ended_at,
            output_bytes, output_start, dropped_bytes, oom_killed, cpu_seconds, memory_peak,
            run_as, stdin, tty,
        ) = row  # fmt: skip
        try:
            usage = None
            if cpu_seconds is not None or memory_peak is not None:
                usage = Usage(float(cpu_seconds or 0.0), int(memory_peak or 0))
            info = JobInfo(
                id=str(job_id),
                owner=_untext(owner),
                command=_untext(command),
                args=_strings(args),
                state=JobState(state),
                pid=pid,
                exit_code=exit_code,
                signal=signal,
                error=_untext(error),
                started_at=_parse_ts(started_at),
                ended_at=None if ended_at is None else _parse_ts(ended_at),
                output_bytes=int(output_bytes),
                limits=self._shared(_limits, limits),
                isolation=self._shared(_isolation, isolation),
                oom_killed=bool(oom_killed),
                spawn_errno=spawn_errno,
                output_start=int(output_start),
                usage=usage,
                user=_untext(run_as),
                stdin=bool(stdin),
                tty=bool(tty),
            )
            return StoredJob(
                info=info,
                env_keys=self._shared(_strings, env_keys),
                cwd=None if cwd is None else _untext(cwd),
                pid_start_time=pid_start_time,
                dropped_bytes=int(dropped_bytes),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise StateDirError(
                f"the job database {self.path}: job {job_id!r} is unreadable: {exc}"
            ) from exc


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (/proc/PID/stat field 22).

    Recorded with a job's pid; at recovery a live pid whose start time differs
    is an unrelated process that reused the number, and must not be killed.
    None when there is no such process.
    """
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        stat = os.read(fd, 4096)  # one read: the kernel renders it whole (~300 bytes)
    except ProcessLookupError:  # (ESRCH: it was reaped meanwhile)
        return None
    finally:
        os.close(fd)
    if not stat:
        return None
    # Field 2 (comm) is in parentheses and may contain spaces or ')': split after the last.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])
