"""Running jobs: one watcher task for every job's pipes and exit, and a task per job
only while there is work for it (its output being written to disk, its end).

Theory of operation. ``JobRunner.run`` (one task in the supervisor's nursery) owns
an epoll instance of its own, which trio watches like any other fd. Each running
job's pipes (or terminal master) and its pidfd are registered there, so a job that
sleeps costs no task, no frame, no cancel scope: three epoll entries in the kernel
and a ``_Watch`` in a dict. Measured in-process (``tools/bench_jobmem.py``), the
four tasks a job used to have (its supervisor task, the log's flusher, two pumps)
were about half of the ~25 KiB of Python heap a sleeping job cost.

When the watcher wakes, it takes the ready fds from its epoll without waiting, and
handles them without yielding in between (so no event can be stale: an fd is
taken out of the epoll before anything closes it): a pipe is read until it is
empty (at most its share of ``_ROUND_BYTES``, split evenly between the ready
pipes of a wakeup; the rest waits for the next one: epoll is level-triggered),
its bytes appended to the job's log;
a pidfd that fires (handled after the wakeup's pipes, whose ends come with the exit)
ends the job there and then when nothing needs waiting for (``_end_now``: its pipes
at their ends, its group empty, its log on disk), else starts ``_end``. A wakeup
with a pidfd among its events first lets the tasks of the loop's next poll run
(``let_io_first``: a Status waits for one job's end less), then takes the events again.

- Output is written to disk by ``OutputLog.flush_pending``, in a task started when
  a job appends and ending when the disk has everything.
- A job whose log is backlogged (the disk is behind by ``max_unflushed``) has its
  pipes taken out of the epoll until the disk catches up (``_resume``): the job
  then waits on its full pipe, as it did on a pump that waited. At a job's end, the
  time its pipes spend out of the watch is not counted against their drain time
  (``_DRAIN_TIMEOUT``): a slow disk must not cost the job its last output.
- ``_end`` is the only place that records a job's end, so "when does a job end"
  has one answer: when its main process has exited, the rest of its process
  group has been killed, and its pipes are drained and flushed.
- If the watcher is cancelled (the supervisor's nursery is), its ``finally``
  (shielded) ends every job it still watches: kill, reap, flush, record.
"""

from __future__ import annotations

import logging
import math
import select
from collections import deque
from collections.abc import Callable, Iterator

import trio

from .._host._cgroups import CgroupError, JobCgroup
from .._host._isolation import read_report
from .._model import OutputStream, Usage
from . import _lifecycle as lc
from ._job import REPORT, Job, kill, kill_now, now, remove_cgroup
from ._process import JobProcess, PipeReader
from ._records import JobRecords
from ._turns import let_io_first

__all__ = ["JobRunner"]

#: How long a job's pipes may stay open after its process group was killed
#: (something outside the group, e.g. a setsid'ed grandchild, may hold them).
_DRAIN_TIMEOUT = 2.0
#: Most bytes the watcher takes from pipes per wakeup before letting other tasks run.
_ROUND_BYTES = 4 * 1024 * 1024
#: Most ready fds taken from the epoll per wakeup.
_MAX_EVENTS = 64
#: A pipe that is ready again within ``_RECENT`` seconds of its last read and holds less
#: than ``_SMALL`` bytes (a job writing steadily, as fast as the watcher takes it: each
#: of its writes would be a round, a log chunk and a follower's message of its own) rests
#: out of the watch for ``_REST`` seconds (epoll's timeout is in whole ms), then is read
#: whatever it holds. A job whose writes are ``_RECENT`` apart or more is read at each at
#: once; no byte waits more than a rest. ARCHITECTURE: "Why the follow fell into small
#: messages".
_SMALL = 64 * 1024
_RECENT = 0.002
_REST = 0.001
_READ_EVENTS = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_log = logging.getLogger("trio_worker.supervisor")


class _Pipe:
    """One of a job's output fds (stdout, stderr, or a terminal's master)."""

    __slots__ = ("read_at", "reader", "rested", "stream", "watch")

    def __init__(self, watch: _Watch, reader: PipeReader, stream: OutputStream) -> None:
        self.watch = watch
        self.reader = reader
        self.stream = stream
        #: When the watcher last read it (trio's clock).
        self.read_at = -math.inf
        #: It rested since (its next turn reads it, whatever it holds).
        self.rested = False


class _Watch:
    """What the runner knows of one running job."""

    __slots__ = (
        "drain",
        "drain_left",
        "drained",
        "ending",
        "flushing",
        "job",
        "paused",
        "pipes",
        "process",
    )

    def __init__(self, job: Job, process: JobProcess) -> None:
        self.job = job
        self.process = process
        #: Output fds not at their end yet.
        self.pipes: list[_Pipe] = []
        #: A task is writing the job's output to disk (``OutputLog.flush_pending``).
        self.flushing = False
        #: The pipes are out of the epoll until the disk catches up.
        self.paused = False
        #: ``_end`` has started (exactly once).
        self.ending = False
        #: Set by the watcher once every pipe reached its end (made by ``_end``).
        self.drained: trio.Event | None = None
        #: ``_end``'s wait for the pipes: its deadline runs only while they are watched.
        self.drain: trio.CancelScope | None = None
        #: What is left of the drain time while the pipes wait for the disk.
        self.drain_left = _DRAIN_TIMEOUT


class JobRunner:
    """Watches running jobs' pipes and exits; ends each job exactly once."""

    def __init__(self, nursery: trio.Nursery, records: JobRecords) -> None:
        self._nursery = nursery
        self._records = records
        self._epoll: select.epoll | None = None
        #: fd -> what it is: a job's pidfd (its ``_Watch``) or one of its pipes.
        self._fds: dict[int, _Watch | _Pipe] = {}
        #: Every job watched and not ended yet.
        self._watches: set[_Watch] = set()
        #: Pipes out of the epoll for a rest, and when it ends (in that order).
        self._resting: deque[tuple[float, _Pipe]] = deque()
        #: Takes an ended job's group to remove later (else removed at its end).
        self.retire: Callable[[JobCgroup], None] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The watcher: runs until cancelled, then ends every job still running."""
        with select.epoll() as epoll:
            self._epoll = epoll
            try:
                task_status.started()
                while True:
                    if self._resting:
                        with trio.move_on_at(self._resting[0][0]):
                            await trio.lowlevel.wait_readable(epoll.fileno())
                        self._end_rests()
                    else:
                        await trio.lowlevel.wait_readable(epoll.fileno())
                    events = epoll.poll(0, _MAX_EVENTS)
                    if self._ends_among(events):
                        # A job's end is ~0.3 ms of the loop: a Status that arrived
                        # meanwhile goes first. The events are read again after (an
                        # fd may have left the epoll in between); all are level-triggered.
                        await let_io_first()
                        events = epoll.poll(0, _MAX_EVENTS)
                    self._handle(events)
            finally:
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as nursery:
                        for watch in list(self._watches):
                            if not watch.ending:
                                watch.ending = True
                                self._unwatch(watch)
                                nursery.start_soon(self._finish, watch)
                self._epoll = None

    def supervise(self, job: Job, process: JobProcess) -> None:
        """Watch a job whose process was just spawned, until its end is recorded."""
        log = job.log
        assert log is not None
        watch = _Watch(job, process)
        self._watches.add(watch)
        for reader, stream in _outputs(job, process):
            watch.pipes.append(_Pipe(watch, reader, stream))
        if self._epoll is None:
            # The watcher has ended: a cancel from outside the supervisor's block ended its
            # tasks while this Start finished in its shield. Its job ends now, as the
            # watcher ended those it watched (this was logged as a bug, with a traceback).
            _log.info("job %s: started as its supervisor was cancelled; killing it", job.id)
            self._stop_watching(watch)
            return
        try:
            self._register(process.pidfd, watch)
            self._resume(watch)
        except Exception:
            # (epoll out of memory or watches): the job cannot be watched, so it ends now.
            self._fail(watch)

    def end_if_exited(self, job: Job) -> None:
        """The watcher's work for ``job`` now, if its main process has exited and the
        watcher has not handled that yet: its pipes read (their ends come with the exit),
        then its end, in the caller's step (``_end_now``, else its task).

        For a Wait that comes before the watcher's turn (its wakeup waits for the loop's
        other work, then lets I/O go first): answered at once, in its reader, not by a
        task woken after the end. The watcher skips what was handled here (its fds left
        the epoll); the order of a job's events is the watcher's.
        """
        process = job.process
        watch = None if process is None else self._fds.get(process.pidfd)
        if not isinstance(watch, _Watch) or watch.job is not job or watch.ending or watch.paused:
            return
        try:
            if not watch.process.has_exited():
                return
        except OSError:
            return  # (cannot tell here, e.g. no waitid on pidfds: the watcher will)
        try:
            for pipe in list(watch.pipes):
                self._read(pipe, _ROUND_BYTES)
        except Exception:
            self._fail(watch)  # (as the watcher: a bug costs this job, not the caller)
            return
        try:
            self._exited(watch)
        except Exception:
            _log.exception("job %s: recording its end failed", watch.job.id)

    # -- the watcher ---------------------------------------------------------

    def _ends_among(self, events: list[tuple[int, int]]) -> bool:
        """Whether a job's pidfd fired (pipes alone are handled at once: output keeps
        its pace)."""
        fds = self._fds
        return any(isinstance(fds.get(fd), _Watch) for fd, _ in events)

    def _handle(self, events: list[tuple[int, int]]) -> None:
        budget = _ROUND_BYTES
        # Each ready pipe gets its share of the round: epoll hands level-triggered fds
        # back in the same order every time, so a pipe that a fast writer keeps full
        # would take the whole round and starve the pipes behind it (whose jobs then
        # block on a full pipe). 64 events: at least 64 KiB each.
        pipes = sum(1 for fd, _ in events if isinstance(self._fds.get(fd), _Pipe))
        share = _ROUND_BYTES // max(1, pipes)
        exited: list[_Watch] = []
        now = trio.current_time()
        for fd, mask in events:
            what = self._fds.get(fd)
            if what is None:
                continue  # (cannot happen: fds leave the epoll before they close)
            if isinstance(what, _Watch):
                exited.append(what)  # after the pipes: their ends come with the exit
            elif self._rests(what, mask, now):
                continue
            elif budget > 0:
                try:
                    budget -= self._read(what, min(budget, share))
                except Exception:
                    # A bug here must cost one job, not the supervisor and every other job.
                    self._fail(what.watch)
        for watch in exited:
            try:
                self._exited(watch)
            except Exception:
                _log.exception("job %s: recording its end failed", watch.job.id)

    def _rests(self, pipe: _Pipe, mask: int, now: float) -> bool:
        """Whether the pipe, ready, rests instead of being read now (see ``_REST``): it
        then leaves the epoll until ``_end_rests`` puts it back.

        The watcher and a job writing steadily on one CPU otherwise take turns: each
        write wakes the loop, which reads it alone and sends it as a message before the
        job runs again (a job writing 4 KiB blocks: a round, a chunk and a message per
        4 KiB, at ~0.6 ms of the loop each). The rest lets the job write meanwhile.
        A pipe at its end (its writers gone: nothing more will come, and its job's end
        waits for it) or holding nothing (its end, or nothing to read) never rests.
        """
        if pipe.rested or now - pipe.read_at >= _RECENT or mask & select.EPOLLHUP:
            return False
        held = pipe.reader.held()
        if held is None or not 0 < held < _SMALL:
            return False
        self._unregister(pipe.reader.fd)
        pipe.rested = True
        self._resting.append((now + _REST, pipe))
        return True

    def _end_rests(self) -> None:
        """Put the pipes whose rest is over back in the epoll (their data is read at
        once: epoll is level-triggered). A pipe that ended, or whose job was paused for
        the disk or is no longer watched, meanwhile stays out."""
        now = trio.current_time()
        resting = self._resting
        while resting and resting[0][0] <= now:
            pipe = resting.popleft()[1]
            watch = pipe.watch
            if (
                watch.paused
                or pipe not in watch.pipes
                or pipe.reader.closed
                or pipe.reader.fd in self._fds
            ):
                continue
            try:
                self._register(pipe.reader.fd, pipe)
            except Exception:
                self._fail(watch)  # (epoll out of memory: as ``supervise``)

    def _read(self, pipe: _Pipe, limit: int) -> int:
        """Move what the pipe holds (up to ``limit``) into the log; returns the bytes moved."""
        watch = pipe.watch
        log = watch.job.log
        assert log is not None
        pipe.read_at = trio.current_time()
        pipe.rested = False
        pieces, at_end = pipe.reader.read_now(limit)
        size = 0
        for data in pieces:
            log.append(pipe.stream, data, notify=False)
            size += len(data)
        if pieces:
            log.notify()
            if not watch.flushing:
                watch.flushing = True
                self._nursery.start_soon(self._flush, watch, name=f"job {watch.job.id} flush")
        if at_end:
            self._unregister(pipe.reader.fd)
            watch.pipes.remove(pipe)
            if not watch.pipes and watch.drained is not None:
                watch.drained.set()
        elif log.backlogged and not watch.paused:
            self._pause(watch)
            self._nursery.start_soon(self._wait_for_disk, watch)
        return size

    def _exited(self, watch: _Watch) -> None:
        """The job's main process has exited (its pidfd fired)."""
        self._unregister(watch.process.pidfd)
        if not watch.paused:
            # Its pipes' rests end with it: their ends are what its end waits for.
            try:
                for pipe in watch.pipes:
                    if pipe.reader.fd not in self._fds:
                        self._register(pipe.reader.fd, pipe)
            except Exception:
                self._fail(watch)  # (epoll out of memory: as ``supervise``)
                return
        if not watch.ending:
            watch.ending = True
            try:
                if self._end_now(watch):
                    return
            except Exception:
                if watch.job.ended.is_set():
                    raise  # (its end is recorded: ``_handle`` logs it, nothing is left)
                _log.exception("job %s: supervision failed; killing it", watch.job.id)
                self._unwatch(watch)
                self._nursery.start_soon(self._finish, watch, name=f"job {watch.job.id}")
                return
            self._nursery.start_soon(self._end, watch, name=f"job {watch.job.id}")

    def _fail(self, watch: _Watch) -> None:
        """Supervision of one job failed (a bug): stop reading it, kill it and end it."""
        _log.exception("job %s: supervision failed; killing it", watch.job.id)
        self._stop_watching(watch)

    def _stop_watching(self, watch: _Watch) -> None:
        """Stop reading the job, kill it and end it (``_finish``, in a task)."""
        self._unwatch(watch)
        if watch.drained is not None:
            watch.drained.set()  # its ``_end`` is waiting for the pipes: they are done
        if not watch.ending:
            watch.ending = True
            self._nursery.start_soon(self._finish, watch, name=f"job {watch.job.id}")

    def _register(self, fd: int, what: _Watch | _Pipe) -> None:
        assert self._epoll is not None
        self._epoll.register(fd, _READ_EVENTS)
        self._fds[fd] = what

    def _unregister(self, fd: int) -> None:
        if self._fds.pop(fd, None) is not None and self._epoll is not None:
            self._epoll.unregister(fd)

    def _pause(self, watch: _Watch) -> None:
        """The job's pipes leave the epoll until its log is flushed. The time the disk
        takes is not the pipes' drain time: a job's last output must not be lost to a
        slow disk."""
        watch.paused = True
        for p in watch.pipes:
            self._unregister(p.reader.fd)
        if watch.drain is not None:
            watch.drain_left = max(watch.drain.deadline - trio.current_time(), 0.0)
            watch.drain.deadline = math.inf

    def _resume(self, watch: _Watch) -> None:
        watch.paused = False
        for pipe in watch.pipes:
            self._register(pipe.reader.fd, pipe)
        if watch.drain is not None:
            watch.drain.deadline = trio.current_time() + watch.drain_left

    def _unwatch(self, watch: _Watch) -> None:
        """Take every fd of the job out of the epoll (before anything closes them)."""
        self._unregister(watch.process.pidfd)
        for pipe in watch.pipes:
            self._unregister(pipe.reader.fd)
        watch.pipes.clear()
        watch.paused = False

    # -- a job's tasks, while there is work ----------------------------------

    async def _flush(self, watch: _Watch) -> None:
        log = watch.job.log
        assert log is not None
        try:
            await log.flush_pending()
        except Exception:
            _log.exception("job %s: cannot write its output", watch.job.id)
        finally:
            watch.flushing = False

    async def _wait_for_disk(self, watch: _Watch) -> None:
        log = watch.job.log
        assert log is not None
        await log.wait_flushed()
        if watch.paused and self._epoll is not None:  # (not if it was unwatched meanwhile)
            try:
                self._resume(watch)
            except Exception:
                self._fail(watch)

    def _end_now(self, watch: _Watch) -> bool:
        """``_end`` without a task, when nothing needs waiting for: the job's pipes reached
        their ends with its exit (the watcher handles pipes before pidfds), its group is
        empty once its process group is killed, and its log is on disk. The usual end,
        so it costs no task and no turn of the event loop before waiters are told.

        False, having done nothing that ``_end`` would not do again, when something
        needs waiting for.
        """
        if watch.pipes or watch.paused or watch.flushing:
            return False
        job, process = watch.job, watch.process
        if not kill_now(job, process):
            return False  # ``_end`` kills by the cgroup, then waits for it to empty
        process.reap()
        self._unwatch(watch)
        self._close(watch)
        log = job.log
        assert log is not None
        if not log.finished:
            log.finish()
        if log.flush_due:  # (lost ranges still to record)
            self._nursery.start_soon(self._finish, watch, name=f"job {job.id} end")
        else:
            log.close()
            self._done(watch)
        return True

    async def _end(self, watch: _Watch) -> None:
        """The job's main process has exited: finish the job and record its end."""
        job, process = watch.job, watch.process
        log = job.log
        assert log is not None
        try:
            # (Its main process has exited: its pidfd fired. Waiting for it again
            # through trio would cost another turn of the event loop.)
            # As systemd does for a service: the main process is gone,
            # so whatever it left (in its group or its cgroup) goes too.
            # (An empty group, the usual case, stays empty: reading it again
            # would cost the loop a file per Wait.)
            if not await kill(job, process) and job.cgroup is not None:
                with trio.move_on_after(_DRAIN_TIMEOUT):
                    try:
                        await job.cgroup.wait_empty()
                    except CgroupError as exc:
                        # Its group cannot be read (no descriptor to spare, say): the
                        # pipes' drain below is bounded all the same. ``kill`` said why
                        # it could not kill the group, if it could not: no second line.
                        _log.debug("job %s: cannot wait for its cgroup: %s", job.id, exc)
            process.reap()
            if watch.pipes:
                # Up to _DRAIN_TIMEOUT of the pipes being watched: while they wait for
                # the disk (``_pause``), the deadline is off.
                watch.drained = trio.Event()
                with trio.CancelScope() as watch.drain:
                    if not watch.paused:
                        watch.drain.deadline = trio.current_time() + _DRAIN_TIMEOUT
                    await watch.drained.wait()
                watch.drain = None
            log.finish()
        except Exception:
            _log.exception("job %s: supervision failed; killing it", job.id)
        finally:
            self._unwatch(watch)
            await self._finish(watch)

    async def _finish(self, watch: _Watch) -> None:
        """Kill and reap what is left, close, flush and record the end (shielded)."""
        job, process = watch.job, watch.process
        log = job.log
        assert log is not None
        with trio.CancelScope(shield=True):
            if not process.reaped:
                try:
                    await kill(job, process)
                except Exception:  # (its process group has its SIGKILL already)
                    # The last resort of a job's end must end it: an error here ended
                    # the supervisor, and its shutdown waited for this job forever.
                    _log.exception("job %s: cannot kill what is left of it", job.id)
                await process.wait_exited()
                process.reap()
            self._close(watch)
            try:
                if not log.finished:
                    log.finish()
                await log.flush()
                log.close()
            except Exception:  # the log's own failures are in it (lost ranges)
                _log.exception("job %s: cannot finish its output log", job.id)
            self._done(watch)

    def _close(self, watch: _Watch) -> None:
        """Close what the job's end leaves open (its main process reaped), but its log."""
        job = watch.job
        watch.process.close_pipes()
        if job.terminal is not None:
            job.terminal.close()
        if job.input is not None:
            job.input.release()  # writers still waiting learn the job ended

    def _done(self, watch: _Watch) -> None:
        self._watches.discard(watch)
        _record_end(watch.job, watch.process, self._records, self.retire, self._nursery)


def _outputs(job: Job, process: JobProcess) -> Iterator[tuple[PipeReader, OutputStream]]:
    if process.stdout is not None:
        yield process.stdout, OutputStream.STDOUT
    if job.terminal is not None:  # on a terminal, all output is stdout
        yield job.terminal, OutputStream.STDOUT
    if process.stderr is not None:
        yield process.stderr, OutputStream.STDERR


def _record_end(
    job: Job,
    process: JobProcess,
    records: JobRecords,
    retire: Callable[[JobCgroup], None] | None,
    nursery: trio.Nursery,
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
        # (The exec's errno alone says whether the command was found: see setup_failure.)
        number = failure.errno if failure.stage == "exec" else None
        job.feed(lc.SpawnFailed(failure.message, now(), number))
    else:
        job.feed(lc.Exited(returncode, now(), oom_killed=oom_killed))
    # Waiters are answered now. The record is queued for the committer's next
    # transaction (which any later one, housekeeping's included, runs first);
    # removing the group (an rmdir per hierarchy) comes last.
    records.end_soon(job)
    if retire is not None and job.cgroup is not None:
        retire(job.cgroup)  # removed with the next places (``_launch``)
    elif job.cgroup is not None and job.cgroup.tracked:
        nursery.start_soon(remove_cgroup, job)
