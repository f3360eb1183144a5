"""Interactive jobs from the command line: ``run -i``/``run -t`` and ``attach``.

A session is one connection and one Attach stream: the job's output goes to our stdout
(stderr to stderr), our stdin goes to the job, our terminal's size follows. With a local
terminal and a job on a terminal that takes our input, our terminal is in raw mode, as
docker's is: every key, Ctrl-C included, is a byte for the job, whose own terminal echoes
and interprets it; ``Ctrl-P Ctrl-Q`` detaches. ``run -t`` without ``-i`` is in raw mode
too: the job takes no input, so Ctrl-C and Ctrl-\\ become the signals its terminal would
have sent it (SIGINT, SIGQUIT), and other keys go nowhere. Raw mode is undone on every way out:
normal end, error, signal (SIGTERM, SIGHUP), lost connection.

Without raw mode, Ctrl-C keeps ``run``'s meaning (stop the job, then leave), and leaves an
``attach`` (the job goes on).
"""

from __future__ import annotations

import contextlib
import os
import signal as _signal
import sys
import termios
import tty as _tty
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import trio
from cyclopts import Parameter

from .._errors import JobNotRunning, PermissionDenied
from .._model import DEFAULT_STOP_GRACE, JobInfo, JobState
from ._errors import ExitCode, leaf_exception
from ._ids import needs_list, resolve_id
from ._params import Options
from ._render import describe_state, job_exit
from ._session import CONNECT_TIMEOUT, OutputSink, lost_end
from ._settings import ClientOptions, Connection, resolve_connection

if TYPE_CHECKING:
    from ..client import Attachment, WorkerClient

__all__ = ["DetachKeys", "StartJob", "attach", "local_terminal_size", "run_interactive"]

#: Ctrl-P then Ctrl-Q: leave the job running (docker's default detach keys).
_DETACH = b"\x10\x11"
#: Bytes read from our stdin at a time.
_READ_BYTES = 64 * 1024
#: Keys a terminal turns into signals (the defaults of VINTR and VQUIT).
_KEY_SIGNALS = {0x03: _signal.SIGINT, 0x1C: _signal.SIGQUIT}
#: Signals that end a session (and undo raw mode) instead of killing us outright.
_LEAVE_SIGNALS = (_signal.SIGTERM, _signal.SIGHUP)

#: ``start(client, stdin, tty, terminal_size)``: starts the job on the session's client.
StartJob = Callable[["WorkerClient", bool, bool, "tuple[int, int] | None"], Awaitable[JobInfo]]


class DetachKeys:
    """Finds ``Ctrl-P Ctrl-Q`` in typed bytes, which may arrive split across reads.

    ``feed`` returns the bytes to send on and whether the sequence was typed (what
    follows it is not sent). A lone Ctrl-P is held until the next byte tells.
    """

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        data = self._held + data
        self._held = b""
        at = data.find(_DETACH)
        if at >= 0:
            return data[:at], True
        if data.endswith(_DETACH[:1]):
            self._held = data[-1:]
            data = data[:-1]
        return data, False

    def flush(self) -> bytes:
        """What was held back, at the end of input."""
        held, self._held = self._held, b""
        return held


def local_terminal_size() -> tuple[int, int] | None:
    """(rows, cols) of our terminal, if stdin or stdout is one."""
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            if size.lines > 0 and size.columns > 0:
                return size.lines, size.columns
    return None


@contextlib.contextmanager
def _raw_mode(fd: int) -> Iterator[None]:
    """Our terminal in raw mode for the block; its settings back as they were after."""
    saved = termios.tcgetattr(fd)
    try:
        _tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@dataclass
class _Outcome:
    ended: JobInfo | None = None
    detached: bool = False
    left_by: int | None = None  # the signal we left on
    interrupted: bool = False  # Ctrl-C: stopping the job (run) or leaving (attach)
    printed: int = 0  # the log offset printed up to


class _Session:
    """One attached job: output out, input in, resizes, signals; ends when the job does."""

    def __init__(
        self,
        job: JobInfo,
        *,
        send_stdin: bool,
        raw: bool,
        on_interrupt: Callable[[], Awaitable[None]] | None,
        on_key_signal: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        self._job = job
        self._send_stdin = send_stdin
        self._raw = raw
        self._on_interrupt = on_interrupt
        self._on_key_signal = on_key_signal
        self.outcome = _Outcome()

    async def run(self, session: Attachment) -> _Outcome:
        sink = OutputSink(session.offset)
        async with trio.open_nursery() as nursery:
            done = nursery.cancel_scope
            nursery.start_soon(self._signals, done, nursery)
            if self._send_stdin:
                nursery.start_soon(self._pump_stdin, session, done)
            elif self._raw and self._on_key_signal is not None:
                nursery.start_soon(self._watch_keys, self._on_key_signal, done)
            controlling = self._send_stdin or self._on_key_signal is not None
            if self._job.tty and controlling and local_terminal_size() is not None:
                # Resizing takes the right to stop the job, as typing does: a watcher
                # leaves the job's terminal as it is.
                nursery.start_soon(self._follow_size, session)
            async for chunk in session:
                sink.write(chunk)
            self.outcome.ended = session.ended
            self.outcome.printed = sink.offset
            done.cancel()
        return self.outcome

    async def _pump_stdin(self, session: Attachment, done: trio.CancelScope) -> None:
        keys = DetachKeys() if self._raw else None
        while True:
            try:
                data = await trio.to_thread.run_sync(
                    os.read, 0, _READ_BYTES, abandon_on_cancel=True
                )
            except OSError:
                data = b""  # our terminal went away: as the end of input
            if not data:
                if keys is not None and (held := keys.flush()):
                    await session.write(held)
                with contextlib.suppress(JobNotRunning):
                    await session.close_stdin()
                return  # the output goes on until the job ends
            if keys is not None:
                data, detach = keys.feed(data)
                if data:
                    await session.write(data)
                if detach:
                    self.outcome.detached = True
                    done.cancel()
                    return
            else:
                await session.write(data)

    async def _watch_keys(
        self, on_key_signal: Callable[[int], Awaitable[None]], done: trio.CancelScope
    ) -> None:
        """Raw mode for a job that takes no input (``run -t``): the keys a terminal turns
        into signals (Ctrl-C, Ctrl-\\) signal the job instead, as its own terminal would;
        Ctrl-P Ctrl-Q detaches; other keys go nowhere."""
        keys = DetachKeys()
        while True:
            try:
                data = await trio.to_thread.run_sync(
                    os.read, 0, _READ_BYTES, abandon_on_cancel=True
                )
            except OSError:
                data = b""
            if not data:
                return
            data, detach = keys.feed(data)
            for byte in data:
                signum = _KEY_SIGNALS.get(byte)
                if signum is not None:
                    await on_key_signal(signum)
            if detach:
                self.outcome.detached = True
                done.cancel()
                return

    async def _follow_size(self, session: Attachment) -> None:
        with trio.open_signal_receiver(_signal.SIGWINCH) as changes:
            size = local_terminal_size()
            if size is not None:
                await session.resize(*size)
            async for _ in changes:
                size = local_terminal_size()
                if size is not None:
                    await session.resize(*size)

    async def _signals(self, done: trio.CancelScope, nursery: trio.Nursery) -> None:
        watched = (*_LEAVE_SIGNALS, _signal.SIGINT)
        with trio.open_signal_receiver(*watched) as signals:
            async for signum in signals:
                if signum == _signal.SIGINT and not self._raw:
                    if self._on_interrupt is not None and not self.outcome.interrupted:
                        self.outcome.interrupted = True
                        nursery.start_soon(self._on_interrupt)
                        continue
                    self.outcome.interrupted = True
                    if self._on_interrupt is not None:
                        _note(f"leaving; job {self._job.id} may still be running")
                else:
                    self.outcome.left_by = int(signum)
                done.cancel()
                return


def _note(message: str) -> None:
    print(f"trio-worker: {message}", file=sys.stderr, flush=True)


async def _attached(
    client: WorkerClient,
    job: JobInfo,
    *,
    offset: int,
    send_stdin: bool,
    on_interrupt: Callable[[], Awaitable[None]] | None,
    on_key_signal: Callable[[int], Awaitable[None]] | None = None,
) -> _Outcome:
    """Attach to ``job`` on ``client`` and run the session, in raw mode where it applies:
    a tty job, our stdin a terminal, and our keys going to the job (as input, or as the
    signals they stand for)."""
    raw = job.tty and os.isatty(0) and (send_stdin or on_key_signal is not None)
    session_runner = _Session(
        job,
        send_stdin=send_stdin,
        raw=raw,
        on_interrupt=on_interrupt,
        on_key_signal=on_key_signal,
    )
    with _raw_mode(0) if raw else contextlib.nullcontext():
        async with client.attach(job.id, offset=offset) as session:
            return await session_runner.run(session)


def _ended_already(job: JobInfo) -> int:
    """``attach`` to a job that had ended: one line, and the job's exit code."""
    code, note = job_exit(job)
    ended = describe_state(job)
    _note(f"job {job.id} had already ended: {ended}; trio-worker logs {job.id} shows its output")
    if note:
        _note(note)
    return code


def _exit_code(outcome: _Outcome, job_id: str) -> int:
    """What ``run``/``attach`` exit with, and the line they print (terminal restored)."""
    if outcome.left_by is not None:
        _note(f"leaving on {_signal.Signals(outcome.left_by).name}; job {job_id} goes on")
        return 128 + outcome.left_by
    if outcome.detached:
        _note(f"detached; job {job_id} goes on (trio-worker attach {job_id})")
        return ExitCode.OK
    if outcome.ended is None:
        return ExitCode.INTERRUPTED
    if outcome.ended.output_bytes > outcome.printed:
        # Its last bytes lost on the server (a full disk) come with no chunk after them
        # to show the gap: said as ``run`` says it (here, with the terminal restored).
        _note(lost_end(outcome.printed, outcome.ended.output_bytes))
    code, note = job_exit(outcome.ended)
    if note:
        _note(note)
    if outcome.interrupted:
        return ExitCode.INTERRUPTED
    return code


@contextlib.asynccontextmanager
async def open_client(conn: Connection) -> AsyncIterator[WorkerClient]:
    """The trio client: interactive sessions read the terminal and the connection at once."""
    from ..client import connect

    async with connect(
        conn.addr, ca=conn.ca, cert=conn.cert, key=conn.key, timeout=CONNECT_TIMEOUT
    ) as client:
        yield client


async def run_interactive(
    conn: Connection,
    start: StartJob,
    *,
    stdin: bool,
    tty: bool,
    grace: float | None,
) -> int:
    """``run -i``/``-t``: start the job and attach to it, on one connection."""
    size = local_terminal_size() if tty else None
    async with open_client(conn) as client:
        job = await start(client, stdin, tty, size)
        if job.state is JobState.FAILED:
            code, note = job_exit(job)
            if note:
                _note(note)
            return code

        async def stop_job() -> None:
            _note(f"stopping job {job.id} (Ctrl-C again to leave at once)")
            with contextlib.suppress(JobNotRunning):
                await client.stop(job.id, DEFAULT_STOP_GRACE if grace is None else grace)

        async def signal_job(signum: int) -> None:
            with contextlib.suppress(JobNotRunning):
                await client.signal(job.id, signum)

        outcome = await _attached(
            client,
            job,
            offset=0,
            send_stdin=stdin,
            on_interrupt=stop_job,
            on_key_signal=signal_job if tty else None,
        )
    return _exit_code(outcome, job.id)


async def attach(
    job_id: Annotated[
        str, Parameter(name="ID", help="The job's id, as start printed it, or a unique prefix.")
    ],
    /,
    *,
    no_stdin: Annotated[
        bool, Parameter(name="--no-stdin", negative="", show_default=False)
    ] = False,
    options: Options = None,
) -> int:
    """Attach to a running job: follow its output from now on, and type into it.

    For a job started with -i, what you type (or pipe in) goes to its stdin, and the end of
    your input closes it. For a job on a terminal (-it), your terminal is in raw mode and the
    job's follows its size; Ctrl-P Ctrl-Q detaches and leaves the job running. Exits with the
    job's code when it ends (as run does); Ctrl-C (without raw mode) leaves, and the job goes
    on. A job that has already ended: attach says so and exits with its code (its output is
    trio-worker logs ID's).

    For example:

        ID=$(trio-worker start -it -- bash)
        trio-worker attach $ID
        trio-worker attach --no-stdin $ID    # watch only (all a readonly role may do)

    Parameters
    ----------
    no_stdin
        Only watch: send nothing to the job, leave its terminal's size alone.
    """
    conn = resolve_connection(options or ClientOptions())
    async with open_client(conn) as client:
        ids = [job.id for job in await client.list()] if needs_list(job_id) else []
        job = await client.status(resolve_id(job_id, lambda: ids))
        if job.ended:
            # Nothing comes "from now on": say so (the output is `logs`'), and exit as
            # attaching a moment earlier would have, with the job's code.
            return _ended_already(job)
        offset = job.output_bytes  # from now on
        try:
            outcome = await _attached(
                client,
                job,
                offset=offset,
                send_stdin=job.stdin and not job.ended and not no_stdin,
                on_interrupt=None,
            )
        except BaseException as exc:
            denied = leaf_exception(exc)
            if no_stdin or not isinstance(denied, PermissionDenied):
                raise
            raise PermissionDenied(f"{denied}; attach --no-stdin only watches") from None
    return _exit_code(outcome, job.id)
