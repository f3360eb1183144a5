"""Validating a start request and spawning, signalling and reaping its process.

We spawn with ``subprocess.Popen`` from the event-loop thread instead of
``trio.lowlevel.open_process`` (which forks from a worker thread) for two
reasons: PR_SET_PDEATHSIG fires when the *thread* that forked exits, and trio's
idle worker threads do exit; and we want to wait for exit *without reaping*
(through a pidfd), so the process group id stays pinned by the zombie leader
while we kill what the job left behind — signalling a group after reaping its
leader could hit an unrelated process that reused the id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal as _signal
import struct
import subprocess
import termios
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .._errors import InvalidRequest

__all__ = [
    "JobProcess",
    "PipeReader",
    "SpawnError",
    "StartSpec",
    "describe_os_error",
    "validate_signal",
    "validate_start",
]

_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1024 * 1024
#: With CAP_SYS_RESOURCE (a root server) a pipe may exceed pipe-max-size: a
#: bigger buffer lets a fast job run ahead while the event loop is busy with
#: followers, so capture speed depends less on how many are watching. The
#: kernel allocates pipe pages only as they fill, so idle jobs cost nothing.
_BIG_PIPE_SIZE = 8 * 1024 * 1024
#: Signals a caller may send; 0 only probes and SIGKILL/SIGSTOP are allowed.
_VALID_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


@dataclass(frozen=True, slots=True)
class StartSpec:
    """A validated start request, ready to spawn."""

    command: str
    args: tuple[str, ...]
    env: Mapping[str, str]  # the complete environment of the job
    cwd: str | None


class SpawnError(Exception):
    """The process could not be started; ``message`` says why in words."""

    def __init__(self, message: str, errno_: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno_


def _check_text(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(field, f"must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidRequest(field, "must not contain NUL bytes")
    return value


def validate_start(
    command: object,
    args: Sequence[object] | None,
    env: Mapping[str, str] | Mapping[object, object] | None,
    cwd: object,
    *,
    base_env: Mapping[str, str],
) -> StartSpec:
    """Check a start request at the edge and build what spawning needs.

    ``env`` extends ``base_env`` (the server's environment); keys given in
    ``env`` override the server's. ``PATH`` is looked up in the result, as
    ``execvpe`` does.
    """
    command = _check_text("command", command)
    if not command:
        raise InvalidRequest("command", "must not be empty")
    if isinstance(args, str | bytes):
        raise InvalidRequest("args", "must be a list of strings, not a single string")
    checked_args = tuple(_check_text(f"args[{i}]", a) for i, a in enumerate(args or ()))
    full_env = dict(base_env)
    for key, value in (env or {}).items():
        key = _check_text("env", key)
        if not key:
            raise InvalidRequest("env", "keys must not be empty")
        if "=" in key:
            raise InvalidRequest("env", f"key {key!r} must not contain '='")
        full_env[key] = _check_text(f"env[{key}]", value)
    checked_cwd: str | None = None
    if cwd is not None and cwd != "":
        checked_cwd = _check_text("cwd", os.fspath(cwd) if isinstance(cwd, Path) else cwd)
        if not os.path.exists(checked_cwd):
            raise InvalidRequest("cwd", f"{checked_cwd!r} does not exist")
        if not os.path.isdir(checked_cwd):
            raise InvalidRequest("cwd", f"{checked_cwd!r} is not a directory")
    return StartSpec(command, checked_args, full_env, checked_cwd)


def validate_signal(signum: object) -> int:
    if isinstance(signum, bool) or not isinstance(signum, int):
        raise InvalidRequest("signal", f"must be a signal number, got {signum!r}")
    if signum not in _VALID_SIGNALS:
        raise InvalidRequest("signal", f"{signum} is not a valid signal number")
    return int(signum)


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    # A bigger pipe means fewer wakeups per byte when the job writes fast.
    for size in (_BIG_PIPE_SIZE, _PIPE_SIZE):
        try:
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, size)
            break
        except OSError:
            continue
    return read_fd, write_fd


class PipeReader:
    """The read end of a job's pipe, read in rounds rather than one call at a time.

    ``read_round`` waits until the pipe is readable, then takes everything it
    has (up to a limit) without yielding in between, so a fast writer costs one
    task switch and one reader wakeup per round instead of per ``read(2)``.
    """

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._closed = False

    async def read_round(self, limit: int) -> list[bytes]:
        """The bytes available now (waiting for some if there are none); [] at EOF."""
        await trio.lowlevel.checkpoint_if_cancelled()
        pieces: list[bytes] = []
        total = 0
        while total < limit:
            try:
                data = os.read(self.fd, min(limit - total, _PIPE_SIZE))
            except BlockingIOError:
                if pieces:
                    break
                await trio.lowlevel.wait_readable(self.fd)
                continue
            except OSError as exc:
                # A terminal's master reads EIO once every holder of the terminal has
                # closed it: that is its end of file.
                if exc.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            pieces.append(data)
            total += len(data)
        if pieces:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return pieces

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)


def describe_os_error(exc: OSError, command: str) -> str:
    """``No such file or directory: 'echi'``: what a user needs, no errno noise."""
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    name = exc.filename if exc.filename is not None else command
    return f"{reason}: {name!r}"


class JobProcess:
    """One spawned job process: its pipes, its pidfd, its process group."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: PipeReader,
        stderr: PipeReader | None,
        stdin_fd: int | None = None,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        #: None on a terminal: stdout and stderr are the same file, the terminal.
        self.stderr = stderr
        #: The write side of the job's stdin (a pipe, or a duplicate of the terminal's
        #: master), for the caller to own; None when stdin is /dev/null.
        self.stdin_fd = stdin_fd
        self._pidfd = os.pidfd_open(popen.pid)
        self.returncode: int | None = None

    @classmethod
    def spawn(
        cls,
        spec: StartSpec,
        *,
        argv: Sequence[str] | None = None,
        preexec: Callable[[], None] | None = None,
        stdin: bool = False,
        terminal: tuple[int, int] | None = None,
    ) -> JobProcess:
        """Start the process in a new process group, stdin from /dev/null.

        ``stdin``: its stdin is a pipe whose write end is ``stdin_fd``. ``terminal``
        (rows, cols): a new pseudo-terminal of that size is its stdin, stdout and stderr
        and its controlling terminal, in a new session (so its process group is still
        its pid); ``stdout`` reads the master and ``stdin_fd`` is a duplicate of it.
        ``argv`` replaces ``[command, *args]`` (to run the namespace helper).
        Synchronous on purpose (see the module docstring); raises SpawnError,
        or ``subprocess.SubprocessError`` when ``preexec`` failed in the child.
        """
        if terminal is not None:
            return cls._spawn_on_terminal(spec, argv, preexec, terminal)
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if stdin else (None, None)
        try:
            popen = subprocess.Popen(
                list(argv) if argv is not None else [spec.command, *spec.args],
                stdin=subprocess.DEVNULL if in_r is None else in_r,
                stdout=out_w,
                stderr=err_w,
                env=dict(spec.env),
                cwd=spec.cwd,
                process_group=0,
                close_fds=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            _close(out_r, err_r, in_w)
            raise SpawnError(describe_os_error(exc, spec.command), exc.errno) from None
        except BaseException:
            _close(out_r, err_r, in_w)
            raise
        finally:
            _close(out_w, err_w, in_r)
        return cls(popen, PipeReader(out_r), PipeReader(err_r), in_w)

    @classmethod
    def _spawn_on_terminal(
        cls,
        spec: StartSpec,
        argv: Sequence[str] | None,
        preexec: Callable[[], None] | None,
        size: tuple[int, int],
    ) -> JobProcess:
        master, slave = os.openpty()
        os.set_inheritable(master, False)
        try:
            fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
            writer = os.dup(master)
        except BaseException:
            _close(master, slave)
            raise

        def take_terminal() -> None:
            # After setsid (Popen does it before preexec_fn): fd 0 becomes the
            # session's controlling terminal, so the job gets SIGHUP, ^C, job control.
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if preexec is not None:
                preexec()

        try:
            popen = subprocess.Popen(
                list(argv) if argv is not None else [spec.command, *spec.args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=dict(spec.env),
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
                preexec_fn=take_terminal,
            )
        except OSError as exc:
            _close(master, writer)
            raise SpawnError(describe_os_error(exc, spec.command), exc.errno) from None
        except BaseException:
            _close(master, writer)
            raise
        finally:
            os.close(slave)  # else the master never reads end-of-file
        return cls(popen, PipeReader(master), None, writer)

    @property
    def reaped(self) -> bool:
        return self.returncode is not None

    async def wait_exited(self) -> None:
        """Wait until the main process has exited, leaving it unreaped."""
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            await trio.lowlevel.checkpoint()

    def signal_group(self, signum: int) -> None:
        """Signal the job's process group; a no-op once the leader is reaped."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def reap(self) -> int:
        """Collect the exit status; call only after ``wait_exited``."""
        if self.returncode is None:
            self.returncode = self._popen.wait()
            os.close(self._pidfd)
        return self.returncode

    def close_pipes(self) -> None:
        self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()


def _close(*fds: int | None) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)
