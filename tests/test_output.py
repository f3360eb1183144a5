from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import random
import resource
import stat
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_worker import OutputChunk, OutputStream
from trio_worker._jobs import _output
from trio_worker._jobs._output import DEFAULT_CHUNK as DEFAULT
from trio_worker._jobs._output import (
    Broadcaster,
    DirectBuffers,
    OpenLogs,
    OutputLog,
    read_log_file,
)

from . import test_faults
from .conftest import require_root

OUT, ERR = OutputStream.STDOUT, OutputStream.STDERR
KiB, MiB = 1024, 1024 * 1024
PAGE = mmap.PAGESIZE


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes with no zero in them, so a hole read back as data would show."""
    return random.Random(seed).randbytes(size).replace(b"\0", b"\1")


def takes_direct(directory: Path) -> bool:
    """Whether the filesystem of ``directory`` opens files with ``O_DIRECT``."""
    probe = directory / "direct-probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink()
    return True


class FaultyLog(OutputLog):
    """An output log whose disk fails on demand, deterministically.

    ``data_budget``: ``None``, data writes work; a number, that many more data
    bytes are written, then every data write fails with ENOSPC (a short write
    first, as a real full disk does). ``index_fails``: each index write puts a
    few bytes of a record on disk, then fails with ENOSPC.
    """

    data_budget: int | None = None
    index_fails = False
    round_trips = 0  # flusher thread calls

    def _write(self, job: _output._Flush) -> None:
        self.round_trips += 1
        super()._write(job)

    def _pwritev(self, fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        budget = self.data_budget  # (read once: a test may change it meanwhile)
        if budget is None:
            return super()._pwritev(fd, buffers, offset)
        if budget <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        cut = []
        for buffer in buffers:
            if budget <= 0:
                break
            view = memoryview(buffer)[:budget]
            cut.append(view)
            budget -= len(view)
        written = os.pwritev(fd, cut, offset)
        if self.data_budget is not None:
            self.data_budget = max(self.data_budget - written, 0)
        return written

    def _pwrite_direct(self, fd: int, buffer: memoryview, offset: int) -> int:
        """With a budget, the whole pages that fit (a direct write's unit), then ENOSPC."""
        budget = self.data_budget
        if budget is None:
            return super()._pwrite_direct(fd, buffer, offset)
        fit = min(budget, len(buffer)) // PAGE * PAGE
        if fit <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.pwrite(fd, buffer[:fit], offset)
        self.data_budget = max(budget - written, 0)
        return written

    def _declare_lost(self, a: int, b: int) -> None:
        self.all_lost = [*getattr(self, "all_lost", []), (a, b)]
        super()._declare_lost(a, b)

    def _pwrite(self, fd: int, data: bytes, offset: int) -> int:
        if self.index_fails and fd == self._index_fd:
            if offset % 9 == 0 and len(data) > 5:
                return os.pwrite(fd, data[:5], offset)  # half a record ...
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ... then full
        return super()._pwrite(fd, data, offset)


class Model:
    """The plain-bytes model: the log is the concatenation of all appends, less
    what retention dropped (below ``start``) and what a failing disk lost.

    ``flush`` is the specification of one flusher round trip: retention first
    (drop to ``min(end - cap, flushed)`` once that is ``step`` past ``start``,
    never stopping inside a lost range), then the writes, where a failure loses
    the unwritten part of the data (all of it if the index write fails).
    """

    def __init__(self, cap: int | None = None, step: int = 1, direct: int | None = None) -> None:
        """``direct``: a flush whose whole pages add up to this much writes them with
        ``O_DIRECT``, where a data budget ends at a page boundary (``_pwrite_direct``)."""
        self.direct = direct
        self.data = bytearray()
        # Each byte's stream's value (a list of enums took seconds to check: Enum.__hash__).
        self.tags = bytearray()
        self.cap, self.step = cap, step
        self.flushed = 0
        self.start = 0
        self.lost: list[tuple[int, int]] = []  # every lost range, merged
        self.dropped = 0
        self.records_pending = False
        self.last: OutputStream | None = None

    @property
    def end(self) -> int:
        return len(self.data)

    def append(self, stream: OutputStream, data: bytes) -> None:
        if not data:
            return
        if stream is not self.last:
            self.records_pending = True
            self.last = stream
        self.data += data
        self.tags += bytes([stream.value]) * len(data)

    def tagged(self, a: int, b: int, stream: OutputStream) -> bool:
        """Bytes ``a`` to ``b`` (at least one) all came from ``stream``."""
        return b > a and self.tags.count(stream.value, a, b) == b - a

    def _advance(self, position: int) -> None:
        for a, b in self.lost:
            if a <= position < b:
                position = b
        self.start = max(self.start, position)

    def _lose(self, a: int, b: int) -> None:
        if a >= b:
            return
        self.dropped += b - a
        if self.lost and self.lost[-1][1] == a:
            self.lost[-1] = (self.lost[-1][0], b)
        else:
            self.lost.append((a, b))

    def flush(self, fault: tuple[str, int] | None = None) -> None:
        if self.flushed == self.end and not self.records_pending:
            return
        if self.cap is not None:
            target = min(self.end - self.cap, self.flushed)
            if target - self.start >= self.step:
                self._advance(target)
        a, b = self.flushed, self.end
        if fault is None:
            self.records_pending = False
        elif fault[0] == "index":
            if self.records_pending:
                self._lose(a, b)
        else:
            self.records_pending = False
            written = self.written(a, b, fault[1])
            if written < b - a:
                self._lose(a + written, b)
                self.records_pending = True
        self.flushed = b

    def written(self, a: int, b: int, budget: int) -> int:
        """How much of a flush of [a, b) reaches the disk with a data budget: all of the
        budget, except in the pages written directly, where a page counts whole or not."""
        first = min(-(-a // PAGE) * PAGE, b)
        last = b // PAGE * PAGE
        if self.direct is None or last - first < self.direct:
            return min(budget, b - a)
        if budget <= first - a or budget >= last - a:
            return min(budget, b - a)
        return first - a + (budget - (first - a)) // PAGE * PAGE

    @property
    def lost_ranges(self) -> list[tuple[int, int]]:
        return [(max(a, self.start), b) for a, b in self.lost if b > self.start]

    def visible(self, offset: int, lost: Sequence[tuple[int, int]] | None = None) -> list[range]:
        """The stretches a reader from ``offset`` gets, in order."""
        position, out = max(offset, self.start), []
        for a, b in self.lost_ranges if lost is None else lost:
            if b <= position:
                continue
            if a > position:
                out.append(range(position, a))
            position = b
        if position < self.end:
            out.append(range(position, self.end))
        return out

    def check(
        self,
        chunks: list[OutputChunk],
        offset: int,
        lost: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Chunks cover exactly the visible stretches: same bytes, same tags,
        contiguous within a stretch, and jumping (never spanning) between them."""
        stretches = iter(self.visible(offset, lost))
        stretch = next(stretches, None)
        for chunk in chunks:
            assert chunk.data, "readers never get empty chunks"
            assert stretch is not None, f"unexpected chunk at {chunk.offset}"
            assert chunk.offset == stretch.start
            assert chunk.end <= stretch.stop, "a chunk never spans a gap"
            assert chunk.data == bytes(self.data[chunk.offset : chunk.end])
            assert self.tagged(chunk.offset, chunk.end, chunk.stream)
            stretch = range(chunk.end, stretch.stop) if chunk.end < stretch.stop else None
            if stretch is None:
                stretch = next(stretches, None)
        assert stretch is None, f"missing bytes from {stretch}"

    def check_state(self, log: OutputLog) -> None:
        assert log.end == self.end
        assert log.start == self.start
        assert log.lost_ranges == self.lost_ranges
        assert log.dropped_bytes == self.dropped


async def collect(log: OutputLog, offset: int = 0, **kw: object) -> list[OutputChunk]:
    return [c async for c in log.read(offset, **kw)]  # type: ignore[arg-type]


FLUSHES = st.one_of(
    st.none(),
    st.just(("ok", 0)),
    st.just(("index", 0)),
    st.tuples(st.just("data"), st.integers(0, 400)),
)
APPENDS = st.lists(
    st.tuples(st.sampled_from([OUT, ERR]), st.binary(min_size=0, max_size=300), FLUSHES),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=APPENDS,
    tail=st.integers(0, 600),
    offsets=st.lists(st.integers(0, 12_000), min_size=1, max_size=4),
    chunk=st.integers(1, 700),
    cap=st.one_of(st.none(), st.integers(0, 3000)),
    step=st.integers(1, 2000),
)
def test_log_matches_bytes_model(
    appends: list[tuple[OutputStream, bytes, tuple[str, int] | None]],
    tail: int,
    offsets: list[int],
    chunk: int,
    cap: int | None,
    step: int,
) -> None:
    """Random chunk sizes, stream interleavings, flush points, reader offsets,
    caps and injected write failures: every read, from memory, from disk or
    from a recovered log, equals the model's bytes, tags, gaps and start."""
    check_against_model(appends, tail, offsets, chunk, cap, step, None)


DIRECT_APPENDS = st.lists(
    st.tuples(
        st.sampled_from([OUT, ERR]),
        st.one_of(st.binary(max_size=300), st.integers(1, 5 * PAGE).map(pattern)),
        st.one_of(FLUSHES, st.tuples(st.just("data"), st.integers(0, 6 * PAGE))),
    ),
    max_size=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=DIRECT_APPENDS,
    tail=st.integers(0, 3 * PAGE),
    offsets=st.lists(st.integers(0, 60_000), min_size=1, max_size=3),
    chunk=st.integers(1, 3 * PAGE),
    cap=st.one_of(st.none(), st.integers(0, 8 * PAGE)),
    step=st.integers(1, 4 * PAGE),
    least=st.sampled_from([PAGE, 2 * PAGE]),
)
def test_a_log_written_directly_matches_bytes_model(
    appends: list[tuple[OutputStream, bytes, tuple[str, int] | None]],
    tail: int,
    offsets: list[int],
    chunk: int,
    cap: int | None,
    step: int,
    least: int,
) -> None:
    """The same with the whole pages of flushes written with ``O_DIRECT`` (from two-page
    buffers, so a flush takes several): byte N at offset N at any flush point, and a
    data write failing part-way in the direct pages loses from a page boundary."""
    check_against_model(appends, tail, offsets, chunk, cap, step, least)


def check_against_model(
    appends: list[tuple[OutputStream, bytes, tuple[str, int] | None]],
    tail: int,
    offsets: list[int],
    chunk: int,
    cap: int | None,
    step: int,
    least: int | None,
) -> None:
    async def scenario(directory: Path) -> None:
        model = Model(cap, step, least if least and takes_direct(directory) else None)
        direct = None if least is None else DirectBuffers(2, 2 * PAGE, least)
        log = FaultyLog(directory, tail_bytes=tail, max_bytes=cap, drop_step=step, direct=direct)
        log._retry_interval, log._retry_bytes = 0.0, 0  # every flush tries the disk
        for stream, data, flush in appends:
            log.append(stream, data)
            model.append(stream, data)
            if flush is not None:
                fault = None if flush[0] == "ok" else flush
                log.index_fails = flush[0] == "index"
                log.data_budget = flush[1] if flush[0] == "data" else None
                await log.flush()
                model.flush(fault)
                log.index_fails, log.data_budget = False, None
                model.check_state(log)
            # A non-following reader mid-way sees exactly what is there so far.
            middle = min(offsets[0], model.end)
            model.check(await collect(log, middle, follow=False, chunk_size=chunk), middle)
        log.finish()
        await log.flush()
        model.flush()
        log.close()
        model.check_state(log)
        for offset in offsets:
            offset = min(offset, model.end)
            chunks = await collect(log, offset, follow=True, chunk_size=chunk)
            assert all(len(c.data) <= chunk for c in chunks)
            model.check(chunks, offset)
        # After a "restart", the files alone replay everything exactly.
        recovered = OutputLog.recover(directory)
        assert recovered.finished
        assert (recovered.end, recovered.start) == (model.end, model.start)
        assert recovered.lost_ranges == model.lost_ranges
        for offset in offsets:
            offset = min(offset, model.end)
            model.check(await collect(recovered, offset, chunk_size=chunk), offset)
        # ... and so does read_log_file on its own, stretch by stretch, in pieces of at
        # most `chunk` bytes.
        first = recovered._first_record
        records = recovered._index_flushed
        for stretch in model.visible(0):
            position, got = stretch.start, []
            while position < stretch.stop:
                more = read_log_file(
                    directory / "output.log",
                    directory / "output.idx",
                    position,
                    stretch.stop - position,
                    records,
                    first,
                    chunk,
                )
                assert all(len(c.data) <= chunk for c in more)
                got += more
                position = more[-1].end
            model.check(got, stretch.start, [(0, stretch.start), (stretch.stop, model.end + 1)])

    with tempfile.TemporaryDirectory() as directory:
        trio.run(scenario, Path(directory))


async def test_follower_wakes_on_append_and_ends_on_finish(tmp_path: Path) -> None:
    log = OutputLog(tmp_path)
    got: list[OutputChunk] = []

    async def follow() -> None:
        async for chunk in log.read(0):
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        log.append(OUT, b"one")
        await trio.testing.wait_all_tasks_blocked()
        assert got == [OutputChunk(b"one", 0, OUT)]
        log.append(ERR, b"two")
        log.finish()
    log.close()
    assert got[1:] == [OutputChunk(b"two", 3, ERR)]


async def test_reader_far_behind_reads_from_disk_while_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    log = OutputLog(tmp_path, tail_bytes=64 * 1024)
    block = bytes(range(256)) * 1024  # 256 KiB
    for i in range(40):  # 10 MiB
        log.append(OUT if i % 3 else ERR, block)
        await log.flush()
    assert log._held <= 64 * 1024 + len(block)
    log.finish()
    await log.flush()
    log.close()
    data = b"".join([c.data async for c in log.read(12345)])
    assert data == (block * 40)[12345:]


async def test_lagging_readers_share_disk_reads_and_each_gets_every_byte(tmp_path: Path) -> None:
    log = OutputLog(tmp_path, tail_bytes=0)
    expected = bytearray()
    for i in range(12):  # 3 MiB + a bit, in runs of both streams
        piece = bytes([i]) * (256 * 1024 + i)
        log.append(ERR if i % 4 == 3 else OUT, piece)
        expected += piece
    await log.flush()
    got: dict[int, list[OutputChunk]] = {}

    async def read(i: int, offset: int) -> None:
        got[i] = [chunk async for chunk in log.read(offset, follow=False)]

    async with trio.open_nursery() as nursery:  # together: one read per block
        for i in range(6):
            nursery.start_soon(read, i, 100 * i)
    await read(6, 0)  # afterwards: recent blocks are still shared
    log.finish()
    log.close()
    for i, chunks in got.items():
        offset = 100 * i if i < 6 else 0
        assert b"".join(c.data for c in chunks) == bytes(expected[offset:])
        assert [c.offset for c in chunks[1:]] == [c.end for c in chunks[:-1]]
    # Readers starting inside the same block end up with the very same objects.
    later = [
        {id(c.data) for c in chunks if c.offset >= _output._FILE_BLOCK} for chunks in got.values()
    ]
    assert all(ids == later[0] for ids in later)


async def test_followers_reading_smaller_chunks_share_the_cut_pieces(tmp_path: Path) -> None:
    """The server's streams read 256 KiB chunks: a block read from disk is cut once, in the
    reading thread, and followers at the same place get the very same pieces (16
    followers used to make 16 copies of every block)."""
    log = OutputLog(tmp_path, tail_bytes=0)
    expected = bytes(range(256)) * (3 * 4096)  # 3 MiB, one run
    log.append(OUT, expected)
    await log.flush()
    log.finish()
    got: list[list[OutputChunk]] = []

    async def read() -> None:
        got.append([chunk async for chunk in log.read(0, follow=False, chunk_size=256 * 1024)])

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(read)
    log.close()
    for chunks in got:
        assert b"".join(c.data for c in chunks) == expected
        assert max(len(c.data) for c in chunks) == 256 * 1024
    ids = [[id(c.data) for c in chunks] for chunks in got]
    assert all(i == ids[0] for i in ids)


async def test_disk_write_failure_keeps_the_job_going(tmp_path: Path) -> None:
    log = OutputLog(tmp_path)
    log.append(OUT, b"before")
    await log.flush()
    os.close(log._data_fd)  # simulate a failing disk: writes now raise EBADF
    log._data_fd = os.open(tmp_path / "output.log", os.O_RDONLY)
    log.append(OUT, b"lost bytes")
    await log.flush()
    assert log.dropped_bytes == len(b"lost bytes")
    assert log.write_error
    log.append(OUT, b"!")  # appends still work
    assert log.end == len(b"beforelost bytes!")
    log.finish()
    log.close()


async def test_broadcaster_never_blocks_the_notifier() -> None:
    b = Broadcaster()
    woken = 0

    async def waiter() -> None:
        nonlocal woken
        await b.wait()
        woken += 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(100):  # many notifies, nobody reading yet: still no blocking
            b.notify()
    assert woken == 5
    assert b._waiting == []


def disk_usage(directory: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in directory.iterdir() if p.name.startswith("output"))


# -- retention -----------------------------------------------------------------


async def test_cap_bounds_disk_use_and_readers_are_told_where_the_log_starts(
    tmp_path: Path,
) -> None:
    cap, step, block = 64 * KiB, 16 * KiB, 8 * KiB
    model = Model()
    log = OutputLog(tmp_path, tail_bytes=32 * KiB, max_bytes=cap, drop_step=step)
    log.append(OUT, pattern(block))
    model.append(OUT, pattern(block))
    behind = log.read(0)  # a follower that takes one chunk, then stalls
    first = await behind.__anext__()
    assert (first.offset, first.end) == (0, block)
    usage = 0
    for i in range(1, 512):  # 4 MiB, both streams
        data = pattern(block, i)
        stream = ERR if i % 5 == 0 else OUT
        log.append(stream, data)
        model.append(stream, data)
        await log.flush()
        assert log.end - log.start < cap + step
        usage = max(usage, disk_usage(tmp_path))
    assert log.start >= model.end - cap - step
    # The files hold the retained part (plus a block or so), not 4 MiB.
    assert usage <= cap + step + 4 * block, usage
    assert os.stat(tmp_path / "output.log").st_size == model.end  # offsets unchanged
    model.start = log.start
    # The stalled follower's next chunk starts exactly at the retained start.
    nxt = await behind.__anext__()
    assert nxt.offset == log.start
    # A reader from 0 (or from anywhere below start) gets the retained log.
    for offset in (0, 12345, log.start - 1, log.start, log.start + 1):
        chunks = await collect(log, offset, follow=False)
        assert chunks[0].offset == max(offset, log.start)
        model.check(chunks, offset)
    log.finish()
    await log.flush()
    log.close()
    # The retained start survives a restart.
    recovered = OutputLog.recover(tmp_path)
    assert (recovered.start, recovered.end) == (log.start, log.end)
    model.check(await collect(recovered, 0), 0)
    model.check(await collect(recovered, log.start + 100), log.start + 100)


async def test_reader_racing_a_hole_punch_never_yields_the_hole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk read that started before retention moved past it may come back
    with zeros where blocks were freed: the reader drops that part."""
    data = pattern(512 * KiB)
    log = OutputLog(tmp_path, tail_bytes=0, max_bytes=64 * KiB, drop_step=16 * KiB)
    log.append(OUT, data[: 256 * KiB])
    await log.flush()
    entered, go = threading.Event(), threading.Event()
    real = _output.read_log_file

    def slow_read(*args: object) -> list[OutputChunk]:
        entered.set()
        go.wait(10)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_output, "read_log_file", slow_read)
    got: list[OutputChunk] = []

    async def read() -> None:
        async for chunk in log.read(0, follow=False):
            got.append(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.to_thread.run_sync(entered.wait)
        log.append(OUT, data[256 * KiB :])
        await log.flush()  # drops [0, 256 KiB) and punches it while the read waits
        assert log.start == 256 * KiB
        assert (tmp_path / "output.log").read_bytes()[:4096] == bytes(4096), "the hole"
        go.set()
    assert got[0].offset == log.start
    assert b"".join(c.data for c in got) == data[log.start :]
    log.finish()
    log.close()


async def test_readers_short_of_budget_share_a_read_of_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Readers asking for the same small stretch off disk while one read of it is under
    way share that read (tools/probe_hostile.py many-windows: 4,096 stalled streams over
    32 offsets queued 4,096 thread calls for one log); another stretch is its own read,
    and a shared read that is cancelled leaves its waiters to read it themselves."""
    data = pattern(512 * KiB)
    log = OutputLog(tmp_path, tail_bytes=0)
    log.append(OUT, data)
    await log.flush()
    entered, go = threading.Event(), threading.Event()
    reads: list[tuple[int, int]] = []
    real = _output.read_log_file

    def slow_read(*args: object) -> list[OutputChunk]:
        reads.append((args[2], args[3]))  # type: ignore[arg-type]
        entered.set()
        go.wait(10)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_output, "read_log_file", slow_read)
    got: dict[int, bytes] = {}

    async def read(i: int, position: int) -> None:
        chunks = await log._read_disk_alone(position, 8 * KiB)
        got[i] = b"".join(c.data for c in chunks)

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(read, i, 100 * KiB)
        nursery.start_soon(read, 50, 300 * KiB)
        await trio.to_thread.run_sync(entered.wait)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert sorted(reads) == [(100 * KiB, 8 * KiB), (300 * KiB, 8 * KiB)]
    assert all(got[i] == data[100 * KiB : 108 * KiB] for i in range(50))
    assert got[50] == data[300 * KiB : 308 * KiB]
    assert log._alone_reads == {}  # nothing kept once read

    # The first reader is cancelled while its read waits for a thread: the others
    # read it again (once, between them).
    reads.clear()
    entered.clear()
    go.clear()
    async with trio.open_nursery() as nursery:
        first = trio.CancelScope()

        async def cancelled() -> None:
            with first:
                await read(-1, 200 * KiB)

        limiter = log._disk_readers
        assert limiter is not None
        borrowers = [object() for _ in range(int(limiter.total_tokens))]
        for borrower in borrowers:  # every thread busy: the first read waits for one
            await limiter.acquire_on_behalf_of(borrower)
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(10):
            nursery.start_soon(read, i, 200 * KiB)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        go.set()
        for borrower in borrowers:
            limiter.release_on_behalf_of(borrower)
    assert reads == [(200 * KiB, 8 * KiB)]
    assert -1 not in got
    assert all(got[i] == data[200 * KiB : 208 * KiB] for i in range(10))
    log.finish()
    log.close()


async def test_without_hole_punching_the_cap_still_holds_for_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unsupported(self: OutputLog, fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(OutputLog, "_punch", unsupported)
    data = pattern(1 * MiB)
    log = OutputLog(tmp_path, tail_bytes=0, max_bytes=64 * KiB, drop_step=16 * KiB)
    with caplog.at_level(logging.WARNING, logger="trio_worker.output"):
        for i in range(0, len(data), 32 * KiB):
            log.append(OUT, data[i : i + 32 * KiB])
            await log.flush()
    assert [r.message for r in caplog.records if "punch" in r.message] == [
        f"{tmp_path}: the filesystem cannot punch holes; output beyond the cap is "
        "hidden from readers but keeps its disk space"
    ]
    assert log.start >= len(data) - 64 * KiB - 16 * KiB - 32 * KiB
    assert disk_usage(tmp_path) >= len(data)  # kept, as documented
    chunks = await collect(log, 0, follow=False)
    assert chunks[0].offset == log.start
    assert b"".join(c.data for c in chunks) == data[log.start :]
    log.finish()
    await log.flush()
    log.close()
    assert OutputLog.recover(tmp_path).start == log.start


def test_negative_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        OutputLog(tmp_path, max_bytes=-1)


# -- lost output (full disk) ----------------------------------------------------


async def pump(log: OutputLog, model: Model, total: int, seed: int, block: int = 16 * KiB) -> None:
    """What the supervisor's pumps do, one pipe round per append."""
    for i in range(total // block):
        data = pattern(block, seed * 100_000 + i)
        stream = ERR if i % 7 == 3 else OUT
        log.append(stream, data)
        model.append(stream, data)
        if log.backlogged:
            await log.wait_flushed()
        await trio.lowlevel.checkpoint()


async def test_full_disk_drops_output_counts_it_and_readers_skip_exactly_that(
    tmp_path: Path,
) -> None:
    model = Model()
    log = FaultyLog(tmp_path, tail_bytes=128 * KiB, max_unflushed=64 * KiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        await pump(log, model, 1 * MiB, 1)
        await log.flush()
        assert log.dropped_bytes == 0
        failed_from = log.end
        log.data_budget = 5000  # the disk fills up 5000 bytes from here
        round_trips = log.round_trips
        with trio.fail_after(10):  # the job is never held up by the failing disk
            await pump(log, model, 8 * MiB, 2)
        # At most one try per MiB appended (or per 100 ms), not one per append.
        assert log.round_trips - round_trips <= 8 + 2 + 10 * 4
        assert log._held + len(log._open) <= 128 * KiB + 64 * KiB + 16 * KiB
        assert log.write_error == os.strerror(errno.ENOSPC)
        log.data_budget = None  # space again
        await trio.sleep(0.15)  # a retry is due
        resumed_from = log.end
        await pump(log, model, 1 * MiB, 3)
        log.finish()
    await log.flush()
    log.close()
    lost = log.lost_ranges
    assert lost[0][0] == failed_from + 5000
    assert all(failed_from < a < b <= resumed_from for a, b in lost)
    assert log.dropped_bytes == sum(b - a for a, b in lost) > 7 * MiB
    # Everything else reads back byte-identical; the lost ranges are jumped over.
    model.start = 0
    for offset in (0, failed_from + 4999, lost[0][0], lost[0][0] + 1, lost[-1][1] - 1):
        chunks = await collect(log, offset, chunk_size=100_000)
        model.check(chunks, offset, lost)
    # The index on disk says the same after a restart.
    recovered = OutputLog.recover(tmp_path)
    assert (recovered.end, recovered.lost_ranges) == (log.end, lost)
    assert recovered.dropped_bytes == log.dropped_bytes
    model.check(await collect(recovered, 0), 0, lost)
    model.check(await collect(recovered, lost[0][0] + 7), lost[0][0] + 7, lost)


async def test_lost_range_reaches_the_index_once_the_disk_is_back(tmp_path: Path) -> None:
    """No more appends after the failure: the flusher still retries on its own."""
    log = FaultyLog(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        log.append(OUT, b"kept ")
        await log.flush()
        log.index_fails = True
        log.append(ERR, b"lost ")
        await log.flush()
        assert log.lost_ranges == [(5, 10)]
        assert OutputLog.recover(tmp_path).end == 5  # not on disk yet: the end is short
        log.index_fails = False
        with trio.fail_after(5):
            while log._pending_index:
                await log._space.wait()  # after every flusher round trip
        recovered = OutputLog.recover(tmp_path)
        assert (recovered.end, recovered.lost_ranges) == (10, [(5, 10)])
        log.append(ERR, b"more")
        log.finish()
    log.close()
    assert [(c.data, c.offset, c.stream) async for c in log.read(0)] == [
        (b"kept ", 0, OUT),
        (b"more", 10, ERR),
    ]
    recovered = OutputLog.recover(tmp_path)
    assert [c async for c in recovered.read(0)] == [c async for c in log.read(0)]


async def test_failing_disk_is_retried_by_bytes_while_time_stands_still(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    log = FaultyLog(tmp_path)
    log.data_budget = 0
    log.append(OUT, b"x")
    await log.flush()  # fails: from now on, drop and retry sparingly
    assert log.dropped_bytes == 1
    before = log.round_trips
    for i in range(4 * 64):  # 4 MiB in 16 KiB appends, a flush after each
        log.append(OUT, pattern(16 * KiB, i))
        await log.flush()
    assert log.round_trips - before <= 4
    assert log.dropped_bytes == 1 + 4 * MiB
    mock_clock.jump(0.2)
    log.append(OUT, b"y")
    await log.flush()  # the interval has passed: this one tries
    assert log.round_trips - before <= 5
    log.data_budget = None
    mock_clock.jump(0.2)
    log.append(OUT, b"z")
    await log.flush()
    assert log.lost_ranges == [(0, log.end - 1)]
    log.finish()
    log.close()


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "direct"])
@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_pumps_followers_faults_and_cap(
    tmp_path: Path, seed: int, direct: bool
) -> None:
    """Two pumps (as the supervisor runs them), the flusher, followers at
    their own pace, a disk that fails and recovers at random, and a cap: every
    follower gets true bytes in order, jumping only over dropped or lost ones,
    and the files replay what the log says it kept. ``direct``: flushes with two
    whole pages or more write them with ``O_DIRECT``, from buffers of two pages."""
    rng = random.Random(seed)
    cap = rng.choice([None, 64 * KiB, 300 * KiB])
    model = Model()
    log = FaultyLog(
        tmp_path,
        tail_bytes=rng.choice([0, 8 * KiB, 256 * KiB]),
        max_unflushed=64 * KiB,
        max_bytes=cap,
        drop_step=16 * KiB,
        direct=DirectBuffers(2, 2 * PAGE, 2 * PAGE) if direct else None,
    )
    log._retry_interval = 0.005
    received: list[list[OutputChunk]] = []

    async def follow(offset: int, slow: float) -> None:
        got: list[OutputChunk] = []
        received.append(got)
        async for chunk in log.read(offset, chunk_size=rng.choice([1000, DEFAULT])):
            got.append(chunk)
            if slow:
                await trio.sleep(slow)

    async def pump_stream(stream: OutputStream) -> None:
        for i in range(200):
            data = pattern(rng.choice([1, 100, 5000, 40 * KiB]), seed * 10_000 + i + stream.value)
            log.append(stream, data)
            model.append(stream, data)
            if log.backlogged:
                await log.wait_flushed()
            await trio.lowlevel.checkpoint()

    async def chaos() -> None:
        while not log.finished:
            log.data_budget = rng.choice([None, None, None, 0, 3000])
            log.index_fails = rng.random() < 0.2
            await trio.sleep(rng.random() * 0.01)
        log.data_budget, log.index_fails = None, False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        for offset, slow in ((0, 0), (0, 0.0005), (5000, 0)):
            nursery.start_soon(follow, offset, slow)
        nursery.start_soon(chaos)
        with trio.fail_after(30):
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump_stream, OUT)
                pumps.start_soon(pump_stream, ERR)
        log.finish()
    log.data_budget, log.index_fails = None, False
    await log.flush()
    log.close()
    gone = sorted([(0, log.start), *getattr(log, "all_lost", [])])
    assert log.dropped_bytes == sum(b - a for a, b in getattr(log, "all_lost", []))

    def jumped_over_gone(a: int, b: int) -> bool:
        for x, y in gone:
            if x <= a < y:
                a = y
        return a >= b

    for got in received:
        position = None
        for chunk in got:
            assert chunk.data == bytes(model.data[chunk.offset : chunk.end])
            assert model.tagged(chunk.offset, chunk.end, chunk.stream)
            if position is not None:
                assert chunk.offset >= position
                assert jumped_over_gone(position, chunk.offset)
            position = chunk.end
        assert position is None or jumped_over_gone(position, model.end)
    model.start = log.start
    lost = log.lost_ranges
    model.check(await collect(log, 0), 0, lost)
    recovered = OutputLog.recover(tmp_path)
    assert (recovered.end, recovered.start) == (log.end, log.start)
    assert recovered.lost_ranges == lost
    model.check(await collect(recovered, 0), 0, lost)
    model.check(await collect(recovered, log.end // 2), log.end // 2, lost)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a disk that really fills up."""
    require_root("mounting a tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_real_full_disk_loses_output_but_never_the_job(small_tmpfs: Path) -> None:
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"f" * 96 * KiB)
    job = small_tmpfs / "job"
    job.mkdir()
    model = Model()
    log = OutputLog(job, tail_bytes=64 * KiB, max_unflushed=64 * KiB)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        with trio.fail_after(10):
            await pump(log, model, 1 * MiB, 1)  # about 150 KiB fit
        await log.flush()
        assert log.dropped_bytes > 0
        assert "No space left" in (log.write_error or "")
        filler.unlink()  # room again
        await trio.sleep(0.15)
        await pump(log, model, 64 * KiB, 2, block=4 * KiB)
        log.finish()
    await log.flush()
    log.close()
    lost = log.lost_ranges
    assert lost
    assert lost[-1][1] < log.end, "writes resumed"
    assert log.dropped_bytes == sum(b - a for a, b in lost)
    model.check(await collect(log, 0), 0, lost)
    recovered = OutputLog.recover(job)
    assert (recovered.end, recovered.lost_ranges) == (log.end, lost)
    model.check(await collect(recovered, 0), 0, lost)


async def test_a_flush_near_the_disk_floor_keeps_the_bytes_that_fit(small_tmpfs: Path) -> None:
    """``keep_free``: a flush that would leave less of the disk free writes what fits
    above the floor (to a block) and loses only the rest, as a write the disk cut short.
    It was refused whole: near the floor a fast job lost up to a whole flush (16 MiB)
    of which most would have fitted. What is kept reads back; the floor holds."""
    job = small_tmpfs / "job"
    job.mkdir()
    keep = 16 * KiB  # (1/16 of the 256 KiB disk)
    disk = os.statvfs(small_tmpfs)
    block = disk.f_frsize
    free = disk.f_bavail * block
    (small_tmpfs / "filler").write_bytes(b"f" * (free - keep - 40 * KiB))
    log = OutputLog(job, tail_bytes=0, keep_free=keep)
    try:
        data = pattern(64 * KiB, 7)
        log.append(OUT, data)
        await log.flush()
        [(kept, end)] = log.lost_ranges
        assert end == 64 * KiB
        assert 0 < kept < end, kept
        assert kept % block == 0, kept
        assert "No space left" in (log.write_error or "")
        left = os.statvfs(small_tmpfs).f_bavail * block
        assert keep <= left < keep + block, (left, kept)  # as much as fitted, not more
        chunks = await collect(log, 0, follow=False)
        assert b"".join(c.data for c in chunks if c.end <= kept) == data[:kept]
        log.finish()
    finally:
        log.close()
    recovered = OutputLog.recover(job)  # (the lost range's record waits for room)
    assert recovered.end == kept
    assert b"".join(c.data for c in await collect(recovered, 0)) == data[:kept]


async def test_real_full_disk_is_avoided_by_the_cap(small_tmpfs: Path) -> None:
    """Punched holes really give the space back: 4 MiB through a 256 KiB disk."""
    model = Model()
    log = OutputLog(small_tmpfs, tail_bytes=0, max_bytes=64 * KiB, drop_step=16 * KiB)
    for i in range(256):
        data = pattern(16 * KiB, i)
        log.append(OUT, data)
        model.append(OUT, data)
        await log.flush()
    assert log.dropped_bytes == 0
    assert log.start >= 4 * MiB - 96 * KiB
    model.start = log.start
    model.check(await collect(log, 0, follow=False), 0)
    log.finish()
    log.close()


async def test_retention_frees_space_on_a_disk_its_log_filled(small_tmpfs: Path) -> None:
    """A capped log's ``output.start`` gets its bytes at the log's first write, before
    any data: a disk full at that moment takes none of its data, and on a disk that
    fills later, retention rewrites those bytes in place (a new file's first bytes
    would need a block the full disk does not have), frees the dropped blocks, and
    the log writes again."""
    job = small_tmpfs / "job"
    job.mkdir()
    log = OutputLog(job, tail_bytes=0, max_bytes=64 * KiB, drop_step=16 * KiB)
    log._retry_interval = 0.0  # every flush tries the disk
    filler = test_faults.fill(small_tmpfs)
    log.append(OUT, pattern(16 * KiB, 0))
    await log.flush()
    assert log.lost_ranges == [(0, 16 * KiB)]
    assert not (job / "output.log").exists(), "data of a capped log before its start"
    filler.unlink()
    for i in range(1, 4):  # 48 KiB more on disk, under the cap
        log.append(OUT, pattern(16 * KiB, i))
        await log.flush()
    assert (job / "output.start").read_bytes() == bytes(16)
    assert log.lost_ranges == [(0, 16 * KiB)]
    test_faults.fill(small_tmpfs)
    for i in range(4, 16):
        log.append(OUT, pattern(16 * KiB, i))
        await log.flush()
    log.finish()
    await log.flush()
    log.close()
    assert log.start >= 11 * 16 * KiB
    start, _ = struct.unpack("<QQ", (job / "output.start").read_bytes())
    assert start == log.start
    # Each punch made room for a write: about every other 16 KiB since the disk filled
    # is on it (without the punches, none would be).
    everything = b"".join(pattern(16 * KiB, i) for i in range(16))
    kept = [c for c in await collect(OutputLog.recover(job), 0) if c.end > 64 * KiB]
    assert kept, log.lost_ranges
    assert all(c.data == everything[c.offset : c.end] for c in kept)


@contextlib.contextmanager
def _no_descriptor_to_spare() -> Iterator[None]:
    """RLIMIT_NOFILE lowered to the lowest free fd: the next open fails with EMFILE."""
    lowest = os.dup(0)
    os.close(lowest)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("cap", [None, 64 * KiB], ids=["uncapped", "capped"])
@pytest.mark.parametrize("cause", ["directory-removed", "no-inode", "no-descriptor"])
async def test_files_that_cannot_be_made_fail_as_a_write_does(
    tmp_path: Path, cap: int | None, cause: str
) -> None:
    """The first write's directory and files cannot be made (the jobs' directory
    removed, no inode, no descriptor): its output is lost, counted and said
    as a failed write's, nothing is left open, and the log goes on; once the cause is
    gone, the next flush makes them and writes. The index says the same after a
    restart."""
    with contextlib.ExitStack() as stack:
        if cause == "no-inode":
            disk = stack.enter_context(
                test_faults.small_tmpfs(tmp_path / "disk", "size=1m,nr_inodes=16")
            )
        else:
            disk = tmp_path
        directory = disk / "jobs" / "job"  # (made by the first flush)
        directory.parent.mkdir()
        model = Model()
        log = OutputLog(directory, max_bytes=cap, tail_bytes=0)
        log._retry_interval = 0.0  # every flush tries the disk
        fds = set(os.listdir("/proc/self/fd"))
        log.append(OUT, b"a" * 100)
        model.append(OUT, b"a" * 100)
        fillers: list[Path] = []
        with contextlib.ExitStack() as failing:
            if cause == "directory-removed":
                directory.parent.rmdir()
            elif cause == "no-inode":
                fillers = test_faults.fill_inodes(disk)
            else:
                failing.enter_context(_no_descriptor_to_spare())
            await log.flush()
        model.flush(("data", 0))
        expected = {"directory-removed": errno.ENOENT, "no-inode": errno.ENOSPC}
        assert log.write_error == os.strerror(expected.get(cause, errno.EMFILE))
        model.check_state(log)
        assert set(os.listdir("/proc/self/fd")) == fds
        if cause == "directory-removed":
            directory.parent.mkdir()
        for filler in fillers:
            filler.unlink()
        log.append(ERR, b"b" * 10)
        model.append(ERR, b"b" * 10)
        await log.flush()
        model.flush()
        assert log.write_error is not None  # (the last failure, as for a write)
        log.finish()
        await log.flush()
        log.close()
        model.check_state(log)
        model.check(await collect(log, 0), 0)
        recovered = OutputLog.recover(directory)
        model.check_state(recovered)
        model.check(await collect(recovered, 0), 0)


# -- recovery -------------------------------------------------------------------


async def write_log(directory: Path, pieces: list[tuple[OutputStream, bytes]]) -> Model:
    model = Model()
    log = OutputLog(directory, tail_bytes=1000)
    for i, (stream, data) in enumerate(pieces):
        log.append(stream, data)
        model.append(stream, data)
        if i % 3 == 2:
            await log.flush()
    log.finish()
    await log.flush()
    log.close()
    return model


PIECES = [(OUT if i % 4 else ERR, pattern(100 + 37 * i, i)) for i in range(40)]


async def test_recover_replays_exactly_from_any_offset(tmp_path: Path) -> None:
    model = await write_log(tmp_path, PIECES)
    log = OutputLog.recover(tmp_path)
    assert (log.end, log.start, log.lost_ranges, log.dropped_bytes) == (model.end, 0, [], 0)
    assert log.finished
    for offset in (0, 1, model.end // 2, model.end - 1, model.end):
        model.check(await collect(log, offset), offset)
        model.check(await collect(log, offset, chunk_size=333), offset)
    with pytest.raises(RuntimeError):
        log.append(OUT, b"read-only")
    log.close()


async def test_recover_after_a_crash_mid_index_record(tmp_path: Path) -> None:
    """The index goes first: a crash while writing a record leaves half a
    record and none of its data. The half record is ignored."""
    model = await write_log(tmp_path, PIECES)
    index = tmp_path / "output.idx"
    records = index.stat().st_size // 9
    last_offset = int.from_bytes(
        index.read_bytes()[(records - 1) * 9 : (records - 1) * 9 + 8], "little"
    )
    os.truncate(index, index.stat().st_size - 4)
    os.truncate(tmp_path / "output.log", last_offset)
    log = OutputLog.recover(tmp_path)
    assert log.end == last_offset
    del model.data[last_offset:]
    model.check(await collect(log, 0), 0)
    model.check(await collect(log, last_offset // 2), last_offset // 2)


async def test_recover_after_a_crash_between_index_and_data(tmp_path: Path) -> None:
    """Records whose data never arrived (or only partly): the data file's
    size is where the log ends, and the tags before it stay exact."""
    model = await write_log(tmp_path, PIECES)
    index = tmp_path / "output.idx"
    records = index.stat().st_size // 9
    last_offset = int.from_bytes(
        index.read_bytes()[(records - 1) * 9 : (records - 1) * 9 + 8], "little"
    )
    cut = last_offset + 10
    os.truncate(tmp_path / "output.log", cut)
    log = OutputLog.recover(tmp_path)
    assert log.end == cut
    del model.data[cut:]
    model.check(await collect(log, 0), 0)
    model.check(await collect(log, last_offset - 3), last_offset - 3)


async def test_recover_counts_what_the_record_counted_as_lost(tmp_path: Path) -> None:
    """Bytes the job's record counted that the files lack (never made, a crash before
    the flush) are a lost range at the end: the end never goes back; a record's start
    past the files' is kept too."""
    empty = OutputLog.recover(tmp_path / "never-made", counted=108_899)
    assert (empty.end, empty.start, empty.lost_ranges) == (108_899, 0, [(0, 108_899)])
    assert (empty.dropped_bytes, await collect(empty, 0)) == (108_899, [])
    model = await write_log(tmp_path, [(OUT, b"abc"), (ERR, b"de")])
    log = OutputLog.recover(tmp_path, counted=9, counted_start=1)
    assert (log.end, log.start, log.lost_ranges, log.dropped_bytes) == (9, 1, [(5, 9)], 4)
    chunks = await collect(log, 0)
    assert [(c.offset, c.data) for c in chunks] == [(1, b"bc"), (3, b"de")]
    assert await collect(log, 6) == []
    same = OutputLog.recover(tmp_path, counted=2)  # (a record behind the files: theirs)
    assert (same.end, same.lost_ranges) == (5, [])
    model.check(await collect(same, 0), 0)


async def test_recover_ignores_a_damaged_index_tail(tmp_path: Path) -> None:
    model = await write_log(tmp_path, PIECES)
    index = tmp_path / "output.idx"
    index.write_bytes(index.read_bytes() + (10**12).to_bytes(8, "little") + b"\x07")  # bad tag
    log = OutputLog.recover(tmp_path)
    assert log.end == model.end
    model.check(await collect(log, 0), 0)


@pytest.mark.parametrize("cap", [None, 64 * KiB], ids=["uncapped", "capped"])
async def test_a_log_that_writes_nothing_makes_no_file(tmp_path: Path, cap: int | None) -> None:
    """A job that prints nothing costs no inode (each cost the refill 0.05-0.5 ms of CPU
    on this host's ext4): its log's files come with its first write, and a log without
    files (or without its directory) recovers as empty."""
    log = OutputLog(tmp_path, max_bytes=cap)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run_flusher)
        await trio.testing.wait_all_tasks_blocked()
        log.finish()
    await log.flush()
    log.close()
    assert os.listdir(tmp_path) == []
    assert await collect(log, 0) == []
    for directory in (tmp_path, tmp_path / "never-made"):
        recovered = OutputLog.recover(directory)
        assert (recovered.end, recovered.start, recovered.lost_ranges) == (0, 0, [])
        assert recovered.finished
        assert await collect(recovered, 0) == []


@pytest.mark.parametrize("cap", [None, 64 * KiB], ids=["uncapped", "capped"])
async def test_a_log_makes_its_files_at_its_first_write(tmp_path: Path, cap: int | None) -> None:
    directory, tmp_path = tmp_path, tmp_path / "job"
    log = OutputLog(tmp_path, max_bytes=cap, tail_bytes=0)
    await log.flush()  # nothing to write yet: nothing made
    assert os.listdir(directory) == []
    log.append(OUT, b"late")
    await log.flush()
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700
    names = {"output.log", "output.idx"} | ({"output.start"} if cap else set())
    assert set(os.listdir(tmp_path)) == names
    assert all(stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600 for name in names)
    if cap:
        # Its 16 bytes were written before any data: retention rewrites them in place.
        assert (tmp_path / "output.start").read_bytes() == bytes(16)
    log.append(ERR, b"r")
    log.finish()
    await log.flush()
    log.close()
    assert (tmp_path / "output.log").read_bytes() == b"later"
    recovered = OutputLog.recover(tmp_path)
    assert [(c.data, c.offset, c.stream) for c in await collect(recovered, 0)] == [
        (b"late", 0, OUT),
        (b"r", 4, ERR),
    ]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _content(log: OutputLog) -> bytes:
    return b"".join([chunk.data async for chunk in log.read(0, follow=False)])


async def test_a_log_holds_files_open_only_from_its_first_write(tmp_path: Path) -> None:
    before = _open_fds()
    log = OutputLog(tmp_path, max_bytes=1 << 20)
    assert _open_fds() == before  # made, not held: a quiet job costs no fd
    log.append(OUT, b"hello")
    await log.flush()
    assert _open_fds() == before + 2  # output.idx and output.log; output.start only when used
    log.finish()
    log.close()
    assert _open_fds() == before
    assert await _content(OutputLog.recover(tmp_path)) == b"hello"


async def test_open_logs_bounds_the_files_held_and_logs_reopen(tmp_path: Path) -> None:
    files = OpenLogs(limit=2)
    logs = []
    for i in range(5):
        directory = tmp_path / str(i)
        directory.mkdir()
        logs.append(OutputLog(directory, files=files, max_bytes=64, drop_step=16))
    before = _open_fds()
    for round_ in range(3):
        for i, log in enumerate(logs):
            log.append(OUT if i % 2 else ERR, f"<{round_}:{i}>".encode() * 10)
            await log.flush()
            assert len(files) <= 2
            assert _open_fds() <= before + 2 * 2
    for log in logs:
        log.finish()
        log.close()
    assert _open_fds() == before
    for i, log in enumerate(logs):
        whole = b"".join(f"<{r}:{i}>".encode() * 10 for r in range(3))
        kept = await _content(log)
        assert log.start > 0  # retention still ran
        assert kept == whole[log.start :]
        recovered = OutputLog.recover(log.directory)
        assert (recovered.start, await _content(recovered)) == (log.start, kept)


async def test_open_logs_flushing_together_get_back_under_the_limit(tmp_path: Path) -> None:
    # A log flushing in its thread cannot be displaced by another's flush: once
    # the flushes end, the logs past the limit give their files up all the same.
    files = OpenLogs(limit=1)
    logs = []
    for i in range(3):
        directory = tmp_path / str(i)
        directory.mkdir()
        logs.append(OutputLog(directory, files=files))
    before = _open_fds()
    for log in logs:
        log.append(OUT, b"x")
    async with trio.open_nursery() as nursery:
        for log in logs:
            nursery.start_soon(log.flush)
    assert len(files) == 1
    assert _open_fds() == before + 2
    for log in logs:
        log.finish()
        log.close()
    assert _open_fds() == before


class _NoFds(OutputLog):
    """A log whose files cannot be opened (out of descriptors) until told otherwise."""

    __slots__ = ("refuse",)

    def _open_files(self) -> None:
        if self.refuse:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        super()._open_files()


async def test_a_log_that_cannot_open_its_files_drops_output_and_tries_again(
    tmp_path: Path,
) -> None:
    log = _NoFds(tmp_path)
    log.refuse = True
    log.append(OUT, b"lost")
    await log.flush()
    assert (log.dropped_bytes, log.write_error) == (4, os.strerror(errno.EMFILE))
    log.refuse = False
    log.append(ERR, b"kept")
    log.finish()
    await log.flush()  # a finished log tries the disk once more
    log.close()
    assert log.lost_ranges == [(0, 4)]
    assert await _content(log) == b"kept"
    recovered = OutputLog.recover(tmp_path)
    assert recovered.lost_ranges == [(0, 4)]
    assert [(c.data, c.stream) async for c in recovered.read(0, follow=False)] == [(b"kept", ERR)]
