"""Starting, watching and stopping the reaper (``_reaper``), from trio.

``ReaperGuard.start(parents)`` starts the reapers for this server's parent
groups, two of them, and waits until both are armed; its ``watch`` task starts
one again if it dies; ``quit`` (once the jobs have ended) tells them to exit
without killing anything. If this process dies instead, the kernel closes their
pipes and each reaper kills every job group under ``parents`` (killing twice
is harmless: ``cgroup.kill`` is idempotent, and a process SIGKILLed while
frozen dies as it thaws, before it can fork).

Why two: a reaper that dies (someone SIGKILLs it, the OOM killer) is replaced
``_RESTART_DELAY`` plus an interpreter's start-up later. With one reaper, a
server that died in that window (~1 s) left its jobs running until the next
server on its state directory cleaned up. With two, either one alone covers
the server's death; jobs outlive it only if both reapers and then the server
die within one restart window. (Why not ``PR_SET_PDEATHSIG`` instead: jobs are
spawned from worker threads, and it fires when the *thread* that forked
exits; even armed from a long-lived thread it would reach only each job's main
process, not what it started.) A reaper costs a few MiB, once per server.

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
#: Reapers kept running at once: either alone covers the server's death.
_COPIES = 2

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
    """This server's reapers, kept running: ``watch`` (a task) starts one again if
    it dies; ``quit`` ends them once the jobs have ended.

    Get one with ``await ReaperGuard.start(parents)``; ``on_start`` hears of
    the reapers each time one starts (the state directory notes their pids for
    a successor).
    """

    def __init__(
        self,
        parents: Sequence[Path],
        reapers: Sequence[Reaper],
        on_start: Callable[[Sequence[Reaper]], None] | None,
    ) -> None:
        self._parents = list(parents)
        #: The running reapers (one per slot; a slot's reaper is replaced when it dies).
        self.reapers = list(reapers)
        self._on_start = on_start

    @classmethod
    async def start(
        cls,
        parents: Sequence[Path],
        *,
        on_start: Callable[[Sequence[Reaper]], None] | None = None,
        copies: int = _COPIES,
    ) -> ReaperGuard:
        """Start ``copies`` reapers and wait until each is armed; ``OSError`` if one
        cannot start (then none is left running)."""
        reapers: list[Reaper] = []

        async def start_one() -> None:
            reapers.append(await _start(parents))

        try:
            async with trio.open_nursery() as nursery:  # (their start-ups overlap)
                for _ in range(copies):
                    nursery.start_soon(start_one)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                for reaper in reapers:
                    await reaper.quit()
            if isinstance(exc, BaseExceptionGroup):
                oserror = next((e for e in exc.exceptions if isinstance(e, OSError)), None)
                if oserror is not None:
                    raise oserror from None
            raise
        if on_start is not None:
            on_start(reapers)
        return cls(parents, reapers, on_start)

    async def watch(self) -> None:
        """Run as a task while jobs may exist: a reaper that dies is replaced."""
        async with trio.open_nursery() as nursery:
            for slot in range(len(self.reapers)):
                nursery.start_soon(self._keep, slot)

    async def _keep(self, slot: int) -> None:
        while True:
            reaper = self.reapers[slot]
            await reaper.process.wait()
            _log.error(
                "the reaper (pid %d) exited (%s); starting it again",
                reaper.pid,
                reaper.process.returncode,
            )
            await trio.sleep(_RESTART_DELAY)
            try:
                self.reapers[slot] = await _start(self._parents)
            except OSError as exc:
                _log.error("cannot start the reaper again: %s", exc)
                continue
            if self._on_start is not None:
                self._on_start(self.reapers)

    async def quit(self) -> None:
        """Tell the reapers to exit without killing anything (the jobs have ended)."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for reaper in self.reapers:
                    if reaper.process.returncode is None:
                        nursery.start_soon(reaper.quit)
                    else:
                        nursery.start_soon(reaper.process.wait)


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
