"""The Start path: a request checked, the job's directory, log and cgroups made,
its process spawned, and the job handed to the runner (``_runner.JobRunner``).

A Start either leaves a job in the table (RUNNING, or FAILED with the reason in
words) or raises having left nothing: no fds, directory, cgroup or table entry.
"""

from __future__ import annotations

import errno
import os
import signal as _signal
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import trio

from .._errors import InvalidRequest, ResourceExhausted, Unenforceable
from .._host._cgroups import CgroupDriver
from .._host._enforce import check_enforceable
from .._host._spawn import Environment
from .._host._users import UnixUser, current_user, lookup_user, start_directory, user_environment
from .._limits import LimitPolicy
from .._model import Isolation, JobIdGenerator, JobInfo, JobState, Limits
from . import _lifecycle as lc
from ._job import Job, now, remove_cgroup
from ._launch import PLACE_PATIENCE, Launched, Launcher, LaunchPlan, kill_stopped_spawn
from ._output import DEFAULT_MAX_UNFLUSHED
from ._process import (
    RESOURCE_ERRNOS,
    Credentials,
    PipeReader,
    SpawnError,
    SpawnOptions,
    StartSpec,
    Stdin,
    Terminal,
    validate_start,
)
from ._queries import JobTable
from ._records import JobRecords
from ._runner import JobRunner
from ._stdin import DEFAULT_TERMINAL_SIZE, StdinWriter, check_terminal_size
from ._turns import let_io_first

__all__ = ["Admission"]

_NO_ISOLATION = Isolation()


class Admission:
    """Starts jobs into ``table``, for ``runner`` to watch."""

    def __init__(
        self,
        table: JobTable,
        records: JobRecords,
        runner: JobRunner,
        jobs_dir: Path,
        *,
        base_env: Mapping[str, str],
        tail_bytes: int,
        cgroups: CgroupDriver,
        limit_policy: LimitPolicy,
        job_nofile: int | None,
        spawn_in_thread: bool,
        ready_places: int = 0,
        max_unflushed: int | None = None,
    ) -> None:
        self._table = table
        self._records = records
        self._runner = runner
        self._jobs_dir = jobs_dir
        #: Spawn from a worker thread (without PDEATHSIG): only while a reaper watches.
        self._spawn_in_thread = spawn_in_thread
        self._cgroups = cgroups
        self._policy = limit_policy
        #: What a Start that names no limits gets (the policy's defaults, or its maximums):
        #: the same for every such Start, so applied once.
        self._unset_limits = limit_policy.apply(Limits())
        #: Encoded once for every Start (``Environment``); a variable that cannot be
        #: encoded fails each Start instead, as it did before (``validate_start``).
        self._base_env: Mapping[str, str]
        try:
            self._base_env = Environment(base_env)
        except UnicodeEncodeError:
            self._base_env = dict(base_env)
        self.new_id = JobIdGenerator()
        #: The newest id handed to a Start in this run (ids follow the Starts' order).
        self._last_id: str | None = None
        #: Who this process runs as: the user of jobs that name none.
        self._me = current_user()
        #: Makes each job's directory, log, cgroup and process (blocking: off the loop),
        #: and keeps ``ready_places`` of them made ahead of need.
        #: Jobs get the soft fd limit this process had before raising its own.
        self.launcher = Launcher(
            jobs_dir,
            jobs_dir.parent / "ready",
            cgroups,
            tail_bytes=tail_bytes,
            max_unflushed=max_unflushed or DEFAULT_MAX_UNFLUSHED,
            max_output_bytes=records.retention.max_output_bytes,
            job_nofile=job_nofile,
            ready=ready_places,
            seeds=spawn_in_thread,
        )

    async def _account(self, user: str | None) -> UnixUser:
        if user is None or user == "" or user == self._me.label:
            return self._me
        if not isinstance(user, str):
            raise InvalidRequest("user", "must be a user name or a decimal uid")
        return await trio.to_thread.run_sync(lookup_user, user)

    async def start(
        self,
        command: str,
        args: Sequence[str] | None,
        *,
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
        limits: Limits | None,
        isolation: Isolation | None,
        owner: str,
        stdin: bool,
        tty: bool,
        terminal_size: tuple[int, int] | None,
        user: str | None,
    ) -> JobInfo:
        """``Supervisor.start`` once the supervisor takes jobs (see there)."""
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
        if limits is None:
            limits = self._unset_limits
        elif isinstance(limits, Limits):
            limits = self._policy.apply(limits)  # InvalidRequest above a maximum
        else:
            raise InvalidRequest("limits", "must be a trio_worker.Limits")
        if isolation is None:
            isolation = _NO_ISOLATION
        elif not isinstance(isolation, Isolation):
            raise InvalidRequest("isolation", "must be a trio_worker.Isolation")
        check_enforceable(self._cgroups, limits, isolation)  # never silently ignored
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
            # While the store refuses writes (a full disk), the record is committed before
            # the spawn, or the Start refused: a place taken would have to go back.
            refusing = self._records.refusing
            # A place made ahead of need (its id and group), if one is ready.
            place = None if refusing else await self.launcher.take_soon(PLACE_PATIENCE)
            job_id = place.job_id if place is not None else self._fresh_id()
            self._last_id = job_id
            job = Job(job_id, owner, spec, limits, isolation, None)
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
            started_at = now()
            try:
                launched = await self._launch(plan, job, started_at, refusing=refusing)
                # The job's process exists; what is left of the Start (its record,
                # the runner, the reply: ~0.4 ms of the loop) waits for what the
                # loop's next poll finds, a Status answered in its reader (no
                # cancel point: the job is the caller's now).
                await let_io_first()
            finally:
                self.launcher.replenish()
        except BaseException:
            # Out of descriptors, memory or processes (ResourceExhausted), or
            # cancelled: no half-made job stays, in the table or on the host.
            _close_terminal(fds, slave=True)
            raise
        if fds is not None:
            os.close(fds[1])  # the slave is the job's alone now
        job.log, job.cgroup = launched.log, launched.group
        records = self._records
        # With the reaper watching, the record is queued for the next commit and
        # the Start does not wait for it (``JobRecords.record_soon``); unless it was
        # committed before the spawn (``refusing``): then its end or pid follow it.
        record_soon = self._spawn_in_thread and records.store is not None and not refusing
        record_after = records.store is not None and not refusing
        process = launched.process
        if launched.error is not None or process is None:
            # The command cannot run: a FAILED job, kept and reported.
            _close_all(launched.procs)
            _close_terminal(fds)
            self._table.add(job)
            error = launched.error or SpawnError("the job's process was not started", None)
            job.feed(lc.SpawnFailed(error.message, started_at, error.errno))
            launched.log.finish()
            launched.log.close()
            if record_soon:
                records.record_soon(job)
            elif refusing:
                records.end_soon(job)  # (its row is in: the update)
            if job.cgroup is not None:
                await remove_cgroup(job)
            if record_after and not record_soon:
                await records.persist_start(job)
            return job.info()
        self._table.add(job)
        job.process = process
        if fds is not None:
            job.terminal = PipeReader(fds[0])
            job.input = StdinWriter(fds[2], tty=True)
        elif process.stdin is not None:
            job.input = StdinWriter(process.stdin, tty=False)
            process.stdin = None  # the writer owns it now
        # The full environment (the server's, ~3 KiB) served the exec; keeping
        # it would cost every job, running or ended, that much memory.
        job.spec = StartSpec(spec.command, spec.args, {}, spec.cwd)
        job.pid_start_time = launched.start_time
        job.feed(lc.Spawned(process.pid, started_at))
        # The job as it started (no usage yet: reading the cgroup's accounting
        # files would cost the loop, for zeros).
        started = job.info(usage=False)
        if record_soon:
            # Queued before the runner has the job: its end's record comes after.
            records.record_soon(job, started)
        self._runner.supervise(job, process)
        if refusing:
            await records.note_spawned(job, process.pid, commit=not self._spawn_in_thread)
        elif not self._spawn_in_thread:
            # Without the reaper, only the pid can find the job after a crash:
            # recorded, with it, before the caller learns the job exists.
            await records.persist_start(job)
        # The job as it started: a quick command may already have ended while
        # its record was written, and Wait/Status tell that part.
        return started

    def _fresh_id(self) -> str:
        """An id for a Start that found no place ready: below the places being made."""
        making = self.launcher.first_making()
        if making is not None:
            job_id = self.new_id.before(self._last_id, making)
            if job_id is not None:
                return job_id
        return self.new_id()

    async def _launch(
        self, plan: LaunchPlan, job: Job, started_at: datetime, *, refusing: bool
    ) -> Launched:
        """Make the job's place and process; return them. Not cancellable: what was
        made (files, group, process) must not be lost.

        A seedable plan runs its place's seed (``launch_seeded``, which shields its own
        waits: no scope here for it, the usual Start); else, or if the seed was dead or
        stopped before its command, the thread's way below, shielded. While the store
        refuses writes (``refusing``), the record is committed before the spawn.
        """
        launcher = self.launcher
        launched: Launched | None = None
        if launcher.seedable(plan):  # (never while ``refusing``: no place then)
            launched = await launcher.launch_seeded(plan)
        if launched is None:
            with trio.CancelScope(shield=True):
                if refusing:
                    before = lc.Record(JobState.RUNNING, started_at=started_at)
                    await self._records.record_before_spawn(
                        job, job.info(usage=False, record=before)
                    )
                launched = await self._spawn(plan)
            assert launched is not None  # (a shield lets every exception through)
        return launched

    async def _spawn(self, plan: LaunchPlan) -> Launched:
        """The job's place and process made the thread's way (shielded by ``_launch``).

        With the reaper watching: one worker-thread call (``prepare_and_spawn``).
        The job's record is not written meanwhile but queued once the job runs
        (``JobRecords.record_soon``): a crash before its commit leaves a job the
        reapers kill by its cgroup, which needs no record. Without the reaper,
        the spawn is on the loop's thread (PR_SET_PDEATHSIG) and the caller
        records the job, with its pid, before answering (``persist_start``),
        since only the pid can find the job's process group after a crash then.

        Raises ``ResourceExhausted`` having left nothing: no files, group, or process.
        """
        launcher = self.launcher
        if self._spawn_in_thread:
            return await _spawn_watched(launcher, plan)
        launched = await _in_thread(launcher.prepare, plan)
        if launched.error is None:
            try:
                launcher.spawn(launched, plan, pdeathsig=_signal.SIGKILL)
            except BaseException:
                await trio.to_thread.run_sync(launcher.discard, launched)
                raise
        return launched


async def _spawn_watched(launcher: Launcher, plan: LaunchPlan) -> Launched:
    """``prepare_and_spawn`` in a worker thread, ``kill_stopped_spawn`` beside it: its
    vfork child, stopped before its exec, would hold the thread for ever."""
    launched: Launched | None = None
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        group = launcher.cgroups.job(plan.job_id)
        nursery.start_soon(kill_stopped_spawn, group, name=f"spawn {plan.job_id}")
        try:
            launched = await _in_thread(launcher.prepare_and_spawn, plan)
        except BaseException as exc:  # raised as it is below, not in an exception group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert launched is not None
    return launched


async def _in_thread(fn: Callable[[LaunchPlan], Launched], plan: LaunchPlan) -> Launched:
    """``fn(plan)`` in a worker thread; no thread to be had is ``ResourceExhausted``."""
    try:
        return await trio.to_thread.run_sync(fn, plan)
    except RuntimeError as exc:  # "can't start new thread": out of processes (EAGAIN)
        if "thread" not in str(exc):
            raise
        raise ResourceExhausted(f"cannot start the job: {exc}") from None


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
