"""One job's output: an append-only, binary-safe log on disk with a memory tail.

The writer side (the job runner, reading the job's pipes) appends chunks tagged
with their stream; the log assigns each byte its offset in the combined log. A
flusher (``run_flusher``, or ``flush_pending`` while there is something to write)
writes the bytes to ``output.log`` and the stream switches to ``output.idx`` from
a worker thread, so disk latency never stalls the event loop.

Readers pull: each keeps its own position and reads from the in-memory tail
when it can and from the files when it has fallen behind, so a slow or stalled
reader costs the job and the other readers nothing. A memory-channel
broadcaster wakes readers that have caught up; nobody polls.

Memory is bounded whatever the job prints: the tail keeps at most
``tail_bytes`` of already-flushed data (plus whatever is not yet on disk,
itself capped by ``max_unflushed``, past which the writer waits for the disk).

Disk is bounded by ``max_bytes``: the oldest output beyond it is dropped in
steps (``drop_step``), its blocks freed with ``fallocate(PUNCH_HOLE)`` from the
flusher's thread, offsets unchanged, and ``start`` advanced. Where holes cannot
be punched (EOPNOTSUPP), the bytes stay on disk but are dropped all the same
for readers (logged once): copying the log to compact it would break "byte N is
at position N" and cost as much I/O as the job's output.

A failing disk (ENOSPC, EIO ...) never holds the job up: what cannot be written
is dropped, counted in ``dropped_bytes`` and listed in ``lost_ranges``; after a
failure, data is dropped as it comes without a system call, and the disk is
tried again at most every 100 ms or 1 MiB appended (and once more at the end).

With :class:`DirectBuffers` (the server's), a flush holding 64 KiB of whole pages or
more writes those pages with ``O_DIRECT``, copied into one of the server's reused
aligned buffers, and the partial pages at its ends through the page cache: the page
cache is neither written nor grown by a fast job's output, and the file's size is
the log's end after every write, as ``recover`` needs after a crash of the server.
Lagging readers read through the page cache as before (measured: ``O_DIRECT`` reads
cost them more). A filesystem that refuses ``O_DIRECT`` (EINVAL) is asked once per server:
its logs all live in its state directory.

Files of one log (all little-endian):

``output.log``
    Byte N is log offset N, always. Bytes that were lost (failed writes) or
    dropped by retention are holes or zeros there, never data: the index says
    which.
``output.idx``
    Fixed 9-byte records ``<offset:u64><tag:u8>``, sorted by offset, one per
    *run* (maximal stretch of bytes from one stream). Tag 1 is stdout, 2 is
    stderr, and tag 0 marks a run of *lost* bytes: output that could not be
    written (full disk), from that offset up to the next record's offset. Data
    after a lost run always starts with a record of its own. A trailing partial
    record (a crash while writing it) is ignored.
``output.start``
    Only for a log with a cap (``max_bytes``): 16 bytes
    ``<start:u64><first_record:u64>``, the first retained offset and the number
    of the index record where a reader of ``start`` begins its search. Bytes and
    index records below them may be holes (``fallocate`` punch hole). Missing
    (or short) means ``(0, 0)``.

A log has no file until it has bytes to write: its first flush makes them, and its
directory if need be, in the flusher's thread (``_make_files``), so a job that prints
nothing costs no inode (each cost the refill 0.05-0.5 ms of CPU on a journal-less
ext4). A capped log's
``output.start`` comes first, with its 16 bytes: no data of a capped log reaches
the disk before them, so retention, which frees space on a full disk, only ever
rewrites blocks it has. Files that cannot be made fail as a write does (the
output is lost, the disk tried again later); a missing file reads as empty.

A log holds no file open until it writes: its flusher's thread opens
``output.idx`` and ``output.log`` when it needs them, and ``output.start`` only
while recording a new start. With an :class:`OpenLogs`, only the logs flushed most
recently keep theirs open between flushes, so a thousand quiet jobs hold none.

Writes go index first, then data, then (on retention) ``output.start``, then
hole punching: whatever a crash interrupts, the files never claim data they do
not hold except at the very end, where :meth:`OutputLog.recover` clamps to the
data file's size. Lost ranges are written to the index before any data that
follows them, so a gap is never read back as zeros.

Readers are never handed a silent gap: a reader below ``start`` or inside a
lost range jumps past it, and the next chunk's ``offset`` says where it landed.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno
import itertools
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, final

import trio

from .._model import OutputChunk, OutputStream

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MAX_UNFLUSHED",
    "DIRECT_BUFFERS",
    "KEEP_FREE",
    "OPEN_LOGS",
    "Broadcaster",
    "DirectBuffers",
    "LogReader",
    "OpenLogs",
    "OutputLog",
    "read_log_file",
]

_INDEX = struct.Struct("<QB")
_START = struct.Struct("<QQ")
_LOST = 0  # index tag of a run of lost bytes
_STREAMS = {s.value: s for s in OutputStream}
_VALID_TAGS = bytes([_LOST, *_STREAMS])

_log = logging.getLogger("trio_worker.output")

#: Largest chunk a reader gets by default. Big enough that a follower of a fast
#: job hands out whole pipe reads without copying (tail chunks are returned as
#: they are when they fit), small enough to be one comfortable gRPC message.
DEFAULT_CHUNK = 1024 * 1024
#: Appends smaller than this coalesce (per stream) into chunks of up to _SEAL_AT,
#: so a chatty job writing a byte at a time does not make a chunk per byte.
_COALESCE_BELOW = 4096
_SEAL_AT = 64 * 1024
#: Largest block a lagging reader reads from disk in one thread round trip.
_FILE_BLOCK = 1024 * 1024
#: Blocks read from disk stay shared for this many more reads of the log: lagging
#: readers of one job are usually near each other, so one read serves them all.
_SHARED_BLOCKS = 4
_IOV_MAX = 512
#: How far appends may run ahead of the disk before ``backlogged`` (writers wait).
DEFAULT_MAX_UNFLUSHED = 16 * 1024 * 1024
#: Of the state directory's disk, what a job's output leaves free (at most 1/16 of the
#: disk), for the job records: a flush that would go below is lost as on a full disk.
#: Without it one job's output filled the disk and every client's Starts were refused
#: (their records could not be written: ``tools/probe_hostile.py full-disk``).
KEEP_FREE: Final = 16 * 1024 * 1024
_FLOOR: Final = "No space left on device (its rest kept for the records)"
#: Chatty jobs that switch streams often make many small chunks: cap their count.
_MAX_TAIL_CHUNKS = 4096
#: Retention drops in steps of at least this much (and 1/16 of the cap).
_MIN_DROP_STEP = 1024 * 1024
#: While the disk refuses writes, try again at most this often (seconds) ...
_RETRY_INTERVAL = 0.1
#: ... or after this many more bytes were appended, whichever comes first.
_RETRY_BYTES = 1024 * 1024

#: Logs that keep their write fds (two, three once a flush wrote with ``O_DIRECT``)
#: open between flushes: enough for every job printing at one moment, few enough
#: that 1,000 jobs fit a 4,096 fd limit.
OPEN_LOGS = 128

#: Aligned buffers the server keeps for writing logs with ``O_DIRECT``: one per flush in
#: flight, at most this many at once (a flush that finds none free writes through the
#: page cache), each ``DIRECT_BUFFER_BYTES``: so 4 MiB, resident once used, whatever
#: number of jobs write.
DIRECT_BUFFERS = 4
DIRECT_BUFFER_BYTES = 1024 * 1024
#: A flush writes its whole blocks with ``O_DIRECT`` only when they add up to this much:
#: a chatty job's small flushes would wait for the disk at each one.
DIRECT_LEAST = 64 * 1024
#: ``O_DIRECT``'s alignment of offsets, lengths and buffers: a page, so no page the log
#: writes through the page cache (the partial blocks at a flush's ends) holds bytes it
#: writes directly.
_ALIGN = mmap.PAGESIZE

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class Broadcaster:
    """Wakes every waiting reader when the log changes, without blocking the writer.

    Each waiter gets a memory channel of capacity 1; ``notify`` drops a token
    into each waiting one with ``send_nowait``. One token is as good as many
    (readers re-check the log after waking), so the writer never waits and a
    reader that is busy elsewhere costs nothing.
    """

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[trio.MemorySendChannel[None]] = []

    def notify(self) -> None:
        waiting, self._waiting = self._waiting, []
        for channel in waiting:
            with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                channel.send_nowait(None)

    async def wait(self) -> None:
        send, receive = trio.open_memory_channel[None](1)
        self._waiting.append(send)
        try:
            with receive:
                await receive.receive()
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(send)
            send.close()


class OpenLogs:
    """The logs whose write fds stay open between flushes, least recently flushed first.

    A log opens its files in its flusher's thread when it writes; past ``limit``
    logs, the least recently flushed ones that are not flushing give up their fds,
    which the flushing log's thread closes (a close may start writeback: not on
    the loop). A server thus holds at most about ``3 * limit`` log fds, whatever
    number of jobs it runs.
    """

    __slots__ = ("_limit", "_logs")

    def __init__(self, limit: int = OPEN_LOGS) -> None:
        self._limit = max(limit, 1)
        self._logs: dict[OutputLog, None] = {}  # insertion order: least recent first

    def __len__(self) -> int:
        return len(self._logs)

    def use(self, log: OutputLog) -> list[int]:
        """``log`` flushes now: keep it, and return the fds of the logs it displaces."""
        logs = self._logs
        logs.pop(log, None)
        logs[log] = None
        return self.trim()

    def trim(self) -> list[int]:
        """Displace the least recently flushed logs past ``limit``; their fds, to close.

        Logs flushing now are passed over, so past the limit some may stay: the
        log whose flush ends calls this again (``OutputLog.flush``).
        """
        logs = self._logs
        excess = len(logs) - self._limit
        if excess <= 0:
            return []
        victims: list[OutputLog] = []
        for old in logs:  # least recent first: usually the first one will do
            if not old._flushing:  # (a log flushing now uses its fds in a thread)
                victims.append(old)
                if len(victims) == excess:
                    break
        fds: list[int] = []
        for old in victims:
            del logs[old]
            fds.extend(old._give_up_files())
        return fds

    def forget(self, log: OutputLog) -> None:
        self._logs.pop(log, None)


def _close_all(fds: list[int]) -> None:
    """In a worker thread: close fds a log gave up (a close may start writeback)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class DirectBuffers:
    """The server's reused, aligned buffers for the logs' ``O_DIRECT`` writes (on the loop).

    A flush of a fast job's output writes its whole pages with ``O_DIRECT``, copied into
    one of these first: the page cache is not written (in this guest a new page's first
    touch is a host fault, and a page-cache write of 256 MiB cost 0.56 s of CPU against
    0.05 s direct) and does not grow. The buffers are made as flushes need them, up to
    ``count``, and kept: being reused, their pages stay warm. A flush takes one on the
    loop before its thread runs and gives it back after; one that finds none free writes
    through the page cache as a small flush does.
    """

    __slots__ = ("_free", "_made", "count", "least", "refused", "size")

    def __init__(
        self,
        count: int = DIRECT_BUFFERS,
        size: int = DIRECT_BUFFER_BYTES,
        least: int = DIRECT_LEAST,
    ) -> None:
        if size <= 0 or size % _ALIGN:
            raise ValueError(f"size must be a positive multiple of {_ALIGN}")
        self.count = count
        self.size = size
        self.least = max(least, _ALIGN)
        self._free: list[mmap.mmap] = []
        self._made = 0
        #: Set (by a flusher's thread) once a log's filesystem refused ``O_DIRECT``: the
        #: server's logs share its state directory's, so none asks again or says so again.
        self.refused = False

    def take(self) -> mmap.mmap | None:
        """A free buffer (page-aligned, ``size`` bytes), or ``None`` if all are in use
        or ``O_DIRECT`` was refused."""
        if self.refused:
            return None
        if self._free:
            return self._free.pop()
        if self._made < self.count:
            self._made += 1
            return mmap.mmap(-1, self.size)
        return None

    def give(self, buffer: mmap.mmap) -> None:
        self._free.append(buffer)


@final
class _DiskLine:
    """A log's disk reads, ``slots`` at a time; the other readers wait in line (FIFO).

    Waiting in ``trio.to_thread.run_sync`` for its limiter held ~40 objects a reader
    (the call's closures and cells, a copy of the context, the limiter's WouldBlock and
    its traceback): a client's 4,096 streams reading one log from disk at as many places
    (tools/probe_streams.py windows-5x1000) had the cycle collector's full collections,
    the loop stopped meanwhile, scan ~150k more objects. A reader parked here holds a
    few. One event loop: no locking.
    """

    __slots__ = ("_busy", "_lot", "slots")

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._busy = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        """A slot: at once when one is free and nobody waits (no checkpoint: the read
        that follows is one), else handed over by ``release`` in the order asked."""
        if self._busy < self.slots and not self._lot:
            self._busy += 1
            return
        await self._lot.park()  # (cancelled here: it never got the slot)

    def release(self) -> None:
        """The slot goes to the first in line, if any."""
        if not self._lot.unpark():
            self._busy -= 1


@dataclass(slots=True)
class _Block:
    """One aligned block of the log files, read once for every reader that wants it."""

    done: trio.Event
    chunks: list[OutputChunk] | None = None  # None while reading, or if the read failed


@dataclass(slots=True)
class _Flush:
    """One round trip to the flusher's thread: what to write, and what happened."""

    index: bytes  # records to write at record number ``index_at``
    index_at: int
    record_offsets: list[int]  # the offsets of those records, in order
    parts: list[bytes | memoryview]  # data from ``offset`` to ``stop``
    offset: int
    stop: int
    retain_from: int | None  # new retained start to persist and punch below
    first_record: int  # current first record (a lower bound for the search)
    close_fds: list[int]  # other logs' fds given up to ``OpenLogs``: closed first
    buffer: mmap.mmap | None = None  # for the whole pages written with O_DIRECT, if any
    # Results:
    written: int = 0  # data bytes from ``offset`` on disk, as they go
    records_written: int = 0
    committed: int = 0  # data and index are on disk below this offset
    error: OSError | None = None


class OutputLog:
    """The log of one job. Appends and tail reads are synchronous and O(1)-ish;
    only flushing and lagging readers touch the disk, always off the event loop.

    ``max_bytes`` caps the retained log: once the part older than the newest
    ``max_bytes`` reaches ``drop_step`` (default: 1/16 of the cap, at least
    1 MiB), it is dropped, its disk blocks freed and :attr:`start` advanced.
    Bytes that cannot be written (full disk) are dropped too, counted in
    ``dropped_bytes`` and listed in :attr:`lost_ranges`; the job never waits for
    a failing disk.
    """

    #: Slots: every running job has a log (a dict per log was ~1.6 KiB).
    __slots__ = (
        "_alone_reads",
        "_blocks",
        "_can_punch",
        "_chunks",
        "_closed",
        "_data_fd",
        "_direct",
        "_direct_fd",
        "_disk_line",
        "_disk_readers",
        "_drop_step",
        "_end",
        "_failing",
        "_files",
        "_finished",
        "_first_record",
        "_flush_done",
        "_flushed",
        "_flusher",
        "_flushing",
        "_held",
        "_index_fd",
        "_index_flushed",
        "_keep_free",
        "_last_disk_record",
        "_last_stream",
        "_lost_ends",
        "_lost_starts",
        "_made",
        "_max_bytes",
        "_max_unflushed",
        "_offsets",
        "_open",
        "_open_offset",
        "_open_stream",
        "_pending_index",
        "_punched_data",
        "_punched_index",
        "_readers",
        "_retry_at",
        "_retry_bytes",
        "_retry_end",
        "_retry_interval",
        "_space",
        "_start",
        "_tail_bytes",
        "directory",
        "dropped_bytes",
        "write_error",
    )

    def __init__(
        self,
        directory: Path,
        *,
        tail_bytes: int = 4 * 1024 * 1024,
        max_unflushed: int = DEFAULT_MAX_UNFLUSHED,
        max_bytes: int | None = None,
        drop_step: int | None = None,
        files: OpenLogs | None = None,
        direct: DirectBuffers | None = None,
        keep_free: int = 0,
    ) -> None:
        """A new, empty log in ``directory`` (made, with the files, by the first flush
        that has bytes to write; its parent must exist by then). With ``files``, the
        log keeps its fds open between flushes only while ``files`` lets it; without,
        from its first flush to ``close``. With ``direct``, large flushes write their
        whole pages with ``O_DIRECT`` where the filesystem takes it. A flush that would
        leave less than ``keep_free`` bytes of the disk free (at most 1/16 of the disk;
        see :data:`KEEP_FREE`) is lost as on a full disk."""
        if max_bytes is not None and max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._setup(directory, tail_bytes, max_unflushed, max_bytes, drop_step, files, direct)
        self._keep_free = keep_free

    def _setup(
        self,
        directory: Path,
        tail_bytes: int,
        max_unflushed: int,
        max_bytes: int | None,
        drop_step: int | None,
        files: OpenLogs | None = None,
        direct: DirectBuffers | None = None,
    ) -> None:
        self.directory = directory
        self._keep_free = 0
        self._data_fd = self._index_fd = -1  # opened by the flusher's thread, when it writes
        #: The buffers for O_DIRECT writes; ``None`` once the filesystem refused
        #: ``O_DIRECT`` (EINVAL: ramfs, some FUSE ones), or once another log of the server's was.
        self._direct = direct
        self._direct_fd = -1  # output.log opened O_DIRECT, at the first direct write
        self._made = False  # whether the files exist (made by the first flush that writes)
        self._files = files
        self._tail_bytes = tail_bytes
        self._max_unflushed = max(max_unflushed, _SEAL_AT)
        self._max_bytes = max_bytes
        if drop_step is None and max_bytes is not None:
            drop_step = max(max_bytes // 16, _MIN_DROP_STEP)
        self._drop_step = max(drop_step or 0, 1)
        self._end = 0
        self._flushed = 0  # below this, every byte is on disk or lost
        self._start = 0  # first retained offset
        self._index_flushed = 0  # records of output.idx on disk
        self._last_disk_record = -1  # offset of the last of them
        self._first_record = 0  # index record where a search for ``start`` begins
        self._punched_data = 0  # holes made so far (data bytes, index bytes)
        self._punched_index = 0
        self._can_punch = True
        # Sealed tail chunks (contiguous) and the open one being coalesced.
        self._chunks: list[OutputChunk] = []
        self._offsets: list[int] = []
        self._held = 0  # bytes in self._chunks
        self._open = bytearray()
        self._open_stream: OutputStream | None = None
        self._open_offset = 0
        self._last_stream: OutputStream | None = None
        # Index records not on disk yet, in offset order: (offset, tag).
        self._pending_index: list[tuple[int, int]] = []
        # Lost ranges at or above ``start``: [from, to), sorted, never adjacent.
        self._lost_starts: list[int] = []
        self._lost_ends: list[int] = []
        # While the disk refuses writes: when to try it again.
        self._failing = False
        self._retry_at = 0.0
        self._retry_end = 0
        self._retry_interval = _RETRY_INTERVAL
        self._retry_bytes = _RETRY_BYTES
        self._finished = False
        self._closed = False
        self._flushing = False
        self._flush_done = Broadcaster()
        self.dropped_bytes = 0
        self.write_error: str | None = None
        self._readers = Broadcaster()
        #: Lagging readers of this log read from disk two at a time: more threads
        #: add no speed (they share the page cache and the GIL) but each holds a
        #: block in memory, and glibc gives each thread its own malloc arena.
        #: Made at the first disk read (most logs never have one).
        self._disk_readers: trio.CapacityLimiter | None = None
        #: ... and the others wait in this line, not in ``trio.to_thread.run_sync``
        self._disk_line = _DiskLine(2)
        #: Blocks read (or being read) from disk, keyed by (block start, end),
        #: oldest first; readers at the same place share one read and one copy.
        self._blocks: dict[tuple[int, int], _Block] = {}
        #: reads under way for readers short of budget, by (position, want): shared too
        self._alone_reads: dict[tuple[int, int], _Block] = {}
        self._flusher = Broadcaster()
        self._space = Broadcaster()

    @classmethod
    def recover(cls, directory: Path, *, counted: int = 0, counted_start: int = 0) -> OutputLog:
        """The finished, read-only log a previous run left in ``directory``.

        Replays exactly the bytes and stream tags that reached the files, with
        lost ranges and retention as they were recorded. A log that never wrote
        has no files (nor, maybe, directory): it is empty. Blocking (it reads the
        index once, in blocks): call it in a thread when that matters. Raises
        ``OSError`` if ``output.log`` or ``output.idx`` exists and cannot be read.

        ``counted`` and ``counted_start`` are the end and start the job's record
        holds (what clients were shown): bytes counted beyond what the files hold
        (files that could never be made, a crash before the flush) are lost, so a
        restart never takes a job's counters back.
        """
        log = cls.__new__(cls)
        log._setup(Path(directory), 0, 0, None, None)
        log._finished = True
        log._closed = True
        with contextlib.ExitStack() as files:
            try:
                data = files.enter_context(open(log.data_path, "rb", buffering=0))
                index = files.enter_context(open(log.index_path, "rb", buffering=0))
            except FileNotFoundError:
                # Never written: no file (the first flush makes the index, then the
                # data file, and only then writes a record).
                log._lose_beyond(counted, counted_start)
                return log
            size = os.fstat(data.fileno()).st_size
            records = os.fstat(index.fileno()).st_size // _INDEX.size
            start, first = 0, 0
            with contextlib.suppress(FileNotFoundError), open(log.start_path, "rb") as f:
                raw = f.read(_START.size)
                if len(raw) == _START.size:
                    start, first = _START.unpack(raw)
            first = min(first, records)
            valid, lost = _scan_index(index.fileno(), first, records)
        if valid < records:
            _log.warning("%s: index damaged after record %d; ignoring the rest", directory, valid)
        if valid <= first:
            size = 0  # data no record describes (a damaged index) is not output
        # Data may be missing at the very end (a crash between the index write
        # and the data write): the data file's size says where it stops. A lost
        # range that ends the log is on the index only, and the log reached the
        # retained start (persisted after the data below it).
        end = max([size, start, *(b for _, b in lost if b is not None)])
        log._end = log._flushed = end
        log._open_offset = end  # empty tail: every read goes to the files
        log._index_flushed = valid
        log._first_record = first
        for a, b in lost:
            b = end if b is None else min(b, end)
            if a >= b:
                continue
            if log._lost_ends and log._lost_ends[-1] >= a:  # adjacent records: one range
                log._lost_ends[-1] = max(log._lost_ends[-1], b)
            else:
                log._lost_starts.append(a)
                log._lost_ends.append(b)
        # As persisted: it was moved past lost ranges when it was chosen.
        log._advance_start(min(start, end), snap=False)
        log._lose_beyond(counted, counted_start)
        return log

    def _lose_beyond(self, counted: int, counted_start: int) -> None:
        """Of a recovered log: bytes up to ``counted`` that the files lack were lost,
        and none below ``counted_start`` is retained."""
        end = self._end
        if counted > end:
            if self._lost_ends and self._lost_ends[-1] >= end:
                self._lost_ends[-1] = counted
            else:
                self._lost_starts.append(end)
                self._lost_ends.append(counted)
            self._end = self._flushed = self._open_offset = counted
        if counted_start > self._start:
            self._advance_start(min(counted_start, self._end), snap=False)
        self.dropped_bytes = sum(b - a for a, b in self.lost_ranges)

    @property
    def data_path(self) -> Path:
        return self.directory / "output.log"

    @property
    def index_path(self) -> Path:
        return self.directory / "output.idx"

    @property
    def start_path(self) -> Path:
        return self.directory / "output.start"

    # -- state ---------------------------------------------------------------

    @property
    def end(self) -> int:
        """Bytes appended so far: the offset the next byte will get."""
        return self._end

    @property
    def start(self) -> int:
        """The first retained offset: bytes below it were dropped by retention."""
        return self._start

    @property
    def lost_ranges(self) -> list[tuple[int, int]]:
        """Retained ranges ``[from, to)`` whose bytes were lost (failed writes).

        ``dropped_bytes`` counts every lost byte, also those since dropped by
        retention; a recovered log counts those of its retained ranges.
        """
        start = self._start
        return [(max(a, start), b) for a, b in zip(self._lost_starts, self._lost_ends, strict=True)]

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def _tail_start(self) -> int:
        if self._chunks:
            return self._chunks[0].offset
        return self._open_offset

    @property
    def backlogged(self) -> bool:
        """True when the disk is behind by more than ``max_unflushed``."""
        return (
            self._end - self._flushed > self._max_unflushed
            or len(self._chunks) > 4 * _MAX_TAIL_CHUNKS
        )

    # -- writer side ---------------------------------------------------------

    def append(self, stream: OutputStream, data: bytes, *, notify: bool = True) -> None:
        """Add ``data`` from ``stream`` at the end of the log; never blocks.

        With ``notify=False`` the caller batches several appends and calls
        ``notify`` once, so readers wake once per batch.
        """
        if self._finished:
            raise RuntimeError("append to a finished output log")
        if not data:
            return
        if stream is not self._last_stream:
            # (After a lost range this may follow a record at the same offset:
            # harmless, the later one wins, and the earlier may be on its way
            # to disk already.)
            self._pending_index.append((self._end, stream.value))
            self._last_stream = stream
        if len(data) >= _COALESCE_BELOW:
            # Reads of a useful size go into the tail as they are: readers get
            # the very same bytes object, no copy.
            self._seal()
            self._push(OutputChunk(data, self._end, stream))
            self._end += len(data)
            self._open_offset = self._end
        else:
            if self._open_stream is not stream or len(self._open) >= _SEAL_AT:
                self._seal()
                self._open_stream = stream
                self._open_offset = self._end
            self._open += data
            self._end += len(data)
        if notify:
            self.notify()

    def notify(self) -> None:
        """Wake the flusher and every reader waiting for more."""
        self._flusher.notify()
        self._readers.notify()

    async def wait_flushed(self) -> None:
        """Wait until the disk has caught up below ``max_unflushed`` again."""
        while self.backlogged and not self._closed:
            await self._space.wait()

    def finish(self) -> None:
        """No more appends: readers end once they have everything."""
        self._seal()
        self._finished = True
        self._flusher.notify()
        self._readers.notify()

    def _push(self, chunk: OutputChunk) -> None:
        self._chunks.append(chunk)
        self._offsets.append(chunk.offset)
        self._held += len(chunk.data)

    def _seal(self) -> None:
        if self._open and self._open_stream is not None:
            self._push(OutputChunk(bytes(self._open), self._open_offset, self._open_stream))
            self._open_offset += len(self._open)
            self._open.clear()
        else:
            self._open_offset = self._end

    # -- flushing ------------------------------------------------------------

    async def run_flusher(self) -> None:
        """Write appended data to disk as it comes, until the log is finished.

        Runs as a task in the job's nursery. If it is cancelled, the owner
        calls ``flush`` (shielded) before ``close`` so nothing appended is lost.
        While the disk refuses writes, new data is dropped as it comes and the
        disk is tried again at most every ``_RETRY_INTERVAL`` seconds or
        ``_RETRY_BYTES`` bytes.
        """
        while not self._finished and not self._closed:
            await self.flush_pending()
            if not self._finished and not self._closed:
                await self._flusher.wait()
        await self.flush()

    @property
    def flush_due(self) -> bool:
        """Whether ``flush_pending`` has anything to do."""
        return (self._flushed != self._end or bool(self._pending_index)) and not self._closed

    async def flush_pending(self) -> None:
        """Write what was appended until the disk has all of it, then return.

        ``run_flusher`` without the wait for more: a supervisor runs it only
        while a job has unflushed output, so an idle job costs no task. While
        the disk refuses writes, lost ranges not on disk yet wait for the next
        retry (new appends cut the wait short, as in ``run_flusher``).
        """
        while not self._finished and not self._closed:
            if self._flushed != self._end or (
                self._pending_index and (not self._failing or self._retry_due())
            ):
                await self.flush()
            elif self._failing and self._pending_index:
                # Lost ranges not on disk yet: record them once the disk is back.
                with trio.move_on_at(self._retry_at):
                    await self._flusher.wait()
            else:
                return

    async def flush(self) -> None:
        """Write everything appended so far to disk (in a worker thread).

        While the disk refuses writes, it tries the disk at most once (and
        only if a retry is due, or the log is finished) and drops the rest.
        """
        while self._flushing:  # one flush at a time (no yield when uncontended)
            await self._flush_done.wait()
        self._flushing = True
        try:
            tried = False
            while (self._flushed != self._end or self._pending_index) and not self._closed:
                if self._failing and (tried or not self._retry_due()):
                    self._drop_unflushed()
                    break
                await self._flush_once()
                tried = True
            # Logs that flushed beside ours could not be displaced: now they may be
            # (again after the closes: others may have ended meanwhile).
            while self._files is not None and (displaced := self._files.trim()):
                await trio.to_thread.run_sync(_close_all, displaced)
        finally:
            self._flushing = False
            self._flush_done.notify()

    def close(self) -> None:
        """Release the files; readers keep working (they open their own)."""
        if not self._closed:
            self._closed = True
            self._space.notify()
        if self._files is not None:
            self._files.forget(self)
        for fd in self._give_up_files():
            os.close(fd)

    def _give_up_files(self) -> list[int]:
        """The fds this log holds, for the caller to close; the next write reopens them."""
        fds = [fd for fd in (self._data_fd, self._index_fd, self._direct_fd) if fd >= 0]
        self._data_fd = self._index_fd = self._direct_fd = -1
        return fds

    def _retry_due(self) -> bool:
        return (
            self._finished or self._end >= self._retry_end or trio.current_time() >= self._retry_at
        )

    async def _flush_once(self) -> None:
        retain_from = None
        if self._max_bytes is not None:
            target = min(self._end - self._max_bytes, self._flushed)
            if target - self._start >= self._drop_step:
                # Published before any hole is punched: a reader whose disk
                # read races the punch sees the new start and discards it.
                self._advance_start(target)
                retain_from = self._start
        parts, offset, stop = self._unflushed()
        snapshot = self._pending_index[:]
        buffer = None
        direct = self._direct
        if direct is not None and _whole_pages(offset, stop) >= direct.least:
            buffer = direct.take()
        job = _Flush(
            index=b"".join([_INDEX.pack(o, t) for o, t in snapshot]),
            index_at=self._index_flushed,
            record_offsets=[o for o, _ in snapshot],
            parts=parts,
            offset=offset,
            stop=stop,
            retain_from=retain_from,
            first_record=self._first_record,
            close_fds=self._files.use(self) if self._files is not None else [],
            buffer=buffer,
        )
        try:
            await trio.to_thread.run_sync(self._write, job)
        finally:
            if buffer is not None and direct is not None:
                direct.give(buffer)
        self._flushed = stop
        if job.records_written:
            self._index_flushed += job.records_written
            self._last_disk_record = job.record_offsets[job.records_written - 1]
        del self._pending_index[: job.records_written]
        if job.committed < stop:
            self._declare_lost(job.committed, stop)
        if retain_from is not None:
            self._first_record = job.first_record
        if job.error is not None:
            if not self._failing:
                _log.warning(
                    "%s: cannot write output (%s); dropping it until the disk takes writes",
                    self.directory,
                    job.error.strerror or job.error,
                )
            self._failing = True
            self.write_error = f"{job.error.strerror or job.error}"
            self._retry_at = trio.current_time() + self._retry_interval
            self._retry_end = self._end + self._retry_bytes
        elif self._failing:
            self._failing = False
            _log.warning(
                "%s: writing output again; %d bytes dropped", self.directory, self.dropped_bytes
            )
        self._trim()
        self._space.notify()

    def _drop_unflushed(self) -> None:
        """The disk refuses writes: count what is waiting as lost, no syscall."""
        if self._flushed < self._end:
            self._declare_lost(self._flushed, self._end)
            self._flushed = self._end
            self._trim()
            self._space.notify()

    def _declare_lost(self, a: int, b: int) -> None:
        """Record that log bytes [a, b) (not yet on disk) will never be.

        Pending index records inside the range go; a lost record at ``a`` (unless
        it extends the previous lost range) and a record at ``b`` for the data
        that follows take their place, so the index stays sorted.
        """
        self.dropped_bytes += b - a
        pending = self._pending_index
        lo = bisect.bisect_left(pending, a, key=_record_offset)
        hi = bisect.bisect_left(pending, b, key=_record_offset)
        new: list[tuple[int, int]] = []
        extends = bool(self._lost_ends) and self._lost_ends[-1] == a
        if extends:
            self._lost_ends[-1] = b  # one range for readers, however many records
        else:
            self._lost_starts.append(a)
            self._lost_ends.append(b)
        if not extends or self._last_disk_record >= a:
            # (Extending a range whose record is the last one before ``a``, on
            # disk or pending, needs no record; after a record on disk, it does.)
            new.append((a, _LOST))
        if hi == len(pending) or pending[hi][0] != b:
            new.append((b, self._stream_at(b - 1).value))
        pending[lo:hi] = new

    def _stream_at(self, position: int) -> OutputStream:
        """The stream of a byte still in the tail."""
        if position >= self._open_offset:
            assert self._open_stream is not None
            return self._open_stream
        return self._chunks[bisect.bisect_right(self._offsets, position) - 1].stream

    def _advance_start(self, start: int, *, snap: bool = True) -> None:
        """Move the retained start to ``start``, or past the lost range it
        falls in (those bytes are gone anyway), so readers of the start get a
        chunk at exactly ``start``."""
        if snap:
            i = bisect.bisect_right(self._lost_starts, start) - 1
            while 0 <= i < len(self._lost_starts) and self._lost_starts[i] <= start:
                start = max(start, self._lost_ends[i])
                i += 1
        self._start = max(self._start, start)
        drop = bisect.bisect_right(self._lost_ends, self._start)
        if drop:
            del self._lost_starts[:drop]
            del self._lost_ends[:drop]

    def _unflushed(self) -> tuple[list[bytes | memoryview], int, int]:
        start = self._flushed
        parts: list[bytes | memoryview] = []
        i = max(bisect.bisect_right(self._offsets, start) - 1, 0)
        for chunk in self._chunks[i:]:
            if chunk.end > start:
                parts.append(memoryview(chunk.data)[max(start - chunk.offset, 0) :])
        if self._open:
            parts.append(bytes(self._open[max(start - self._open_offset, 0) :]))
        return parts, start, self._end

    # The system calls, as methods so tests can inject faults.

    def _pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def _pwritev(self, fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def _open_direct(self) -> int:
        return os.open(self.data_path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)

    def _pwrite_direct(self, fd: int, buffer: memoryview, offset: int) -> int:
        return os.pwrite(fd, buffer, offset)

    def _punch(self, fd: int, offset: int, length: int) -> None:
        _punch_hole(fd, offset, length)

    def _write(self, job: _Flush) -> None:
        """Runs in a worker thread: index records, then data, then retention.

        Data is written at its log offset, so a failed write leaves a hole of
        the right size rather than shifting what follows; the index says what
        the hole is. On failure ``job`` says what did reach the disk.
        """
        index_pos = job.index_at * _INDEX.size
        job.committed = job.offset
        for fd in job.close_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self._open_files()
        except OSError as exc:  # nothing written: all of it is lost, as on a full disk
            job.error = exc
            return
        try:
            room = self._room(job, index_pos)
            self._pwrite_all(self._index_fd, job.index, index_pos)
        except OSError as exc:
            job.error = exc
            self._truncate_index(index_pos)
        else:
            job.records_written = len(job.record_offsets)
            done = self._write_data(job, room)
            if job.offset + done < job.stop and job.error is None:  # cut short by the floor
                job.error = OSError(errno.ENOSPC, _FLOOR)
            job.committed = job.offset + done
            if job.committed < job.stop:
                # Records of data that did not make it go again (rewritten
                # later, in order, after the lost range's own record).
                keep = bisect.bisect_left(job.record_offsets, job.committed)
                if keep < job.records_written:
                    job.records_written = keep
                    self._truncate_index(index_pos + keep * _INDEX.size)
        if job.retain_from is not None:
            self._retain(job)

    def _room(self, job: _Flush, index_pos: int) -> int:
        """In the flusher's thread: the log offset up to which ``job``'s data may go and
        leave ``keep_free`` of the disk free (at most 1/16 of the disk), counted in the
        blocks its index records and data would take; ENOSPC if not even the records and
        one byte of data fit. ``job.stop`` without a floor."""
        if not self._keep_free:
            return job.stop
        disk = os.fstatvfs(self._index_fd)
        block = disk.f_frsize
        keep = min(self._keep_free, disk.f_blocks * block // 16)
        room = disk.f_bavail * block - keep
        # New blocks: those the records reach past the index's last one (it has no
        # holes), then every block the data touches (the one ``job.offset`` is in may
        # be held or a lost range's hole: counted, so the floor is never crossed).
        room -= (-(-(index_pos + len(job.index)) // block) - -(-index_pos // block)) * block
        end = min(job.stop, job.offset // block * block + max(room, 0) // block * block)
        if room < 0 or (end <= job.offset < job.stop):
            raise OSError(errno.ENOSPC, _FLOOR)
        return end

    def _open_files(self) -> None:
        """In the flusher's thread: open the files this log writes, if they are not."""
        if not self._made:
            self._make_files()
            return
        if self._index_fd < 0:
            self._index_fd = os.open(self.index_path, os.O_RDWR | os.O_CLOEXEC)
        if self._data_fd < 0:
            self._data_fd = os.open(self.data_path, os.O_WRONLY | os.O_CLOEXEC)

    def _make_files(self) -> None:
        """In the flusher's thread, at the first write (and again after a failed one):
        make the directory if it is not there, the files, and keep the two it writes open.

        A capped log's ``output.start`` first, with its bytes: on a full disk,
        retention is what frees space, and rewriting those bytes then needs none,
        where writing them for the first time might. So no data of the log reaches
        the disk without them. Any failure (ENOSPC, EDQUOT, EMFILE, the jobs' directory
        removed) raises with nothing kept open: the flush fails as a write does."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o700)
        create = os.O_CREAT | os.O_CLOEXEC
        if self._max_bytes is not None:
            fd = os.open(self.start_path, os.O_WRONLY | create, 0o600)
            try:
                self._pwrite_all(fd, _START.pack(0, 0), 0)
            finally:
                os.close(fd)
        index = os.open(self.index_path, os.O_RDWR | create, 0o600)
        try:
            data = os.open(self.data_path, os.O_WRONLY | create, 0o600)
        except BaseException:
            os.close(index)
            raise
        self._index_fd, self._data_fd = index, data
        self._made = True

    def _pwrite_all(self, fd: int, data: bytes, offset: int) -> None:
        done = 0
        while done < len(data):
            written = self._pwrite(fd, data[done:], offset + done)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            done += written

    def _write_data(self, job: _Flush, end: int) -> int:
        """Write the data up to log offset ``end`` (``job.stop`` unless the disk's floor
        is nearer); return how many bytes made it (all, unless it fails).

        With a buffer, the whole pages go with ``O_DIRECT`` and the partial pages at
        either end through the page cache, so the file's size is the log's end after
        each write (``recover``), and no page is written both ways. A direct write that
        fails part-way counts only the pages it wrote.
        """
        size = end - job.offset
        ends = list(itertools.accumulate(len(part) for part in job.parts))
        try:
            if job.buffer is not None and self._direct is not None:
                first = min(-(-job.offset // _ALIGN) * _ALIGN, end) - job.offset
                last = end // _ALIGN * _ALIGN - job.offset
                self._write_buffered(job, ends, first)
                self._write_direct(job, ends, job.buffer, last)
            self._write_buffered(job, ends, size)
        except OSError as exc:
            job.error = exc
        return job.written

    def _write_buffered(self, job: _Flush, ends: list[int], to: int) -> None:
        """Write the data from ``job.written`` up to ``to`` (relative to ``job.offset``)
        through the page cache."""
        parts = _span(job.parts, ends, job.written, to)
        for i in range(0, len(parts), _IOV_MAX):
            batch = parts[i : i + _IOV_MAX]
            size, done = sum(len(p) for p in batch), 0
            while done < size:
                written = self._pwritev(self._data_fd, _skip(batch, done), job.offset + job.written)
                if written <= 0:
                    raise OSError(errno.EIO, "short write")
                done += written
                job.written += written

    def _write_direct(self, job: _Flush, ends: list[int], buffer: mmap.mmap, to: int) -> None:
        """Write the whole pages from ``job.written`` up to ``to`` with ``O_DIRECT``, a
        buffer at a time; where the filesystem refuses it, leave them to the page cache."""
        if job.written >= to:
            return
        if self._direct_fd < 0:
            try:
                self._direct_fd = self._open_direct()
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refuse_direct(exc)
                return
        view = memoryview(buffer)
        while job.written < to:
            n = min(len(buffer), to - job.written)
            _gather(view, job.parts, ends, job.written, n)
            try:
                written = self._pwrite_direct(self._direct_fd, view[:n], job.offset + job.written)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._refuse_direct(exc)  # (the offset, length and buffer are aligned)
                return
            written -= written % _ALIGN  # (bytes past a page boundary: counted lost)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            job.written += written

    def _refuse_direct(self, exc: OSError) -> None:
        """In the flusher's thread: this filesystem refuses ``O_DIRECT``; write through
        the page cache from now on, this log and the server's others (the loop sees it at
        once or at the next flush: either is right), and say so once."""
        if self._direct is not None and not self._direct.refused:
            self._direct.refused = True
            _log.info(
                "%s: no O_DIRECT here (%s); writing logs through the page cache",
                self.directory,
                exc,
            )
        self._direct = None
        if self._direct_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._direct_fd)
            self._direct_fd = -1

    def _truncate_index(self, size: int) -> None:
        try:
            os.ftruncate(self._index_fd, size)
        except OSError as exc:  # stale records stay beyond the count; overwritten later
            _log.warning("%s: cannot truncate the index: %s", self.directory, exc)

    def _retain(self, job: _Flush) -> None:
        """Persist the new start, then free the disk blocks below it."""
        assert job.retain_from is not None
        records = job.index_at + job.records_written
        first = _last_record_at_or_before(
            self._index_fd, job.retain_from, job.first_record, records
        )
        job.first_record = first
        try:
            # Opened only now: a log drops old output rarely (in steps of drop_step).
            fd = os.open(self.start_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self._pwrite_all(fd, _START.pack(job.retain_from, first), 0)
            finally:
                os.close(fd)
        except OSError as exc:
            # Without the start on disk a hole could read back as data after
            # a restart: keep the bytes (they are still dropped for readers).
            _log.warning("%s: cannot record the retained start: %s", self.directory, exc)
            return
        if not self._can_punch:
            return
        try:
            self._punch(self._data_fd, self._punched_data, job.retain_from - self._punched_data)
            self._punched_data = job.retain_from
            index_to = first * _INDEX.size
            if index_to > self._punched_index:
                self._punch(self._index_fd, self._punched_index, index_to - self._punched_index)
                self._punched_index = index_to
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self._can_punch = False
                _log.warning(
                    "%s: the filesystem cannot punch holes; output beyond the cap is "
                    "hidden from readers but keeps its disk space",
                    self.directory,
                )
            else:
                _log.warning("%s: cannot free dropped output: %s", self.directory, exc)

    def _trim(self) -> None:
        # Keep flushed data only while it fits the tail's byte and chunk budgets;
        # never what is below the retained start.
        drop, held, count = 0, self._held, len(self._chunks)
        while drop < count and self._chunks[drop].end <= self._flushed:
            chunk = self._chunks[drop]
            if (
                chunk.end > self._start
                and held <= self._tail_bytes
                and count - drop <= _MAX_TAIL_CHUNKS
            ):
                break
            held -= len(chunk.data)
            drop += 1
        if drop:
            del self._chunks[:drop]
            del self._offsets[:drop]
            self._held = held

    # -- reader side ---------------------------------------------------------

    def read(
        self,
        offset: int = 0,
        *,
        follow: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        budget: ReadBudget | None = None,
    ) -> LogReader:
        """Iterate the log from ``offset``; with ``follow``, until finished. ``budget``:
        see :class:`ReadBudget`."""
        return LogReader(self, offset, follow, chunk_size, budget)

    def _next_readable(self, position: int) -> tuple[int, int]:
        """Where a reader at ``position`` really starts, and where its run ends."""
        if position < self._start:
            position = self._start
        starts = self._lost_starts
        if not starts:
            return position, self._end
        i = max(bisect.bisect_right(starts, position) - 1, 0)
        while i < len(starts) and starts[i] <= position:
            position = max(position, self._lost_ends[i])
            i += 1
        return position, starts[i] if i < len(starts) else self._end

    async def _read_disk(self, position: int, want: int, size: int) -> list[OutputChunk]:
        """Up to one block from ``position`` (all below ``position + want``) off disk, in
        chunks of at most ``size`` bytes.

        Reads the aligned block holding ``position`` in a worker thread, and
        shares it: readers wanting the same block wait for the read under way
        or take a recent one instead of copying the same bytes again. The block
        is cut into chunks of the first reader's ``size`` once, there: followers
        asking for the same size (the server's streams do) share the pieces too.
        """
        block = position - position % _FILE_BLOCK
        end = min(block + _FILE_BLOCK, position + want)
        key = (block, end)
        entry = self._blocks.get(key)
        if entry is None:
            entry = self._blocks[key] = _Block(trio.Event())
            limiter = self._disk_limiter()
            line = self._disk_line
            try:
                await line.acquire()
                try:
                    entry.chunks = await trio.to_thread.run_sync(
                        _read_cut,
                        self.data_path,
                        self.index_path,
                        block,
                        end - block,
                        self._index_flushed,
                        self._first_record,
                        size,
                        limiter=limiter,
                    )
                finally:
                    line.release()
            finally:
                entry.done.set()
                if entry.chunks is None:
                    del self._blocks[key]
                else:
                    self._forget_old_blocks()
        else:
            await entry.done.wait()
        if entry.chunks is None:  # the read failed or was cancelled: read it ourselves
            return await self._read_disk(position, want, size)
        return [_cut(chunk, position) for chunk in entry.chunks if chunk.end > position]

    async def _read_disk_alone(self, position: int, want: int) -> list[OutputChunk]:
        """``want`` bytes from ``position`` off disk, not a whole block (a reader short of
        budget). Readers asking for the same bytes while a read of them is under way
        wait for it and share its chunks: 4,096 stalled streams of one client over 32
        offsets were 4,096 queued thread calls (each ~25 objects for the collector to
        scan, and a read each), now 32. Nothing is kept once the read is done."""
        limiter = self._disk_limiter()
        key = (position, want)
        while True:
            entry = self._alone_reads.get(key)
            if entry is None:
                break
            await entry.done.wait()
            if entry.chunks is not None:
                return list(entry.chunks)
            # (that read failed or was cancelled: read it ourselves, or join the next)
        entry = self._alone_reads[key] = _Block(trio.Event())
        line = self._disk_line
        try:
            await line.acquire()  # (in line before the arguments are made: a reader waits lean)
            try:
                entry.chunks = await trio.to_thread.run_sync(
                    read_log_file,
                    self.data_path,
                    self.index_path,
                    position,
                    want,
                    self._index_flushed,
                    self._first_record,
                    limiter=limiter,
                )
            finally:
                line.release()
        finally:
            del self._alone_reads[key]
            entry.done.set()
        return list(entry.chunks)

    def _disk_limiter(self) -> trio.CapacityLimiter:
        """The log's two worker threads (trio's default limiter of 40 could be filled by
        a connection's streams); the readers wait for them in ``_disk_line`` first."""
        if self._disk_readers is None:
            self._disk_readers = trio.CapacityLimiter(2)
        return self._disk_readers

    def _forget_old_blocks(self) -> None:
        done = [key for key, entry in self._blocks.items() if entry.chunks is not None]
        for key in done[: max(len(done) - _SHARED_BLOCKS, 0)]:
            del self._blocks[key]

    def _read_memory(self, position: int, limit: int) -> OutputChunk:
        if position >= self._open_offset:
            assert self._open_stream is not None
            start = position - self._open_offset
            data = bytes(self._open[start : start + limit])
            return OutputChunk(data, position, self._open_stream)
        chunk = self._chunks[bisect.bisect_right(self._offsets, position) - 1]
        start = position - chunk.offset
        if start == 0 and len(chunk.data) <= limit:
            return chunk
        return OutputChunk(chunk.data[start : start + limit], position, chunk.stream)


class ReadBudget(Protocol):
    """What a reader may hold, when its consumer shares one budget with others (the
    server's output streams on one connection): the reader asks :meth:`step` before each
    chunk and each disk read, and keeps :attr:`held` up to date (bytes read ahead from disk
    and not handed out yet, a read in flight included)."""

    held: int

    def step(self) -> int:
        """The most bytes the next chunk, or the next disk read, may hold now."""
        ...


class LogReader:
    """One reader's position in a log: an async iterator of ``OutputChunk``.

    A plain iterator rather than an async generator, so a caller may ``break``
    out of ``async for`` at any point without leaving anything to finalize.
    Chunks are contiguous except where bytes are gone (below the log's
    ``start``, or lost): there the next chunk's offset jumps past them.
    """

    def __init__(
        self,
        log: OutputLog,
        offset: int,
        follow: bool,
        chunk_size: int,
        budget: ReadBudget | None = None,
    ) -> None:
        self._log = log
        self._position = offset
        self._follow = follow
        self._chunk_size = chunk_size
        self._budget = budget
        self._pending: list[OutputChunk] = []  # read from disk, not yet handed out

    @property
    def position(self) -> int:
        """The offset of the next byte this reader will yield."""
        return self._position

    def __aiter__(self) -> LogReader:
        return self

    async def __anext__(self) -> OutputChunk:
        log = self._log
        while True:
            budget = self._budget
            if self._pending:
                chunk = self._pending.pop()
                if budget is not None:
                    budget.held -= len(chunk.data)
                if chunk.offset < log._start:
                    # Retention moved past it while we read: it may be a hole.
                    if chunk.end <= log._start:
                        continue
                    cut = log._start - chunk.offset
                    chunk = OutputChunk(chunk.data[cut:], log._start, chunk.stream)
                self._position = chunk.end
                await trio.lowlevel.checkpoint()
                return chunk
            position, limit = self._position, log._end
            if position < log._start or log._lost_starts:
                position, limit = log._next_readable(position)
                self._position = position
            if position < log._end:
                step = self._chunk_size if budget is None else budget.step()
                if position >= log._tail_start:
                    size = min(self._chunk_size, step, limit - position)
                    chunk = log._read_memory(position, size)
                    self._position = chunk.end
                    await trio.lowlevel.checkpoint()
                    return chunk
                # Everything below `_flushed` is on disk: read a whole block, even past
                # where the tail starts, so a lagging reader catches up in big steps;
                # a small one alone, when a budget says so.
                want = min(log._flushed, limit) - position
                size = min(self._chunk_size, step)
                if budget is None:
                    chunks = await log._read_disk(position, want, size)
                else:
                    alone = step < _FILE_BLOCK
                    if alone:
                        want = min(want, step)
                    reserved = min(want, _FILE_BLOCK)
                    budget.held += reserved  # held from now: the read is under way
                    try:
                        if alone:
                            chunks = await log._read_disk_alone(position, want)
                        else:
                            chunks = await log._read_disk(position, want, size)
                    finally:
                        budget.held -= reserved
                if not chunks:
                    # The files hold nothing there (damaged or shortened
                    # behind our back): step over it rather than spin.
                    self._position = min(
                        position + want, position - position % _FILE_BLOCK + _FILE_BLOCK
                    )
                    continue
                self._pending = list(_split(chunks, size))
                self._pending.reverse()
                if budget is not None:
                    budget.held += sum(len(chunk.data) for chunk in self._pending)
                continue
            if log._finished or not self._follow:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await log._readers.wait()

    async def aclose(self) -> None:
        """Nothing to release; present so ``aclosing(reader)`` works."""
        await trio.lowlevel.checkpoint()


def _record_offset(record: tuple[int, int]) -> int:
    return record[0]


def _skip(parts: Sequence[bytes | memoryview], skip: int) -> Sequence[bytes | memoryview]:
    """The buffers after the first ``skip`` bytes (to resume a short write)."""
    if not skip:
        return parts
    out: list[bytes | memoryview] = []
    for part in parts:
        if skip >= len(part):
            skip -= len(part)
            continue
        out.append(memoryview(part)[skip:])
        skip = 0
    return out


def _whole_pages(offset: int, stop: int) -> int:
    """How many bytes of whole pages [offset, stop) holds."""
    return max(stop // _ALIGN * _ALIGN - -(-offset // _ALIGN) * _ALIGN, 0)


def _span(
    parts: Sequence[bytes | memoryview], ends: Sequence[int], a: int, b: int
) -> list[memoryview]:
    """Views of bytes ``a`` to ``b`` of the buffers ``parts`` (joined), which end at
    ``ends`` (their running total)."""
    out: list[memoryview] = []
    i = bisect.bisect_right(ends, a)
    while i < len(parts) and a < b:
        part_start = ends[i] - len(parts[i])
        out.append(memoryview(parts[i])[a - part_start : min(b, ends[i]) - part_start])
        a = ends[i]
        i += 1
    return out


def _gather(
    view: memoryview, parts: Sequence[bytes | memoryview], ends: Sequence[int], a: int, n: int
) -> None:
    """Copy bytes ``a`` to ``a + n`` of ``parts`` (joined) to the start of ``view``."""
    at = 0
    for piece in _span(parts, ends, a, a + n):
        view[at : at + len(piece)] = piece
        at += len(piece)


def _cut(chunk: OutputChunk, position: int) -> OutputChunk:
    if chunk.offset >= position:
        return chunk
    return OutputChunk(chunk.data[position - chunk.offset :], position, chunk.stream)


def _split(chunks: list[OutputChunk], size: int) -> Iterator[OutputChunk]:
    for chunk in chunks:
        if len(chunk.data) <= size:
            yield chunk
            continue
        view = memoryview(chunk.data)
        for start in range(0, len(view), size):
            yield OutputChunk(bytes(view[start : start + size]), chunk.offset + start, chunk.stream)


def _read_cut(
    data_path: Path,
    index_path: Path,
    offset: int,
    limit: int,
    index_records: int,
    first_record: int,
    size: int,
) -> list[OutputChunk]:
    """``read_log_file`` in chunks of at most ``size`` bytes (``_split`` only where a
    chunk is larger: never, as it reads them)."""
    chunks = read_log_file(data_path, index_path, offset, limit, index_records, first_record, size)
    return list(_split(chunks, size))


_fallocate: Callable[[int, int, int, int], int] | None = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the blocks of [offset, offset+length) of ``fd``; the size stays."""
    global _fallocate
    if length <= 0:
        return
    if _fallocate is None:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
        if func is None:
            raise OSError(errno.ENOSYS, "fallocate is not available")
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _fallocate = func
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _last_record_at_or_before(fd: int, offset: int, lo: int, records: int) -> int:
    """Number of the last index record (in [lo, records)) starting at or before
    ``offset``; ``lo`` if there is none. Blocking."""
    hi = records
    if hi - lo < 1:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _INDEX.unpack(os.pread(fd, _INDEX.size, mid * _INDEX.size))[0] <= offset:
            lo = mid
        else:
            hi = mid
    return lo


def _scan_index(fd: int, first: int, records: int) -> tuple[int, list[tuple[int, int | None]]]:
    """Check records [first, records) of an index; return how many records are
    valid (up to the first unknown tag) and the lost ranges they describe
    (end ``None``: the lost run is the last record, it goes to the log's end).
    Blocking; tags are checked a block at a time without a Python-level loop.
    """
    lost_at: list[tuple[int, int]] = []  # (offset, record number) of lost records
    i = first
    while i < records:
        want = min(65536, records - i)
        block = os.pread(fd, want * _INDEX.size, i * _INDEX.size)
        n = len(block) // _INDEX.size
        tags = block[_INDEX.size - 1 : n * _INDEX.size : _INDEX.size]
        bad = tags.translate(None, _VALID_TAGS)
        if bad:
            n = tags.index(bad[0])
        j = tags.find(_LOST, 0, n)
        while j != -1:
            lost_at.append((_INDEX.unpack_from(block, j * _INDEX.size)[0], i + j))
            j = tags.find(_LOST, j + 1, n)
        i += n
        if bad or n < want:
            break
    lost: list[tuple[int, int | None]] = []
    for offset, number in lost_at:
        end: int | None = None
        if number + 1 < i:
            end = _INDEX.unpack(os.pread(fd, _INDEX.size, (number + 1) * _INDEX.size))[0]
        lost.append((offset, end))
    return i, lost


def read_log_file(
    data_path: Path,
    index_path: Path,
    offset: int,
    limit: int,
    index_records: int,
    first_record: int = 0,
    piece: int = _FILE_BLOCK,
) -> list[OutputChunk]:
    """Read up to ``limit`` bytes from ``offset`` of a log on disk, split at runs, in
    chunks of at most ``piece`` bytes, each read on its own (no copy to cut them).

    Blocking: call it in a thread. ``index_records`` is how many records of
    ``output.idx`` are known to be complete (the file may be growing);
    ``first_record`` is where the retained index starts (``output.start``).
    Lost runs are skipped (not read): the chunks' offsets then jump past them.
    """
    limit = min(limit, _FILE_BLOCK)
    if limit <= 0 or index_records <= first_record:
        return []
    with open(index_path, "rb", buffering=0) as index, open(data_path, "rb", buffering=0) as data:
        idx_fd = index.fileno()
        data_fd = data.fileno()

        def record(i: int) -> tuple[int, int]:
            start, tag = _INDEX.unpack(os.pread(idx_fd, _INDEX.size, i * _INDEX.size))
            return start, tag

        lo, hi = first_record, index_records
        while hi - lo > 1:  # last record with start <= offset
            mid = (lo + hi) // 2
            if record(mid)[0] <= offset:
                lo = mid
            else:
                hi = mid
        first_start, tag = record(lo)
        i = lo
        if first_start > offset:  # before the first record: nothing known there
            i, tag = lo - 1, _LOST
        end = offset + limit
        chunks: list[OutputChunk] = []
        position = offset
        while position < end:
            run_end = record(i + 1)[0] if i + 1 < index_records else end
            stop = min(run_end, end)
            if stop > position:
                stream = _STREAMS.get(tag)
                if stream is not None:
                    while position < stop:
                        want = min(piece, stop - position)
                        blob = os.pread(data_fd, want, position)
                        if blob:
                            chunks.append(OutputChunk(blob, position, stream))
                        if len(blob) < want:
                            return chunks  # the file ends here (still being written)
                        position += want
                position = stop
            i += 1
            if i >= index_records:
                break
            tag = record(i)[1]
        return chunks
