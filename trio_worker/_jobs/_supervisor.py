"""The supervisor: the public facade over a job's parts.

``Supervisor`` holds the job table (``_queries``), the records (``_records``),
the Start path (``_admission``) and the runner that watches running jobs
(``_runner``, one task for all of them, in its nursery); ``open_supervisor``
sets the host up (fd limit, state directory lock, cgroups, reaper) and tears it
down: every job stopped before it returns.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import signal as _signal
import tempfile
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .._errors import InvalidRequest, JobNotFound, JobStillRunning, ShuttingDown
from .._host._cgroups import CgroupDriver, CgroupError, JobCgroup
from .._host._cgroups import detect as cgroup_detect
from .._host._guard import ReaperGuard, outlive
from .._host._pathwatch import PathWatch
from .._host._spawn import raise_nofile_limit
from .._limits import LimitPolicy
from .._model import Isolation, JobInfo, JobState, Limits, OutputChunk, Usage
from .._util import NoPublicConstructor, final
from . import _input
from ._admission import Admission
from ._job import LOST_ERROR, KillTimer, kill, running_process, signal_job, terminate
from ._launch import Launcher
from ._output import DEFAULT_CHUNK, ReadBudget
from ._process import validate_signal
from ._queries import JobTable, open_output
from ._records import JobRecords, Retention
from ._runner import JobRunner
from ._statedir import END_NOTES, StateDir
from ._store import JobStore, SqliteJobStore

__all__ = [
    "LOST_ERROR",
    "Retention",
    "Supervisor",
    "end_of",
    "ended_info",
    "open_supervisor",
    "open_supervisor_with_driver",
    "output_within",
    "owner_of",
]

_log = logging.getLogger("trio_worker.supervisor")


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
        max_unflushed: int | None = None,
    ) -> None:
        self._nursery = nursery
        self._store = store
        self.cgroups = cgroups
        self.state_dir = state_dir
        jobs_dir = state_dir / "jobs"
        jobs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._jobs = JobTable()
        self._records = JobRecords(
            store,
            self._jobs,
            jobs_dir,
            retention or Retention(),
            notes_path=None if store is None else state_dir / END_NOTES,
        )
        self._runner = JobRunner(nursery, self._records)
        self._admission = Admission(
            self._jobs,
            self._records,
            self._runner,
            jobs_dir,
            base_env=base_env,
            tail_bytes=tail_bytes,
            cgroups=cgroups,
            limit_policy=limit_policy,
            job_nofile=job_nofile,
            spawn_in_thread=spawn_in_thread,
            ready_places=ready_places,
            max_unflushed=max_unflushed,
        )
        self._runner.retire = self._admission.launcher.retire
        self._kills = KillTimer(nursery)
        self._closing = False
        #: Starts past the ``_closing`` check and not returned yet (``shutdown`` waits).
        self._starting = 0
        self._started = trio.lowlevel.ParkingLot()

    # -- queries -------------------------------------------------------------

    def status(self, job_id: str) -> JobInfo:
        return self._jobs.get(job_id).info()

    def list(self, owner: str | None = None) -> list[JobInfo]:
        """Every job (of ``owner``, if given), oldest first."""
        return self._jobs.list(owner)

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
        return self._jobs.iter_jobs(before=before, states=states, owner=owner, visible=visible)

    async def jobs_slice(
        self,
        *,
        before: str | None,
        limit: int,
        states: Collection[JobState] | None = None,
        owner: str | None = None,
        visible: Callable[[str], bool] | None = None,
    ) -> tuple[Sequence[JobInfo], str | None]:
        """``iter_jobs`` a slice at a time, for a List page built without blocking the loop:
        of the (at most) ``limit`` ids below ``before``, the matching jobs, newest first, and
        the id the next slice starts below (None: no more).

        The running jobs' usage is read in one thread for the slice (a cgroup's files cost
        tens of us each); jobs started, ended or removed meanwhile never make a caller
        that pages with the returned id repeat or skip one.
        """
        jobs, below = self._jobs.scan(
            before=before, limit=limit, states=states, owner=owner, visible=visible
        )
        groups = [(job, group) for job in jobs if (group := job.live_cgroup()) is not None]
        measured: dict[str, Usage | None] = {}
        if groups:
            usages = await trio.to_thread.run_sync(_read_usages, [g for _, g in groups])
            measured = {job.id: usage for (job, _), usage in zip(groups, usages, strict=True)}
        return [job.info(measured=measured.get(job.id)) for job in jobs], below

    def running_count(self, owner: str) -> int:
        """How many of ``owner``'s jobs are running (for quotas: no snapshots made)."""
        return self._jobs.running_count(owner)

    async def wait(self, job_id: str) -> JobInfo:
        """Wait until the job has ended and its output is complete."""
        job = self._jobs.get(job_id)
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
        return output_within(self, job_id, offset, follow, chunk_size, None)

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
        # Twice: the Start's first piece of loop work (checks, a place, the launch)
        # comes after what the loop's next poll finds, a Status (see ``let_io_first``).
        await trio.lowlevel.cancel_shielded_checkpoint()
        if self._closing:
            raise ShuttingDown("the supervisor is shutting down")
        self._starting += 1
        try:
            return await self._admission.start(
                command,
                args,
                env=env,
                cwd=cwd,
                limits=limits,
                isolation=isolation,
                owner=owner,
                stdin=stdin,
                tty=tty,
                terminal_size=terminal_size,
                user=user,
            )
        finally:
            self._starting -= 1
            self._started.unpark_all()

    async def signal(self, job_id: str, signum: int) -> JobInfo:
        """Send ``signum`` to the job's process group."""
        job = self._jobs.get(job_id)
        signum = validate_signal(signum)
        await trio.lowlevel.checkpoint()
        signal_job(job, running_process(job), signum)
        return job.info()

    async def stop(self, job_id: str, grace: float = 5.0) -> JobInfo:
        """SIGTERM the job's group, SIGKILL it after ``grace`` seconds; return the end."""
        job = self._jobs.get(job_id)
        if isinstance(grace, bool) or not isinstance(grace, int | float):
            raise InvalidRequest("grace", "must be a number of seconds")
        if not math.isfinite(grace) or grace < 0:
            raise InvalidRequest("grace", f"must be a finite number >= 0, got {grace}")
        process = running_process(job)
        signal_job(job, process, _signal.SIGTERM)
        # The SIGKILL after the grace is the supervisor's, not the caller's: a
        # caller that gives up waiting (cancelled, disconnected) cannot stop it.
        self._kills.kill_at(job, process, trio.current_time() + grace)
        await job.ended.wait()
        return job.info()

    async def remove(self, job_id: str, force: bool = False) -> JobInfo:
        """Delete an ended job: its record, in memory and in the store, and its output on
        disk. Returns its last snapshot; from then on the id is ``JobNotFound``.

        A running job raises ``JobStillRunning``, unless ``force``: then it is SIGKILLed (its
        process group and, through the cgroup, whatever escaped it) and removed once ended.
        """
        job = self._jobs.get(job_id)
        if not job.ended.is_set():
            if not force:
                raise JobStillRunning(job.id)
            if job.record.state is JobState.RUNNING and job.process is not None:
                await kill(job, job.process)
            await job.ended.wait()
        if self._jobs.find(job.id) is not job:
            raise JobNotFound(job.id)  # another remove got there first
        info = job.info()
        self._jobs.forget(job.id)
        # Shielded: once the record is going, the output goes too, whatever the caller does.
        with trio.CancelScope(shield=True):
            try:
                await self._records.delete(job)
            except BaseException:
                self._jobs.add(job)  # its record was not removed (its output may be)
                raise
        return info

    async def write_stdin(self, job_id: str, data: bytes) -> None:
        """Write ``data`` to the job's stdin, waiting while the job does not read it.

        Nothing is buffered here: the wait is the backpressure, and memory stays bounded
        by the pipe (or terminal). Concurrent writes go in arrival order. Raises NoStdin
        for a job started without stdin (or whose stdin was closed), JobNotRunning once
        it has ended. Bytes a job will never read (it closed its stdin) are dropped.
        """
        await _input.write_stdin(self._jobs.get(job_id), data)

    async def close_stdin(self, job_id: str) -> None:
        """End the job's input: it reads EOF (on a terminal: the EOF character, after
        whatever was written before). Closing twice is no error."""
        await _input.close_stdin(self._jobs.get(job_id))

    async def resize(self, job_id: str, rows: int, cols: int) -> None:
        """Set a tty job's terminal size; its foreground process group gets SIGWINCH."""
        await _input.resize(self._jobs.get(job_id), rows, cols)

    # -- housekeeping and shutdown ----------------------------------------------

    async def housekeep(self) -> None:
        """Persist output counters and enforce retention now.

        A persistent supervisor does this periodically on its own; calling it
        is only useful to apply a policy at a moment of your choosing.
        """
        await self._records.housekeep()

    @property
    def closing(self) -> bool:
        return self._closing

    async def shutdown(self, grace: float = 5.0) -> None:
        """Refuse new jobs and stop every running one (TERM, ``grace``, KILL).

        Leaving ``open_supervisor`` does this too; a server calls it earlier, so
        followers get the end of their streams while connections drain.
        """
        self._closing = True
        # A Start under way (its place and process are made in a worker thread) adds
        # its job after this began: wait for it, or that job would outlive the
        # shutdown, and end unwatched if it came after the runner.
        while self._starting:
            await self._started.park()
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                if job.record.state is JobState.RUNNING and job.process is not None:
                    nursery.start_soon(terminate, job, job.process, grace)


def _cgroup_parent_for(state_dir: Path) -> str:
    """``trio-worker-<hash>``: one parent group per state directory."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()[:12]
    return f"trio-worker-{digest}"


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


def owner_of(sup: Supervisor, job_id: str) -> str:
    """The job's owner (``JobNotFound`` if there is none): what the server's visibility
    check needs, without ``status``'s read of a running job's cgroup accounting (a few
    files on the event loop, on every Wait, Stop, Signal and Output)."""
    return sup._jobs.get(job_id).owner


def ended_info(sup: Supervisor, job_id: str) -> JobInfo | None:
    """The job's snapshot if it has ended, else None (``JobNotFound`` if there is none):
    the server's Wait of a job that ended before it was asked for (most of them: a short
    command's end comes before its client's Wait) answers at once, without the turn of
    the event loop that ``wait``'s checkpoint costs. A job whose process has exited
    and whose end the watcher has not handled yet is ended now (``end_if_exited``)."""
    job = sup._jobs.get(job_id)
    if not job.ended.is_set():
        # Its process may have exited with the watcher's turn still to come.
        sup._runner.end_if_exited(job)
    return job.info() if job.ended.is_set() else None


def end_of(sup: Supervisor, job_id: str) -> Callable[[], Awaitable[JobInfo]]:
    """Await it for the job's snapshot once it has ended and its output is complete, as
    ``wait`` gives: the job is taken now (``JobNotFound`` now if there is none), so its
    end still comes if it is removed meanwhile (``remove`` with ``force`` ends it first).
    Attach's ``ended``: a caller attached across a Remove gets the end, not NOT_FOUND."""
    job = sup._jobs.get(job_id)

    async def ended() -> JobInfo:
        await job.ended.wait()
        return job.info()

    return ended


def output_within(
    sup: Supervisor,
    job_id: str,
    offset: int,
    follow: bool,
    chunk_size: int,
    budget: ReadBudget | None,
) -> AsyncIterator[OutputChunk]:
    """``sup.output``, its reader holding what it reads ahead within ``budget`` (the
    server's output streams share their connection's): not in the public signature."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidRequest("offset", f"must be an integer >= 0, got {offset!r}")
    if chunk_size <= 0:
        raise InvalidRequest("chunk_size", "must be > 0")
    return open_output(sup._jobs, job_id, offset, follow, chunk_size, budget)


async def watch_state_dir(
    lock: StateDir, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Warn, once, when the state directory is deleted, moved or replaced under us: the
    server goes on with its open files, nameless, and whatever it writes from then on is
    not where a restart looks (a restart finds none of the jobs); a new directory at the
    path is not locked either, so a second server could start there and take our jobs'
    groups for leftovers. Says so again if it comes back and goes again. Told by inotify
    (``PathWatch``), it checks only when something happened there. Started once it
    watches (or knows it cannot)."""
    try:
        watch = await trio.to_thread.run_sync(PathWatch, lock.path, lock.lock_path)
    except OSError as exc:
        task_status.started()
        what = await trio.to_thread.run_sync(lock.missing)
        if what is not None:  # gone before it could be watched
            _say_missing(lock, what)
        else:
            _log.warning(
                "cannot watch the state directory %s (%s): its removal would go unsaid",
                lock.path,
                exc,
            )
        return
    task_status.started()
    with watch:
        said = False
        while True:
            await watch.wait()
            what = await trio.to_thread.run_sync(lock.missing)
            if what is not None and not said:
                _say_missing(lock, what)
            elif what is None and said:
                _log.info("state directory %s is back", lock.path)
            said = what is not None


def _say_missing(lock: StateDir, what: str) -> None:
    _log.warning(
        "state directory %s %s while the server runs: what it writes from now on "
        "(job records, output) is not there, and a restart will not find this "
        "server's jobs; put the directory back, or restart the server",
        lock.path,
        what,
    )


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

    ``state_dir`` holds the jobs' output logs (``jobs/``: a job's directory comes
    with its first output); a few jobs' places (their groups) are made ahead of need,
    and a Start then only takes one. Without one a temporary directory is used and
    removed on exit (unless ``keep_state``). ``env`` is the base environment jobs
    extend (default: this process's environment).
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

    With ``reaper`` (the default) and cgroups, two small helper processes (the
    reapers, ``_host/_reaper``) outlive this one if it dies, even by SIGKILL,
    and then kill every job group under the parent: no job process, escapees
    included, survives the supervisor's process. Either one alone is enough,
    so one being restarted after it was killed leaves no gap. Leaving the
    block tells them to exit quietly.
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
    max_unflushed: int | None = None,
) -> AsyncIterator[Supervisor]:
    """``open_supervisor`` with a given cgroup driver instead of the host's probe (tests),
    ``max_unflushed``: how far each job's output may run ahead of the disk before its
    pipes wait (``OutputLog``'s; default 16 MiB), and ``ready_places``: how many jobs'
    places (id, directory, cgroup) are kept made ahead of need (``_launch``)."""
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
    launcher: Launcher | None = None
    made: Supervisor | None = None
    try:
        if lock is not None:
            store = await SqliteJobStore.open(lock.db_path)
        if cgroup_parent is None:
            cgroup_parent = _cgroup_parent_for(path)
        driver = cgroups if cgroups is not None else cgroup_detect(cgroup_parent)
        _log.debug("%s", driver.summary())  # (serve says it at INFO once it listens)
        if lock is not None and lock.previous_reapers:
            # A server that died a moment ago may still have its reapers at work
            # on our parent groups: let them finish before any job of ours exists.
            async with trio.open_nursery() as waiting:
                for pid, start_time in lock.previous_reapers:
                    waiting.start_soon(outlive, pid, start_time)
        leftovers = await trio.to_thread.run_sync(driver.cleanup_leftovers)
        if leftovers:
            _log.warning("killed %d job group(s) left by an earlier run", len(leftovers))
        if reaper and driver.tracks:
            note = (
                (lambda rs: lock.note_reapers([(r.pid, r.start_time) for r in rs if r.start_time]))
                if lock
                else None
            )
            try:
                guard = await ReaperGuard.start(driver.parent_dirs(), on_start=note)
            except OSError as exc:
                _log.error("cannot start the reaper: jobs may outlive a crash: %s", exc)
        async with _unwrap_single(), trio.open_nursery() as nursery:
            if guard is not None:
                nursery.start_soon(guard.watch)
            supervisor: Supervisor = Supervisor._create(
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
                max_unflushed=max_unflushed,
            )
            made = supervisor
            await nursery.start(supervisor._runner.run)
            if store is not None:
                await supervisor._records.restore(await store.load_all())
                nursery.start_soon(supervisor._records.run_housekeeping)
                nursery.start_soon(supervisor._records.run_committer)
            if lock is not None:
                nursery.start_soon(watch_state_dir, lock)
            launcher = supervisor._admission.launcher
            nursery.start_soon(launcher.keep_ready, supervisor._admission.new_id)
            nursery.start_soon(launcher.watch_memory_caps)
            nursery.start_soon(launcher.watch_seeds)
            try:
                yield supervisor
            finally:
                with trio.CancelScope(shield=True):
                    await supervisor.shutdown(shutdown_grace)
                nursery.cancel_scope.cancel()  # housekeeping, the runner; jobs have ended
    finally:
        with trio.CancelScope(shield=True):
            if store is not None and made is not None:
                # A last try for pending records, once the nursery is done: a job's end
                # is known (Wait answered, shutdown's wait over) before its record is
                # written, and the runner's shielded write of it finishes only now; a
                # try before it would find that record not yet pending.
                await made._records.commit_queued()
                await made._records.save_unsaved()
                made._records.close_notes()
            if launcher is not None:
                await launcher.aclose()  # the places no job took, the groups left to remove
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


def _read_usages(groups: list[JobCgroup]) -> list[Usage | None]:
    """Each group's usage (None for a group going away): runs in a thread."""
    usages: list[Usage | None] = []
    for group in groups:
        try:
            usages.append(group.usage())
        except CgroupError:
            usages.append(None)
    return usages
