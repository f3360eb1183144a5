"""Making a job's place and process: its directory, cgroup, then the spawn.

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

Places ahead of need: creating a job's groups (a mkdir per hierarchy) and, once,
its directory and log files was most of that thread's work (measured with py-spy
under the bench: ~75% of it). So the launcher keeps a few *ready places*, made by
``keep_ready`` once a Start took one: the job's id and groups. A Start then writes
its limits (if any) and spawns. No directory or file is made ahead: the job's log
makes ``jobs/<id>/`` and its files at its first flush, if the job ever writes (each
inode costs 0.05-0.5 ms of CPU on this host's ext4; a job that prints nothing costs
none; see ``_output``); a Start whose helper needs the directory (isolation's
report) makes it. The job id comes with the place, since a v2 cgroup cannot be
renamed; it holds the time the place was made, not the Start's (ids still sort by
when they were made). After a crash, a place's groups are leftovers like any
other's. An ended job's group that is as new is recycled for a later place rather
than removed and made again (``_recycle``: ARCHITECTURE.md, "Why groups are
recycled"); it keeps the name of the job it was made for.

Seeds: with the reaper watching, a place also holds its job's process, made
with it (``_host._spawn.Seed``): already in the job's groups and process group,
with its output pipes, blocked until it is told its command. A plain Start
(no limits, namespaces, stdin or terminal: ``seedable``) then runs on the loop
alone (``launch_seeded``): hand the seed its command, wait (without a thread)
for its exec or its report of failure. Any other Start kills the place's seed in
its thread and spawns as before. See ARCHITECTURE.md, "Why seeds".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import select
import shutil
import signal
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from .._errors import ResourceExhausted
from .._host._cgroups import CgroupDriver, CgroupError, Inotify, JobCgroup, remove_groups
from .._host._isolation import helper_argv, helper_tasks, resolve_command
from .._host._place import Sown, make_place, make_seeded_place
from .._host._spawn import SEEDS_REFUSED, Seed, release_seed_slots
from .._model import Isolation, Limits
from ._job import REPORT
from ._output import KEEP_FREE, DirectBuffers, OpenLogs, OutputLog
from ._process import (
    PIPE_SIZES,
    RESOURCE_ERRNOS,
    Credentials,
    JobProcess,
    PipeReader,
    SpawnError,
    SpawnOptions,
    StartSpec,
    Stdin,
    describe_os_error,
    resource_exhausted,
    setup_failure,
)
from ._store import process_start_time
from ._threads import in_thread

__all__ = ["PLACE_PATIENCE", "LaunchPlan", "Launched", "Launcher", "Place", "remove_new_job_dir"]

_log = logging.getLogger("trio_worker.supervisor")

#: An ended job's group waits this long (s) for the next job's end before one worker-
#: thread call removes every group waiting: a burst of ends (a Stop of many jobs) is
#: one call after it, not a call per end competing with the next ends for the CPU...
RETIRE_AFTER = 0.05
#: ... or until this many wait (an empty group still holds kernel memory).
RETIRE_BATCH = 128
#: How long a seeded Start waits for its seed's exec before it checks whether the seed
#: was stopped from outside (``launch_seeded``): a seed's exec takes ~1 ms, a stopped
#: one never comes. One ``waitid`` per this much waiting, only while a seed is late.
SEED_PATIENCE = 0.1
#: How long a Start that finds no place ready waits for the one being made (``take_soon``).
PLACE_PATIENCE = 0.005


async def kill_stopped_spawn(group: JobCgroup) -> None:
    """Run beside a Start's worker-thread spawn until cancelled: its child, a vfork
    child, holds that thread until it execs, so one stopped before its exec (``kill
    -STOP`` by root, or by any job of the user it has switched to: a job's ``kill(-1,
    SIGSTOP)`` loop caught one in ~1 of 40 Starts here) held the thread, the shielded
    Start and so the shutdown, for ever. Every ``SEED_PATIENCE`` the group's processes
    (that child alone, before the job runs) are checked; a stopped one is SIGKILLed,
    which frees the thread: the job is KILLED at its start, none of its command ran."""
    while True:
        await trio.sleep(SEED_PATIENCE)
        # (On the loop, a few bytes of cgroupfs a directory, once a spawn is late: not in a
        # thread, whose limiter the stuck spawns themselves may hold.)
        for directory in group.dirs:
            with contextlib.suppress(OSError, ValueError):
                for pid in map(int, (directory / "cgroup.procs").read_text().split()):
                    _kill_if_stopped(pid)


def _stopped_early(seed: Seed) -> bool:
    """Whether ``seed`` is stopped (``kill -STOP``) before its exec: stopped, and its
    report pipe holds nothing yet (no EOF of an exec, no failure)."""
    if not seed.stopped():
        return False
    fd = seed.report_fd
    if fd < 0:
        return False  # (its outcome was read)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return not poller.poll(0)


def _kill_if_stopped(pid: int) -> None:
    """SIGKILL our child ``pid`` if it is stopped now (``waitid`` that does not wait and
    consumes nothing)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        if info is not None and info.si_code == os.CLD_STOPPED:
            os.kill(pid, signal.SIGKILL)
    except (ChildProcessError, ProcessLookupError):
        pass  # (not our child, or gone)


@dataclass(slots=True)
class Sprout:
    """A place's seed and the read ends of its stdout and stderr pipes."""

    seed: Seed
    stdout: int
    stderr: int
    #: The seed's start time (as /proc says it): the job's, since the exec keeps the pid.
    start_time: int | None
    #: SIGKILLed while it waited (a memory cap appeared): the thread's way, never ``go``
    #: (a go byte could reach the pipe before its death: a job killed at its start).
    killed: bool = False

    @property
    def fds(self) -> list[int]:
        """Every descriptor the server holds for this seed."""
        return [*self.seed.fds, self.stdout, self.stderr]

    def kill(self) -> None:
        """Kill and reap the unused seed, close the pipes (blocking, briefly)."""
        self.seed.kill()
        os.close(self.stdout)
        os.close(self.stderr)


@dataclass(slots=True)
class Place:
    """A job's place made ahead of need: its id, its group with the ``cgroup.procs``
    fds (no limits yet) — or, with a seed, no fds: the seed joined the group already —
    and the path of its directory, ``jobs/<id>``, which its log makes at its first
    write (or a Start whose helper needs it)."""

    job_id: str
    directory: Path
    group: JobCgroup
    procs: list[int]
    seed: Sprout | None = None


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
    #: A ready place for the job (``Launcher.take``), or None to make one.
    place: Place | None = None


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
        ready_dir: Path,
        cgroups: CgroupDriver,
        *,
        tail_bytes: int,
        max_unflushed: int,
        max_output_bytes: int | None,
        job_nofile: int | None,
        ready: int = 0,
        seeds: bool = False,
    ) -> None:
        self.jobs_dir = jobs_dir
        self.ready_dir = ready_dir
        self.cgroups = cgroups
        self._tail_bytes = tail_bytes
        self._max_unflushed = max_unflushed
        self._max_output_bytes = max_output_bytes
        self._job_nofile = job_nofile
        #: The jobs' logs that keep their files open between flushes (on the loop).
        self.open_logs = OpenLogs()
        #: The aligned buffers the logs' large flushes write with O_DIRECT (on the loop).
        self.direct_buffers = DirectBuffers()
        #: How many places ``keep_ready`` keeps made ahead of need.
        self._target = ready
        self._ready: deque[Place] = deque()
        #: Ended jobs' groups, to recycle or remove (``retire``).
        self._retired: list[JobCgroup] = []
        #: Ended jobs' groups recycled for the next places (``_tend``'s: its thread's,
        #: one round at a time, then ``aclose``'s).
        self._spare: deque[JobCgroup] = deque()
        #: The sleep of ``keep_ready``'s timer (``_linger_on``); ``retire`` sets its
        #: deadline if it has none.
        self._linger: trio.CancelScope | None = None
        #: When the last group was retired: the linger lasts until ``RETIRE_AFTER`` later.
        self._retired_at = -math.inf
        #: Set when a place was taken (``keep_ready`` waits on it).
        self._wanted = trio.Event()
        #: Set while ``keep_ready`` waits with nothing to do (``settled``).
        self._idle = trio.Event()
        #: Set (and dropped) when a place joins the pool, or a refill ends: made only
        #: while a Start waits for a place (``take_soon``), not twice per round.
        self._arrived: trio.Event | None = None
        self._closed = False
        #: Seeded Starts waiting for their seed's exec, and since when (trio's clock):
        #: ``watch_seeds`` bounds their waits, one timer for all (``_exec_or_stopped``).
        self._execs: dict[Seed, float] = {}
        #: ``watch_seeds``'s sleep until the next check (None while it does not run);
        #: the first Start to wait after a quiet spell sets its deadline.
        self._seed_watch: trio.CancelScope | None = None
        #: Seeds the watch killed, stopped before their exec: their Starts take the
        #: thread's way.
        self._late: set[Seed] = set()
        #: trio's clock: bound to the run's clock by ``keep_ready`` (``trio.current_time``
        #: goes through four Python frames, this one).
        self._now: Callable[[], float] = trio.current_time
        #: Starts waiting for the next place (``take_soon``): while there are any, the
        #: refill's thread hands each place over as soon as it is made (``_tend``).
        self._awaited = 0
        #: The ids of the places a worker thread is making now (``keep_ready``).
        self._making: Sequence[str] = ()
        #: Plant a seed with each place (only with the reaper: a seed planted by a
        #: worker thread has no PR_SET_PDEATHSIG); off for good if clone3 is refused.
        self._seeds = seeds
        #: The loop's, for the refill's thread to hand it places (``_tend``).
        self._token: trio.lowlevel.TrioToken | None = None
        #: A memory limit above the jobs holds no seed (``_memory_capped``).
        self._capped = False
        #: ``_capped`` was read after the last write to the limit files that
        #: ``watch_memory_caps`` saw: the refill plants by it, without reading them.
        self._caps_fresh = False

    # -- ready places --------------------------------------------------------

    def take(self) -> Place | None:
        """A ready place for a Start, or None (the Start makes its own)."""
        return self._ready.popleft() if self._ready else None

    def first_making(self) -> str | None:
        """The oldest id of the places being made: a Start meanwhile sorts below it."""
        return self._making[0] if self._making else None

    def replenish(self) -> None:
        """Wake ``keep_ready`` once a Start is done with the CPU (not at ``take``,
        where the refill's thread would compete with the Start's own), if the
        places are down to half: a job's end (``retire``) wakes it anyway."""
        if len(self._ready) <= self._target // 2:
            self._wake()

    def retire(self, group: JobCgroup) -> None:
        """Remove an ended job's group, in a later round of ``keep_ready``: the next one
        a Start wakes (``replenish``), or once no other job ended for ``RETIRE_AFTER``
        seconds, or once ``RETIRE_BATCH`` groups wait.

        One worker-thread call then removes the groups of the jobs that ended and
        makes the places missing: Starts and their jobs' ends share thread round
        trips, and a burst of ends shares one.
        """
        if not group.tracked:
            return
        self._retired.append(group)
        if len(self._retired) >= RETIRE_BATCH:
            self._wake()
            return
        if self._idle.is_set():
            self._idle = trio.Event()
        self._retired_at = now = self._now()
        linger = self._linger
        if linger is not None and linger.deadline == math.inf:
            # Set once: ``_linger_on`` lingers on from ``_retired_at`` (moving a deadline
            # per end cost each end of a burst an entry in trio's deadline heap).
            linger.deadline = now + RETIRE_AFTER

    def _wake(self) -> None:
        self._wanted.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    def ready_places(self) -> list[Place]:
        return list(self._ready)

    def spare_groups(self) -> list[JobCgroup]:
        """The recycled groups waiting for places (tests take stock, once ``settled``)."""
        return list(self._spare)

    async def settled(self) -> None:
        """Wait until ``keep_ready`` has nothing to do (tests take stock of places)."""
        await self._idle.wait()

    async def keep_ready(self, new_id: Callable[[], str]) -> None:
        """Keep the ready places made, until cancelled (a task of the supervisor).

        Woken by ``replenish`` and ``retire``, never polls. Removes the retired
        groups and makes what is missing in one worker-thread call. When a place
        cannot be made (out of descriptors, disk, processes...), it stops trying
        until it is woken again: a Start meanwhile makes its own place, and says
        why it cannot.
        """
        self._token = trio.lowlevel.current_trio_token()
        self._now = trio.lowlevel.current_clock().current_time
        # The places an earlier version left in ``ready/`` (now a place has no directory;
        # their groups are leftovers, gone already).
        await trio.to_thread.run_sync(shutil.rmtree, self.ready_dir, True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._linger_on)
            failed = False
            while True:
                if self._wanted.is_set():
                    self._wanted = trio.Event()
                wanted = self._wanted
                missing = 0 if failed or self._closed else self._target - len(self._ready)
                if missing > 0 or self._retire_due():
                    retired, self._retired = self._retired, []
                    made = await self._round(retired, [new_id() for _ in range(missing)])
                    failed = made < missing
                    if failed and not self._retired:
                        await self._wait(wanted)
                        failed = False
                    continue
                await self._wait(wanted)
                failed = False

    def _retire_due(self) -> bool:
        """Whether the retired groups go now, without places to make: ``RETIRE_BATCH``
        of them wait, or no job ended for ``RETIRE_AFTER``. Else they wait for the next
        round that makes places (a Start's ``replenish``): a job that ended during a
        round cost a round of its own, one thread call per job in a Start + Wait loop."""
        return bool(self._retired) and (
            len(self._retired) >= RETIRE_BATCH or self._now() >= self._retired_at + RETIRE_AFTER
        )

    async def _round(self, retired: list[JobCgroup], ids: list[str]) -> int:
        """One round of the refill's thread (``_tend``): how many places it made."""
        # Not cancellable (``in_thread``, no other checkpoint): the places the thread
        # makes must reach the pool (or ``aclose`` would not remove them).
        made = 0
        self._making = ids
        try:
            made, held = await in_thread(partial(self._tend, retired, ids))
            if held:
                self._arrive(held)
        except RuntimeError:  # "can't start new thread"
            self._retired[:0] = retired
        finally:
            self._making = ()
            self._tell_arrived()  # a Start waiting for a place: none is coming
        return made

    async def _wait(self, wanted: trio.Event) -> None:
        """Idle until woken: by a Start (``replenish``), or by ``_linger_on`` once
        ``RETIRE_AFTER`` passed since the last group was retired. Settled (``settled``)
        only with no group waiting."""
        if self._retired:
            self._linger_until(self._retired_at + RETIRE_AFTER)
        else:
            self._idle.set()
        await wanted.wait()

    def _linger_until(self, due: float) -> None:
        linger = self._linger
        if linger is not None and due < linger.deadline:
            linger.deadline = due

    async def _linger_on(self) -> None:
        """``keep_ready``'s timer (a task of its own): wakes it once ``RETIRE_AFTER``
        passed since the last group was retired (``_retire_due``). ``retire`` sets its
        deadline if it has none, and it moves it on while ends keep coming: no timer
        while no group waits, no polling. One deadline per ``RETIRE_AFTER`` of ends,
        where a scope with a deadline in each of ``keep_ready``'s waits cost a refill
        round ~40 of the loop's Python calls (a round every other Start)."""
        due = math.inf
        while True:
            with trio.CancelScope(deadline=due) as self._linger:
                await trio.sleep_forever()
            if self._retire_due():
                self._wake()  # (it takes every group waiting: no deadline until the next end)
                due = math.inf
            else:
                due = self._retired_at + RETIRE_AFTER if self._retired else math.inf

    async def aclose(self) -> None:
        """Remove the retired and spare groups and the ready places (after
        ``keep_ready`` was cancelled and every job ended)."""
        self._closed = True
        places = list(self._ready)
        self._ready.clear()
        retired, self._retired = [*self._retired, *self._spare], []
        self._spare.clear()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._discard_all, retired, places)

    def _discard_all(self, retired: Sequence[JobCgroup], places: Sequence[Place]) -> None:
        _remove_groups(retired)
        _discard_places(places)
        release_seed_slots()  # (no seed is born after this: the refill is over)

    def _tend(self, retired: Sequence[JobCgroup], ids: Sequence[str]) -> tuple[int, list[Place]]:
        """In a worker thread: recycle what it can of the retired groups (``_recycle``),
        make the places, then remove the other retired groups. Returns how many places
        were made, and those not handed over yet.

        The places come back with the result (``_round`` puts them in the pool): each
        hand-over wakes the loop, a turn of it (~20-40 us of its CPU) per place. Only
        while a Start waits for one (``take_soon``) is each place handed over as soon as
        it is made, with those held before it, by ``run_sync_soon``, not waited for (the
        thread goes on to the next). The loop runs those callbacks in order, before it
        learns the thread's result (delivered the same way)."""
        token = self._token
        assert token is not None
        held: list[Place] = []

        def arrive(place: Place) -> None:
            held.append(place)
            if self._awaited:  # a Start waits (``take_soon``): these go now, in order
                token.run_sync_soon(self._arrive, held[:])
                held.clear()

        gone = self._recycle(retired, len(ids))
        made = self._make_places(ids, arrive)
        _remove_groups(gone)
        return made, held

    def _recycle(self, retired: Sequence[JobCgroup], wanted: int) -> list[JobCgroup]:
        """In a worker thread: recycle retired groups into ``_spare`` (``CgroupDriver.
        recycle``), enough for ``wanted`` places and the pool's target; returns those
        to remove (the rest, and those that cannot be recycled).

        A place in a recycled group costs a few reads and a write, where a new one cost
        a mkdir per hierarchy and, at its job's end, an rmdir each (the bulk of this
        thread's CPU: ARCHITECTURE.md, "Why groups are recycled")."""
        room = max(wanted, self._target) - len(self._spare)
        if room <= 0 or not retired:
            return list(retired)
        candidates, gone = list(retired[:room]), list(retired[room:])
        for group, recycled in zip(candidates, self.cgroups.recycle(candidates), strict=True):
            if recycled is None:
                gone.append(group)
            else:
                self._spare.append(recycled)
        return gone

    def _arrive(self, places: Sequence[Place]) -> None:
        """On the loop: places the refill's thread made join the pool, in order."""
        for place in places:
            if self._capped and place.seed is not None:
                _kill_waiting(place.seed)  # planted before the cap was seen (``watch_memory_caps``)
            self._ready.append(place)
        self._making = self._making[len(places) :]  # made in order
        self._tell_arrived()

    def _tell_arrived(self) -> None:
        """Wake the Starts waiting for a place (``take_soon``), if any."""
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            arrived.set()

    async def take_soon(self, patience: float) -> Place | None:
        """``take``, but with none ready while the refill's thread is making places,
        wait up to ``patience`` seconds for the next one: it is usually a fraction of
        a millisecond away, where making a place of its own costs a Start a thread
        round trip, an inode and the groups (3-5 ms here) and slows the refill."""
        if not self._ready and self._making:
            self._awaited += 1  # the refill's thread hands over each place as it is made
            try:
                with trio.move_on_after(patience):
                    while not self._ready and self._making:
                        if self._arrived is None:
                            self._arrived = trio.Event()
                        await self._arrived.wait()
            finally:
                self._awaited -= 1
        return self.take()

    def _make_places(self, ids: Sequence[str], arrive: Callable[[Place], None]) -> int:
        """In a worker thread: as many of the places as can be made, in order, each
        handed to ``arrive`` once made; returns how many."""
        made = 0
        # The cap as the watch last read it, or read now if it is not watched (or was
        # written since: the watch is reading it; seeds planted meanwhile are killed as
        # they arrive, or with those waiting).
        capped = self._capped if self._caps_fresh else self._memory_capped() is not False
        plant = self._seeds and bool(ids) and not capped
        for job_id in ids:
            sown: Sown | OSError | None = None
            recycled = self._spare.popleft() if self._spare else None  # (the oldest first)
            try:
                if recycled is not None:
                    group = recycled
                    group.job_id = job_id
                else:
                    group = self.cgroups.planned(job_id)
                # The groups and their fds, and the seed: one call with the GIL let go
                # (it leaves nothing behind if it fails, but a recycled group as it was).
                # No directory or file: the log's first flush makes them, if the job ever
                # writes (``OutputLog``).
                if plant and self._seeds and group.tracked:
                    procs, sown = make_seeded_place(
                        None,
                        (),
                        group,
                        nofile_soft=self._job_nofile,
                        pipe_sizes=PIPE_SIZES,
                        recycled=recycled is not None,
                    )
                else:
                    procs = make_place(None, (), group, recycled=recycled is not None)
            except (CgroupError, OSError) as exc:
                _log.debug("no place made ahead: %s", exc)
                if recycled is not None:
                    # Removed, not kept: a group that cannot be joined (removed from
                    # outside, say) would fail every later round at its turn.
                    _remove_groups([recycled])
                break
            place = Place(job_id, self.jobs_dir / job_id, group, procs)
            if isinstance(sown, Sown):
                place.seed = Sprout(sown.seed, sown.stdout, sown.stderr, sown.start_time)
            elif sown is not None:
                self._not_sown(sown)
            arrive(place)
            made += 1
        return made

    def _not_sown(self, exc: OSError) -> None:
        """A place made without its seed: said, and no more seeds where the kernel
        refuses clone3 (``SEEDS_REFUSED``)."""
        if exc.filename == "clone3" and exc.errno in SEEDS_REFUSED:
            self._seeds = False
            _log.info("no seeds: clone3 is refused here (%s)", exc.strerror)
        else:
            _log.debug("no seed: %s", exc)

    def _memory_capped(self) -> bool | None:
        """In a worker thread: whether a memory limit holds the jobs and not the server,
        so that no seed may be planted (``CgroupDriver.memory_capped``: a job's OOM there
        would kill a seed, and with it the server whose memory it shares); None if that
        cannot be read now (then no seeds either). Said in the log when that changes."""
        try:
            capped = self.cgroups.memory_capped()
        except CgroupError as exc:  # (out of descriptors): unknown, so no seeds
            _log.debug("no seeds: cannot read the jobs' memory limits: %s", exc)
            return None
        if (capped is not None) != self._capped:
            self._capped = capped is not None
            if capped is not None:
                _log.info("no seeds while %s limits the jobs' memory (not the server's)", capped)
        return capped is not None

    async def watch_memory_caps(self) -> None:
        """Until cancelled (a task of the supervisor): a memory cap set above the jobs
        while seeds wait kills those seeds at once, not when they are used.

        The refill plants by the cap (``_memory_capped``), but seeds already waiting
        stayed exposed (a job's OOM there kills one, and so the server) until a Start
        used each. cgroupfs notes a ``write`` to a limit's file like any file system:
        one inotify on the files ``memory_capped`` reads wakes this task, which reads
        the cap (in a thread) and SIGKILLs every waiting seed if there is one (a Start
        then takes the thread's way with the place). No polling; nothing while no
        limit is written. While watched, the answer is kept for the refill
        (``_caps_fresh``), which read the files at every round (25 us of its thread,
        mostly holding the GIL). Left: a v2 cap written below the jobs' usage makes its OOM
        kill inside the writer's ``write``, before any notice.

        A watch is trusted only while its files are the ones the paths name: the jobs'
        parent group removed (a rename, or the groups above it) and made again has new
        files, which no write to reaches the old watch. The removal's notice (on the
        groups' parents) wakes this task, which then watches the files there now; with
        none (the group not made again), the refill reads them every round.
        """
        if not self._seeds:
            return
        while (watch := await trio.to_thread.run_sync(self._watch_caps)) is not None:
            try:
                await self._keep_caps_fresh(watch)
            finally:
                self._caps_fresh = False
                watch.close()
            _log.info("the jobs' memory limit groups were removed or renamed: watching anew")

    def _watch_caps(self) -> Inotify | None:
        """In a worker thread: a watch on the jobs' memory limit files and their groups'
        parents (for the groups' removal); None if there are none or it cannot be made."""
        paths = self.cgroups.memory_limit_files()
        if not paths:
            return None
        try:
            # (The jobs' groups' parents, for those groups' removal: the top one's holds
            # other groups too, other servers' beside ours in a group they share.)
            parents: dict[Path, set[str]] = {}
            for path in paths:
                parents.setdefault(path.parent.parent, set()).add(path.parent.name)
            return Inotify(*paths, parents=parents)
        except OSError as exc:
            _log.warning("no watch on the jobs' memory limits: %s", exc)
            return None

    def _read_caps(self, watch: Inotify) -> tuple[bool | None, bool]:
        """In a worker thread: ``_memory_capped``, and whether ``watch`` still watches
        the files it read (checked first: a removal after it wakes the watch again)."""
        watching = watch.watching()
        return self._memory_capped(), watching

    async def _keep_caps_fresh(self, watch: Inotify) -> None:
        """Read the cap once ``watch`` is on (a write before it is seen here), then after
        each write, killing waiting seeds under a cap; return once ``watch`` watches
        files the paths no longer name. Until the first read, the refill reads for itself."""
        while True:
            self._caps_fresh = False
            capped, watching = await trio.to_thread.run_sync(self._read_caps, watch)
            if capped is not False:
                for place in self._ready:
                    if place.seed is not None:
                        _kill_waiting(place.seed)
            if not watching:
                return
            self._caps_fresh = capped is not None
            await trio.lowlevel.wait_readable(watch.fd)
            while not watch.drain():  # (another group than ours came or went beside it)
                await trio.lowlevel.wait_readable(watch.fd)

    # -- a seeded Start (on the loop) -------------------------------------------

    @staticmethod
    def seedable(plan: LaunchPlan) -> bool:
        """Whether the plan's place has a seed that can run it: no limits to write
        first (a command never runs outside its limits), no namespaces (their
        helper), no terminal or stdin pipe (the seed's stdin is /dev/null)."""
        place = plan.place
        return (
            place is not None
            and place.seed is not None
            and not place.seed.killed
            and not plan.limits.any
            and not plan.isolation.any
            and not plan.tty
            and plan.options.stdin is Stdin.NULL
        )

    async def launch_seeded(self, plan: LaunchPlan) -> Launched | None:
        """Start a ``seedable`` plan with its place's seed, on the loop: hand the seed
        its command, and wait for its exec (EOF on its report pipe) or its failure (a FAILED job,
        as ``spawn``'s). No thread, nothing blocking.

        Not cancellable: what the seed runs must not be lost, so a cancel of the
        caller is held off until its next checkpoint (``_exec_or_stopped``), and the
        caller needs no shield of its own. The usual Start has no cancel scope here.

        None if the seed was dead before its command (killed from outside while it
        waited: nothing of the command ran), or stopped before its exec (then killed
        here): the place is the plan's again, without a seed's fds, for
        ``prepare_and_spawn`` (whose ``_claim`` reaps the seed)."""
        place = plan.place
        assert place is not None
        assert place.seed is not None
        sprout, place.seed = place.seed, None
        seed = sprout.seed
        spec = plan.spec
        try:
            # First the command, so that the seed's exec overlaps the rest.
            seed.go(
                spec.command,
                [spec.command, *spec.args],
                spec.env,
                spec.cwd,
                user=plan.options.user,
            )
        except BrokenPipeError:
            place.seed = sprout
            return None
        except OSError as exc:
            # ENOMEM copying the command: the process, run or not, goes with its group.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_discard_seeded, place, sprout)
            raise resource_exhausted(exc, "handing its process the command") from None
        log = OutputLog(
            place.directory,  # (made by the log's first flush, if the job writes)
            tail_bytes=self._tail_bytes,
            max_bytes=self._max_output_bytes,
            max_unflushed=self._max_unflushed,
            files=self.open_logs,
            direct=self.direct_buffers,
            keep_free=KEEP_FREE,
        )
        # (Their read ends are non-blocking from the refill's thread: no fcntl here.)
        stdout = PipeReader(sprout.stdout, nonblocking=True)  # (``output_pipe``'s)
        stderr = PipeReader(sprout.stderr, nonblocking=True)
        if not seed.poll() and not await self._exec_or_stopped(seed):
            # Stopped from outside before its exec (``kill -STOP``), and so killed:
            # nothing of the command ran. The thread's way, with the same place
            # (``_claim`` reaps it).
            place.seed = sprout
            return None
        failure = seed.error(spec.command, spec.cwd)
        if failure is None:
            process = JobProcess(seed.pid, seed.pidfd, stdout, stderr, None)
            return Launched(log, place.group, process=process, start_time=sprout.start_time)
        # The child failed before its command (exit 127): reap it, as spawn does.
        with trio.CancelScope(shield=True):
            await trio.lowlevel.wait_readable(seed.pidfd)
        trio.lowlevel.notify_closing(seed.pidfd)
        seed.reap()
        stdout.close()
        stderr.close()
        return Launched(log, place.group, error=setup_failure(failure, spec, place.group))

    async def _exec_or_stopped(self, seed: Seed) -> bool:
        """Wait until the seed has exec'd or failed (``poll``); False if it was stopped
        from outside before its exec (``kill -STOP``: it would keep this Start, and so
        the shutdown, waiting until continued) and has been SIGKILLed for it.

        No cancel scope of its own, where a shielded one with a deadline per Start was
        ~40 of the loop's Python calls (a Start + Wait makes ~1,000): ``watch_seeds``
        bounds every Start's wait with one timer, and a cancel of the caller is caught
        here and the wait finished shielded (``_exec_shielded``). What the seed runs
        must not be lost: the job is returned, and the caller's scope, still
        cancelled, raises at its next checkpoint (as after a shield's end)."""
        watch = self._seed_watch
        if watch is None:  # (``watch_seeds`` does not run: not yet, or no more)
            return await self._exec_shielded(seed)
        now = self._now()
        self._execs[seed] = now
        if watch.deadline == math.inf:
            watch.deadline = now + SEED_PATIENCE
        try:
            while True:
                await trio.lowlevel.wait_readable(seed.report_fd)
                if seed in self._late:  # (first: its death reads as an exec's EOF)
                    self._late.discard(seed)
                    return False
                if seed.poll():
                    return True
        except trio.Cancelled:
            pass  # (finished below, shielded: see above)
        finally:
            del self._execs[seed]
        if seed in self._late:
            self._late.discard(seed)
            return False
        return await self._exec_shielded(seed)

    async def _exec_shielded(self, seed: Seed) -> bool:
        """``_exec_or_stopped``'s wait in a shield, bounded by ``SEED_PATIENCE`` itself
        (a cancelled Start's, or one while ``watch_seeds`` does not run)."""
        while not seed.poll():
            with trio.CancelScope(deadline=self._now() + SEED_PATIENCE, shield=True) as late:
                await trio.lowlevel.wait_readable(seed.report_fd)
            if late.cancelled_caught and seed.stopped() and not seed.poll():
                signal.pidfd_send_signal(seed.pidfd, signal.SIGKILL)
                return False
        return True

    async def watch_seeds(self) -> None:
        """Until cancelled (a task of the supervisor): bound the seeded Starts' waits for
        their exec (``_exec_or_stopped``). Each ``SEED_PATIENCE`` while one waits, the
        seeds waited for longer than that are checked, and one stopped before its exec
        is SIGKILLed: its Start wakes (EOF) and takes the thread's way. Nothing while
        no Start waits; one deadline set per ``SEED_PATIENCE`` of Starts, not a
        scope per Start. Once cancelled (the supervisor's end), it keeps the bound for
        the Starts still waiting."""
        try:
            while True:
                execs = self._execs
                due = min(execs.values()) + SEED_PATIENCE if execs else math.inf
                with trio.CancelScope(deadline=due) as self._seed_watch:
                    await trio.sleep_forever()
                self._check_seeds()
        finally:
            self._seed_watch = None
            with trio.CancelScope(shield=True):
                while self._execs:
                    await trio.sleep(SEED_PATIENCE)
                    self._check_seeds()

    def _check_seeds(self) -> None:
        """SIGKILL the seeds that Starts waited for longer than ``SEED_PATIENCE`` and
        that are stopped before their exec (nothing on their report pipe: the Start's
        own ``poll`` reads it, not this); the others are checked again a
        ``SEED_PATIENCE`` later (one ``waitid`` each, only while a seed is late)."""
        now = self._now()
        execs = self._execs
        for seed, since in list(execs.items()):
            if now - since < SEED_PATIENCE or seed in self._late:
                continue
            if _stopped_early(seed):
                self._late.add(seed)
                signal.pidfd_send_signal(seed.pidfd, signal.SIGKILL)
            else:
                execs[seed] = now

    # -- a Start ---------------------------------------------------------------

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
        """The job's log (``_open_log``), its cgroup and that group's ``cgroup.procs`` fds.

        Raises ``ResourceExhausted`` (out of descriptors, memory, disk) having
        left nothing behind. A cgroup that cannot be made or joined for another
        reason comes back as the ``error`` of a job that FAILED.
        """
        if plan.place is not None:
            return self._claim(plan.place, plan)
        log = self._open_log(plan.job_id, plan.isolation)
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
                procs = group.open_join()
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

    def _claim(self, place: Place, plan: LaunchPlan) -> Launched:
        """``prepare`` with a ready place: its log, and the limits written. A seed the
        place has cannot run this plan: it goes."""
        unjoinable: OSError | None = None
        if place.seed is not None:
            sprout, place.seed = place.seed, None
            sprout.kill()
            try:
                place.procs = place.group.open_join()
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    _discard_places([place])
                    raise resource_exhausted(exc, "opening its cgroup") from None
                # Its group is gone (removed from outside, with the jobs' parent): a
                # job that FAILED, in words, as ``prepare``'s, not "resource exhausted".
                unjoinable = exc
        try:
            log = self._open_log(place.job_id, plan.isolation)
        except BaseException:
            _discard_places([place])
            raise
        if unjoinable is not None:
            _remove_group(place.group)
            message = f"cannot join the job's cgroup: {unjoinable.strerror}"
            return Launched(log, None, error=SpawnError(message, unjoinable.errno))
        try:
            group = self.cgroups.configure(
                place.group,
                plan.limits,
                cwd=plan.spec.cwd,
                extra_tasks=helper_tasks(plan.isolation),
            )
            if group is not place.group:
                # The limits need hierarchies a place is not in (v1): open them all.
                place.group = group
                try:
                    procs = group.open_join()
                except OSError as exc:
                    raise CgroupError(
                        f"cannot open {exc.filename}: {exc.strerror}", errno_=exc.errno
                    ) from None
                for fd in place.procs:
                    os.close(fd)
                place.procs = procs
        except CgroupError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                log.close()
                _discard_places([place])
                raise ResourceExhausted(f"cannot start the job: {exc}") from None
            for fd in place.procs:
                os.close(fd)
            _remove_group(place.group)
            error = SpawnError(f"cannot set up the job's cgroup: {exc}", None)
            return Launched(log, None, error=error)
        except BaseException:
            log.close()
            _discard_places([place])
            raise
        return Launched(log, place.group, place.procs)

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
        if launched.group is not None:
            _remove_group(launched.group)

    def _open_log(self, job_id: str, isolation: Isolation) -> OutputLog:
        """The new job's log. Its directory and files come with its first write; with
        ``isolation``, the directory is made now, for the helper's report, or
        ``ResourceExhausted`` says why not (nothing is left behind).

        Without it a Start never waits for the state disk: on a disk full or out of
        inodes, the job runs, and only its output (lost, counted) and record wait.
        """
        directory = self.jobs_dir / job_id
        if isolation.any:
            try:
                directory.mkdir(mode=0o700)
            except OSError as exc:
                remove_new_job_dir(directory)
                raise ResourceExhausted(
                    f"cannot create the job's directory in the state directory: "
                    f"{exc.strerror or exc}"
                ) from None
        return OutputLog(
            directory,
            tail_bytes=self._tail_bytes,
            max_bytes=self._max_output_bytes,
            max_unflushed=self._max_unflushed,
            files=self.open_logs,
            direct=self.direct_buffers,
            keep_free=KEEP_FREE,
        )


def _remove_groups(groups: Sequence[JobCgroup]) -> None:
    """Remove ended jobs' groups (blocking): together in one call with the GIL let
    go, then ``_remove_group`` for those that need more (subgroups, processes
    still leaving, an error to log)."""
    for group in remove_groups([g for g in groups if g.tracked]):
        _remove_group(group)


def _remove_group(group: JobCgroup) -> None:
    if group.tracked:
        try:
            group.remove()
        except CgroupError as exc:
            _log.warning("job %s: cannot remove its cgroup: %s", group.job_id, exc)


def _kill_waiting(sprout: Sprout) -> None:
    """SIGKILL a waiting seed (on the loop: no wait); ``_claim`` reaps it."""
    if not sprout.killed:
        sprout.killed = True
        with contextlib.suppress(ProcessLookupError):  # (dead already: ``_arrive`` must not raise)
            signal.pidfd_send_signal(sprout.seed.pidfd, signal.SIGKILL)


def _discard_seeded(place: Place, sprout: Sprout) -> None:
    """A seeded Start refused: its seed (and whatever its command started), its
    directory and group go (blocking)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sprout.seed.pid, signal.SIGKILL)
    with contextlib.suppress(CgroupError):
        place.group.kill()
    sprout.kill()
    _discard_places([place])


def _discard_places(places: Sequence[Place]) -> None:
    """Remove places no job will have (blocking)."""
    for place in places:
        if place.seed is not None:
            place.seed.kill()
            place.seed = None
        for fd in place.procs:
            os.close(fd)
        place.procs = []
        remove_new_job_dir(place.directory)
        _remove_group(place.group)


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
