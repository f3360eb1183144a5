"""Lagging readers sharing one output budget (a server connection's output streams): what they
read ahead stays within it, a lone reader still reads whole blocks, and nobody waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from trio_worker import OutputStream
from trio_worker._jobs._output import _FILE_BLOCK, OutputLog
from trio_worker._net._budget import LEAN_STEP, MAX_STEP, MIN_STEP, ClientOutput, OutputBudget

OUT = OutputStream.STDOUT
CHUNK = 256 * 1024


async def written_log(tmp_path: Path, size: int) -> tuple[OutputLog, bytes]:
    log = OutputLog(tmp_path, tail_bytes=0)
    data = bytes(range(256)) * (size // 256)
    for i in range(0, len(data), CHUNK):
        log.append(OUT, data[i : i + CHUNK])
    await log.flush()
    return log, data


def test_the_step_is_what_is_free_between_a_floor_and_a_block() -> None:
    budget = OutputBudget(total=4 * MAX_STEP)
    assert budget.step() == MAX_STEP
    one, two = budget.share(), budget.share()
    one.held = 3 * MAX_STEP + MAX_STEP // 2
    assert budget.step() == MAX_STEP // 2
    two.held = MAX_STEP
    assert budget.step() == MIN_STEP  # used up: small steps, never zero
    budget.unsent = 10 * MAX_STEP
    assert budget.step() == MIN_STEP
    one.close()
    budget.unsent = 0
    assert budget.step() == MAX_STEP  # only two's MiB is held: 3 MiB free, one block at most
    assert budget.held == MAX_STEP
    one.held = 0  # a closed share's reader letting go: counted no more
    two.held -= MAX_STEP // 2
    assert budget.held == MAX_STEP // 2


async def test_stalled_readers_hold_no_more_than_the_budget_and_a_step_each(
    tmp_path: Path,
) -> None:
    """16 readers, each on its own block, take one chunk and stop (their clients do not
    read): unbudgeted, each would keep the rest of a 1 MiB block read ahead."""
    log, data = await written_log(tmp_path, 20 * _FILE_BLOCK)
    budget = OutputBudget(total=2 * MAX_STEP)
    readers = [
        log.read(i * _FILE_BLOCK, follow=False, chunk_size=CHUNK, budget=budget.share())
        for i in range(16)
    ]
    firsts = [await reader.__anext__() for reader in readers]
    assert budget.held <= budget.total + 16 * MIN_STEP
    assert budget.held < 16 * (_FILE_BLOCK - CHUNK)  # what they held without the budget
    # Each still gets every byte, in order, and gives its share back as it goes.
    for i, (reader, first) in enumerate(zip(readers, firsts, strict=True)):
        rest = b"".join([chunk.data async for chunk in reader])
        assert first.offset == i * _FILE_BLOCK
        assert first.data + rest == data[i * _FILE_BLOCK :]
    assert budget.held == 0
    log.finish()
    log.close()


async def test_a_lone_reader_within_the_budget_reads_whole_chunks(tmp_path: Path) -> None:
    log, data = await written_log(tmp_path, 4 * _FILE_BLOCK)
    budget = OutputBudget()
    share = budget.share()
    chunks = [chunk async for chunk in log.read(0, follow=False, chunk_size=CHUNK, budget=share)]
    assert b"".join(c.data for c in chunks) == data
    assert {len(c.data) for c in chunks} == {CHUNK}
    assert share.held == 0
    log.finish()
    log.close()


async def test_a_reader_stepping_alone_still_shares_the_logs_two_disk_readers(
    tmp_path: Path,
) -> None:
    """The budget is held: the first disk read is a small one of the reader's own. It goes
    through the log's limiter of two worker threads, as block reads do (not trio's default
    limiter of 40, which a connection's streams could then fill)."""
    log, data = await written_log(tmp_path, 2 * _FILE_BLOCK)
    budget = OutputBudget()
    budget.unsent = budget.total  # held by messages waiting for window
    reader = log.read(0, follow=False, chunk_size=CHUNK, budget=budget.share())
    first = await reader.__anext__()
    assert first.data == data[:MIN_STEP]
    limiter = log._disk_readers
    assert limiter is not None
    assert limiter.total_tokens == 2
    log.finish()
    log.close()


async def test_readers_waiting_for_the_disk_wait_in_the_logs_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty readers of one log, each needing its own disk read at once (their budget is
    held): two at a time are in a worker thread, the others wait in the log's line, not
    inside ``trio.to_thread.run_sync``, where each held ~40 objects (its closures, a copy
    of the context, the limiter's WouldBlock and traceback) for the cycle collector's full
    collections to scan (tools/probe_hostile.py many-windows: 4,096 streams)."""
    log, data = await written_log(tmp_path, 2 * _FILE_BLOCK)
    inside = most = 0
    run_sync = trio.to_thread.run_sync

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        try:
            return await run_sync(*args, **kwargs)
        finally:
            inside -= 1

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    budget = OutputBudget()
    budget.unsent = budget.total  # held by messages waiting for window: lean steps
    firsts: dict[int, bytes] = {}

    async def first(i: int) -> None:
        reader = log.read(i * MIN_STEP, follow=False, chunk_size=CHUNK, budget=budget.share())
        firsts[i] = (await reader.__anext__()).data

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(first, i)
    assert most == 2
    assert firsts == {i: data[i * MIN_STEP : (i + 1) * MIN_STEP] for i in range(20)}
    log.finish()
    log.close()


def test_a_clients_connections_share_its_output_budget() -> None:
    """Full steps while the client's connections hold less than its budget between them;
    beyond it, lean steps on every one of them, never zero; room again as they let go."""
    client = ClientOutput(total=2 * MAX_STEP)
    one, two = OutputBudget(client=client), OutputBudget(client=client)
    assert one.step() == MAX_STEP
    a = one.share()
    a.held = MAX_STEP + MAX_STEP // 2
    assert two.step() == MAX_STEP // 2  # what the client has left, though two holds nothing
    two.unsent = MAX_STEP // 2
    assert client.held == 2 * MAX_STEP
    assert one.step() == two.step() == LEAN_STEP
    a.close()
    assert client.held == MAX_STEP // 2
    assert one.step() == MAX_STEP
    two.unsent = 0
    assert client.held == 0


async def test_one_clients_stalled_streams_on_many_connections_hold_its_budget_and_lean_steps(
    tmp_path: Path,
) -> None:
    """tools/probe_hostile.py many-windows: one client's streams on many connections each take
    a chunk and stall (its message waits for window, held unsent). Each connection's budget
    alone let every stream hold a 64 KiB step (1 GiB for 4,096 streams); the client's budget
    holds them to it and a lean step each. A live reader of the same client still reads to
    the end meanwhile (lean steps: nobody waits for the stalled ones)."""
    log, data = await written_log(tmp_path, 8 * _FILE_BLOCK)
    client = ClientOutput(total=MAX_STEP)
    budgets = [OutputBudget(total=2 * MAX_STEP, client=client) for _ in range(8)]
    streams = 0
    for budget in budgets:
        for i in range(16):
            reader = log.read(i * MIN_STEP, follow=False, chunk_size=CHUNK, budget=budget.share())
            first = await reader.__anext__()
            budget.unsent += len(first.data)  # its message, waiting for a window never opened
            streams += 1
    assert client.held <= client.total + MAX_STEP + streams * 2 * LEAN_STEP
    assert client.held < streams * MIN_STEP  # what each held without the client's budget
    live = budgets[0].share()
    chunks = [c async for c in log.read(0, follow=False, chunk_size=CHUNK, budget=live)]
    assert b"".join(c.data for c in chunks) == data
    assert live.held == 0
    log.finish()
    log.close()
