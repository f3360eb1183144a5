"""The Start path: a request checked, the job's directory, log and cgroups made,
its process spawned, and the job handed to the runner (``_runner.JobRunner``).

A Start either leaves a job in the table (RUNNING, or FAILED with the reason in
words) or raises having left nothing: no fds, directory, cgroup or table entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

from .._errors import InvalidRequest, ResourceExhausted, Unenforceable
from .._host._cgroups import CgroupDriver, CgroupError, JobCgroup
from .._host._enforce import check_enforceable
from .._host._isolation import helper_argv, helper_tasks, resolve_command
from .._host._users import UnixUser, current_user, lookup_user, start_directory, user_environment
from .._limits import LimitPolicy
from .._model import Isolation, JobIdGenerator, JobInfo, Limits
from . import _lifecycle as lc
from ._job import REPORT, Job, now, remove_cgroup
from ._output import DEFAULT_MAX_UNFLUSHED, OutputLog
from ._process import (
    RESOURCE_ERRNOS,
    Credentials,
    JobProcess,
    PipeReader,
    SpawnError,
    SpawnOptions,
    Stdin,
    Terminal,
    describe_os_error,
    resource_exhausted,
    validate_start,
)
from ._queries import JobTable
from ._records import JobRecords
from ._runner import JobRunner
from ._stdin import DEFAULT_TERMINAL_SIZE, StdinWriter, check_terminal_size

__all__ = ["Admission"]


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
        self._base_env = dict(base_env)
        self._tail_bytes = tail_bytes
        #: How far a job's output may run ahead of the disk before its pipes wait.
        self._max_unflushed = max_unflushed or DEFAULT_MAX_UNFLUSHED
        self._new_id = JobIdGenerator()
        #: Who this process runs as: the user of jobs that name none.
        self._me = current_user()
        #: The soft fd limit jobs get (the one this process had before raising its own).
        self._job_nofile = job_nofile

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
        limits = limits if limits is not None else Limits()
        isolation = isolation if isolation is not None else Isolation()
        if not isinstance(limits, Limits):
            raise InvalidRequest("limits", "must be a trio_worker.Limits")
        if not isinstance(isolation, Isolation):
            raise InvalidRequest("isolation", "must be a trio_worker.Isolation")
        limits = self._policy.apply(limits)  # InvalidRequest above a maximum
        check_enforceable(self._cgroups, limits, isolation)  # never silently ignored
        job_id = self._new_id()
        # The job's directory, log files and cgroups (mkdir and open on disk and
        # cgroupfs: ~1-2 ms) are made in a worker thread, so Status and others
        # are served meanwhile. Shielded: what the thread made must not be lost.
        try:
            with trio.CancelScope(shield=True):
                log, group, procs, setup_error = await trio.to_thread.run_sync(
                    self._prepare, job_id, limits, isolation, spec.cwd
                )
        except RuntimeError as exc:  # "can't start new thread": out of processes (EAGAIN)
            if "thread" not in str(exc):
                raise
            raise ResourceExhausted(f"cannot start the job: {exc}") from None
        job = Job(job_id, owner, spec, limits, isolation, log)
        job.cgroup = group
        job.env_keys = tuple(env or ())
        job.user = account.label
        job.stdin = bool(stdin)
        job.tty = terminal is not None
        fds: tuple[int, int, int] | None = None
        slave_open = False
        # The namespace helper must start as root (to unshare): it drops to the user
        # itself, right before the command.
        user_options = None if isolation.any else credentials
        try:
            # A terminal's master and slave, and the master's duplicate for writing:
            # made before the job, so running out of descriptors refuses the Start.
            if terminal is not None:
                fds = _open_terminal()
                slave_open = True
                if credentials is not None:
                    os.fchown(fds[1], credentials.uid, -1)  # the job's own terminal, as login does
                options = SpawnOptions(
                    stdin=Terminal(fds[1], terminal[0], terminal[1]), user=user_options
                )
            else:
                options = SpawnOptions(
                    stdin=Stdin.PIPE if job.stdin else Stdin.NULL, user=user_options
                )
            if setup_error is not None:
                raise setup_error
            argv = None
            spawn_spec = spec
            if isolation.any:
                # The helper would only notice a missing command after it
                # started: resolve first, so the failure looks the same. Not for
                # another user: root's view of the files is not theirs to learn.
                if credentials is None:
                    try:
                        resolve_command(spec.command, spec.env.get("PATH"), spec.cwd)
                    except OSError as exc:
                        raise SpawnError(describe_os_error(exc, spec.command), exc.errno) from None
                else:  # the helper enters the directory once it is the user
                    spawn_spec = dataclasses.replace(spec, cwd=None)
                report = log.directory / REPORT
                argv = helper_argv(
                    isolation,
                    spec.command,
                    spec.args,
                    report=report,
                    user=credentials,
                    cwd=spec.cwd if credentials is not None else None,
                    tty=terminal is not None,
                )
            given, procs = procs, []  # the spawn owns (and closes) them now
            try:
                process = await self._spawn(
                    functools.partial(
                        JobProcess.spawn,
                        spawn_spec,
                        argv=argv,
                        cgroup=job.cgroup,
                        cgroup_fds=given,
                        options=options,
                        nofile_soft=self._job_nofile,
                    )
                )
            finally:
                if fds is not None:
                    os.close(fds[1])  # the slave is the job's alone now
                    slave_open = False
        except SpawnError as exc:
            # The command cannot run: a FAILED job, kept and reported.
            _close_all(procs)
            _close_terminal(fds, slave=slave_open)
            self._table.add(job)
            job.feed(lc.SpawnFailed(exc.message, now(), exc.errno))
            log.finish()
            log.close()
            if job.cgroup is not None:
                await remove_cgroup(job)
            await self._records.persist_start(job, None)
            return job.info()
        except BaseException:
            # Out of descriptors, memory or processes (ResourceExhausted), or
            # cancelled: no half-made job stays, in the table or on the host.
            _close_all(procs)
            _close_terminal(fds, slave=slave_open)
            with trio.CancelScope(shield=True):
                log.close()
                _remove_new_job_dir(log.directory)
                if job.cgroup is not None:
                    await remove_cgroup(job)
            raise
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
        job.spec = dataclasses.replace(spec, env={})
        job.feed(lc.Spawned(process.pid, now()))
        started = job.info()
        self._runner.supervise(job, process)
        # Recorded before the caller learns the job exists; a crash in between
        # leaves a cgroup named after it, which the next start cleans up.
        await self._records.persist_start(job, process.pid)
        # The job as it started: a quick command may already have ended while
        # its record was written, and Wait/Status tell that part.
        return started

    async def _spawn(self, spawn: Callable[..., JobProcess]) -> JobProcess:
        """Run ``spawn`` (a ``JobProcess.spawn``) off the loop when the reaper allows it.

        vfork suspends the calling thread until the child's exec, 2-20 ms on a
        loaded host. With the reaper watching, a worker thread takes that wait and
        the child gets no PR_SET_PDEATHSIG (it would fire when that thread exits):
        the reaper kills every job group if the server dies. Without the reaper,
        the loop's thread spawns, with PDEATHSIG. Shielded: the process must not
        be lost to a cancel.
        """
        if not self._spawn_in_thread:
            return spawn()
        try:
            with trio.CancelScope(shield=True):
                process = await trio.to_thread.run_sync(functools.partial(spawn, pdeathsig=0))
        except RuntimeError as exc:  # "can't start new thread": out of processes (EAGAIN)
            if "thread" not in str(exc):
                raise
            raise ResourceExhausted(f"cannot start the job: {exc}") from None
        return process

    def _prepare(
        self, job_id: str, limits: Limits, isolation: Isolation, cwd: str | None
    ) -> tuple[OutputLog, JobCgroup | None, Sequence[int], SpawnError | None]:
        """In a worker thread: the job's log, its cgroup and that group's ``cgroup.procs`` fds.

        Raises ``ResourceExhausted`` (out of descriptors, memory, disk) having
        left nothing behind. A cgroup that cannot be made or joined for another
        reason comes back as the ``SpawnError`` of a job that FAILED.
        """
        log = self._open_log(job_id)
        try:
            try:
                group = self._cgroups.create(
                    job_id, limits, cwd=cwd, extra_tasks=helper_tasks(isolation)
                )
            except CgroupError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise ResourceExhausted(f"cannot start the job: {exc}") from None
                return log, None, [], SpawnError(f"cannot set up the job's cgroup: {exc}", None)
            try:
                procs = group.open_procs()
            except OSError as exc:
                with contextlib.suppress(CgroupError):
                    group.remove()
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "opening its cgroup") from None
                message = f"cannot join the job's cgroup: {exc.strerror}"
                return log, None, [], SpawnError(message, exc.errno)
        except BaseException:
            log.close()
            _remove_new_job_dir(log.directory)
            raise
        return log, group, procs, None

    def _open_log(self, job_id: str) -> OutputLog:
        """The new job's directory and log files, or ``ResourceExhausted`` saying why not.

        On a full disk this is where a Start is refused: nothing runs and
        nothing is left behind. (Creating empty files rarely fails even then;
        when it works, the job runs and only its output and record wait.)
        """
        directory = self._jobs_dir / job_id
        try:
            directory.mkdir(mode=0o700)
            return OutputLog(
                directory,
                tail_bytes=self._tail_bytes,
                max_bytes=self._records.retention.max_output_bytes,
                max_unflushed=self._max_unflushed,
            )
        except OSError as exc:
            _remove_new_job_dir(directory)
            raise ResourceExhausted(
                f"cannot create the job's output files in the state directory: "
                f"{exc.strerror or exc}"
            ) from None


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


def _remove_new_job_dir(directory: Path) -> None:
    """Remove a job directory a refused Start made, even with no descriptor to spare.

    ``shutil.rmtree`` opens the directory to list it, which fails with EMFILE
    exactly when a Start is refused for lack of descriptors: unlink the files
    a new job can have by name first (no fd needed), then the directory.
    """
    for name in ("output.log", "output.idx", "output.start", REPORT):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)
