"""The namespace helper: ``python -m trio_worker._nsinit [--pid] [--mount] [--network] -- CMD``.

A separate, re-exec'd program because namespaces must be entered by the job's
own process, between fork and exec, and doing mounts and forks inside a
``preexec_fn`` of a multi-threaded server is asking for deadlocks. It uses only
the standard library (no package imports), so the supervisor can start it as a
plain script with ``python -I -S`` and pay only the interpreter's start-up.

What it does:

* ``--network``: a new network namespace with only ``lo``, brought up.
* ``--mount``: a new mount namespace with every mount made private (so nothing
  propagates back to the host) and a fresh ``/proc``.
* ``--pid``: a new PID namespace (always with a private mount namespace, to
  mount its ``/proc``). This process forks PID 1, a small init that mounts
  ``/proc``, runs the command as PID 2 in its own process group, forwards
  signals to that group, reaps orphans, and exits when the command does; this
  process forwards signals to PID 1 and finally mirrors the command's status
  (exit code N -> exit N, killed by signal N -> kills itself with N).
* ``--tty`` (with ``--pid``): stdin is the job's terminal. PID 1's own session
  took it away from the command, so the command (PID 2) starts a session and
  takes the terminal back as its controlling terminal (``TIOCSCTTY`` with force,
  as root, before dropping to ``--user``); its group is then the terminal's
  foreground group, which a resize's SIGWINCH and the terminal's keys reach.
* Without ``--pid`` it execs the command in place: no process stays behind.

Reserved exit codes (as GNU ``env``/``chroot`` use them), each with a one-line
message on stderr and, with ``--report PATH``, a ``stage<TAB>errno<TAB>message``
line in PATH so the supervisor can tell them from a command's own exit status:
127 the command was not found (ENOENT), 126 it could not be executed otherwise,
125 the namespaces could not be set up.
"""

from __future__ import annotations

# The C module behind ``signal``: same functions and numbers, without the ~7 ms
# the enum import costs, a quarter of the helper's start-up.
import _signal as signal  # type: ignore[import-not-found]
import ctypes
import errno
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~8 ms of start-up, a third of the helper's
    from typing import NoReturn

__all__ = [
    "EXIT_EXEC_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_SETUP_FAILED",
    "FORWARDED_SIGNALS",
    "main",
    "prctl",
]

EXIT_NOT_FOUND = 127
EXIT_EXEC_FAILED = 126
EXIT_SETUP_FAILED = 125

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

#: Signals the helper passes on to the command instead of acting on them.
FORWARDED_SIGNALS: tuple[int, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGQUIT,
    signal.SIGALRM,
    signal.SIGWINCH,
    signal.SIGCONT,
)
#: Python ignores these at start-up; the command must get them back at default.
_RESET_SIGNALS: tuple[int, ...] = (signal.SIGPIPE, signal.SIGXFSZ)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def _raise_errno(what: str) -> NoReturn:
    code = ctypes.get_errno()
    raise OSError(code, f"{what}: {os.strerror(code)}")


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        _raise_errno("unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    if _libc.mount(enc(source), enc(target), enc(fstype), flags, None) != 0:
        _raise_errno(f"mount {fstype or ''} on {target}".replace("  ", " "))


def prctl(option: int, arg2: int) -> int:
    """Bare prctl(2): returns -1 with errno set instead of raising (preexec-safe)."""
    return int(_libc.prctl(option, arg2, 0, 0, 0))


def _loopback_up() -> None:
    """Set IFF_UP on ``lo`` with SIOCGIFFLAGS/SIOCSIFFLAGS, no ``ip`` binary needed."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _mount_proc() -> None:
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


class _Options:
    def __init__(self) -> None:
        self.pid = False
        self.mount = False
        self.network = False
        #: --tty: the command takes stdin (a terminal) as its controlling terminal.
        self.tty = False
        self.report: str | None = None
        self.report_fd = -1
        #: --user UID:GID:G1,G2: who the command runs as (set right before exec).
        self.user: tuple[int, int, list[int]] | None = None
        #: --cwd DIR: entered after switching to the user (with its rights).
        self.cwd: str | None = None
        self.command = ""
        self.args: list[str] = []


def _parse(argv: list[str]) -> _Options:
    opts = _Options()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            break
        if arg == "--pid":
            opts.pid = True
        elif arg == "--mount":
            opts.mount = True
        elif arg == "--network":
            opts.network = True
        elif arg == "--tty":
            opts.tty = True
        elif arg == "--report" and i < len(argv):
            opts.report = argv[i]
            i += 1
        elif arg == "--cwd" and i < len(argv):
            opts.cwd = argv[i]
            i += 1
        elif arg == "--user" and i < len(argv):
            try:
                uid, gid, groups = argv[i].split(":")
                opts.user = (int(uid), int(gid), [int(g) for g in groups.split(",") if g])
            except ValueError:
                _fail(opts, "usage", errno.EINVAL, f"bad --user {argv[i]!r}", EXIT_SETUP_FAILED)
            i += 1
        else:
            _fail(opts, "usage", errno.EINVAL, f"unknown option {arg!r}", EXIT_SETUP_FAILED)
    else:
        _fail(opts, "usage", errno.EINVAL, "missing '--' before the command", EXIT_SETUP_FAILED)
    if i >= len(argv):
        _fail(opts, "usage", errno.EINVAL, "no command given", EXIT_SETUP_FAILED)
    opts.command = argv[i]
    opts.args = argv[i:]
    return opts


def _fail(opts: _Options, stage: str, code: int, message: str, status: int) -> NoReturn:
    """Tell the supervisor (report file) and the user (stderr), then exit ``status``."""
    if opts.report:
        try:
            if opts.report_fd >= 0:  # opened before dropping to the user
                fd, opts.report_fd = opts.report_fd, -1
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                fd = os.open(opts.report, flags, 0o600)
            try:
                os.write(fd, f"{stage}\t{code}\t{message}\n".encode(errors="replace"))
            finally:
                os.close(fd)
        except OSError:
            pass
    try:  # noqa: SIM105 - contextlib would cost start-up time
        os.write(2, f"trio-worker: {message}\n".encode(errors="replace"))
    except OSError:
        pass
    os._exit(status)


def _setup(opts: _Options) -> None:
    flags = 0
    if opts.pid or opts.mount:
        flags |= CLONE_NEWNS
    if opts.pid:
        flags |= CLONE_NEWPID
    if opts.network:
        flags |= CLONE_NEWNET
    unshare(flags)
    if flags & CLONE_NEWNS:
        # First, so none of our mounts can propagate back to the host.
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    if opts.network:
        _loopback_up()
    if opts.mount and not opts.pid:
        _mount_proc()  # with --pid, PID 1 mounts it: /proc shows the mounter's PID namespace


def _drop_to_user(opts: _Options) -> None:
    """Become the job's user: groups, gid, uid (in that order), for good."""
    if opts.user is None:
        return
    uid, gid, groups = opts.user
    # os.execvp imports this lazily; the user may not be able to read our files.
    import warnings  # noqa: F401

    if opts.report:  # the report file is where only root may write: open it now
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            opts.report_fd = os.open(opts.report, flags, 0o600)
        except OSError:
            pass
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        message = f"cannot switch to uid {uid}: {exc.strerror}"
        _fail(opts, "setup", exc.errno or 0, message, EXIT_SETUP_FAILED)
    # The working directory is entered with the user's rights (a given one only now,
    # the one inherited again).
    cwd = opts.cwd or "."
    try:
        cwd = opts.cwd or os.getcwd()
        os.chdir(cwd)
    except OSError as exc:
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        _fail(opts, "chdir", exc.errno or 0, f"{reason}: {cwd!r}", EXIT_EXEC_FAILED)


def _exec(opts: _Options) -> NoReturn:
    for sig in (*FORWARDED_SIGNALS, *_RESET_SIGNALS):
        signal.signal(sig, signal.SIG_DFL)
    _drop_to_user(opts)
    try:
        os.execvp(opts.command, opts.args)
    except OSError as exc:
        if exc.errno == errno.EACCES and _nowhere_on_path(opts.command):
            # A PATH directory this user may not search said EACCES: not found, as
            # bash and Go's LookPath say (the supervisor's ``setup_failure``, too).
            exc = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        elif exc.errno == errno.ENOENT and _command_there(opts.command):
            # There, with an interpreter (#!, ELF loader) that is not: not executable.
            reason = os.strerror(errno.ENOENT)
            message = f"bad interpreter: {reason}: {opts.command!r}"
            _fail(opts, "exec", errno.ENOEXEC, message, EXIT_EXEC_FAILED)
        status = EXIT_NOT_FOUND if exc.errno == errno.ENOENT else EXIT_EXEC_FAILED
        reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
        _fail(opts, "exec", exc.errno or 0, f"cannot execute {opts.command!r}: {reason}", status)


def _command_there(command: str) -> bool:
    """A file ``command`` names is there for this user (the path, or one on PATH)."""
    if "/" in command:
        return os.path.exists(command)
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return any(os.path.exists(os.path.join(d or ".", command)) for d in dirs)


def _nowhere_on_path(command: str) -> bool:
    """``command`` is searched on PATH and no directory of it shows this user such a file."""
    if "/" in command:
        return False
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return not any(os.path.lexists(os.path.join(d or ".", command)) for d in dirs)


class _Forwarder:
    """Signal handler passing signals on; queues them until there is a target."""

    def __init__(self) -> None:
        self.target = 0
        self.group = False
        self.pending: list[int] = []

    def install(self) -> None:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: object) -> None:
        if self.target == 0:
            self.pending.append(signum)
        else:
            self._send(signum)

    def _send(self, signum: int) -> None:
        try:
            if self.group:
                try:
                    os.killpg(self.target, signum)
                    return
                except ProcessLookupError:
                    pass  # a --tty command between fork and setsid: no group of its own yet
            os.kill(self.target, signum)
        except ProcessLookupError:
            pass

    def retarget(self, pid: int, *, group: bool) -> None:
        self.group = group
        self.target = pid
        while self.pending:
            self._send(self.pending.pop(0))


def _status_to_exit(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _init(opts: _Options, fwd: _Forwarder, alive_r: int, status_w: int) -> NoReturn:
    """PID 1 of the new namespace: mount /proc, run the command as PID 2, reap."""
    # Signals queued before the fork are the outer helper's to pass on (to us).
    fwd.target = 0
    fwd.pending.clear()
    try:
        # Out of the supervisor's process group: a group signal must reach the
        # command once (forwarded), not also directly past this init.
        os.setsid()
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            _raise_errno("prctl(PR_SET_PDEATHSIG)")
        # getppid() is 0 outside our namespace, so the outer helper's liveness is
        # read from a pipe it holds open: EOF means it died before prctl took hold.
        import select

        if select.select([alive_r], [], [], 0)[0]:
            os._exit(EXIT_SETUP_FAILED)
        os.close(alive_r)
        _mount_proc()
    except OSError as exc:
        _fail(opts, "setup", exc.errno or 0, f"cannot set up namespaces: {exc}", EXIT_SETUP_FAILED)
    command = os.fork()
    if command == 0:
        os.close(status_w)
        if opts.tty:
            _take_terminal(opts)
        else:
            os.setpgid(0, 0)
        _exec(opts)
    if not opts.tty:  # a group leader could not setsid: the --tty command makes its own
        try:  # noqa: SIM105 - contextlib would cost start-up time
            os.setpgid(command, command)
        except OSError:
            pass  # it did it itself and may have exec'd already
    fwd.retarget(command, group=True)
    while True:
        pid, status = os.wait()
        if pid == command:
            break
    os.write(status_w, status.to_bytes(4, "little", signed=True))
    # Leaving kills whatever else still runs in the namespace.
    os._exit(_status_to_exit(status))


def _take_terminal(opts: _Options) -> None:
    """Become a session leader with stdin (the job's terminal) as controlling terminal.

    The outer helper's session still holds the terminal: ``TIOCSCTTY`` with 1
    steals it, which needs CAP_SYS_ADMIN, so this runs before ``--user`` drops it.
    """
    import fcntl
    import termios

    try:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 1)
    except OSError as exc:
        message = f"cannot make the terminal the controlling terminal: {exc.strerror}"
        _fail(opts, "setup", exc.errno or 0, message, EXIT_SETUP_FAILED)


def _mirror(status: int) -> NoReturn:
    """End this process the way the command ended."""
    if os.WIFSIGNALED(status):
        import resource

        sig = os.WTERMSIG(status)
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the helper's core is of no use
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)
    os._exit(_status_to_exit(status))


def _run_pid_namespace(opts: _Options) -> NoReturn:
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    fwd = _Forwarder()
    fwd.install()  # before fork: a signal in between is queued, not lost
    try:
        init = os.fork()
    except OSError as exc:
        _fail(opts, "setup", exc.errno or 0, f"cannot fork PID 1: {exc}", EXIT_SETUP_FAILED)
    if init == 0:
        os.close(alive_w)
        os.close(status_r)
        _init(opts, fwd, alive_r, status_w)
    os.close(alive_r)
    os.close(status_w)
    fwd.retarget(init, group=False)
    _, status = os.waitpid(init, 0)
    reported = b""
    while chunk := os.read(status_r, 4):
        reported += chunk
    if len(reported) == 4:
        status = int.from_bytes(reported, "little", signed=True)
    _mirror(status)


def main(argv: list[str] | None = None) -> NoReturn:
    opts = _parse(sys.argv[1:] if argv is None else argv)
    try:
        _setup(opts)
    except OSError as exc:
        _fail(opts, "setup", exc.errno or 0, f"cannot set up namespaces: {exc}", EXIT_SETUP_FAILED)
    if opts.pid:
        _run_pid_namespace(opts)
    _exec(opts)


if __name__ == "__main__":
    main()
