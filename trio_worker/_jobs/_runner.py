"""The job task: one per running job, in the supervisor's nursery.

It owns the job's process (its pipes, its group) and its output log, and is the
only place that records the job's end, so "when does a job end" has one answer:
when its main process has exited, the rest of its process group has been killed,
and its pipes are drained and flushed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .._host._cgroups import CgroupError, JobCgroup
from .._host._isolation import read_report
from .._model import OutputStream, Usage
from . import _lifecycle as lc
from ._job import REPORT, Job, kill, now, remove_cgroup
from ._output import OutputLog
from ._process import JobProcess, PipeReader
from ._records import JobRecords

__all__ = ["run_job"]

#: How long a job's pipes may stay open after its process group was killed
#: (something outside the group, e.g. a setsid'ed grandchild, may hold them).
_DRAIN_TIMEOUT = 2.0
#: Most bytes a pump takes from a pipe before letting other tasks run.
_ROUND_BYTES = 4 * 1024 * 1024
_log = logging.getLogger("trio_worker.supervisor")


async def run_job(
    job: Job,
    process: JobProcess,
    records: JobRecords,
    retire: Callable[[JobCgroup], None] | None = None,
) -> None:
    """Supervise a started job until its end is recorded; never raises.

    ``retire`` takes its group once it ended, to remove it later (else it is
    removed here, in a worker thread).
    """
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
                await kill(job, process)
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
                await kill(job, process)
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
            await _record_end(job, process, records, retire)


async def _record_end(
    job: Job,
    process: JobProcess,
    records: JobRecords,
    retire: Callable[[JobCgroup], None] | None,
) -> None:
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
        job.feed(lc.SpawnFailed(failure.message, now(), failure.errno))
    else:
        job.feed(lc.Exited(returncode, now(), oom_killed=oom_killed))
    # Waiters are answered now. The record goes to the store first (so a
    # housekeeping pass after a Wait sees the end); removing the group (an
    # rmdir per hierarchy, each waiting for an RCU grace period) comes last.
    await records.persist_end(job)
    if retire is not None and job.cgroup is not None:
        retire(job.cgroup)
    else:
        await remove_cgroup(job)


async def _pump(pipe: PipeReader, tag: OutputStream, log: OutputLog) -> None:
    """Move bytes from one pipe into the log as fast as the pipe gives them."""
    while pieces := await pipe.read_round(_ROUND_BYTES):
        for data in pieces:
            log.append(tag, data, notify=False)
        log.notify()
        if log.backlogged:
            await log.wait_flushed()
