"""The jobs' durable side: their records in the store (written even when the store
fails for a while), recovery of an earlier run, and retention.

A store failure never escapes: the record waits in ``unsaved`` and housekeeping
writes it once the store takes writes again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal as _signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import trio

from .._errors import JobNotFound, ResourceExhausted, StateDirError
from .._model import JobInfo, JobState
from .._util import final
from . import _lifecycle as lc
from ._endnotes import EndNotes, read_end_notes
from ._job import LOST_ERROR, Job, now
from ._queries import JobTable
from ._store import JobStore, Queued, StoredJob, disk_full, process_start_time

__all__ = ["JobRecords", "Retention", "remove_dirs"]

_log = logging.getLogger("trio_worker.supervisor")

#: How long (s) the committer lets records wait for more before one transaction writes
#: them all: ended jobs' records, from the first of them (a burst of ends, a Stop of many
#: jobs, is a few transactions, not one per end), and a start's record queued within this
#: long of the committer's last commit (a burst of Starts is one transaction per this
#: long, not one per Start: each is a round trip of the store's thread, and on 2 cores
#: its wakeups and its turns with the GIL are the loop's wait). A start's record after a
#: quiet spell goes at once. The waiting only widens the window in which a crash erases
#: a job just started (its record not committed: its reapers kill it) or leaves an ended
#: one LOST after the restart.
END_COMMIT_AFTER = 0.02


@final
@dataclass(frozen=True, slots=True)
class Retention:
    """How much of the past a persistent supervisor keeps.

    ``max_output_bytes`` caps each job's retained log (the oldest part goes
    first, and readers are told where the log now starts); ``keep_ended`` and
    ``max_ended_age`` bound how many ended jobs (records and logs) are kept,
    oldest first. ``None`` disables a cap. Enforced every ``interval`` seconds.
    """

    max_output_bytes: int | None = 1024**3
    keep_ended: int | None = 10_000
    max_ended_age: timedelta | None = timedelta(days=30)
    interval: float = 5.0


class JobRecords:
    """Writes the jobs of ``table`` to ``store`` (nothing without one)."""

    def __init__(
        self,
        store: JobStore | None,
        table: JobTable,
        jobs_dir: Path,
        retention: Retention,
        *,
        notes_path: Path | None = None,
    ) -> None:
        self.store = store
        self._table = table
        self._jobs_dir = jobs_dir
        self.retention = retention
        #: Where ended jobs' ends are noted until their records commit (``_endnotes``):
        #: read by ``restore``, which then makes ``_notes``.
        self._notes_path = notes_path
        self._notes: EndNotes | None = None
        #: Jobs whose record in the store is behind (a write failed, e.g. a full
        #: disk): job id -> whether its row exists. Written again by housekeeping.
        self.unsaved: dict[str, bool] = {}
        #: Records queued for the next commit (``record_soon``, ``end_soon``), in order:
        #: (job id, the write, whether the job's row exists once the writes before it
        #: are in).
        self._queued: list[tuple[str, Queued, bool]] = []
        #: The committer's wait, while it waits: its deadline is the next commit's time.
        #: An end's record sets it ``END_COMMIT_AFTER`` away if it has none, so a job's
        #: end costs the loop no turn of the committer; a start's brings it to
        #: ``END_COMMIT_AFTER`` after the last commit began (``_commit_soon``). No event
        #: and no second sleep: one wake of the committer per commit.
        self._waiting: trio.CancelScope | None = None
        #: A start's record came while the committer was not waiting (it commits).
        self._commit_wanted = False
        #: When the last commit of the committer began (trio's clock).
        self._last_commit = -math.inf
        #: trio's clock, bound to the run's by ``run_committer`` (``trio.current_time``
        #: goes through four Python frames, this one).
        self._now: Callable[[], float] = trio.current_time
        #: Held by a commit until its records' outcomes are in ``unsaved``: housekeeping
        #: waits for one in flight, or it would not know what to write again.
        self._committing = trio.Lock()
        #: The store refused the last job record written (``refusing``). Only a record's
        #: write says it: a smaller transaction (counters, a read) may still fit in the
        #: room a refused one's partial write left (its WAL's last page).
        self._refused = False

    async def persist_start(self, job: Job) -> None:
        """Record the new job; if the store fails, the job runs with its record pending.

        Shielded: once the process exists its record must be attempted, even
        if the caller gave up waiting.
        """
        if self.store is None:
            return
        with trio.CancelScope(shield=True):
            if not await self._save(job, exists=False):
                self.unsaved[job.id] = False

    @property
    def refusing(self) -> bool:
        """The store refused the last job record written (a full disk), or gave up its
        reserve (``SqliteJobStore.reserved``): a new job's record queued now might not
        be written, and a crash would erase a job that a client was told of. A Start
        then commits its record before the spawn (``record_before_spawn``), and is
        refused if it cannot. With the reserve held, a commit that finds the disk full
        still goes through, in its room: the Starts answered before it are kept."""
        return self._refused or (self.store is not None and not self.store.reserved)

    async def record_before_spawn(self, job: Job, info: JobInfo) -> None:
        """Commit the new job's record, RUNNING without a pid (``info``), before its
        process exists; raise ``ResourceExhausted`` if the store refuses it.

        The pid comes later (``note_spawned``). A crash in between leaves a pid-less
        RUNNING record, which recovery makes LOST (its cgroup is killed, which needs
        no pid), as with any job that a crash caught running.
        """
        store = self.store
        assert store is not None
        try:
            await store.record_start(
                info, env_keys=job.env_keys, cwd=job.spec.cwd, pid_start_time=None
            )
            self._refused = False
        except StateDirError as exc:
            # (The store's own words name the server's paths: only SQLite's, here.)
            why = exc.__cause__ if exc.__cause__ is not None else "refused"
            raise ResourceExhausted(
                f"cannot start the job: its record cannot be written (the job database: "
                f"{why}); a job the server could forget after a crash is not started"
            ) from None

    async def note_spawned(self, job: Job, pid: int, *, commit: bool) -> None:
        """The pid of a job ``record_before_spawn`` recorded, for the next commit; with
        ``commit``, committed now (best effort: without it the record stays pid-less)."""
        store = self.store
        assert store is not None
        store.note_spawned(job.id, pid, job.pid_start_time)
        if commit:
            with contextlib.suppress(StateDirError, trio.ClosedResourceError):
                await store.flush()

    def record_soon(self, job: Job, info: JobInfo | None = None) -> None:
        """Queue a new job's record as it is now (RUNNING with its pid, or FAILED)
        for the store's next commit, without waiting: ``run_committer`` commits it
        right after (or, in a burst, up to ``END_COMMIT_AFTER`` after its last commit),
        with whatever else was queued meanwhile (group commit).

        Only for a job its cgroup can find: until the commit, a crash leaves a job
        with no record, which the reapers kill by its cgroup (as the cleanup of
        leftover groups at the next start would), and whose directory the next
        start removes (``restore``). Writes queued later (its end) are committed
        after this one. ``info``: the job's snapshot as it is now, if the caller
        has one already.
        """
        store = self.store
        assert store is not None
        try:
            write = store.queue_start(
                info if info is not None else job.info(usage=False),
                env_keys=job.env_keys,
                cwd=job.spec.cwd,
                pid_start_time=job.pid_start_time,
            )
        except trio.ClosedResourceError:
            self.unsaved[job.id] = False
            return
        self._queued.append((job.id, write, False))
        self._commit_soon()

    def _commit_soon(self) -> None:
        """A record that is committed at once (a start's): the committer's next commit
        ``END_COMMIT_AFTER`` after its last one began, or at its next turn after a quiet
        spell (its wait's deadline brought forward, to the past if need be)."""
        waiting = self._waiting
        if waiting is None:  # (committing: it looks at ``_commit_wanted`` once done)
            self._commit_wanted = True
            return
        due = self._last_commit + END_COMMIT_AFTER
        if due < waiting.deadline:  # (once per commit: the starts after see it set)
            waiting.deadline = due

    def end_soon(self, job: Job) -> None:
        """Queue the ended job's record for the store's next commit, without waiting;
        never raises (the runner's end of a job calls it, after waiters were told).

        ``run_committer`` commits it right after, with the other ends and starts queued
        meanwhile: a burst of ends (Stop of many jobs) costs one transaction, not a
        task's wait on the store each. Any later transaction (housekeeping, a Remove,
        the shutdown's last commit) writes it first, so retention and Remove see it.
        """
        store = self.store
        if store is None:
            return
        exists = self.unsaved.pop(job.id, True)
        info = job.info()
        dropped = job.log.dropped_bytes if job.log is not None else 0
        try:
            if exists:
                write = store.queue_end(info, dropped_bytes=dropped)
            else:  # its start was never written: the whole record, as it ended
                write = store.queue_start(
                    info, env_keys=job.env_keys, cwd=job.spec.cwd, pid_start_time=job.pid_start_time
                )
        except trio.ClosedResourceError:
            self.unsaved[job.id] = exists
            return
        self._queued.append((job.id, write, exists))
        if not exists:  # a whole record (its start was never written): at once
            self._commit_soon()
        elif (waiting := self._waiting) is not None and waiting.deadline == math.inf:
            waiting.deadline = self._now() + END_COMMIT_AFTER
        if exists and self._notes is not None:
            # Before anyone is told (the waiters run after this step): a crash before
            # the commit leaves the end on disk for ``restore``, not a LOST job.
            self._notes.note(info, dropped)

    async def run_committer(self) -> None:
        """Commit the records ``record_soon`` and ``end_soon`` queued, until cancelled
        (a task of the supervisor): woken by its wait's deadline, never polls; ends wait
        up to ``END_COMMIT_AFTER`` (from the first of them) for more, and a start's waits
        until ``END_COMMIT_AFTER`` after the last commit began (at once after a quiet
        spell): in a burst of Starts, what they queue meanwhile goes in one commit."""
        now = self._now = trio.lowlevel.current_clock().current_time
        while True:
            with trio.CancelScope() as waiting:
                if self._commit_wanted:  # a start's record came while the last commit ran
                    waiting.deadline = self._last_commit + END_COMMIT_AFTER
                elif self._queued:  # (ends queued while the last commit ran: they wait on)
                    waiting.deadline = now() + END_COMMIT_AFTER
                self._commit_wanted = False
                self._waiting = waiting
                try:
                    await trio.sleep_forever()
                finally:
                    self._waiting = None
            if self._queued:  # (else another commit took them: housekeeping, a Remove)
                self._last_commit = now()
                await self.commit_queued()

    async def commit_queued(self) -> None:
        """Commit the queued records now; one the store refused goes to ``unsaved``.

        After a commit in flight (another task's) is done with its outcomes."""
        committing = self._committing
        store = self.store
        if not committing.locked() and (store is None or not store.busy):
            # No commit in flight, here or in the store (the committer's usual case):
            # nothing below waits, and the store's thread call is no cancel point, so no
            # shield is needed (a scope was ~25 of the loop's Python calls a commit),
            # and no turn of the loop first.
            committing.acquire_nowait()
            await self._commit_held()
            return
        # Shielded: the batch holds the records, see it through. Each record's own
        # outcome says what to do, not the flush's.
        with trio.CancelScope(shield=True):
            if committing.locked():
                await committing.acquire()
            else:
                committing.acquire_nowait()
            await self._commit_held()

    async def _commit_held(self) -> None:
        """``commit_queued`` once it holds ``_committing`` (released here)."""
        try:
            queued, self._queued = self._queued, []
            if not queued or self.store is None:
                return
            with contextlib.suppress(StateDirError, trio.ClosedResourceError):
                await self.store.flush()
            self._settle(queued)
        finally:
            self._committing.release()

    def _settle(self, queued: list[tuple[str, Queued, bool]]) -> None:
        """Put the records of a commit the store refused in ``unsaved``."""
        notes = self._notes
        for job_id, write, exists in queued:
            if write.done and write.error is None:
                self._refused = False  # (a batch is one transaction: all or none)
                if notes is not None and exists:
                    # An end's update (the one write ``end_soon`` notes). Not a start's
                    # record: its job may have ended (and been noted) while it committed.
                    notes.release(job_id)
                continue
            if isinstance(write.error, StateDirError):
                self._refused = True
            if write.error is not None and job_id not in self.unsaved:
                _log.error("job %s: cannot record it (will retry): %s", job_id, write.error)
            # The next try writes the record as it is by then: an insert unless the
            # row is known to be there (a failed start before it says it is not).
            row = exists and not isinstance(write.error, JobNotFound)
            self.unsaved[job_id] = self.unsaved.get(job_id, True) and row

    async def _save(self, job: Job, *, exists: bool, info: JobInfo | None = None) -> bool:
        """Write the job's record as it is now: insert it or record its end.

        Returns False, having logged why, when the store cannot take it (a full
        disk, an SQLite error): the caller keeps the job in ``unsaved`` and
        housekeeping tries again. Never raises: a store failure must not escape
        a job's task, or it would stop the supervisor and every other job.
        """
        store = self.store
        assert store is not None
        # A running job's row gets no usage: only its end's counts, and reading them
        # (a file per hierarchy, on the loop) would cost every Start for nothing.
        if info is None:
            info = job.info(usage=exists or job.ended.is_set())
        dropped = job.log.dropped_bytes if job.log is not None else 0
        try:
            try:
                if exists:
                    await store.record_end(info, dropped_bytes=dropped)
                else:
                    await store.record_start(
                        info,
                        env_keys=job.env_keys,
                        cwd=job.spec.cwd,
                        pid_start_time=job.pid_start_time,
                    )
            except JobNotFound:  # the row we thought was there is not: insert it
                await store.record_start(
                    info,
                    env_keys=job.env_keys,
                    cwd=job.spec.cwd,
                    pid_start_time=job.pid_start_time,
                )
            except ValueError:  # already recorded after all: bring it up to date
                if info.ended:
                    await store.record_end(info, dropped_bytes=dropped)
        except StateDirError as exc:
            self._refused = True
            if job.id not in self.unsaved:
                _log.error("job %s: cannot record it (will retry): %s", job.id, exc)
            return False
        except Exception:
            _log.exception("job %s: cannot record it (will retry)", job.id)
            return False
        self._refused = False
        return True

    async def save_unsaved(self) -> None:
        """Write the records that failed before (the disk may have room again)."""
        table = self._table
        pending = [(i, exists) for i, exists in self.unsaved.items() if i in table]
        self.unsaved = {i: e for i, e in self.unsaved.items() if i in table}
        if not pending:
            return
        saved: list[str] = []

        async def save(job_id: str, exists: bool) -> None:
            if await self._save(table.get(job_id), exists=exists):
                saved.append(job_id)
                # (A running job whose row is now in: its end will update it.)
                self.unsaved.pop(job_id, None)
                if self._notes is not None:
                    self._notes.release(job_id)

        # Concurrent, so group commit writes them in one transaction.
        async with trio.open_nursery() as nursery:
            for job_id, exists in pending:
                nursery.start_soon(save, job_id, exists)
        if saved:
            _log.info("recorded %d job(s) whose records were pending", len(saved))

    async def delete(self, job: Job) -> None:
        """Delete an ended job's record and its directory (the caller shields this).

        On a full disk the record's delete may need room (its WAL frames) that the job's
        own output holds: then the output goes first and the delete is tried once more,
        so removing jobs frees a disk they filled. If that fails too, the error is
        raised and the job is kept, its output gone."""
        if self.store is not None:
            try:
                await self.store.delete([job.id])
            except StateDirError as exc:
                if job.directory is None or not disk_full(exc):
                    raise
                await trio.to_thread.run_sync(remove_dirs, [job.directory])
                await self.store.delete([job.id])
        self.unsaved.pop(job.id, None)
        if self._notes is not None:
            self._notes.release(job.id)  # (noted while its end waited to be saved)
        if job.directory is not None:
            await trio.to_thread.run_sync(remove_dirs, [job.directory])

    async def restore(self, stored: Sequence[StoredJob]) -> None:
        """Take back the jobs of an earlier run from the store.

        A job recorded as RUNNING outlived its server: whatever is left of it
        is killed (its cgroup already was, by ``cleanup_leftovers``; without
        cgroups, its process group, if the pid still names the same process),
        and it becomes LOST. Output written before the crash stays readable. Unless its
        end was noted (``_endnotes``): it ended before the crash, and a caller may have
        been told how; it ends so again.
        """
        path = self._notes_path
        notes = {} if path is None else await trio.to_thread.run_sync(read_end_notes, path)
        at = now()
        lost: list[str] = []
        noted: list[StoredJob] = []
        for entry in stored:
            info = entry.info
            note = notes.get(info.id) if info.state is JobState.RUNNING else None
            if note is not None:
                entry = replace(entry, info=note.ended(info), dropped_bytes=note.dropped_bytes)
                noted.append(entry)
            elif info.state is JobState.RUNNING:
                _kill_recorded(info.pid, entry.pid_start_time)
                lost.append(info.id)
            job = Job.restored(entry, self._jobs_dir / info.id)
            if entry.info.state is JobState.RUNNING:
                job.feed(lc.Lost(LOST_ERROR, at))
            self._table.add(job)
        if lost and self.store is not None:
            try:
                await self.store.mark_lost(lost, LOST_ERROR, at)
            except StateDirError as exc:
                self._refused = True
                _log.error("cannot record %d lost job(s) (will retry): %s", len(lost), exc)
                self.unsaved.update(dict.fromkeys(lost, True))
        if path is not None and self.store is not None and await self._record_noted(noted):
            # (Not while the noted ends are not in the store: the file keeps them.)
            try:
                self._notes = await trio.to_thread.run_sync(EndNotes.create, path)
            except OSError as exc:  # (no room for it: a disk all but full)
                _log.warning("ends are not noted until their records commit: %s", exc)
        if stored:
            _log.info("restored %d job(s), %d of them lost", len(stored), len(lost))
        known = {entry.info.id for entry in stored}
        unrecorded = await trio.to_thread.run_sync(_unrecorded_dirs, self._jobs_dir, known)
        if unrecorded:
            # Jobs whose record was still queued when the server died: the
            # reapers killed them, the cleanup of leftover groups removed their
            # groups; nobody was told of them for sure, so nothing of them stays.
            await trio.to_thread.run_sync(remove_dirs, unrecorded)
            _log.warning("removed %d job directory(ies) with no record", len(unrecorded))

    async def _record_noted(self, noted: Sequence[StoredJob]) -> bool:
        """Commit the ends ``restore`` took from the notes, in one transaction; False if
        the store refused them."""
        store = self.store
        assert store is not None
        writes = [store.queue_end(e.info, dropped_bytes=e.dropped_bytes) for e in noted]
        try:
            await store.flush()
        except StateDirError as exc:
            _log.error("cannot record the ends of %d job(s): %s", len(noted), exc)
        if not all(w.done and w.error is None for w in writes):
            self._refused = True
            self.unsaved.update({e.info.id: True for e in noted})
            return False
        if noted:
            _log.info("%d job(s) ended as noted before the restart", len(noted))
        return True

    def close_notes(self) -> None:
        """Unmap the notes (after the last commit: what is still noted stays on disk)."""
        if self._notes is not None:
            self._notes.close()
            self._notes = None

    async def run_housekeeping(self) -> None:
        """Run ``housekeep`` every ``retention.interval`` seconds."""
        while True:
            await trio.sleep(self.retention.interval)
            await self.housekeep()

    async def housekeep(self) -> None:
        """Persist output counters and enforce retention now."""
        store = self.store
        if store is None:
            await trio.lowlevel.checkpoint()
            return
        retention = self.retention
        table = self._table
        # The queued records first (with a commit in flight, once its outcomes are
        # known): one the store refused is then in ``unsaved``, written again below.
        await self.commit_queued()
        await self.save_unsaved()
        # Then the store's reserve, if a full disk took it and has room again: Starts
        # answer before their record's commit again (``refusing``).
        await store.reserve()
        for job in table.values():
            if job.log is not None and not job.ended.is_set():
                store.note_output(job.id, job.log.end, job.output_start, job.log.dropped_bytes)
        try:
            await store.flush()
            if retention.keep_ended is None and retention.max_ended_age is None:
                return
            doomed = await store.ended_for_retention(
                keep_count=retention.keep_ended, max_age=retention.max_ended_age, now=now()
            )
            doomed = [
                i
                for i in doomed
                if (ended := table.find(i)) is not None
                and ended.ended.is_set()
                and i not in self.unsaved
            ]
            if not doomed:
                return
            for job_id in doomed:
                table.forget(job_id)
            await trio.to_thread.run_sync(remove_dirs, [self._jobs_dir / i for i in doomed])
            await store.delete(doomed)
            _log.info("retention: removed %d ended job(s)", len(doomed))
        except StateDirError as exc:
            _log.error("housekeeping failed: %s", exc)


def _kill_recorded(pid: int | None, start_time: int | None) -> None:
    """Kill a recorded job's process group, if ``pid`` is still that process."""
    if pid is None or start_time is None or process_start_time(pid) != start_time:
        return  # gone, or the pid now names an unrelated process
    try:
        os.killpg(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        _log.warning("cannot kill process group %d of a lost job", pid)


def _unrecorded_dirs(jobs_dir: Path, known: set[str]) -> list[Path]:
    """The directories under ``jobs_dir`` of no job the store knows."""
    try:
        entries = list(os.scandir(jobs_dir))
    except FileNotFoundError:
        return []
    return [Path(e.path) for e in entries if e.name not in known and e.is_dir()]


def remove_dirs(directories: Sequence[Path]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
