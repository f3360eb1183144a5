"""The server's stderr written off the loop (cli/_logsink): a stderr that takes nothing never
stops the loop, what waits is bounded, and what is dropped is said."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.test_cli import COMMAND, clean_env, own_cgroup
from trio_worker._blocking_client import connect_blocking
from trio_worker.cli._logsink import LogSink


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def _logger(sink: LogSink) -> logging.Logger:
    log = logging.getLogger(f"trio_worker.test_logsink.{id(sink)}")
    log.handlers[:] = [sink]
    log.propagate = False
    log.setLevel(logging.INFO)
    return log


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _fill(fd: int) -> int:
    """Fill the pipe's buffer: a write to it would now block."""
    os.set_blocking(fd, False)
    filled = 0
    try:
        while True:
            filled += os.write(fd, b"#" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    return filled


async def test_a_stderr_that_takes_nothing_never_blocks_the_loop_and_drops_are_said(
    pipe: tuple[int, int],
) -> None:
    """With the pipe full and nobody reading, 5,000 lines are logged from the loop and it
    runs on (a plain StreamHandler blocks in its first write: the test would hang); past
    the bound lines are dropped and counted; once the reader reads, the kept lines come
    in order, and lines say how many were dropped: every line is written or counted."""
    r, w = pipe
    sink = LogSink(w, limit=64 * 1024)
    sink.setFormatter(logging.Formatter("%(message)s"))
    log = _logger(sink)
    filled = _fill(w)
    got = bytearray()

    def read_until_end() -> None:  # the reader, at last
        os.set_blocking(r, True)
        while not got.endswith(b"END\n"):
            got.extend(os.read(r, 65536))

    async with trio.open_nursery() as reader:
        async with trio.open_nursery() as nursery:
            await nursery.start(sink.run)
            with trio.fail_after(60):  # (a guard against a hang, not a measure)
                for i in range(5000):
                    log.info("line %05d %s", i, "x" * 40)
                    if i % 100 == 0:
                        await trio.lowlevel.checkpoint()  # the loop turns: it is not blocked
            assert sink.dropped > 0  # 5,000 x 52 bytes > 64 KiB; the pipe takes nothing
            reader.start_soon(trio.to_thread.run_sync, read_until_end)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()  # the writer's end writes what is left
        await trio.to_thread.run_sync(log.info, "END")  # no writer: written at once
    assert got[:filled] == b"#" * filled
    lines = got[filled:].decode().splitlines()
    kept = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    notes = [line for line in lines if not line.startswith(("line ", "END"))]
    counts = [int(note.split()[0]) for note in notes]
    assert kept == sorted(kept)  # in order
    assert notes
    assert all(
        note.endswith("log lines were dropped: stderr took none while 65536 bytes waited")
        for note in notes
    )
    assert len(kept) + sum(counts) == 5000  # every line is written or counted


async def test_lines_before_during_and_after_the_writer_all_arrive_in_order(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    sink = LogSink(w)
    sink.setFormatter(logging.Formatter("%(message)s"))
    log = _logger(sink)
    log.info("before")  # no writer yet: written at once
    assert _drain(r) == b"before\n"
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        log.info("during 1")
        await trio.to_thread.run_sync(log.info, "during 2")  # from another thread
        log.info("during 3")
        nursery.cancel_scope.cancel()  # the writer's end writes what is left
    log.info("after")
    assert _drain(r) == b"during 1\nduring 2\nduring 3\nafter\n"
    assert sink.dropped == 0


async def test_a_line_logged_from_a_thread_wakes_the_idle_writer(pipe: tuple[int, int]) -> None:
    r, w = pipe
    sink = LogSink(w)
    sink.setFormatter(logging.Formatter("%(message)s"))
    log = _logger(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(sink.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer waits for a first line
        await trio.to_thread.run_sync(log.info, "from a thread")
        os.set_blocking(r, True)
        with trio.fail_after(60):
            got = await trio.to_thread.run_sync(os.read, r, 100)
        nursery.cancel_scope.cancel()
    assert got == b"from a thread\n"


def test_a_server_whose_stderr_nobody_reads_serves_on(tmp_path: Path) -> None:
    """`serve` with its stderr a pipe read only until it says where it listens: 3,000
    calls (an audit line each, ~900 KiB, 14 pipes full) are all answered, and their lines
    all come once stderr is read. Its loop wrote each line itself before: it stopped at
    the ~200th call, and every client with it."""
    state = tmp_path / "state"
    env = clean_env(tmp_path)
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--listen", "127.0.0.1:0", "--state-dir", state, *own_cgroup(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        port = None
        for raw in proc.stderr:  # read until it listens, then never again
            if match := re.search(rb"serving on 127\.0\.0\.1:(\d+)", raw):
                port = int(match[1])
                break
        assert port is not None
        d = state / "pki"
        files = {"ca": d / "ca.pem", "cert": d / "admin.pem", "key": d / "admin.key"}
        with connect_blocking(f"127.0.0.1:{port}", timeout=30, **files) as worker:
            answered = sum(1 for _ in range(3000) if worker.list() is not None)
        assert answered == 3000
    finally:
        proc.send_signal(signal.SIGINT)
        with proc.stderr:
            rest = proc.stderr.read()  # (its last lines: the exit waits for them)
        assert proc.wait(timeout=60) == 0
    assert rest.endswith(b"trio-worker: server stopped\n")
    # Held (under LOG_BUFFER) and written once read: not one audit line lost.
    assert rest.count(b'"method":"/trioworker.v1.Worker/List"') == 3000
