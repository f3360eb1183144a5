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
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from .._errors import InvalidRequest
from ._exec_limit import check_exec_size

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
    check_exec_size((command, *checked_args), full_env)  # E2BIG: refused, never stored
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
        stderr: PipeReader,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd = os.pidfd_open(popen.pid)
        self.returncode: int | None = None

    @classmethod
    def spawn(
        cls,
        spec: StartSpec,
        *,
        argv: Sequence[str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> JobProcess:
        """Start the process in a new process group, stdin from /dev/null.

        ``argv`` replaces ``[command, *args]`` (to run the namespace helper).
        Synchronous on purpose (see the module docstring); raises SpawnError,
        or ``subprocess.SubprocessError`` when ``preexec`` failed in the child.
        """
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        try:
            popen = subprocess.Popen(
                list(argv) if argv is not None else [spec.command, *spec.args],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=dict(spec.env),
                cwd=spec.cwd,
                process_group=0,
                close_fds=True,
                preexec_fn=preexec,
            )
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            raise SpawnError(describe_os_error(exc, spec.command), exc.errno) from None
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        return cls(popen, PipeReader(out_r), PipeReader(err_r))

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
        self.stderr.close()
