from __future__ import annotations

import os
import tempfile
from pathlib import Path

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_worker import OutputChunk, OutputStream
from trio_worker._output import Broadcaster, OutputLog, read_log_file

OUT, ERR = OutputStream.STDOUT, OutputStream.STDERR


class Model:
    """The plain-bytes model: the log is the concatenation of all appends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.tags: list[OutputStream] = []

    def append(self, stream: OutputStream, data: bytes) -> None:
        self.data += data
        self.tags += [stream] * len(data)

    def check(self, chunks: list[OutputChunk], offset: int) -> None:
        position = offset
        for chunk in chunks:
            assert chunk.offset == position
            assert chunk.data, "readers never get empty chunks"
            assert chunk.data == bytes(self.data[position : chunk.end])
            assert set(self.tags[position : chunk.end]) == {chunk.stream}
            position = chunk.end
        assert position == len(self.data)


async def collect(log: OutputLog, offset: int = 0, **kw: object) -> list[OutputChunk]:
    return [c async for c in log.read(offset, **kw)]  # type: ignore[arg-type]


APPENDS = st.lists(
    st.tuples(st.sampled_from([OUT, ERR]), st.binary(min_size=0, max_size=300), st.booleans()),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=APPENDS,
    tail=st.integers(0, 600),
    offsets=st.lists(st.integers(0, 12_000), min_size=1, max_size=4),
    chunk=st.integers(1, 700),
)
def test_log_matches_bytes_model(
    appends: list[tuple[OutputStream, bytes, bool]],
    tail: int,
    offsets: list[int],
    chunk: int,
) -> None:
    """Random chunk sizes, stream interleavings, flush points and reader offsets:
    every read, from memory or from disk, equals the model's bytes and tags."""

    async def scenario(directory: Path) -> None:
        model = Model()
        log = OutputLog(directory, tail_bytes=tail)
        for stream, data, flush in appends:
            log.append(stream, data)
            model.append(stream, data)
            if flush:
                await log.flush()
            # A non-following reader mid-way sees exactly what is there so far.
            middle = min(offsets[0], len(model.data))
            model.check(await collect(log, middle, follow=False, chunk_size=chunk), middle)
        log.finish()
        await log.flush()
        log.close()
        for offset in offsets:
            offset = min(offset, len(model.data))
            chunks = await collect(log, offset, follow=True, chunk_size=chunk)
            assert all(len(c.data) <= chunk for c in chunks)
            model.check(chunks, offset)
        # After a "restart", the files alone replay everything exactly.
        index_records = (directory / "output.idx").stat().st_size // 9
        replay: list[OutputChunk] = []
        position = offsets[-1] if offsets[-1] <= len(model.data) else 0
        start = position
        while position < len(model.data):
            got = read_log_file(
                directory / "output.log", directory / "output.idx", position, 10**9, index_records
            )
            replay += got
            position = got[-1].end
        model.check(replay, start)

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
