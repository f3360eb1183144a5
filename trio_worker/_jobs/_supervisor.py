"""The supervisor: a trio nursery that owns every job's process and output.

Each job is one task in the supervisor's nursery. The task owns the job's
process (its pipes, its group) and its output log, and is the only place that
records the job's end, so "when does a job end" has one answer: when its main
process has exited, the rest of its process group has been killed, and its
pipes are drained and flushed.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal as _signal
import tempfile
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from .._errors import (
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    JobStillRunning,
    NoStdin,
    ResourceExhausted,
    ShuttingDown,
    StateDirError,
    Unenforceable,
)
from .._host._cgroups import CgroupDriver, CgroupError, JobCgroup
from .._host._cgroups import detect as cgroup_detect
from .._host._enforce import check_enforceable
from .._host._guard import ReaperGuard, outlive
from .._host._isolation import read_report
from .._host._spawn import raise_nofile_limit
from .._host._users import (
    UnixUser,
    current_user,
    lookup_user,
    start_directory,
    user_environment,
)
from .._limits import LimitPolicy
from .._model import (
    Isolation,
    JobIdGenerator,
    JobInfo,
    JobState,
    Limits,
    OutputChunk,
    OutputStream,
    Usage,
)
from .._util import NoPublicConstructor, final
from . import _lifecycle as lc
from ._launch import REPORT, Launched, Launcher, LaunchPlan
from ._output import DEFAULT_CHUNK, OutputLog
from ._process import (
    RESOURCE_ERRNOS,
    Credentials,
    JobProcess,
    PipeReader,
    SpawnError,
    SpawnOptions,
    StartSpec,
    Stdin,
    Terminal,
    validate_signal,
    validate_start,
)
from ._statedir import StateDir
from ._stdin import DEFAULT_TERMINAL_SIZE, StdinClosed, StdinWriter, check_terminal_size
from ._store import JobStore, SqliteJobStore, StoredJob, process_start_time

__all__ = [
    "LOST_ERROR",
    "Retention",
    "Supervisor",
    "open_supervisor",
    "open_supervisor_with_driver",
]

#: How long a job's pipes may stay open after its process group was killed
#: (something outside the group, e.g. a setsid'ed grandchild, may hold them).
_DRAIN_TIMEOUT = 2.0
_log = logging.getLogger("trio_worker.supervisor")
_audit = logging.getLogger("trio_worker.audit")
LOST_ERROR = "the server stopped while the job ran"


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


#: Most bytes a pump takes from a pipe before letting other tasks run.
_ROUND_BYTES = 4 * 1024 * 1024


def _now() -> datetime:
    return datetime.now(UTC)


class _Job:
    """The supervisor's private, mutable view of one job."""

    def __init__(
        self,
        job_id: str,
        owner: str,
        spec: StartSpec,
        limits: Limits,
        isolation: Isolation,
        log: OutputLog | None,
    ) -> None:
        self.id = job_id
        self.owner = owner
        self.spec = spec
        #: The keys the request gave (values may be secrets: never persisted).
        self.env_keys: tuple[str, ...] = ()
        self.limits = limits
        self.isolation = isolation
        self.log = log
        self.record = lc.Record()
        self.process: JobProcess | None = None
        self.cgroup: JobCgroup | None = None
        self.final_usage: Usage | None = None
        self.ended = trio.Event()
        #: Started with stdin (callers may write it) / on a terminal.
        self.stdin = False
        self.tty = False
        #: The job's input side: its stdin pipe, or its terminal (also for resizes).
        self.input: StdinWriter | None = None
        #: A tty job's terminal master, read as its output.
        self.terminal: PipeReader | None = None
        #: Recorded with the pid, so a record written late still lets recovery
        #: tell the job's process from one that reused its pid.
        self.pid_start_time: int | None = None
        #: When an accepted Stop SIGKILLs the job (the earliest one asked for).
        self.kill_deadline: float | None = None
        #: The Unix user it runs as (``UnixUser.label``).
        self.user = ""

    def feed(self, event: lc.Event) -> None:
        self.record = lc.apply(self.record, event)
        if self.record.state is not None and self.record.state.ended:
            self.ended.set()

    def info(self, *, usage: bool = True, record: lc.Record | None = None) -> JobInfo:
        """The job as it is now; ``usage=False`` skips reading the cgroup's accounting.

        ``record`` stands in for the lifecycle's (the record written while spawning).
        """
        r = record or self.record
        assert r.state is not None
        assert r.started_at is not None
        return JobInfo(
            id=self.id,
            owner=self.owner,
            command=self.spec.command,
            args=self.spec.args,
            state=r.state,
            pid=r.pid,
            exit_code=r.exit_code,
            signal=r.signal,
            error=r.error,
            started_at=r.started_at,
            ended_at=r.ended_at,
            output_bytes=self.log.end if self.log is not None else 0,
            output_start=self.output_start,
            limits=self.limits,
            isolation=self.isolation,
            oom_killed=r.oom_killed,
            spawn_errno=r.spawn_errno,
            usage=self.usage() if usage else None,
            user=self.user,
            stdin=self.stdin,
            tty=self.tty,
        )

    @classmethod
    def restored(cls, entry: StoredJob, directory: Path) -> _Job:
        """A job of an earlier run, as its record and its log on disk say."""
        info = entry.info
        spec = StartSpec(info.command, info.args, {}, entry.cwd)
        if (directory / "output.log").exists():
            log = OutputLog.recover(directory)
        else:  # never written (or removed by hand): an empty, finished log
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            log = OutputLog(directory)
            log.finish()
            log.close()
        job = cls(info.id, info.owner, spec, info.limits, info.isolation, log)
        job.env_keys = entry.env_keys
        job.user = info.user
        job.final_usage = info.usage
        job.record = lc.Record(
            state=info.state,
            pid=info.pid,
            exit_code=info.exit_code,
            signal=info.signal,
            error=info.error,
            spawn_errno=info.spawn_errno,
            started_at=info.started_at,
            ended_at=info.ended_at,
            oom_killed=info.oom_killed,
        )
        if info.state.ended:
            job.ended.set()
        return job

    @property
    def output_start(self) -> int:
        return getattr(self.log, "start", 0) if self.log is not None else 0

    @property
    def directory(self) -> Path | None:
        return self.log.directory if self.log is not None else None

    def usage(self) -> Usage | None:
        if self.final_usage is None and self.cgroup is not None and not self.ended.is_set():
            try:
                return self.cgroup.usage()
            except CgroupError:
                return None  # the group is going away: the job is ending
        return self.final_usage


@final
class Supervisor(metaclass=NoPublicConstructor):
    """Starts, controls and watches jobs. Get one from ``open_supervisor``.

    ``status`` and ``list`` are plain methods: they only read snapshots.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        state_dir: Path,
        *,
        base_env: Mapping[str, str],
        tail_bytes: int,
        cgroups: CgroupDriver,
        limit_policy: LimitPolicy,
        store: JobStore | None = None,
        retention: Retention | None = None,
        job_nofile: int | None = None,
        spawn_in_thread: bool = False,
        ready_places: int = 0,
    ) -> None:
        self._nursery = nursery
        #: Spawn from a worker thread (without PDEATHSIG): only while a reaper watches.
        self._spawn_in_thread = spawn_in_thread
        self._store = store
        self._retention = retention or Retention()
        self.cgroups = cgroups
        self._policy = limit_policy
        self.state_dir = state_dir
        self._jobs_dir = state_dir / "jobs"
        self._jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._base_env = dict(base_env)
        self._jobs: dict[str, _Job] = {}
        #: Every id in ``_jobs``, sorted (ids sort by creation): List pages from it.
        #: Add and remove jobs with ``_add`` and ``_forget`` to keep it in step.
        self._order: list[str] = []
        self._new_id = JobIdGenerator()
        self._closing = False
        #: Who this process runs as: the user of jobs that name none.
        self._me = current_user()
        #: Makes each job's directory, log, cgroup and process (blocking: off the loop).
        #: Jobs get the soft fd limit this process had before raising its own.
        self._launcher = Launcher(
            self._jobs_dir,
            state_dir / "ready",
            cgroups,
            tail_bytes=tail_bytes,
            max_output_bytes=self._retention.max_output_bytes,
            job_nofile=job_nofile,
            ready=ready_places,
        )
        #: Jobs whose record in the store is behind (a write failed, e.g. a full
        #: disk): job id -> whether its row exists. Written again by housekeeping.
        self._unsaved: dict[str, bool] = {}

    # -- queries -------------------------------------------------------------

    def status(self, job_id: str) -> JobInfo:
        return self._get(job_id).info()

    def list(self, owner: str | None = None) -> list[JobInfo]:
        """Every job (of ``owner``, if given), oldest first."""
        return [job.info() for job in self._jobs.values() if owner is None or job.owner == owner]

    def iter_jobs(
        self,
        *,
        before: str | None = None,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> Iterator[JobInfo]:
        """Jobs newest first, for paging: those with an id below ``before`` (all if
        None), in ``states`` (any if None or empty), of ``owner`` (anyone's if
        None), whose owner ``visible`` accepts.

        Lazy: a page costs the snapshots it takes, however many jobs there are.
        Consume it without awaiting in between (the table may change).
        """
        order = self._order
        i = len(order) if before is None else bisect.bisect_left(order, before)
        wanted = frozenset(states) if states else None
        while i > 0:
            i -= 1
            job = self._jobs.get(order[i])
            if job is None or job.record.state is None:
                continue  # forgotten, or not started yet
            if wanted is not None and job.record.state not in wanted:
                continue
            if owner is not None and job.owner != owner:
                continue
            if visible is not None and not visible(job.owner):
                continue
            yield job.info()

    def _add(self, job: _Job) -> None:
        """Put a job in the table (and in id order, for ``iter_jobs``)."""
        self._jobs[job.id] = job
        order = self._order
        if not order or order[-1] < job.id:
            order.append(job.id)  # the usual case: ids grow
        else:
            bisect.insort(order, job.id)

    def _forget(self, job_id: str) -> None:
        """Take a job out of the table (its records and files are the caller's)."""
        if self._jobs.pop(job_id, None) is not None:
            i = bisect.bisect_left(self._order, job_id)
            if i < len(self._order) and self._order[i] == job_id:
                del self._order[i]

    async def _account(self, user: str | None) -> UnixUser:
        if user is None or user == "" or user == self._me.label:
            return self._me
        if not isinstance(user, str):
            raise InvalidRequest("user", "must be a user name or a decimal uid")
        return await trio.to_thread.run_sync(lookup_user, user)

    def running_count(self, owner: str) -> int:
        """How many of ``owner``'s jobs are running (for quotas: no snapshots made)."""
        running = JobState.RUNNING
        return sum(1 for j in self._jobs.values() if j.owner == owner and j.record.state is running)

    def _get(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except (KeyError, TypeError):
            raise JobNotFound(str(job_id)) from None

    # -- control -------------------------------------------------------------

    async def start(
        self,
        command: str,
        args: Sequence[str] | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        limits: Limits | None = None,
        isolation: Isolation | None = None,
        owner: str = "",
        stdin: bool = False,
        tty: bool = False,
        terminal_size: tuple[int, int] | None = None,
        user: str | None = None,
    ) -> JobInfo:
        """Start a job; return once its process exists.

        ``stdin``: keep the job's stdin open for ``write_stdin``/``close_stdin`` (else it
        is /dev/null). ``tty``: run it on a new pseudo-terminal of ``terminal_size``
        (rows, cols; default 24x80), its stdin, stdout and stderr and its controlling
        terminal, in a new session; its output is all STDOUT.

        A command that cannot be executed is not an exception: the job is
        returned (and kept) in state FAILED with ``error`` saying why.

        ``user`` (a name or a decimal uid; default: the supervisor's own user)
        is who the job runs as: its uid, primary gid and groups (InvalidRequest
        for a user the host does not know). A job of another user gets a clean
        environment (PATH and locale kept, HOME, USER, LOGNAME and SHELL from
        passwd; ``env`` on top)
        and starts in that user's home (``/`` without one) unless ``cwd`` says.
        """
        await trio.lowlevel.checkpoint()
        if self._closing:
            raise ShuttingDown("the supervisor is shutting down")
        account = await self._account(user)
        as_other = account.uid != self._me.uid
        base_env: Mapping[str, str] = self._base_env
        if as_other:
            if self._me.uid != 0:
                raise Unenforceable(
                    f"cannot run a job as {account.label}: the server does not run as root"
                )
            base_env = user_environment(account, self._base_env)
            if cwd is None or cwd == "":
                cwd = await trio.to_thread.run_sync(start_directory, account)
        credentials = Credentials(account.uid, account.gid, account.groups) if as_other else None
        spec = validate_start(command, args, env, cwd, base_env=base_env, check_cwd=not as_other)
        terminal = _check_terminal(tty, terminal_size)
        limits = limits if limits is not None else Limits()
        isolation = isolation if isolation is not None else Isolation()
        if not isinstance(limits, Limits):
            raise InvalidRequest("limits", "must be a trio_worker.Limits")
        if not isinstance(isolation, Isolation):
            raise InvalidRequest("isolation", "must be a trio_worker.Isolation")
        limits = self._policy.apply(limits)  # InvalidRequest above a maximum
        check_enforceable(self.cgroups, limits, isolation)  # never silently ignored
        # A terminal's master and slave, and the master's duplicate for writing:
        # made before the job, so running out of descriptors refuses the Start.
        fds = _open_terminal() if terminal is not None else None
        try:
            stdin_option: Stdin | Terminal
            if fds is not None and terminal is not None:
                if credentials is not None:
                    os.fchown(fds[1], credentials.uid, -1)  # the job's own terminal, as login does
                stdin_option = Terminal(fds[1], terminal[0], terminal[1])
            else:
                stdin_option = Stdin.PIPE if stdin else Stdin.NULL
            # A place made ahead of need (its id, directory and group), if one is ready.
            place = self._launcher.take()
            job_id = place.job_id if place is not None else self._new_id()
            job = _Job(job_id, owner, spec, limits, isolation, None)
            job.env_keys = tuple(env or ())
            job.user = account.label
            job.stdin = bool(stdin)
            job.tty = terminal is not None
            # The namespace helper must start as root (to unshare): it drops to the
            # user itself, right before the command.
            user_options = None if isolation.any else credentials
            plan = LaunchPlan(
                job_id,
                spec,
                limits,
                isolation,
                credentials,
                SpawnOptions(stdin=stdin_option, user=user_options),
                tty=terminal is not None,
                place=place,
            )
            started_at = _now()
            # Shielded: what the thread made (files, group, process) must not be lost.
            with trio.CancelScope(shield=True):
                try:
                    launched, recorded = await self._launch(job, plan, started_at)
                finally:
                    self._launcher.replenish()
        except BaseException:
            # Out of descriptors, memory or processes (ResourceExhausted), or
            # cancelled: no half-made job stays, in the table or on the host.
            _close_terminal(fds, slave=True)
            raise
        if fds is not None:
            os.close(fds[1])  # the slave is the job's alone now
        job.log, job.cgroup = launched.log, launched.group
        if self._store is not None and self._spawn_in_thread and not recorded:
            self._unsaved[job.id] = False  # written by housekeeping (or at the end)
        process = launched.process
        if launched.error is not None or process is None:
            # The command cannot run: a FAILED job, kept and reported.
            _close_all(launched.procs)
            _close_terminal(fds)
            self._add(job)
            error = launched.error or SpawnError("the job's process was not started", None)
            self._feed(job, lc.SpawnFailed(error.message, started_at, error.errno))
            launched.log.finish()
            launched.log.close()
            if job.cgroup is not None:
                await self._remove_cgroup(job)
            if self._spawn_in_thread:
                await self._persist_end(job)  # the record made while spawning, now FAILED
            else:
                await self._persist_start(job)
            return job.info()
        self._add(job)
        job.process = process
        if fds is not None:
            job.terminal = PipeReader(fds[0])
            job.input = StdinWriter(fds[2], tty=True)
        elif process.stdin is not None:
            job.input = StdinWriter(process.stdin, tty=False)
            process.stdin = None  # the writer owns it now
        # The full environment (the server's, ~3 KiB) served the exec; keeping
        # it would cost every job, running or ended, that much memory.
        job.spec = dataclasses.replace(spec, env={})
        job.pid_start_time = launched.start_time
        self._feed(job, lc.Spawned(process.pid, started_at))
        # The job as it started (no usage yet: reading the cgroup's accounting
        # files would cost the loop, for zeros).
        started = job.info(usage=False)
        self._nursery.start_soon(self._run_job, job, process, name=f"job {job_id}")
        if recorded:
            # Its record was committed while it was spawned; the pid follows with
            # the next commit (group commit: no second transaction on this path).
            assert self._store is not None
            self._store.note_spawned(job.id, process.pid, launched.start_time)
        elif not self._spawn_in_thread:
            # Recorded before the caller learns the job exists; a crash in between
            # leaves a cgroup named after it, which the next start cleans up.
            await self._persist_start(job)
        # The job as it started: a quick command may already have ended while
        # its record was written, and Wait/Status tell that part.
        return started

    async def _launch(
        self, job: _Job, plan: LaunchPlan, started_at: datetime
    ) -> tuple[Launched, bool]:
        """Make the job's place and process; return them, and whether its record is
        committed (RUNNING, no pid yet).

        With the reaper watching: one worker-thread call (``prepare_and_spawn``),
        and, with a store, the job's record written *meanwhile*, by the store's own
        thread: a client still learns of a job only once its record would survive a
        crash, but the Start waits for the longer of the two, not their sum. A
        record without a pid is what recovery makes LOST; the reaper and the
        cleanup of leftover groups kill the job by its cgroup, which needs no pid.
        Without the reaper, the spawn is on the loop's thread (PR_SET_PDEATHSIG)
        and the record follows it, with the pid (``_persist_start``), since only
        the pid can find the job's process group after a crash then.

        Raises ``ResourceExhausted`` having left nothing: no files, group, process,
        or record.
        """
        launcher = self._launcher
        if not self._spawn_in_thread:
            launched = await self._in_thread(launcher.prepare, plan)
            if launched.error is None:
                try:
                    launcher.spawn(launched, plan, pdeathsig=_signal.SIGKILL)
                except BaseException:
                    await trio.to_thread.run_sync(launcher.discard, launched)
                    raise
            return launched, False
        if self._store is None:
            return await self._in_thread(launcher.prepare_and_spawn, plan), False
        recorded = False
        failure: BaseException | None = None

        async def record() -> None:
            nonlocal recorded
            info = job.info(usage=False, record=lc.Record(JobState.RUNNING, started_at=started_at))
            recorded = await self._save(job, exists=False, info=info)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            try:
                launched = await self._in_thread(launcher.prepare_and_spawn, plan)
            except BaseException as exc:
                failure = exc
        if failure is not None:
            if recorded:
                await self._unrecord(job.id)
            raise failure
        return launched, recorded

    async def _unrecord(self, job_id: str) -> None:
        """Delete the record of a Start that was refused after all."""
        assert self._store is not None
        try:
            await self._store.delete([job_id])
        except Exception:
            # Left as it is, it reads as a LOST job after a restart.
            _log.exception("job %s: cannot delete the record of a refused start", job_id)

    async def _in_thread(self, fn: Callable[[LaunchPlan], Launched], plan: LaunchPlan) -> Launched:
        """``fn(plan)`` in a worker thread; no thread to be had is ``ResourceExhausted``."""
        try:
            return await trio.to_thread.run_sync(fn, plan)
        except RuntimeError as exc:  # "can't start new thread": out of processes (EAGAIN)
            if "thread" not in str(exc):
                raise
            raise ResourceExhausted(f"cannot start the job: {exc}") from None

    def _feed(self, job: _Job, event: lc.Event) -> None:
        """Advance the job's lifecycle and write the audit line for the change."""
        job.feed(event)
        r = job.record
        assert r.state is not None
        _audit.info(
            json.dumps(
                {
                    "time": _now().isoformat(timespec="milliseconds"),
                    "event": "job",
                    "job_id": job.id,
                    "owner": job.owner,
                    "state": r.state.value,
                    "pid": r.pid,
                    "exit_code": r.exit_code,
                    "signal": r.signal,
                    "error": r.error or None,
                    "oom_killed": r.oom_killed,
                },
                separators=(",", ":"),
            )
        )

    async def _persist_start(self, job: _Job) -> None:
        """Record the new job; if the store fails, the job runs with its record pending.

        Shielded: once the process exists its record must be attempted, even
        if the caller gave up waiting.
        """
        if self._store is None:
            return
        with trio.CancelScope(shield=True):
            if not await self._save(job, exists=False):
                self._unsaved[job.id] = False

    async def _persist_end(self, job: _Job) -> None:
        """Record the job's end; never raises (the job task's ``finally`` calls it)."""
        if self._store is None:
            return
        exists = self._unsaved.pop(job.id, True)
        if not await self._save(job, exists=exists):
            self._unsaved[job.id] = exists

    async def _save(self, job: _Job, *, exists: bool, info: JobInfo | None = None) -> bool:
        """Write the job's record as it is now: insert it or record its end.

        Returns False, having logged why, when the store cannot take it (a full
        disk, an SQLite error): the caller keeps the job in ``_unsaved`` and
        housekeeping tries again. Never raises: a store failure must not escape
        a job's task, or it would stop the supervisor and every other job.
        """
        store = self._store
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
            if job.id not in self._unsaved:
                _log.error("job %s: cannot record it (will retry): %s", job.id, exc)
            return False
        except Exception:
            _log.exception("job %s: cannot record it (will retry)", job.id)
            return False
        return True

    async def _save_unsaved(self) -> None:
        """Write the records that failed before (the disk may have room again)."""
        pending = [(i, exists) for i, exists in self._unsaved.items() if i in self._jobs]
        self._unsaved = {i: e for i, e in self._unsaved.items() if i in self._jobs}
        if not pending:
            return
        saved: list[str] = []

        async def save(job_id: str, exists: bool) -> None:
            if await self._save(self._jobs[job_id], exists=exists):
                saved.append(job_id)
                # (A running job whose row is now in: its end will update it.)
                self._unsaved.pop(job_id, None)

        # Concurrent, so group commit writes them in one transaction.
        async with trio.open_nursery() as nursery:
            for job_id, exists in pending:
                nursery.start_soon(save, job_id, exists)
        if saved:
            _log.info("recorded %d job(s) whose records were pending", len(saved))

    async def signal(self, job_id: str, signum: int) -> JobInfo:
        """Send ``signum`` to the job's process group."""
        job = self._get(job_id)
        signum = validate_signal(signum)
        await trio.lowlevel.checkpoint()
        _signal_job(job, self._running_process(job), signum)
        return job.info()

    async def stop(self, job_id: str, grace: float = 5.0) -> JobInfo:
        """SIGTERM the job's group, SIGKILL it after ``grace`` seconds; return the end."""
        job = self._get(job_id)
        if isinstance(grace, bool) or not isinstance(grace, int | float):
            raise InvalidRequest("grace", "must be a number of seconds")
        if not math.isfinite(grace) or grace < 0:
            raise InvalidRequest("grace", f"must be a finite number >= 0, got {grace}")
        process = self._running_process(job)
        _signal_job(job, process, _signal.SIGTERM)
        # The SIGKILL after the grace is the supervisor's, not the caller's: a
        # caller that gives up waiting (cancelled, disconnected) cannot stop it.
        deadline = trio.current_time() + grace
        if job.kill_deadline is None or deadline < job.kill_deadline:
            job.kill_deadline = deadline
            self._nursery.start_soon(self._kill_at, job, process, deadline)
        await job.ended.wait()
        return job.info()

    async def remove(self, job_id: str, force: bool = False) -> JobInfo:
        """Delete an ended job: its record, in memory and in the store, and its output on
        disk. Returns its last snapshot; from then on the id is ``JobNotFound``.

        A running job raises ``JobStillRunning``, unless ``force``: then it is SIGKILLed (its
        process group and, through the cgroup, whatever escaped it) and removed once ended.
        """
        job = self._get(job_id)
        if not job.ended.is_set():
            if not force:
                raise JobStillRunning(job.id)
            if job.record.state is JobState.RUNNING and job.process is not None:
                await self._kill(job, job.process)
            await job.ended.wait()
        if self._jobs.get(job.id) is not job:
            raise JobNotFound(job.id)  # another remove got there first
        info = job.info()
        self._forget(job.id)
        # Shielded: once the record is going, the output goes too, whatever the caller does.
        with trio.CancelScope(shield=True):
            if self._store is not None:
                try:
                    await self._store.delete([job.id])
                except BaseException:
                    self._add(job)  # nothing was removed
                    raise
            self._unsaved.pop(job.id, None)
            if job.directory is not None:
                await trio.to_thread.run_sync(_remove_dirs, [job.directory])
        return info

    async def _kill_at(self, job: _Job, process: JobProcess, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await job.ended.wait()
        if not job.ended.is_set() and job.kill_deadline == deadline:
            await self._kill(job, process)

    async def write_stdin(self, job_id: str, data: bytes) -> None:
        """Write ``data`` to the job's stdin, waiting while the job does not read it.

        Nothing is buffered here: the wait is the backpressure, and memory stays bounded
        by the pipe (or terminal). Concurrent writes go in arrival order. Raises NoStdin
        for a job started without stdin (or whose stdin was closed), JobNotRunning once
        it has ended. Bytes a job will never read (it closed its stdin) are dropped.
        """
        job = self._get(job_id)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidRequest("data", f"must be bytes, got {type(data).__name__}")
        writer = self._stdin_of(job)
        try:
            await writer.write(data)
        except StdinClosed:
            raise self._closed_stdin(job) from None

    async def close_stdin(self, job_id: str) -> None:
        """End the job's input: it reads EOF (on a terminal: the EOF character, after
        whatever was written before). Closing twice is no error."""
        job = self._get(job_id)
        await self._stdin_of(job, closing=True).close()

    async def resize(self, job_id: str, rows: int, cols: int) -> None:
        """Set a tty job's terminal size; its foreground process group gets SIGWINCH."""
        job = self._get(job_id)
        try:
            rows, cols = check_terminal_size(rows, cols)
        except ValueError as exc:
            raise InvalidRequest("terminal_size", str(exc)) from None
        await trio.lowlevel.checkpoint()
        if not job.tty:
            raise NoStdin(job.id, "it has no terminal (start it with tty)")
        self._running_process(job)
        if job.input is None:
            raise self._closed_stdin(job)
        try:
            job.input.resize(rows, cols)
        except StdinClosed:
            raise self._closed_stdin(job) from None

    def _stdin_of(self, job: _Job, *, closing: bool = False) -> StdinWriter:
        if not job.stdin:
            raise NoStdin(job.id, "it was started without stdin")
        self._running_process(job)
        writer = job.input
        if writer is None:
            raise self._closed_stdin(job)
        if writer.closed and not closing:
            raise NoStdin(job.id, "its stdin was closed")
        return writer

    def _closed_stdin(self, job: _Job) -> Exception:
        if job.ended.is_set() or job.record.state is not JobState.RUNNING:
            state = job.record.state.value if job.record.state else "new"
            return JobNotRunning(job.id, state)
        return NoStdin(job.id, "its stdin was closed")

    async def wait(self, job_id: str) -> JobInfo:
        """Wait until the job has ended and its output is complete."""
        job = self._get(job_id)
        await job.ended.wait()
        return job.info()

    def output(
        self,
        job_id: str,
        offset: int = 0,
        follow: bool = True,
        *,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> AsyncIterator[OutputChunk]:
        """The job's output from ``offset``: with ``follow``, live until the job ends.

        Bad arguments raise ``InvalidRequest`` at once; what needs the job (``JobNotFound``,
        an offset past the end of an ended log) raises at the first iteration, as the
        remote client's ``output`` does (it learns of them from the server's answer).
        """
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequest("offset", f"must be an integer >= 0, got {offset!r}")
        if chunk_size <= 0:
            raise InvalidRequest("chunk_size", "must be > 0")
        return _OnFirstNext(lambda: self._open_output(job_id, offset, follow, chunk_size))

    def _open_output(
        self, job_id: str, offset: int, follow: bool, chunk_size: int
    ) -> AsyncIterator[OutputChunk]:
        job = self._get(job_id)
        assert job.log is not None
        if job.log.finished and offset > job.log.end:
            raise InvalidRequest("offset", f"{offset} is past the end of the log ({job.log.end})")
        reader = job.log.read(offset, follow=follow, chunk_size=chunk_size)
        return _UntilEnded(reader, job.ended) if follow else reader

    # -- internals -----------------------------------------------------------

    def _running_process(self, job: _Job) -> JobProcess:
        if job.record.state is not JobState.RUNNING or job.process is None:
            state = job.record.state.value if job.record.state else "new"
            raise JobNotRunning(job.id, state)
        return job.process

    async def _terminate(self, job: _Job, process: JobProcess, grace: float) -> None:
        _signal_job(job, process, _signal.SIGTERM)
        with trio.move_on_after(grace):
            await job.ended.wait()
        if not job.ended.is_set():
            await self._kill(job, process)
            await job.ended.wait()

    async def _kill(self, job: _Job, process: JobProcess) -> None:
        """SIGKILL everything of the job: its process group and, through the
        cgroup, whatever escaped it (setsid, double fork)."""
        _signal_job(job, process, _signal.SIGKILL)
        group = job.cgroup
        if group is not None and group.tracked and not group.is_empty():
            # May freeze and wait (v1 without cgroup.kill): not on the event loop.
            try:
                await trio.to_thread.run_sync(group.kill)
            except CgroupError as exc:
                if group.is_empty():
                    return  # it ended (and its group went) while we were killing it
                _log.error("job %s: cannot kill its cgroup: %s", job.id, exc)

    async def _remove_cgroup(self, job: _Job) -> None:
        group = job.cgroup
        if group is None or not group.tracked:
            return
        try:
            await trio.to_thread.run_sync(group.remove)
        except CgroupError as exc:
            _log.warning("job %s: cannot remove its cgroup: %s", job.id, exc)

    async def _run_job(self, job: _Job, process: JobProcess) -> None:
        log = job.log
        assert log is not None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.run_flusher)
                async with trio.open_nursery() as pumps:
                    if process.stdout is not None:
                        pumps.start_soon(_pump, process.stdout, OutputStream.STDOUT, log)
                    if job.terminal is not None:  # on a terminal, all output is stdout
                        pumps.start_soon(_pump, job.terminal, OutputStream.STDOUT, log)
                    if process.stderr is not None:
                        pumps.start_soon(_pump, process.stderr, OutputStream.STDERR, log)
                    await process.wait_exited()
                    # As systemd does for a service: the main process is gone,
                    # so whatever it left (in its group or its cgroup) goes too.
                    await self._kill(job, process)
                    if job.cgroup is not None:
                        with trio.move_on_after(_DRAIN_TIMEOUT):
                            await job.cgroup.wait_empty()
                    process.reap()
                    pumps.cancel_scope.deadline = trio.current_time() + _DRAIN_TIMEOUT
                log.finish()
        except Exception:
            # A bug here must cost one job, not the supervisor and every other job.
            _log.exception("job %s: supervision failed; killing it", job.id)
        finally:
            with trio.CancelScope(shield=True):
                if not process.reaped:
                    await self._kill(job, process)
                    await process.wait_exited()
                    process.reap()
                process.close_pipes()
                if job.terminal is not None:
                    job.terminal.close()
                if job.input is not None:
                    job.input.release()  # writers still waiting learn the job ended
                try:
                    if not log.finished:
                        log.finish()
                    await log.flush()
                    log.close()
                except Exception:  # the log's own failures are in it (lost ranges)
                    _log.exception("job %s: cannot finish its output log", job.id)
                await self._record_end(job, process)

    async def _record_end(self, job: _Job, process: JobProcess) -> None:
        returncode = process.returncode
        assert returncode is not None
        oom_killed = False
        group = job.cgroup
        if group is not None and group.tracked:
            try:
                oom_killed = group.oom_killed()
                job.final_usage = group.usage() or Usage()
            except CgroupError as exc:
                _log.warning("job %s: cannot read its cgroup's accounting: %s", job.id, exc)
                job.final_usage = Usage()
        failure = None
        if job.isolation.any and (log_dir := job.directory) is not None:
            try:
                failure = read_report(log_dir / REPORT)
            except OSError as exc:  # the job's end is recorded whatever the disk says
                _log.warning("job %s: cannot read the helper's report: %s", job.id, exc)
        if failure is not None:
            self._feed(job, lc.SpawnFailed(failure.message, _now(), failure.errno))
        else:
            self._feed(job, lc.Exited(returncode, _now(), oom_killed=oom_killed))
        # Waiters are answered now. The record goes to the store first (so a
        # housekeeping pass after a Wait sees the end); removing the group (an
        # rmdir per hierarchy, each waiting for an RCU grace period) comes last.
        await self._persist_end(job)
        await self._remove_cgroup(job)

    # -- persistence -----------------------------------------------------------

    async def _restore(self, stored: Sequence[StoredJob]) -> None:
        """Take back the jobs of an earlier run from the store.

        A job recorded as RUNNING outlived its server: whatever is left of it
        is killed (its cgroup already was, by ``cleanup_leftovers``; without
        cgroups, its process group, if the pid still names the same process),
        and it becomes LOST. Output written before the crash stays readable.
        """
        now = _now()
        lost: list[str] = []
        for entry in stored:
            info = entry.info
            if info.state is JobState.RUNNING:
                _kill_recorded(info.pid, entry.pid_start_time)
                lost.append(info.id)
            job = _Job.restored(entry, self._jobs_dir / info.id)
            if info.state is JobState.RUNNING:
                self._feed(job, lc.Lost(LOST_ERROR, now))
            self._add(job)
        if lost and self._store is not None:
            try:
                await self._store.mark_lost(lost, LOST_ERROR, now)
            except StateDirError as exc:
                _log.error("cannot record %d lost job(s) (will retry): %s", len(lost), exc)
                self._unsaved.update(dict.fromkeys(lost, True))
        if stored:
            _log.info("restored %d job(s), %d of them lost", len(stored), len(lost))

    async def _housekeeping(self) -> None:
        """Run ``housekeep`` every ``retention.interval`` seconds."""
        while True:
            await trio.sleep(self._retention.interval)
            await self.housekeep()

    async def housekeep(self) -> None:
        """Persist output counters and enforce retention now.

        A persistent supervisor does this periodically on its own; calling it
        is only useful to apply a policy at a moment of your choosing.
        """
        store = self._store
        if store is None:
            await trio.lowlevel.checkpoint()
            return
        retention = self._retention
        await self._save_unsaved()
        for job in self._jobs.values():
            if job.log is not None and not job.ended.is_set():
                store.note_output(job.id, job.log.end, job.output_start, job.log.dropped_bytes)
        try:
            await store.flush()
            if retention.keep_ended is None and retention.max_ended_age is None:
                return
            doomed = await store.ended_for_retention(
                keep_count=retention.keep_ended, max_age=retention.max_ended_age, now=_now()
            )
            doomed = [
                i
                for i in doomed
                if i in self._jobs and self._jobs[i].ended.is_set() and i not in self._unsaved
            ]
            if not doomed:
                return
            for job_id in doomed:
                self._forget(job_id)
            await trio.to_thread.run_sync(_remove_dirs, [self._jobs_dir / i for i in doomed])
            await store.delete(doomed)
            _log.info("retention: removed %d ended job(s)", len(doomed))
        except StateDirError as exc:
            _log.error("housekeeping failed: %s", exc)

    @property
    def closing(self) -> bool:
        return self._closing

    async def shutdown(self, grace: float = 5.0) -> None:
        """Refuse new jobs and stop every running one (TERM, ``grace``, KILL).

        Leaving ``open_supervisor`` does this too; a server calls it earlier, so
        followers get the end of their streams while connections drain.
        """
        self._closing = True
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                if job.record.state is JobState.RUNNING and job.process is not None:
                    nursery.start_soon(self._terminate, job, job.process, grace)


class _OnFirstNext:
    """An iterator made by ``open`` at the first ``__anext__`` (whose errors come out there)."""

    def __init__(self, open_: Callable[[], AsyncIterator[OutputChunk]]) -> None:
        self._open: Callable[[], AsyncIterator[OutputChunk]] | None = open_
        self._inner: AsyncIterator[OutputChunk] | None = None

    def __aiter__(self) -> _OnFirstNext:
        return self

    async def __anext__(self) -> OutputChunk:
        if self._inner is None:
            assert self._open is not None
            opener, self._open = self._open, None
            self._inner = opener()
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            await trio.lowlevel.checkpoint()


class _UntilEnded:
    """A follower's iterator that ends only once the job's end is recorded.

    The log is complete a moment before the job's final state is: ending the
    stream after both means a client that follows, then asks for the status,
    always sees the job ended.
    """

    def __init__(self, reader: AsyncIterator[OutputChunk], ended: trio.Event) -> None:
        self._reader = reader
        self._ended = ended

    def __aiter__(self) -> _UntilEnded:
        return self

    async def __anext__(self) -> OutputChunk:
        try:
            return await self._reader.__anext__()
        except StopAsyncIteration:
            await self._ended.wait()
            raise

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _signal_job(job: _Job, process: JobProcess, signum: int) -> None:
    """Signal the job's process group and, on a terminal, its foreground group too.

    A shell with job control (``bash -i``, ``set -m``) runs each command in a group of its
    own and makes it the terminal's foreground group; a terminal would signal that group
    (Ctrl-C), so Signal and Stop do as well. It lies in the job's session, so it is the
    job's; the cgroup still takes whatever is in neither group when the job is killed.
    """
    process.signal_group(signum)
    if job.tty and job.input is not None and not process.reaped:
        group = job.input.foreground_group()
        if group is not None and group != process.pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signum)


def _open_terminal() -> tuple[int, int, int]:
    """(master, slave, a duplicate of the master for writing), none inheritable."""
    try:
        master, slave = os.openpty()
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS or exc.errno == errno.ENOSPC:  # ENOSPC: no ptys left
            raise ResourceExhausted(f"cannot give the job a terminal: {exc.strerror}") from None
        raise
    try:
        writer = os.dup(master)
    except OSError as exc:
        os.close(master)
        os.close(slave)
        if exc.errno in RESOURCE_ERRNOS:
            raise ResourceExhausted(f"cannot give the job a terminal: {exc.strerror}") from None
        raise
    return master, slave, writer


def _close_terminal(fds: tuple[int, int, int] | None, *, slave: bool = False) -> None:
    """A terminal the job never got: the master and its duplicate, and the slave if
    it is still open (the spawn closes it once it ran)."""
    if fds is not None:
        os.close(fds[0])
        os.close(fds[2])
        if slave:
            os.close(fds[1])


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def _check_terminal(tty: object, size: object) -> tuple[int, int] | None:
    """The terminal's first size for a tty job, None for a job without one."""
    if not isinstance(tty, bool):
        raise InvalidRequest("tty", f"must be a bool, got {tty!r}")
    if not tty:
        if size is not None:
            raise InvalidRequest("terminal_size", "is only for a job with tty")
        return None
    if size is None:
        return DEFAULT_TERMINAL_SIZE
    if not isinstance(size, tuple | list) or len(size) != 2:
        raise InvalidRequest("terminal_size", "must be (rows, cols)")
    try:
        return check_terminal_size(size[0], size[1])
    except ValueError as exc:
        raise InvalidRequest("terminal_size", str(exc)) from None


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


def _cgroup_parent_for(state_dir: Path) -> str:
    """``trio-worker-<hash>``: one parent group per state directory."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()[:12]
    return f"trio-worker-{digest}"


def _remove_dirs(directories: Sequence[Path]) -> None:
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


async def _pump(pipe: PipeReader, tag: OutputStream, log: OutputLog) -> None:
    """Move bytes from one pipe into the log as fast as the pipe gives them."""
    while pieces := await pipe.read_round(_ROUND_BYTES):
        for data in pieces:
            log.append(tag, data, notify=False)
        log.notify()
        if log.backlogged:
            await log.wait_flushed()


@asynccontextmanager
async def _unwrap_single() -> AsyncIterator[None]:
    """Let the body's own exception out of the nursery as itself.

    Job tasks never raise, so a group of one is the caller's exception; wrapping
    it would make ``except MyError`` around ``open_supervisor`` stop working.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@asynccontextmanager
async def open_supervisor(
    state_dir: str | os.PathLike[str] | None = None,
    *,
    keep_state: bool = False,
    shutdown_grace: float = 5.0,
    env: Mapping[str, str] | None = None,
    tail_bytes: int = 4 * 1024 * 1024,
    cgroup_parent: str | None = None,
    limit_policy: LimitPolicy | None = None,
    persist: bool | None = None,
    retention: Retention | None = None,
    reaper: bool = True,
) -> AsyncIterator[Supervisor]:
    """Run a supervisor for the duration of the ``async with`` block.

    ``state_dir`` holds the jobs' output logs; without one a temporary
    directory is used and removed on exit (unless ``keep_state``). ``env`` is
    the base environment jobs extend (default: this process's environment).
    Leaving the block — normally, by an exception, or by cancellation — stops
    every running job (SIGTERM, ``shutdown_grace``, SIGKILL) before returning.

    The process's soft RLIMIT_NOFILE is raised to its hard limit (and stays
    so): each running job holds a few descriptors. Jobs get the old soft limit.

    With ``persist`` (the default when a ``state_dir`` is given) the directory
    is locked against a second supervisor, every job is recorded in
    ``jobs.db``, and the jobs of an earlier run come back: ended ones as they
    were, running ones as LOST (their leftovers killed), with their output.
    ``retention`` bounds what is kept.

    Limits and tracking use the host's cgroups, probed at start: one parent
    group ``cgroup_parent`` under this process's own cgroup, one child per job.
    Job groups left by an earlier run under the same parent are killed and
    removed first. The default parent is named after the state directory
    (``trio-worker-<hash>``), so supervisors on different state directories
    never touch each other's jobs, and the lock on a state directory makes the
    cleanup safe. ``limit_policy`` holds the defaults and maximums applied to
    every job's limits.

    With ``reaper`` (the default) and cgroups, a small helper process (the
    reaper, ``_host/_reaper``) outlives this one if it dies, even by SIGKILL,
    and then kills every job group under the parent: no job process, escapees
    included, survives the supervisor's process. Leaving the block tells it
    to exit quietly.
    """
    async with open_supervisor_with_driver(
        None,
        state_dir,
        keep_state=keep_state,
        shutdown_grace=shutdown_grace,
        env=env,
        tail_bytes=tail_bytes,
        cgroup_parent=cgroup_parent,
        limit_policy=limit_policy,
        persist=persist,
        retention=retention,
        reaper=reaper,
    ) as supervisor:
        yield supervisor


@asynccontextmanager
async def open_supervisor_with_driver(
    cgroups: CgroupDriver | None,
    state_dir: str | os.PathLike[str] | None = None,
    *,
    keep_state: bool = False,
    shutdown_grace: float = 5.0,
    env: Mapping[str, str] | None = None,
    tail_bytes: int = 4 * 1024 * 1024,
    cgroup_parent: str | None = None,
    limit_policy: LimitPolicy | None = None,
    persist: bool | None = None,
    retention: Retention | None = None,
    reaper: bool = True,
    ready_places: int = 4,
) -> AsyncIterator[Supervisor]:
    """``open_supervisor`` with a given cgroup driver instead of the host's probe (tests).

    ``ready_places``: how many jobs' places (id, directory, log files, cgroup) are
    kept made ahead of need (``_launch``).
    """
    # Jobs cost descriptors (pipes, pidfd, log files): use all the host allows.
    job_nofile = raise_nofile_limit()
    temporary = state_dir is None
    path = Path(tempfile.mkdtemp(prefix="trio-worker-") if state_dir is None else state_dir)
    persistent = (not temporary) if persist is None else persist
    # The lock comes first: a second server must not even clean up cgroups.
    lock = await trio.to_thread.run_sync(StateDir.open, path) if persistent else None
    store: SqliteJobStore | None = None
    driver: CgroupDriver | None = None
    guard: ReaperGuard | None = None
    supervisor: Supervisor | None = None
    try:
        if lock is not None:
            store = await SqliteJobStore.open(lock.db_path)
        if cgroup_parent is None:
            cgroup_parent = _cgroup_parent_for(path)
        driver = cgroups if cgroups is not None else cgroup_detect(cgroup_parent)
        if lock is not None and lock.previous_reaper is not None:
            # A server that died a moment ago may still have its reaper at work
            # on our parent groups: let it finish before any job of ours exists.
            await outlive(*lock.previous_reaper)
        leftovers = await trio.to_thread.run_sync(driver.cleanup_leftovers)
        if leftovers:
            _log.warning("killed %d job group(s) left by an earlier run", len(leftovers))
        if reaper and driver.tracks:
            note = (lambda r: lock.note_reaper(r.pid, r.start_time)) if lock else None
            try:
                guard = await ReaperGuard.start(driver.parent_dirs(), on_start=note)
            except OSError as exc:
                _log.error("cannot start the reaper: jobs may outlive a crash: %s", exc)
        async with _unwrap_single(), trio.open_nursery() as nursery:
            if guard is not None:
                nursery.start_soon(guard.watch)
            supervisor = Supervisor._create(
                nursery,
                path,
                base_env=os.environ if env is None else env,
                tail_bytes=tail_bytes,
                cgroups=driver,
                limit_policy=limit_policy or LimitPolicy(),
                job_nofile=job_nofile,
                spawn_in_thread=guard is not None,
                store=store,
                retention=retention,
                ready_places=ready_places,
            )
            if store is not None:
                await supervisor._restore(await store.load_all())
                nursery.start_soon(supervisor._housekeeping)
            nursery.start_soon(supervisor._launcher.keep_ready, supervisor._new_id)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown(shutdown_grace)
                    if store is not None:
                        await supervisor._save_unsaved()  # a last try for pending records
                nursery.cancel_scope.cancel()  # housekeeping; jobs have ended
    finally:
        with trio.CancelScope(shield=True):
            if supervisor is not None:
                await supervisor._launcher.aclose()  # the places no job took
            if guard is not None:
                await guard.quit()  # every job has ended
            if store is not None:
                await store.aclose()
        if driver is not None and cgroups is None:
            driver.close()
        if lock is not None:
            lock.release()
        if temporary and not keep_state:
            shutil.rmtree(path, ignore_errors=True)
