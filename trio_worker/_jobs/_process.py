"""Validating a start request and spawning, signalling and reaping its process.

We spawn through ``_host._spawn`` (vfork + exec in a small C extension). The
calling thread is suspended until the child's exec (0.2 ms idle, 2-20 ms on a
loaded host: the child waits for a CPU), where ``subprocess.Popen(preexec_fn=...)``
forked the whole server (3-9 ms). With the reaper watching (it kills every job
group if the server dies), the supervisor spawns from a worker thread without
PR_SET_PDEATHSIG, so the loop never waits for a child; without it, from the
event-loop thread with PR_SET_PDEATHSIG, which fires when the *thread* that
forked exits (trio's idle worker threads do exit). We wait
for exit *without reaping* (through a pidfd), so the process group id stays
pinned by the zombie leader while we kill what the job left behind —
signalling a group after reaping its leader could hit an unrelated process
that reused the id. A plain Start whose place has a seed (a process made with
the place, ``_host._spawn.Seed``) does not spawn here: ``_launch`` hands the
seed its command on the loop and wraps it in a ``JobProcess`` the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal as _signal
import struct
import termios
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, final

import trio

from .._errors import InvalidRequest, ResourceExhausted
from .._host._spawn import (
    ChildSetupError,
    Credentials,
    Environment,
    Stage,
    Stdin,
    Terminal,
    exec_candidates,
    spawn,
)
from ._exec_limit import check_exec_size

if TYPE_CHECKING:
    from .._host._cgroups import JobCgroup

__all__ = [
    "PIPE_SIZES",
    "Credentials",
    "JobProcess",
    "PipeReader",
    "SpawnError",
    "SpawnOptions",
    "StartSpec",
    "Stdin",
    "Terminal",
    "describe_os_error",
    "describe_setup_error",
    "output_pipe",
    "setup_failure",
    "validate_signal",
    "validate_start",
]

_F_SETPIPE_SZ = 1031
_HELD = struct.Struct("i")  # FIONREAD's answer, an int
_PIPE_SIZE = 1024 * 1024
#: With CAP_SYS_RESOURCE (a root server) a pipe may exceed pipe-max-size: a
#: bigger buffer lets a fast job run ahead while the event loop is busy with
#: followers, so capture speed depends less on how many are watching. The
#: kernel allocates pipe pages only as they fill, so idle jobs cost nothing.
_BIG_PIPE_SIZE = 8 * 1024 * 1024
#: The sizes a job's output pipe is given, the first the kernel takes (``output_pipe``;
#: a place's seed's pipes, made in C: ``_host._place.make_seeded_place``).
PIPE_SIZES = (_BIG_PIPE_SIZE, _PIPE_SIZE)
#: Signals a caller may send; 0 only probes and SIGKILL/SIGSTOP are allowed.
_VALID_SIGNALS = frozenset(int(s) for s in _signal.valid_signals())


@dataclass(frozen=True, slots=True)
class StartSpec:
    """A validated start request, ready to spawn."""

    command: str
    args: tuple[str, ...]
    env: Mapping[str, str]  # the complete environment of the job
    cwd: str | None


@final
@dataclass(frozen=True, slots=True)
class SpawnOptions:
    """How a job's process is started, beyond its command line.

    ``stdin``: ``Stdin.NULL`` (/dev/null), ``Stdin.PIPE`` (``JobProcess.stdin``
    is the write end) or a ``Terminal`` (its slave becomes stdin, stdout,
    stderr and the controlling terminal; there are no output pipes then, the
    caller reads its master). ``user``: the credentials to run as, or None for
    the server's own.
    """

    stdin: Stdin | Terminal = Stdin.NULL
    user: Credentials | None = None


#: errno values that mean "the host is out of something right now", not "this
#: request is wrong": Start answers RESOURCE_EXHAUSTED and keeps nothing.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


def resource_exhausted(exc: OSError, what: str) -> ResourceExhausted:
    """``cannot start the job: too many open files (creating its pipes)``."""
    reason = os.strerror(exc.errno or errno.EIO).lower()
    return ResourceExhausted(f"cannot start the job: {reason} ({what})")


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
    check_cwd: bool = True,
) -> StartSpec:
    """Check a start request at the edge and build what spawning needs.

    ``env`` extends ``base_env`` (the server's environment); keys given in
    ``env`` override the server's. ``PATH`` is looked up in the result, as
    ``execvpe`` does. Without ``check_cwd`` the directory is not looked at here
    (a job of another user: its own chdir says, with that user's rights, so a
    caller cannot probe the server's files through our answer).
    """
    command = _check_text("command", command)
    if not command:
        raise InvalidRequest("command", "must not be empty")
    if isinstance(args, str | bytes):
        raise InvalidRequest("args", "must be a list of strings, not a single string")
    checked_args = tuple(_check_text(f"args[{i}]", a) for i, a in enumerate(args or ()))
    added: dict[str, str] = {}
    for key, value in (env or {}).items():
        key = _check_text("env", key)
        if not key:
            raise InvalidRequest("env", "keys must not be empty")
        if "=" in key:
            raise InvalidRequest("env", f"key {key!r} must not contain '='")
        added[key] = _check_text(f"env[{key}]", value)
    if not isinstance(base_env, Environment):
        base_env = Environment(base_env)
    full_env = base_env.updated(added)
    checked_cwd: str | None = None
    if cwd is not None and cwd != "":
        checked_cwd = _check_text("cwd", os.fspath(cwd) if isinstance(cwd, Path) else cwd)
        if check_cwd and not os.path.exists(checked_cwd):
            raise InvalidRequest("cwd", f"{checked_cwd!r} does not exist")
        if check_cwd and not os.path.isdir(checked_cwd):
            raise InvalidRequest("cwd", f"{checked_cwd!r} is not a directory")
    check_exec_size((command, *checked_args), full_env)  # E2BIG: refused, never stored
    return StartSpec(command, checked_args, full_env, checked_cwd)


def validate_signal(signum: object) -> int:
    if isinstance(signum, bool) or not isinstance(signum, int):
        raise InvalidRequest("signal", f"must be a signal number, got {signum!r}")
    if signum not in _VALID_SIGNALS:
        raise InvalidRequest("signal", f"{signum} is not a valid signal number")
    return int(signum)


def output_pipe() -> tuple[int, int]:
    """A job's stdout or stderr pipe (read end, write end), both close-on-exec; the read
    end, ours, non-blocking already (the job's end blocks): its ``PipeReader``, made on
    the loop, then costs no ``fcntl``s there."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        # (A new pipe's read end has no other status flag to keep: one call, not two.)
        fcntl.fcntl(read_fd, fcntl.F_SETFL, os.O_NONBLOCK)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    # A bigger pipe means fewer wakeups per byte when the job writes fast.
    for size in PIPE_SIZES:
        try:
            fcntl.fcntl(read_fd, _F_SETPIPE_SZ, size)
            break
        except OSError:
            continue
    return read_fd, write_fd


class PipeReader:
    """The read end of a job's pipe (non-blocking), read in rounds rather than one
    call at a time.

    ``read_now`` takes everything the pipe has (up to a limit) without yielding, so
    a fast writer costs one wakeup of the job runner and one reader wakeup per round
    instead of per ``read(2)``. (The runner waits for the pipe; see ``_runner``.)
    """

    __slots__ = ("_closed", "fd")

    def __init__(self, fd: int, *, nonblocking: bool = False) -> None:
        """``nonblocking``: the fd is already (``output_pipe``'s read ends)."""
        if not nonblocking:
            os.set_blocking(fd, False)
        self.fd = fd
        self._closed = False

    def read_now(self, limit: int) -> tuple[list[bytes], bool]:
        """The bytes the pipe holds now (up to ``limit``), without waiting, and
        whether it reached its end (EOF, or EIO from a terminal's master).

        A read that returns less than it asked for emptied the pipe: what the job
        writes meanwhile waits for the next round rather than being read a few KiB
        at a time (a job writing 4 KiB blocks as fast as we read made ~180 reads of
        6 KiB per MiB; epoll is level-triggered, so nothing is missed).
        """
        pieces: list[bytes] = []
        total = 0
        while total < limit:
            want = min(limit - total, _PIPE_SIZE)
            try:
                data = os.read(self.fd, want)
            except BlockingIOError:
                return pieces, False
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                return pieces, True
            if not data:
                return pieces, True
            pieces.append(data)
            total += len(data)
            if len(data) < want:
                break
        return pieces, False

    def held(self) -> int | None:
        """How many bytes the pipe holds now (``FIONREAD``), or None where it cannot say."""
        try:
            answer = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return None
        held: int = _HELD.unpack(answer)[0]
        return held

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        # No ``trio.lowlevel.notify_closing``: trio never waits for the fd (the runner
        # watches it in an epoll of its own), and telling trio of an fd it never saw
        # costs a failed epoll_ctl and its exception (~15 us a pipe, at every job's end).
        if not self._closed:
            self._closed = True
            os.close(self.fd)


def describe_os_error(exc: OSError, command: str) -> str:
    """``No such file or directory: 'echi'``: what a user needs, no errno noise."""
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    name = exc.filename if exc.filename is not None else command
    return f"{reason}: {name!r}"


class JobProcess:
    """One spawned job process: its pipes, its pidfd, its process group."""

    __slots__ = ("_pidfd", "_trio_waited", "pid", "returncode", "stderr", "stdin", "stdout")

    def __init__(
        self,
        pid: int,
        pidfd: int,
        stdout: PipeReader | None,
        stderr: PipeReader | None,
        stdin: int | None,
    ) -> None:
        self.pid = pid
        self._pidfd = pidfd
        #: None with a terminal: the output comes from its master then.
        self.stdout = stdout
        self.stderr = stderr
        #: The write end of the stdin pipe (``Stdin.PIPE``), non-blocking; else None.
        self.stdin = stdin
        self.returncode: int | None = None
        #: ``wait_exited`` waited through trio (else only the runner's epoll saw the pidfd).
        self._trio_waited = False

    @classmethod
    def spawn(
        cls,
        spec: StartSpec,
        *,
        argv: Sequence[str] | None = None,
        cgroup: JobCgroup | None = None,
        cgroup_fds: Sequence[int] | None = None,
        options: SpawnOptions | None = None,
        nofile_soft: int | None = None,
        pdeathsig: int = _signal.SIGKILL,
    ) -> JobProcess:
        """Start the process in its cgroup and a new process group (or session).

        ``argv`` replaces ``[command, *args]`` (to run the namespace helper).
        Synchronous: from the event-loop thread with ``pdeathsig``, or from a
        worker thread with ``pdeathsig=0`` (see the module docstring). Raises
        ``SpawnError`` when the command cannot run (the job is FAILED, with
        the reason in words), ``ResourceExhausted`` when the host is out of
        descriptors, memory or processes. Either way nothing is left open.
        """
        options = options or SpawnOptions()
        # Every fd we hold, the given ``cgroup_fds`` included; the parent's ends survive.
        owned: list[int] = list(cgroup_fds or ())
        keep: set[int] = set()
        pid = -1
        try:
            try:
                if cgroup_fds is None:
                    cgroup_fds = cgroup.open_join() if cgroup is not None else []
                    owned += cgroup_fds
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "opening its cgroup") from None
                raise SpawnError(
                    f"cannot join the job's cgroup: {exc.strerror}", exc.errno
                ) from None
            try:
                stdin_w: int | None = None
                out_r = err_r = None
                if isinstance(options.stdin, Terminal):
                    term = options.stdin
                    fcntl.ioctl(
                        term.slave_fd,
                        termios.TIOCSWINSZ,
                        struct.pack("HHHH", term.rows, term.cols, 0, 0),
                    )
                    child_in = child_out = child_err = term.slave_fd
                else:
                    if options.stdin is Stdin.PIPE:
                        child_in, stdin_w = os.pipe2(os.O_CLOEXEC)
                        owned += (child_in, stdin_w)
                    else:
                        child_in = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                        owned.append(child_in)
                    out_r, child_out = output_pipe()
                    owned += (out_r, child_out)
                    err_r, child_err = output_pipe()
                    owned += (err_r, child_err)
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "creating its pipes") from None
                raise
            full_argv = list(argv) if argv is not None else [spec.command, *spec.args]
            try:
                pid = spawn(
                    full_argv[0],
                    full_argv,
                    spec.env,
                    spec.cwd,
                    stdin=child_in,
                    stdout=child_out,
                    stderr=child_err,
                    cgroup_fds=cgroup_fds,
                    terminal=isinstance(options.stdin, Terminal),
                    user=options.user,
                    pdeathsig=pdeathsig,
                    nofile_soft=nofile_soft,
                )
            except ChildSetupError as exc:
                raise setup_failure(exc, spec, cgroup) from None
            except OSError as exc:  # vfork itself
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "creating its process") from None
                raise SpawnError(describe_os_error(exc, spec.command), exc.errno) from None
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                # The child runs but we cannot watch it: take it back at once.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, _signal.SIGKILL)
                os.waitpid(pid, 0)
                if exc.errno in RESOURCE_ERRNOS:
                    raise resource_exhausted(exc, "watching its process") from None
                raise
            if stdin_w is not None:
                os.set_blocking(stdin_w, False)
                keep.add(stdin_w)
            if out_r is not None and err_r is not None:
                keep.update((out_r, err_r))
                return cls(
                    pid,
                    pidfd,
                    PipeReader(out_r, nonblocking=True),
                    PipeReader(err_r, nonblocking=True),
                    stdin_w,
                )
            return cls(pid, pidfd, None, None, stdin_w)
        finally:
            for fd in owned:
                if fd not in keep:
                    os.close(fd)

    @property
    def pidfd(self) -> int:
        """Readable once the main process has exited (-1 once reaped)."""
        return -1 if self.returncode is not None else self._pidfd

    @property
    def reaped(self) -> bool:
        return self.returncode is not None

    async def wait_exited(self) -> None:
        """Wait until the main process has exited, leaving it unreaped."""
        if self.returncode is None:
            self._trio_waited = True
            await trio.lowlevel.wait_readable(self._pidfd)
        else:
            await trio.lowlevel.checkpoint()

    def has_exited(self) -> bool:
        """Whether the main process has exited (reaped or not); nothing is consumed.
        OSError where the kernel cannot tell by its pidfd (``waitid(P_PIDFD)``: Linux 5.4)."""
        if self.returncode is not None:
            return True
        return os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None

    def signal_group(self, signum: int) -> None:
        """Signal the job's process group; a no-op once the leader is reaped."""
        if self.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def reap(self) -> int:
        """Collect the exit status (-N for signal N); call only after ``wait_exited``."""
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            if self._trio_waited:  # (see ``PipeReader.close``)
                trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
        return self.returncode

    def close_pipes(self) -> None:
        if self.stdout is not None:
            self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None


def setup_failure(exc: ChildSetupError, spec: StartSpec, cgroup: JobCgroup | None) -> SpawnError:
    """The FAILED job's error for a child that failed before its command ran.

    A command searched on ``PATH`` that no directory of it holds is not found (ENOENT: 127)
    even when ``execve`` said EACCES: that came from a directory the job's user may not
    search (root's ``~/.cargo/bin`` in the server's ``PATH``, which jobs of other users
    keep), as bash and Go's ``LookPath`` (docker) see it; it made every missing command
    "Permission denied" (126). A file that is there and cannot be run stays EACCES.
    A failure before the exec (its working directory, its cgroup, its user) carries no
    errno: the command was not even looked for."""
    if exc.stage is Stage.EXEC and exc.errno == errno.EACCES and _nowhere_on_path(spec):
        exc = ChildSetupError(Stage.EXEC, errno.ENOENT, exc.index, exc.filename)
    if exc.stage is Stage.EXEC and exc.errno == errno.ENOENT and _command_there(spec):
        # The file is there; what execve did not find is its interpreter (a #! line's
        # program, an ELF loader): found, not executable (126), in bash's words.
        message = f"bad interpreter: No such file or directory: {spec.command!r}"
        return SpawnError(message, errno.ENOEXEC)
    # Only the exec's errno says whether the command was found (``spawn_errno``: 127 or
    # 126); a working directory that does not exist is no missing command (126).
    number = exc.errno if exc.stage is Stage.EXEC else None
    return SpawnError(describe_setup_error(exc, spec, cgroup), number)


def _command_there(spec: StartSpec) -> bool:
    """A file ``spec.command`` names exists (as the server sees it): the path given, from
    the job's directory, or one on PATH."""
    if "/" in spec.command:
        return os.path.exists(os.path.join(spec.cwd or os.getcwd(), spec.command))
    candidates = exec_candidates(spec.command, spec.env.get("PATH"))
    return any(os.path.exists(candidate) for candidate in candidates)


def _nowhere_on_path(spec: StartSpec) -> bool:
    """``spec.command`` is searched on PATH (no ``/``) and no candidate exists (as the
    server sees them: a few stats, on a failed Start only)."""
    if "/" in spec.command:
        return False
    candidates = exec_candidates(spec.command, spec.env.get("PATH"))
    return not any(os.path.lexists(candidate) for candidate in candidates)


def describe_setup_error(exc: ChildSetupError, spec: StartSpec, cgroup: JobCgroup | None) -> str:
    """What went wrong in the child, in words a user can act on."""
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    stage = exc.stage
    if stage is Stage.EXEC:
        return f"{reason}: {spec.command!r}"
    if stage is Stage.CHDIR:
        return f"{reason}: {spec.cwd!r}"
    if stage is Stage.CGROUP:
        where = (
            cgroup.dirs[exc.index] if cgroup is not None and exc.index < len(cgroup.dirs) else "?"
        )
        return f"cannot join the job's cgroup: cannot move the job into cgroup {where}: {reason}"
    if stage in (Stage.SETGROUPS, Stage.SETGID, Stage.SETUID):
        return f"cannot switch to the job's user ({stage.name.lower()}): {reason}"
    if stage in (Stage.SESSION, Stage.TTY):
        return f"cannot give the job its terminal or process group: {reason}"
    return f"cannot set up the job's process ({stage.name.lower()}): {reason}"
