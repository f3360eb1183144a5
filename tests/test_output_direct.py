"""The output log's ``O_DIRECT`` writes (``DirectBuffers``) keep what the log promises.

Byte N at offset N at any flush point and a part-way failure are also in
``test_output``'s model test (``test_a_log_written_directly_matches_bytes_model``);
followers, faults and a cap together in its ``test_concurrent_pumps_followers_faults_and_cap``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from trio_worker import OutputStream
from trio_worker._jobs._output import DIRECT_LEAST, DirectBuffers, OutputLog

from . import test_faults
from .conftest import ext4_on_a_loop_device, require_root
from .test_output import ERR, OUT, PAGE, FaultyLog, Model, collect, pattern

KiB, MiB = 1024, 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB ext4 file system on a loop device: a real disk that takes ``O_DIRECT``,
    whatever file system the tests' temporary directory is on (tmpfs's ``O_DIRECT`` goes
    through its page cache)."""
    with ext4_on_a_loop_device(tmp_path, 16 * MiB) as mount_point:
        yield mount_point


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (``mincore``; reads nothing)."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        pages = -(-size // PAGE)
        vector = ctypes.create_string_buffer(pages)
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw)


async def write(log: OutputLog, model: Model, sizes: list[int], seed: int) -> int:
    """Append a piece of each size and flush after each; return the flushes."""
    for i, size in enumerate(sizes):
        data = pattern(size, seed * 1000 + i)
        stream = ERR if i % 3 == 2 else OUT
        log.append(stream, data)
        model.append(stream, data)
        await log.flush()
    return len(sizes)


SIZES = [100, 1 * MiB, 3 * MiB + 7, 70 * KiB, 1, 2 * MiB + 5000]


async def test_large_flushes_write_around_the_page_cache(ext4: Path) -> None:
    """Whole pages go with ``O_DIRECT``: after the flushes only the partial pages at
    their ends are in the page cache (all of them without the buffers), and the files
    replay every byte, also after a restart."""
    resident = {}
    for name, direct in (("cached", None), ("direct", DirectBuffers())):
        model = Model()
        log = OutputLog(ext4 / name, tail_bytes=0, direct=direct)
        flushes = await write(log, model, SIZES, 1)
        log.finish()
        await log.flush()
        log.close()
        resident[name] = resident_pages(log.data_path)
        model.check(await collect(log, 0), 0)
        recovered = OutputLog.recover(log.directory)
        assert recovered.end == model.end
        model.check(await collect(recovered, 0), 0)
        model.check(await collect(recovered, 3 * MiB), 3 * MiB)
    pages = -(-model.end // PAGE)
    assert resident["cached"] > pages // 2  # (what the measure sees when nothing is direct)
    assert resident["direct"] <= flushes + 1


async def test_a_direct_write_on_a_full_disk_loses_whole_pages_only(ext4: Path) -> None:
    """On a full disk the direct pages that failed are lost from a page boundary (what
    the flush wrote before them is kept), the job's later output is written once there
    is room, and a restart replays the same."""
    model = Model()
    log = OutputLog(ext4 / "job", tail_bytes=0, direct=DirectBuffers())
    await write(log, model, [100], 2)  # (the files exist: the disk fills with data only)
    filler = test_faults.fill(ext4)
    os.truncate(filler, filler.stat().st_size - 512 * KiB)  # room for about 512 KiB
    await write(log, model, [4 * MiB], 3)
    lost = log.lost_ranges
    assert len(lost) == 1
    lost_from, lost_to = lost[0]
    assert lost_to == log.end
    assert lost_from % PAGE == 0
    assert 100 < lost_from < 100 + 512 * KiB
    filler.unlink()
    log._retry_interval = 0.0
    await write(log, model, [1 * MiB + 3, 5], 4)
    log.finish()
    await log.flush()
    log.close()
    assert log.lost_ranges == lost
    assert log.dropped_bytes == lost_to - lost_from
    model.check(await collect(log, 0), 0, lost)
    recovered = OutputLog.recover(log.directory)
    assert (recovered.end, recovered.lost_ranges) == (log.end, lost)
    model.check(await collect(recovered, 0), 0, lost)


async def test_a_direct_write_failing_part_way_counts_the_pages_it_wrote(ext4: Path) -> None:
    """The partial page before the direct ones is written through the page cache; a
    failure after one direct page keeps that page and loses the rest, from its end."""
    model = Model(direct=DIRECT_LEAST)
    log = FaultyLog(ext4 / "job", tail_bytes=0, direct=DirectBuffers())
    log._retry_interval, log._retry_bytes = 0.0, 0  # every flush tries the disk
    await write(log, model, [100], 6)
    model.flush()
    budget = (PAGE - 100) + PAGE + 1000  # the partial page, one page, and a bit
    log.data_budget = budget
    log.append(OUT, pattern(100 * KiB, 7))
    model.append(OUT, pattern(100 * KiB, 7))
    await log.flush()
    model.flush(("data", budget))
    assert log.lost_ranges == [(2 * PAGE, log.end)] == model.lost_ranges
    log.data_budget = None
    await write(log, model, [5], 8)
    model.flush()
    log.finish()
    await log.flush()
    log.close()
    assert log.lost_ranges == model.lost_ranges
    model.check(await collect(log, 0), 0)
    model.check(await collect(OutputLog.recover(log.directory), 0), 0)


CHILD = textwrap.dedent(
    """
    import random, sys, trio
    from pathlib import Path
    from trio_worker import OutputStream
    from trio_worker._jobs._output import DIRECT_LEAST, DirectBuffers, OutputLog
    from tests.test_output_direct import pieces

    async def main():
        log = OutputLog(Path(sys.argv[1]), tail_bytes=0, direct=DirectBuffers())
        for stream, data in pieces():
            log.append(stream, data)
            await log.flush()
            print(log.end, flush=True)

    trio.run(main)
    """
)


def kill_mid_write(directory: Path, after: int) -> int:
    """Run ``CHILD`` until it flushed ``after`` bytes, SIGKILL it; what it had flushed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    with child.stdout:
        flushed = 0
        while flushed < after:
            line = child.stdout.readline()
            assert line, "the child ended early"
            flushed = int(line)
        child.send_signal(signal.SIGKILL)
        child.wait()
    return flushed


def pieces() -> Iterator[tuple[OutputStream, bytes]]:
    """The child's output, the same in the test: sizes that end mid-page."""
    rng = random.Random(11)
    for i in range(200):
        size = rng.choice([1, 3000, 70 * KiB + 1, 1 * MiB + 3, 3 * MiB - 5])
        yield (ERR if i % 4 == 3 else OUT), pattern(size, i)


async def test_recover_after_a_sigkill_mid_write_finds_the_logs_end(ext4: Path) -> None:
    """A server killed while it writes: the files' end is the log's end (the partial
    page was written through the page cache), at least what flushes finished, and
    every byte and tag below it is the job's."""
    directory = ext4 / "job"
    flushed = await trio.to_thread.run_sync(kill_mid_write, directory, 12 * MiB)
    recovered = OutputLog.recover(directory)
    assert recovered.end >= flushed
    assert recovered.lost_ranges == []
    model = Model()
    for stream, data in pieces():
        if model.end >= recovered.end:
            break
        model.append(stream, data)
    del model.data[recovered.end :]
    model.check(await collect(recovered, 0), 0)
    model.check(await collect(recovered, flushed - 5), flushed - 5)


class CountingLog(OutputLog):
    """Counts its attempts to open ``output.log`` with ``O_DIRECT``."""

    opens = 0

    def _open_direct(self) -> int:
        self.opens += 1
        return super()._open_direct()


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A ramfs: a file system that refuses ``O_DIRECT`` (EINVAL at the open)."""
    require_root("mounting a ramfs")
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_where_o_direct_is_refused_the_log_writes_through_the_page_cache(
    ramfs: Path,
) -> None:
    """Asked once: the first large flush finds ``O_DIRECT`` refused and writes
    its bytes through the page cache, and later ones do not ask again."""
    model = Model()
    direct = DirectBuffers()
    log = CountingLog(ramfs / "job", tail_bytes=0, direct=direct)
    await write(log, model, SIZES, 5)
    assert log.opens == 1
    assert log._direct is None
    assert log.dropped_bytes == 0
    log.finish()
    await log.flush()
    log.close()
    model.check(await collect(log, 0), 0)
    recovered = OutputLog.recover(log.directory)
    model.check(await collect(recovered, 0), 0)


async def test_a_refusal_of_o_direct_is_asked_and_said_once_per_server(
    ramfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's logs share its state directory's file system: once one log found
    ``O_DIRECT`` refused, the others write through the page cache without asking, and
    the server says so in one line, not one per job."""
    caplog.set_level("INFO", logger="trio_worker")
    direct = DirectBuffers()
    logs = [CountingLog(ramfs / f"job{i}", tail_bytes=0, direct=direct) for i in range(3)]
    models = [Model() for _ in logs]
    for i, (log, model) in enumerate(zip(logs, models, strict=True)):
        await write(log, model, SIZES, 10 + i)
    assert [log.opens for log in logs] == [1, 0, 0]
    assert direct.refused
    assert direct.take() is None
    said = [r for r in caplog.records if "no O_DIRECT here" in r.getMessage()]
    assert len(said) == 1
    for log, model in zip(logs, models, strict=True):
        assert log.dropped_bytes == 0
        log.finish()
        await log.flush()
        model.check(await collect(log, 0), 0)
        log.close()
