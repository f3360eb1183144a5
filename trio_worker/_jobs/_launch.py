"""Making a job's place and process: its directory, log files, cgroup, then the spawn.

All of it is blocking work (mkdir and open on the state disk and on cgroupfs, a
vfork that waits for the child's exec), so the supervisor runs it off the event
loop: with the reaper watching, ``prepare_and_spawn`` is *one* worker-thread
call per Start (each thread round trip costs the loop two wakeups, 0.3 ms idle
and several ms on a busy host). Without the reaper the spawn must come from the
loop's own thread (PR_SET_PDEATHSIG fires when the forking thread exits), so
``prepare`` runs in a thread and ``spawn`` on the loop.

Every path leaves either a job (running, or FAILED with the reason in words)
or nothing at all: ``ResourceExhausted`` (out of descriptors, memory, disk or
processes) is raised only after ``discard`` removed what was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .._errors import ResourceExhausted
from .._host._cgroups import CgroupDriver, CgroupError, JobCgroup
from .._host._isolation import helper_argv, helper_tasks, resolve_command
from .._model import Isolation, Limits
from ._output import OutputLog
from ._process import (
    RESOURCE_ERRNOS,
    Credentials,
    JobProcess,
    SpawnError,
    SpawnOptions,
    StartSpec,
    describe_os_error,
    resource_exhausted,
)
from ._store import process_start_time

__all__ = ["REPORT", "LaunchPlan", "Launched", "Launcher", "remove_new_job_dir"]

#: Where the namespace helper reports why it could not run the command.
REPORT = "nsinit.report"
_log = logging.getLogger("trio_worker.supervisor")


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """A validated Start, as the spawn needs it."""

    job_id: str
    spec: StartSpec
    limits: Limits
    isolation: Isolation
    #: Another user's credentials, or None for the server's own.
    credentials: Credentials | None
    options: SpawnOptions
    tty: bool


@dataclass(slots=True)
class Launched:
    """What ``prepare`` (and ``spawn``) made: the job's log and group, then its process.

    ``error`` is a job that FAILED (the reason in words); ``procs`` are the group's
    ``cgroup.procs`` fds until the spawn takes them (the caller closes what is left).
    """

    log: OutputLog
    group: JobCgroup | None
    procs: list[int] = field(default_factory=list)
    error: SpawnError | None = None
    process: JobProcess | None = None
    #: The process's start time (/proc), so a record can tell it from a pid reused later.
    start_time: int | None = None


class Launcher:
    """Makes jobs' places and processes under ``jobs_dir`` and the driver's parent group."""

    def __init__(
        self,
        jobs_dir: Path,
        cgroups: CgroupDriver,
        *,
        tail_bytes: int,
        max_output_bytes: int | None,
        job_nofile: int | None,
    ) -> None:
        self.jobs_dir = jobs_dir
        self.cgroups = cgroups
        self._tail_bytes = tail_bytes
        self._max_output_bytes = max_output_bytes
        self._job_nofile = job_nofile

    def prepare_and_spawn(self, plan: LaunchPlan) -> Launched:
        """In a worker thread: ``prepare`` then ``spawn`` without PR_SET_PDEATHSIG
        (the reaper covers a server crash: see ``_process``)."""
        launched = self.prepare(plan)
        if launched.error is None:
            try:
                self.spawn(launched, plan, pdeathsig=0)
            except BaseException:
                self.discard(launched)
                raise
        return launched

    def prepare(self, plan: LaunchPlan) -> Launched:
        """The job's directory and log, its cgroup and that group's ``cgroup.procs`` fds.

        Raises ``ResourceExhausted`` (out of descriptors, memory, disk) having
        left nothing behind. A cgroup that cannot be made or joined for another
        reason comes back as the ``error`` of a job that FAILED.
        """
        log = self._open_log(plan.job_id)
        try:
            try:
                group = self.cgroups.create(
                    plan.job_id,
                    plan.limits,
                    cwd=plan.spec.cwd,
                    extra_tasks=helper_tasks(plan.isolation),
                )
            except CgroupError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise ResourceExhausted(f"cannot start the job: {exc}") from None
                error = SpawnError(f"cannot set up the job's cgroup: {exc}", None)
                return Launched(log, None, error=error)
            try:
                procs = group.open_procs()
            except OSError as exc:
                with contextlib.suppress(CgroupError):
                    group.remove()
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "opening its cgroup") from None
                message = f"cannot join the job's cgroup: {exc.strerror}"
                return Launched(log, None, error=SpawnError(message, exc.errno))
        except BaseException:
            log.close()
            remove_new_job_dir(log.directory)
            raise
        return Launched(log, group, procs)

    def spawn(self, launched: Launched, plan: LaunchPlan, *, pdeathsig: int) -> None:
        """Start the prepared job's process; a command that cannot run becomes ``error``.

        Raises ``ResourceExhausted`` (the caller then ``discard``s).
        """
        spec = plan.spec
        argv = None
        if plan.isolation.any:
            # The helper would only notice a missing command after it started:
            # resolve first, so the failure looks the same. Not for another user:
            # root's view of the files is not theirs to learn.
            if plan.credentials is None:
                try:
                    resolve_command(spec.command, spec.env.get("PATH"), spec.cwd)
                except OSError as exc:
                    launched.error = SpawnError(describe_os_error(exc, spec.command), exc.errno)
                    return
            else:  # the helper enters the directory once it is the user
                spec = dataclasses.replace(spec, cwd=None)
            argv = helper_argv(
                plan.isolation,
                plan.spec.command,
                plan.spec.args,
                report=launched.log.directory / REPORT,
                user=plan.credentials,
                cwd=plan.spec.cwd if plan.credentials is not None else None,
                tty=plan.tty,
            )
        procs, launched.procs = launched.procs, []  # the spawn owns (and closes) them now
        try:
            process = JobProcess.spawn(
                spec,
                argv=argv,
                cgroup=launched.group,
                cgroup_fds=procs,
                options=plan.options,
                nofile_soft=self._job_nofile,
                pdeathsig=pdeathsig,
            )
        except SpawnError as exc:
            launched.error = exc
            return
        launched.process = process
        launched.start_time = process_start_time(process.pid)

    def discard(self, launched: Launched) -> None:
        """Remove what ``prepare`` made for a Start that is refused (blocking)."""
        for fd in launched.procs:
            os.close(fd)
        launched.procs = []
        launched.log.close()
        remove_new_job_dir(launched.log.directory)
        group = launched.group
        if group is not None and group.tracked:
            try:
                group.remove()
            except CgroupError as exc:
                _log.warning("job %s: cannot remove its cgroup: %s", group.job_id, exc)

    def _open_log(self, job_id: str) -> OutputLog:
        """The new job's directory and log files, or ``ResourceExhausted`` saying why not.

        On a full disk this is where a Start is refused: nothing runs and
        nothing is left behind. (Creating empty files rarely fails even then;
        when it works, the job runs and only its output and record wait.)
        """
        directory = self.jobs_dir / job_id
        try:
            directory.mkdir(mode=0o700)
            return OutputLog(
                directory, tail_bytes=self._tail_bytes, max_bytes=self._max_output_bytes
            )
        except OSError as exc:
            remove_new_job_dir(directory)
            raise ResourceExhausted(
                f"cannot create the job's output files in the state directory: "
                f"{exc.strerror or exc}"
            ) from None


def remove_new_job_dir(directory: Path) -> None:
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
