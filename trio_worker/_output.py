"""One job's output: an append-only, binary-safe log on disk with a memory tail.

The writer side (the job's pipe pumps) appends chunks tagged with their stream;
the log assigns each byte its offset in the combined log. A flusher task writes
the bytes to ``output.log`` and the stream switches to ``output.idx`` from a
worker thread, so disk latency never stalls the event loop.

Readers pull: each keeps its own position and reads from the in-memory tail
when it can and from the files when it has fallen behind, so a slow or stalled
reader costs the job and the other readers nothing. A memory-channel
broadcaster wakes readers that have caught up; nobody polls.

Memory is bounded whatever the job prints: the tail keeps at most
``tail_bytes`` of already-flushed data (plus whatever is not yet on disk,
itself capped by ``max_unflushed``, past which the pumps wait for the disk).

``output.idx`` holds one fixed-size record per *run* (maximal stretch of bytes
from one stream): ``<offset:u64 little-endian><stream:u8>``. Together with
``output.log``, whose byte N is log offset N, that is enough to replay from
any offset exactly, also after a restart.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import trio

from ._model import OutputChunk, OutputStream

__all__ = ["Broadcaster", "LogReader", "OutputLog", "read_log_file"]

_INDEX = struct.Struct("<QB")
_STREAMS = {s.value: s for s in OutputStream}

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
_IOV_MAX = 512
#: Chatty jobs that switch streams often make many small chunks: cap their count.
_MAX_TAIL_CHUNKS = 4096


class Broadcaster:
    """Wakes every waiting reader when the log changes, without blocking the writer.

    Each waiter gets a memory channel of capacity 1; ``notify`` drops a token
    into each waiting one with ``send_nowait``. One token is as good as many
    (readers re-check the log after waking), so the writer never waits and a
    reader that is busy elsewhere costs nothing.
    """

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


class OutputLog:
    """The log of one job. Appends and tail reads are synchronous and O(1)-ish;
    only flushing and lagging readers touch the disk, always off the event loop.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tail_bytes: int = 4 * 1024 * 1024,
        max_unflushed: int = 16 * 1024 * 1024,
    ) -> None:
        self.directory = directory
        self.data_path = directory / "output.log"
        self.index_path = directory / "output.idx"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._data_fd = os.open(self.data_path, flags, 0o600)
        try:
            self._index_fd = os.open(self.index_path, flags, 0o600)
        except BaseException:
            os.close(self._data_fd)
            raise
        self._tail_bytes = tail_bytes
        self._max_unflushed = max(max_unflushed, _SEAL_AT)
        self._end = 0
        self._flushed = 0
        self._index_flushed = 0  # records of output.idx on disk
        # Sealed tail chunks (contiguous) and the open one being coalesced.
        self._chunks: list[OutputChunk] = []
        self._offsets: list[int] = []
        self._held = 0  # bytes in self._chunks
        self._open = bytearray()
        self._open_stream: OutputStream | None = None
        self._open_offset = 0
        self._last_stream: OutputStream | None = None
        self._pending_index: list[bytes] = []
        self._finished = False
        self._closed = False
        self.dropped_bytes = 0
        self.write_error: str | None = None
        self._readers = Broadcaster()
        self._flusher = Broadcaster()
        self._space = Broadcaster()

    # -- state ---------------------------------------------------------------

    @property
    def end(self) -> int:
        """Bytes appended so far: the offset the next byte will get."""
        return self._end

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
            self._pending_index.append(_INDEX.pack(self._end, stream.value))
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
        """
        while True:
            if self._flushed == self._end and not self._pending_index:
                if self._finished:
                    return
                await self._flusher.wait()
                continue
            await self.flush()

    async def flush(self) -> None:
        """Write everything appended so far to disk (in a worker thread)."""
        while self._flushed != self._end or self._pending_index:
            parts, start, stop = self._unflushed()
            index = b"".join(self._pending_index)
            self._pending_index.clear()
            await trio.to_thread.run_sync(self._write, parts, start, index)
            self._flushed = stop
            self._index_flushed += len(index) // _INDEX.size
            self._trim()
            self._space.notify()

    def close(self) -> None:
        """Release the files; readers keep working (they open their own)."""
        if not self._closed:
            self._closed = True
            self._space.notify()
            os.close(self._data_fd)
            os.close(self._index_fd)

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

    def _write(self, parts: Sequence[bytes | memoryview], offset: int, index: bytes) -> None:
        """Runs in a worker thread. Data is written at its log offset, so a failed
        write leaves a hole of the right size rather than shifting what follows.
        """
        try:
            for i in range(0, len(parts), _IOV_MAX):
                batch = list(parts[i : i + _IOV_MAX])
                size = sum(len(p) for p in batch)
                done = 0
                while done < size:
                    done_now = os.pwritev(self._data_fd, _skip(batch, done), offset + done)
                    if done_now == 0:
                        raise OSError(errno.EIO, "short write")
                    done += done_now
                offset += size
            if index:
                os.write(self._index_fd, index)
        except OSError as exc:
            # The job must keep running; the log records what it lost.
            self.dropped_bytes += sum(len(p) for p in parts)
            self.write_error = f"{exc.strerror or exc}"

    def _trim(self) -> None:
        # Keep flushed data only while it fits the tail's byte and chunk budgets.
        drop, held, count = 0, self._held, len(self._chunks)
        while (
            drop < count
            and (held > self._tail_bytes or count - drop > _MAX_TAIL_CHUNKS)
            and self._chunks[drop].end <= self._flushed
        ):
            held -= len(self._chunks[drop].data)
            drop += 1
        if drop:
            del self._chunks[:drop]
            del self._offsets[:drop]
            self._held = held

    # -- reader side ---------------------------------------------------------

    def read(
        self, offset: int = 0, *, follow: bool = True, chunk_size: int = DEFAULT_CHUNK
    ) -> LogReader:
        """Iterate the log from ``offset``; with ``follow``, until finished."""
        return LogReader(self, offset, follow, chunk_size)

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


class LogReader:
    """One reader's position in a log: an async iterator of ``OutputChunk``.

    A plain iterator rather than an async generator, so a caller may ``break``
    out of ``async for`` at any point without leaving anything to finalize.
    """

    def __init__(self, log: OutputLog, offset: int, follow: bool, chunk_size: int) -> None:
        self._log = log
        self._position = offset
        self._follow = follow
        self._chunk_size = chunk_size
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
            if self._pending:
                chunk = self._pending.pop()
                self._position = chunk.end
                await trio.lowlevel.checkpoint()
                return chunk
            position = self._position
            if position < log._end:
                if position >= log._tail_start:
                    chunk = log._read_memory(position, self._chunk_size)
                    self._position = chunk.end
                    await trio.lowlevel.checkpoint()
                    return chunk
                chunks = await trio.to_thread.run_sync(
                    read_log_file,
                    log.data_path,
                    log.index_path,
                    position,
                    min(log._flushed, log._tail_start) - position,
                    log._index_flushed,
                )
                self._pending = list(_split(chunks, self._chunk_size))
                self._pending.reverse()
                continue
            if log._finished or not self._follow:
                await trio.lowlevel.checkpoint()
                raise StopAsyncIteration
            await log._readers.wait()

    async def aclose(self) -> None:
        """Nothing to release; present so ``aclosing(reader)`` works."""
        await trio.lowlevel.checkpoint()


def _skip(parts: list[bytes | memoryview], skip: int) -> list[bytes | memoryview]:
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


def _split(chunks: list[OutputChunk], size: int) -> Iterator[OutputChunk]:
    for chunk in chunks:
        if len(chunk.data) <= size:
            yield chunk
            continue
        view = memoryview(chunk.data)
        for start in range(0, len(view), size):
            yield OutputChunk(bytes(view[start : start + size]), chunk.offset + start, chunk.stream)


def read_log_file(
    data_path: Path, index_path: Path, offset: int, limit: int, index_records: int
) -> list[OutputChunk]:
    """Read up to ``limit`` bytes from ``offset`` of a log on disk, split at runs.

    Blocking: call it in a thread. ``index_records`` is how many records of
    ``output.idx`` are known to be complete (the file may be growing).
    """
    limit = min(limit, _FILE_BLOCK)
    if limit <= 0 or index_records <= 0:
        return []
    with open(index_path, "rb", buffering=0) as index, open(data_path, "rb", buffering=0) as data:
        idx_fd = index.fileno()

        def record(i: int) -> tuple[int, OutputStream]:
            start, stream = _INDEX.unpack(os.pread(idx_fd, _INDEX.size, i * _INDEX.size))
            return start, _STREAMS[stream]

        lo, hi = 0, index_records
        while hi - lo > 1:  # last record with start <= offset
            mid = (lo + hi) // 2
            if record(mid)[0] <= offset:
                lo = mid
            else:
                hi = mid
        blob = os.pread(data.fileno(), limit, offset)
        chunks: list[OutputChunk] = []
        position, i = offset, lo
        stream = record(i)[1]
        while position < offset + len(blob):
            run_end = record(i + 1)[0] if i + 1 < index_records else offset + len(blob)
            stop = min(run_end, offset + len(blob))
            if stop > position:
                chunks.append(
                    OutputChunk(blob[position - offset : stop - offset], position, stream)
                )
                position = stop
            i += 1
            if i < index_records:
                stream = record(i)[1]
        return chunks
