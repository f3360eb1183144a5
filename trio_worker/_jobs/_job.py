"""One job as the supervisor holds it: its parts, its lifecycle (with the audit line
for each change), and what signals or kills it.

``Job`` is private and mutable; callers only ever see its ``JobInfo`` snapshots.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import os
import signal as _signal
from datetime import UTC, datetime
from pathlib import Path

import trio

from .._errors import JobNotRunning
from .._host._cgroups import CgroupError, JobCgroup
from .._model import Isolation, JobInfo, JobState, Limits, Usage
from . import _lifecycle as lc
from ._output import OutputLog
from ._process import JobProcess, PipeReader, StartSpec
from ._stdin import StdinWriter
from ._store import StoredJob

__all__ = [
    "LOST_ERROR",
    "REPORT",
    "Job",
    "KillTimer",
    "kill",
    "kill_now",
    "now",
    "remove_cgroup",
    "running_process",
    "signal_job",
    "terminate",
]

#: Where the namespace helper reports why it could not run the command.
REPORT = "nsinit.report"
LOST_ERROR = "the server stopped while the job ran"
_log = logging.getLogger("trio_worker.supervisor")
_audit = logging.getLogger("trio_worker.audit")


def now() -> datetime:
    return datetime.now(UTC)


class Job:
    """The supervisor's private, mutable view of one job."""

    __slots__ = (
        "cgroup",
        "ended",
        "env_keys",
        "final_info",
        "final_usage",
        "id",
        "input",
        "isolation",
        "kill_deadline",
        "limits",
        "log",
        "owner",
        "pid_start_time",
        "process",
        "record",
        "spec",
        "stdin",
        "terminal",
        "tty",
        "user",
    )

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
        #: An ended job's last snapshot and what it was made from (``info``).
        self.final_info: tuple[lc.Record, JobInfo] | None = None

    def feed(self, event: lc.Event) -> None:
        """Advance the job's lifecycle and write the audit line for the change."""
        self.record = lc.apply(self.record, event)
        if self.record.state is not None and self.record.state.ended:
            self.ended.set()
        r = self.record
        assert r.state is not None
        if not _audit.isEnabledFor(logging.INFO):
            return  # (the line costs ~40 us of the loop to make, per event)
        _audit.info(
            json.dumps(
                {
                    "time": now().isoformat(timespec="milliseconds"),
                    "event": "job",
                    "job_id": self.id,
                    "owner": self.owner,
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

    def info(
        self,
        *,
        usage: bool = True,
        record: lc.Record | None = None,
        measured: Usage | None = None,
    ) -> JobInfo:
        """The job as it is now; ``usage=False`` skips reading the cgroup's accounting.

        ``record`` stands in for the lifecycle's (the record written while spawning).
        ``measured`` is the live group's usage read off the loop (``live_cgroup``): it is
        taken instead of reading the group here, if the job is still live.
        """
        if record is None and usage and self.ended.is_set():
            # An ended job's snapshot is made once (its end's record and every waiter
            # and Status after take the same), while nothing it shows changes.
            kept = self.final_info
            if kept is not None and kept[0] is self.record:
                info = kept[1]
                log = self.log
                if info.usage is self.final_usage and (
                    log is None or (info.output_bytes == log.end and info.output_start == log.start)
                ):
                    return info
            info = self._snapshot(self.record, True, None)
            self.final_info = (self.record, info)
            return info
        return self._snapshot(record or self.record, usage, measured)

    def _snapshot(self, r: lc.Record, usage: bool, measured: Usage | None) -> JobInfo:
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
            usage=self.usage(measured) if usage else None,
            user=self.user,
            stdin=self.stdin,
            tty=self.tty,
        )

    @classmethod
    def restored(cls, entry: StoredJob, directory: Path) -> Job:
        """A job of an earlier run, as its record and its log on disk say."""
        info = entry.info
        spec = StartSpec(info.command, info.args, {}, entry.cwd)
        # (A log that was never written, or removed by hand, has no files: empty. Bytes
        # the record counted that the files lack are lost: the counters never go back.)
        log = OutputLog.recover(
            directory, counted=info.output_bytes, counted_start=info.output_start
        )
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

    def live_cgroup(self) -> JobCgroup | None:
        """The group whose files hold the job's usage now; None once it is final (or none)."""
        if self.final_usage is None and self.cgroup is not None and not self.ended.is_set():
            return self.cgroup
        return None

    def usage(self, measured: Usage | None = None) -> Usage | None:
        """What the job has used: ``measured`` (read off the loop) while it is live, else
        its group read now; once it has ended, the final usage."""
        group = self.live_cgroup()
        if group is None:
            return self.final_usage
        if measured is not None:
            return measured
        try:
            return group.usage()
        except CgroupError:
            return None  # the group is going away: the job is ending


def running_process(job: Job) -> JobProcess:
    """The job's process, or ``JobNotRunning`` naming its state."""
    if job.record.state is not JobState.RUNNING or job.process is None:
        state = job.record.state.value if job.record.state else "new"
        raise JobNotRunning(job.id, state)
    return job.process


def signal_job(job: Job, process: JobProcess, signum: int) -> None:
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


async def terminate(job: Job, process: JobProcess, grace: float) -> None:
    """SIGTERM the job, SIGKILL it after ``grace`` seconds; return once it has ended."""
    signal_job(job, process, _signal.SIGTERM)
    with trio.move_on_after(grace):
        await job.ended.wait()
    if not job.ended.is_set():
        await kill(job, process)
        await job.ended.wait()


class KillTimer:
    """The SIGKILLs that accepted Stops promised, each at its deadline: one task sleeps
    until the earliest, rather than a task (and its cancel scope) per Stop.

    The kill is the supervisor's, not the caller's: a caller that gives up waiting
    (cancelled, disconnected) cannot call it off. A job whose earlier deadline comes
    from a later Stop is killed at that one; nothing fires for a job that has ended.
    """

    __slots__ = ("_heap", "_kept", "_nursery", "_order", "_sleep")

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        #: (deadline, arrival order, job, its process), the earliest first.
        self._heap: list[tuple[float, int, Job, JobProcess]] = []
        self._order = itertools.count()
        #: The task's sleep until the earliest deadline (None: not started yet).
        self._sleep: trio.CancelScope | None = None
        #: Entries after the last pruning (``_prune``).
        self._kept = 0

    def kill_at(self, job: Job, process: JobProcess, deadline: float) -> None:
        """SIGKILL the job at ``deadline`` (trio's clock) unless it has ended by then."""
        if job.kill_deadline is not None and job.kill_deadline <= deadline:
            return  # an earlier Stop's kill comes first
        job.kill_deadline = deadline
        heapq.heappush(self._heap, (deadline, next(self._order), job, process))
        if len(self._heap) > max(64, 2 * self._kept):
            self._prune()
        if self._sleep is None:
            self._sleep = trio.CancelScope(deadline=deadline)
            self._nursery.start_soon(self._run, name="stop deadlines")
        elif deadline < self._sleep.deadline:
            self._sleep.deadline = deadline

    def _prune(self) -> None:
        """Drop entries that can no longer fire (ended jobs, deadlines moved earlier):
        a job that ignores SIGTERM while Stops with ever shorter graces come must not
        grow the heap for as long as the longest grace."""
        self._heap = [e for e in self._heap if _due(e[2], e[0])]
        heapq.heapify(self._heap)
        self._kept = len(self._heap)

    async def _run(self) -> None:
        assert self._sleep is not None
        while True:
            with self._sleep:
                await trio.sleep_forever()
            now = trio.current_time()
            while self._heap and self._heap[0][0] <= now:
                deadline, _, job, process = heapq.heappop(self._heap)
                if _due(job, deadline):
                    self._nursery.start_soon(kill, job, process)
            self._sleep = trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf)


def _due(job: Job, deadline: float) -> bool:
    return not job.ended.is_set() and job.kill_deadline == deadline


def kill_now(job: Job, process: JobProcess) -> bool:
    """``kill`` without its thread: SIGKILL the job's process group; True if its cgroup
    is empty (or it has none), so nothing escaped it and nothing is left to kill."""
    signal_job(job, process, _signal.SIGKILL)
    group = job.cgroup
    if group is None or not group.tracked:
        return True
    try:
        return group.is_empty()
    except CgroupError:
        # Cannot tell (no descriptor to spare, say): not known empty, so the caller
        # takes the way that kills by the group and waits, bounded.
        return False


async def kill(job: Job, process: JobProcess) -> bool:
    """SIGKILL everything of the job: its process group and, through the
    cgroup, whatever escaped it (setsid, double fork). True if its cgroup was
    found empty (or it has none): nothing is left to wait for.

    Nothing for a job that has ended: its group may serve another job by now (recycled,
    ``_launch``), and a kill that was due (``KillTimer``) must not reach that one."""
    if job.ended.is_set():
        return True
    if kill_now(job, process):
        return True
    group = job.cgroup
    assert group is not None
    # The thread may come after the job's end (its process group's SIGKILL went first),
    # when the group is retired: it must not be recycled for another job by then.
    group.killed = True
    # May freeze and wait (v1 without cgroup.kill): not on the event loop.
    try:
        await trio.to_thread.run_sync(group.kill)
    except CgroupError as exc:
        with contextlib.suppress(CgroupError):
            if group.is_empty():
                return True  # it ended (and its group went) while we were killing it
        _log.error("job %s: cannot kill its cgroup: %s", job.id, exc)
    return False


async def remove_cgroup(job: Job) -> None:
    """Remove the job's cgroup (an rmdir per hierarchy, in a worker thread)."""
    group = job.cgroup
    if group is None or not group.tracked:
        return
    try:
        await trio.to_thread.run_sync(group.remove)
    except CgroupError as exc:
        _log.warning("job %s: cannot remove its cgroup: %s", job.id, exc)
