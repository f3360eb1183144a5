"""The job runner's watcher (``_jobs._runner``) on real pipes and logs, without processes:
how one wakeup's reading is shared between jobs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from trio_worker._jobs import _runner
from trio_worker._jobs._job import Job
from trio_worker._jobs._output import OutputLog
from trio_worker._jobs._process import JobProcess, PipeReader, validate_start
from trio_worker._jobs._records import JobRecords
from trio_worker._model import Isolation, Limits, OutputStream

from .conftest import require_root

_F_SETPIPE_SZ = 1031
_HELD = 512 * 1024


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made: list[tuple[int, int]] = []
    yield made
    for r, w in made:
        os.close(r)
        os.close(w)


def _full_pipe(made: list[tuple[int, int]]) -> int:
    """A pipe holding ``_HELD`` bytes, as a fast writer keeps it: its read end."""
    r, w = os.pipe()
    made.append((r, w))
    fcntl.fcntl(w, _F_SETPIPE_SZ, 1024 * 1024)
    os.write(w, b"x" * _HELD)
    return r


def _job(tmp_path: Path, name: str) -> Job:
    spec = validate_start("true", None, None, None, base_env={"PATH": os.defpath})
    directory = tmp_path / name
    directory.mkdir()
    return Job(name, "owner", spec, Limits(), Isolation(), OutputLog(directory))


async def test_a_pipe_kept_full_does_not_starve_the_one_behind_it(
    tmp_path: Path, pipes: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs' pipes ready in one wakeup, each holding more than the round takes: both
    get their share. (epoll hands level-triggered fds back in the same order each time,
    so a first pipe that took the whole round would, kept full, starve the second's job
    for as long as it writes.)"""
    monkeypatch.setattr(_runner, "_ROUND_BYTES", 128 * 1024)
    jobs = [_job(tmp_path, "a"), _job(tmp_path, "b")]
    async with trio.open_nursery() as nursery:
        # (a round of reading writes no records)
        runner = _runner.JobRunner(nursery, JobRecords.__new__(JobRecords))
        with select.epoll() as epoll:
            runner._epoll = epoll
            events = []
            for job in jobs:
                watch = _runner._Watch(job, None)  # type: ignore[arg-type]
                pipe = _runner._Pipe(watch, PipeReader(_full_pipe(pipes)), OutputStream.STDOUT)
                watch.pipes.append(pipe)
                runner._register(pipe.reader.fd, pipe)
                events.append((pipe.reader.fd, select.EPOLLIN))
            runner._handle(events)
            taken = [job.log.end for job in jobs if job.log is not None]
            assert taken == [64 * 1024, 64 * 1024]
            runner._epoll = None
        nursery.cancel_scope.cancel()
    for job in jobs:
        assert job.log is not None
        job.log.close()


def test_a_round_stops_at_a_short_read(
    pipes: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that returns less than it asked for emptied the pipe: the round ends there,
    rather than taking what the job writes meanwhile a few KiB at a time (a job writing
    4 KiB blocks as fast as we read made ~180 reads per MiB)."""
    r, w = os.pipe()
    pipes.append((r, w))
    os.write(w, b"x" * 10_000)
    sizes: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        if fd == r:
            sizes.append(len(data))
            os.write(w, b"y" * 100)  # the job writes while we read
        return data

    monkeypatch.setattr(os, "read", read)
    pieces, at_end = PipeReader(r).read_now(1024 * 1024)
    assert (sizes, at_end) == ([10_000], False)
    assert pieces == [b"x" * 10_000]


def test_an_ended_jobs_snapshot_is_made_once_and_again_when_it_would_differ(
    tmp_path: Path,
) -> None:
    """The end's record, the waiters and every Status after take the same snapshot of an
    ended job; a change of what it shows (its usage, its output's counters, its record)
    makes a new one, so no caller is told something stale."""
    from datetime import UTC, datetime

    from trio_worker._jobs import _lifecycle as lc
    from trio_worker._model import JobState, Usage

    job = _job(tmp_path, "a")
    at = datetime.now(UTC)
    job.feed(lc.Spawned(4242, at))
    running = job.info()
    assert job.info() is not running  # running: made each time
    job.final_usage = Usage(cpu_seconds=0.5, memory_peak_bytes=4096)
    job.feed(lc.Exited(3, at))
    ended = job.info()
    assert ended.state is JobState.EXITED
    assert ended.exit_code == 3
    assert ended.usage == Usage(cpu_seconds=0.5, memory_peak_bytes=4096)
    assert job.info() is ended
    assert job.info(usage=False) is not ended
    assert job.info(usage=False).usage is None
    job.final_usage = Usage(cpu_seconds=1.0, memory_peak_bytes=8192)
    assert job.info().usage == job.final_usage
    assert job.log is not None
    job.log.append(OutputStream.STDOUT, b"late", notify=False)
    assert job.info().output_bytes == 4
    job.record = lc.Record(
        state=JobState.LOST, error="gone", started_at=at, ended_at=at
    )  # (as a restore would make it)
    assert job.info().state is JobState.LOST
    job.log.close()


def test_a_jobs_output_pipe_is_read_without_blocking_and_written_blocking() -> None:
    """The read end (ours, read by the runner in rounds) is non-blocking from the start, so
    the loop sets nothing when it takes a seed's pipes; the job's end blocks as a
    program expects of its stdout; neither end is inherited across an exec."""
    from trio_worker._jobs._process import output_pipe

    r, w = output_pipe()
    try:
        assert not os.get_blocking(r)
        assert os.get_blocking(w)
        assert not os.get_inheritable(r)
        assert not os.get_inheritable(w)
        reader = PipeReader(r, nonblocking=True)
        assert reader.read_now(1024) == ([], False)  # (empty: no wait)
        os.write(w, b"out")
        os.close(w)
        w = -1
        assert reader.read_now(1024) == ([b"out"], False)  # (a short read ends a round)
        assert reader.read_now(1024) == ([], True)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_a_jobs_stdout_and_stderr_block_seeded_or_not_and_ours_do_not(
    tmp_path: Path,
) -> None:
    """The read ends the runner takes are non-blocking from the place's C call (a seed's)
    or ``output_pipe`` (the thread's spawn); the job's own ends block, as a program
    expects of its stdout and stderr, on either path."""
    import sys

    from trio_worker import open_supervisor

    require_root("seeds (cgroups and the reaper)")
    probe = "import os; print(os.get_blocking(1), os.get_blocking(2))"
    async with open_supervisor(tmp_path / "state") as sup:
        launcher = sup._admission.launcher
        await launcher.settled()
        seeded = [p.seed for p in launcher.ready_places() if p.seed is not None]
        assert seeded
        for sprout in seeded:
            assert not os.get_blocking(sprout.stdout)
            assert not os.get_blocking(sprout.stderr)
        plain = await sup.start(sys.executable, ["-c", probe])
        threaded = await sup.start(sys.executable, ["-c", probe], stdin=True)  # (no seed)
        for job in (plain, threaded):
            assert (await sup.wait(job.id)).exit_code == 0
            chunks = [c.data async for c in sup.output(job.id, follow=False)]
            assert b"".join(chunks) == b"True True\n"


_BLOCK = b"z" * 4096  # a write of ``head -c``, ``cat`` and most programs


class _OnePipe:
    """A runner (its watcher running) watching one pipe of one job, as ``supervise``
    leaves it, without the process: ``w`` is the job's end."""

    def __init__(self, runner: _runner.JobRunner, job: Job, r: int, w: int) -> None:
        self.runner = runner
        self.job = job
        self.w = w
        self.watch = _runner._Watch(job, None)  # type: ignore[arg-type]
        self.pipe = _runner._Pipe(self.watch, PipeReader(r), OutputStream.STDOUT)
        self.watch.pipes.append(self.pipe)
        runner._register(r, self.pipe)

    @property
    def taken(self) -> int:
        assert self.job.log is not None
        return self.job.log.end

    async def write(self, data: bytes) -> None:
        """The job writes; the watcher has its turn."""
        os.write(self.w, data)
        await trio.testing.wait_all_tasks_blocked()


@contextlib.asynccontextmanager
async def _watching(tmp_path: Path, pipes: list[tuple[int, int]]) -> AsyncIterator[_OnePipe]:
    job = _job(tmp_path, "a")
    r, w = os.pipe()
    pipes.append((r, w))
    fcntl.fcntl(w, _F_SETPIPE_SZ, 1024 * 1024)  # (room for what the tests write)
    async with trio.open_nursery() as nursery:
        runner = _runner.JobRunner(nursery, JobRecords.__new__(JobRecords))
        await nursery.start(runner.run)
        yield _OnePipe(runner, job, r, w)
        nursery.cancel_scope.cancel()
    assert job.log is not None
    job.log.close()


async def test_a_job_writing_steadily_is_read_in_rounds_not_write_by_write(
    tmp_path: Path, pipes: list[tuple[int, int]], mock_clock: trio.testing.MockClock
) -> None:
    """A job writing 4 KiB blocks as fast as the watcher reads them (on one CPU, each
    write woke the loop, which read it alone before the job ran again): once it was read
    within ``_RECENT``, a pipe holding less than ``_SMALL`` rests for ``_REST`` and is
    then read whole. A follower gets what the rest gathered as one message, not a
    message per write (before: 64 messages of 4 KiB, the 'small-message mode')."""
    async with _watching(tmp_path, pipes) as one:
        log = one.job.log
        assert log is not None
        follower = log.read(0, chunk_size=256 * 1024)
        await one.write(_BLOCK)
        assert one.taken == 4096  # the first write: at once
        first = await follower.__anext__()
        await one.write(_BLOCK)  # the next, at once after it (no time passed)
        assert one.taken == 4096  # resting
        assert one.pipe.reader.fd not in one.runner._fds
        for _ in range(62):
            await one.write(_BLOCK)
        assert one.taken == 4096
        mock_clock.jump(_runner._REST)
        await trio.testing.wait_all_tasks_blocked()
        assert one.taken == 64 * 4096  # the rest over: all of it, in one round
        second = await follower.__anext__()
        assert [len(first.data), len(second.data)] == [4096, 63 * 4096]
        # Read again at once, it held 252 KiB: a big round is read as it comes.
        assert one.pipe.reader.fd in one.runner._fds
        await one.write(_BLOCK * 16)
        assert one.taken == 80 * 4096


async def test_a_job_writing_now_and_then_is_read_at_once(
    tmp_path: Path, pipes: list[tuple[int, int]], mock_clock: trio.testing.MockClock
) -> None:
    """A job printing a line a second (or every 20 ms) is read at each line, no time
    passing: the rest costs latency only to a job writing steadily, and at most
    ``_REST`` to any byte."""
    async with _watching(tmp_path, pipes) as one:
        for i in range(5):
            await one.write(b"line %d\n" % i)
            assert one.taken == 7 * (i + 1)
            mock_clock.jump(2 * _runner._RECENT if i % 2 else 1.0)
        await one.write(b"now\n")
        assert one.taken == 39
        # A line right after the last: it waits, _REST at most.
        await one.write(b"soon\n")
        assert one.taken == 39
        mock_clock.jump(_runner._REST / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert one.taken == 39
        mock_clock.jump(_runner._REST / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert one.taken == 44


async def test_a_resting_pipe_paused_for_the_disk_comes_back_once(
    tmp_path: Path, pipes: list[tuple[int, int]], mock_clock: trio.testing.MockClock
) -> None:
    """A job paused for the disk while one of its pipes rests: the pipe's rest ends
    without it (the pause holds), and the resume brings it back once, whether the rest
    ended first or not (a second register of its fd would fail the job)."""
    async with _watching(tmp_path, pipes) as one:
        runner, watch, fd = one.runner, one.watch, one.pipe.reader.fd
        for resume_first in (False, True):
            mock_clock.jump(1.0)
            await one.write(b"a")  # read at once ...
            taken = one.taken
            await one.write(b"b")  # ... so this one rests
            await one.write(b"c")
            assert one.taken == taken
            assert fd not in runner._fds  # resting
            runner._pause(watch)
            if resume_first:
                runner._resume(watch)
                await trio.testing.wait_all_tasks_blocked()
                assert one.taken == taken + 2
            mock_clock.jump(_runner._REST)
            await trio.testing.wait_all_tasks_blocked()
            if not resume_first:
                assert fd not in runner._fds  # still paused
                assert one.taken == taken
                runner._resume(watch)
                await trio.testing.wait_all_tasks_blocked()
                assert one.taken == taken + 2
            assert runner._fds.get(fd) is one.pipe
            assert not runner._resting


async def test_a_pipe_that_ends_while_it_rests_is_read_to_its_end(
    tmp_path: Path, pipes: list[tuple[int, int]], mock_clock: trio.testing.MockClock
) -> None:
    """The job's end of the pipe closes during a rest: after it, the rest of the bytes
    and the end are read, and the pipe leaves the watch."""
    async with _watching(tmp_path, pipes) as one:
        await one.write(_BLOCK)
        await one.write(b"last")
        assert one.taken == 4096
        os.close(one.w)
        pipes[-1] = (pipes[-1][0], os.open(os.devnull, os.O_WRONLY))  # (closed at the end)
        mock_clock.jump(_runner._REST)
        await trio.testing.wait_all_tasks_blocked()
        assert one.taken == 4100
        assert one.watch.pipes == []
        assert one.pipe.reader.fd not in one.runner._fds


async def test_a_resting_pipe_comes_back_when_its_job_exits(
    tmp_path: Path, pipes: list[tuple[int, int]], mock_clock: trio.testing.MockClock
) -> None:
    """Its job's exit ends a pipe's rest, no time passing: what the job's end waits for
    (its pipes' ends) is read at the watcher's next turn, not after the rest."""
    async with _watching(tmp_path, pipes) as one:
        await one.write(_BLOCK)
        await one.write(b"last")
        assert one.pipe.reader.fd not in one.runner._fds  # resting
        one.watch.process = JobProcess(0, -1, None, None, None)  # (its pidfd: not watched)
        one.watch.ending = True  # (a Stop's end, say: it waits for the pipes)
        one.runner._exited(one.watch)
        await trio.testing.wait_all_tasks_blocked()
        assert one.taken == 4100
