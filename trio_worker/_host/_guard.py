"""Starting, watching and stopping the reaper (``_reaper``), from trio.

``ReaperGuard.start(parents)`` starts the reaper for this server's parent
groups and waits until it is armed; its ``watch`` task starts it again if it
dies; ``quit`` (once the jobs have ended) tells it to exit without killing
anything. If this process dies instead, the kernel closes the pipe and
the reaper kills every job group under ``parents``.

``outlive(pid, start_time)``: a server taking over a state directory waits for
the previous server's reaper to finish before it starts jobs of its own, so an
old reaper can never kill a new job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from . import _reaper

__all__ = ["REAPER_PATH", "Reaper", "ReaperGuard", "outlive"]

REAPER_PATH = str(Path(_reaper.__file__).resolve())
#: How long the reaper may take to exit when told, or to finish killing.
_EXIT_TIMEOUT = 5.0
#: Between restarts of a reaper that keeps dying (someone kills it).
_RESTART_DELAY = 1.0

_log = logging.getLogger("trio_worker.reaper")


def _start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


class Reaper:
    """One running reaper process."""

    def __init__(self, process: trio.Process, start_time: int | None) -> None:
        self.process = process
        self.start_time = start_time

    @property
    def pid(self) -> int:
        return self.process.pid

    async def quit(self) -> None:
        """Tell it to exit without killing anything, and wait for it (bounded)."""
        stdin = self.process.stdin
        assert stdin is not None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stdin.send_all(_reaper.QUIT)
        await stdin.aclose()
        with trio.move_on_after(_EXIT_TIMEOUT):
            await self.process.wait()
        if self.process.returncode is None:
            _log.warning("the reaper (pid %d) did not exit when told; killing it", self.pid)
            self.process.kill()
            await self.process.wait()


async def _start(parents: Sequence[Path]) -> Reaper:
    argv = [sys.executable, "-I", "-S", REAPER_PATH, *map(str, parents)]
    process = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # a terminal's Ctrl-C must not reach it
        cwd="/",
    )
    try:
        assert process.stdout is not None
        # No timeout: it says ready or dies (EOF) within an interpreter's
        # start-up, and a trio timeout would fire at once under a MockClock.
        ready = await process.stdout.receive_some(16)
        if ready != b"ready\n":
            raise OSError(f"the reaper did not start (it said {ready!r})")
        await process.stdout.aclose()
    except BaseException:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()
        raise
    return Reaper(process, _start_time(process.pid))


class ReaperGuard:
    """This server's reaper, kept running: ``watch`` (a task) starts it again if
    it dies; ``quit`` ends it once the jobs have ended.

    Get one with ``await ReaperGuard.start(parents)``; ``on_start`` hears of
    each reaper started (the state directory notes its pid for a successor).
    """

    def __init__(
        self, parents: Sequence[Path], reaper: Reaper, on_start: Callable[[Reaper], None] | None
    ) -> None:
        self._parents = list(parents)
        self.reaper = reaper
        self._on_start = on_start

    @classmethod
    async def start(
        cls, parents: Sequence[Path], *, on_start: Callable[[Reaper], None] | None = None
    ) -> ReaperGuard:
        """Start the reaper and wait until it is armed; ``OSError`` if it cannot start."""
        reaper = await _start(parents)
        if on_start is not None:
            on_start(reaper)
        return cls(parents, reaper, on_start)

    async def watch(self) -> None:
        """Run as a task while jobs may exist: a reaper that dies is replaced."""
        while True:
            await self.reaper.process.wait()
            _log.error(
                "the reaper (pid %d) exited (%s); starting it again",
                self.reaper.pid,
                self.reaper.process.returncode,
            )
            await trio.sleep(_RESTART_DELAY)
            try:
                self.reaper = await _start(self._parents)
            except OSError as exc:
                _log.error("cannot start the reaper again: %s", exc)
                continue
            if self._on_start is not None:
                self._on_start(self.reaper)

    async def quit(self) -> None:
        """Tell the reaper to exit without killing anything (the jobs have ended)."""
        with trio.CancelScope(shield=True):
            if self.reaper.process.returncode is None:
                await self.reaper.quit()
            else:
                await self.reaper.process.wait()


async def outlive(pid: int, start_time: int) -> None:
    """Wait (bounded) for a previous server's reaper to finish; kill it if it hangs.

    Only if ``pid`` is still that process (same start time): a pid reused by
    something else is left alone.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        if _start_time(pid) != start_time:
            return
        _log.info("waiting for the previous server's reaper (pid %d) to finish", pid)
        with trio.move_on_after(_EXIT_TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
            return
        _log.warning("the previous server's reaper (pid %d) hangs; killing it", pid)
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        with trio.move_on_after(_EXIT_TIMEOUT):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
