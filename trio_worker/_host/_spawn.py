"""Start a process the way a job needs it, without forking the server.

``spawn`` calls the ``_cspawn`` extension: vfork, then in the child (on data
prepared here) join the cgroups, make a process group or a session with a
controlling terminal, set up stdin/stdout/stderr, drop to a user, chdir, arm
PR_SET_PDEATHSIG, exec. The parent thread is suspended only until the exec
(measured: see ARCHITECTURE.md), where ``subprocess.Popen(preexec_fn=...)``
copied the server's page tables with a full ``fork()`` for 3-9 ms.

This module knows processes and file descriptors, nothing of jobs.
"""

from __future__ import annotations

import enum
import errno as _errno
import os
import resource
import signal
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import final

try:
    from . import _cspawn
except ImportError as exc:  # pragma: no cover - a source tree nobody built
    raise ImportError(
        "trio_worker's spawn extension is not built; run `pip install -e .` "
        f"(or `pip install .`) in the project ({exc})"
    ) from exc

__all__ = [
    "ChildSetupError",
    "Credentials",
    "Environment",
    "Seed",
    "Stage",
    "Stdin",
    "Terminal",
    "exec_candidates",
    "raise_nofile_limit",
    "release_seed_slots",
    "spawn",
]


@final
@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a command runs as: set with setgroups, setgid, setuid (in that order)."""

    uid: int
    gid: int
    #: Supplementary groups (``setgroups``); empty means none at all.
    groups: tuple[int, ...] = ()


class Stdin(enum.Enum):
    """Where a command's stdin comes from, short of a terminal."""

    NULL = "null"  # /dev/null
    PIPE = "pipe"  # a pipe; the parent keeps the write end


@final
@dataclass(frozen=True, slots=True)
class Terminal:
    """A pseudo-terminal for the command.

    ``slave_fd`` becomes its stdin, stdout and stderr and its controlling
    terminal, in a new session (so its process group is its session). The
    caller keeps the master and owns both fds; ``rows`` x ``cols`` is the
    initial window size.
    """

    slave_fd: int
    rows: int = 24
    cols: int = 80


class Stage(enum.IntEnum):
    """What the child was doing when it failed (mirrors ``_cspawn.c``)."""

    CGROUP = 1
    SESSION = 2
    TTY = 3
    FDS = 4
    SETGROUPS = 5
    SETGID = 6
    SETUID = 7
    CHDIR = 8
    PDEATHSIG = 9
    PARENT_GONE = 10
    EXEC = 11
    RLIMIT = 12
    #: A seed that died before it could say why (killed from outside).
    LOST = -1


class ChildSetupError(OSError):
    """The child failed before or at exec; it is already reaped.

    ``stage`` says which step, ``index`` which cgroup fd (for ``Stage.CGROUP``).
    """

    def __init__(self, stage: Stage, errno: int, index: int, filename: str | None) -> None:
        super().__init__(errno, os.strerror(errno), filename)
        self.stage = stage
        self.index = index


def exec_candidates(command: str, path: str | None) -> list[bytes]:
    """The files ``execvp`` would try for ``command`` with ``PATH`` ``path``, in order."""
    return _candidates(os.fsencode(command), _search_dirs(path))


def _search_dirs(path: str | None) -> tuple[bytes, ...]:
    """``PATH``'s directories as ``execvp`` joins a name to them (an empty one is ".")."""
    dirs = (path if path is not None else os.defpath).split(os.pathsep)
    return tuple(os.path.join(os.fsencode(d) or b".", b"") for d in dirs)


def _candidates(name: bytes, dirs: tuple[bytes, ...]) -> list[bytes]:
    return [name] if b"/" in name else [d + name for d in dirs]


def _entry(key: str, value: str) -> bytes:
    return os.fsencode(f"{key}={value}")


@final
class Environment(Mapping[str, str]):
    """A process's environment with each ``KEY=value`` encoded for ``execve`` once.

    Every job's environment is the server's (here ~36 variables, 1.2 KiB) plus the
    request's few: encoding all of it for each Start, once to count its exec size and
    once for the child's envp, and splitting ``PATH`` for the command's lookup, cost the
    loop ~65 us of a Start (20 + 19 + 27 us alone). ``updated`` encodes only what a
    Start adds; the server's part and its ``PATH`` search list are shared.
    """

    __slots__ = ("_dirs", "_entries", "_sizes", "_vars")

    def __init__(self, variables: Mapping[str, str]) -> None:
        self._vars: dict[str, str] = dict(variables)
        #: key -> b"key=value", in the variables' order (``envp``).
        self._entries: dict[str, bytes] = {k: _entry(k, v) for k, v in self._vars.items()}
        self._dirs: tuple[bytes, ...] | None = None
        self._sizes: tuple[int, int, int] | None = None

    def updated(self, more: Mapping[str, str]) -> Environment:
        """This environment with ``more`` on top (a key of ours keeps its place)."""
        if not more:
            return self
        env = Environment.__new__(Environment)
        env._vars = {**self._vars, **more}
        env._entries = {**self._entries, **{k: _entry(k, v) for k, v in more.items()}}
        env._dirs = None if "PATH" in more else self._dirs
        env._sizes = None
        return env

    @property
    def envp(self) -> list[bytes]:
        """``execve``'s environment: ``key=value`` strings (without their NULs)."""
        return list(self._entries.values())

    def exec_strings(self) -> tuple[int, int, int]:
        """(how many, their bytes, the longest), each string with its NUL, as
        ``execve`` counts them."""
        sizes = self._sizes
        if sizes is None:
            entries = self._entries.values()
            n = len(entries)
            sizes = self._sizes = (
                (n, sum(map(len, entries)) + n, max(map(len, entries)) + 1) if n else (0, 0, 0)
            )
        return sizes

    def candidates(self, command: str) -> list[bytes]:
        """``exec_candidates(command, self.get("PATH"))``, the search list made once."""
        dirs = self._dirs
        if dirs is None:
            dirs = self._dirs = _search_dirs(self._vars.get("PATH"))
        return _candidates(os.fsencode(command), dirs)

    def __getitem__(self, key: str) -> str:
        return self._vars[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vars)

    def __len__(self) -> int:
        return len(self._vars)

    def __repr__(self) -> str:
        return f"Environment({len(self._vars)} variables)"


def _exec_env(command: str, env: Mapping[str, str]) -> tuple[list[bytes], list[bytes]]:
    """(the files to try for ``command``, the envp) for ``env``."""
    if isinstance(env, Environment):
        return env.candidates(command), env.envp
    return exec_candidates(command, env.get("PATH")), [_entry(k, v) for k, v in env.items()]


def spawn(
    command: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    *,
    stdin: int,
    stdout: int,
    stderr: int,
    cgroup_fds: Sequence[int] = (),
    terminal: bool = False,
    user: Credentials | None = None,
    pdeathsig: int = signal.SIGKILL,
    nofile_soft: int | None = None,
) -> int:
    """Start ``command`` (looked up in ``env``'s PATH) and return its pid.

    The child joins the cgroups whose ``cgroup.procs`` files ``cgroup_fds``
    are open on (before it runs anything of the command), gets a process
    group of its own — or, with ``terminal``, a session whose controlling
    terminal is ``stdin`` — and dies with the calling *thread* (PDEATHSIG):
    call this from the thread that lives as long as the jobs (the event loop).
    ``nofile_soft`` lowers the child's soft RLIMIT_NOFILE (see
    ``raise_nofile_limit``).
    Raises ``ChildSetupError`` (the child failed, already reaped) or
    ``OSError`` (vfork failed: EAGAIN, ENOMEM).
    """
    candidates, envp = _exec_env(command, env)
    pid, stage, code, index = _cspawn.spawn(
        candidates,
        [os.fsencode(a) for a in argv],
        envp,
        os.fsencode(cwd) if cwd is not None else None,
        stdin,
        stdout,
        stderr,
        cgroup_fds,
        terminal,
        terminal,
        user.uid if user is not None else -1,
        user.gid if user is not None else -1,
        user.groups if user is not None else None,
        pdeathsig,
        os.getpid(),
        nofile_soft if nofile_soft is not None else -1,
    )
    if stage:
        where = Stage(stage)
        filename = command if where is Stage.EXEC else cwd if where is Stage.CHDIR else None
        raise ChildSetupError(where, code or _errno.EIO, index, filename)
    return pid


def release_seed_slots() -> None:
    """Close the low descriptors that seeds' births hold between births (blocking
    while one is under way): a seed is born sharing the server's descriptor table and
    takes a copy of only those below the highest of them, where its own are put
    (``_cspawn.c``, ``seed_slots_take``). For a supervisor's end; the next birth
    reserves them again."""
    _cspawn.release_seed_slots()


#: clone3 refused so (seccomp, sandboxes, kernels before 5.7): no seeds on this host.
SEEDS_REFUSED = frozenset({_errno.ENOSYS, _errno.EPERM, _errno.EINVAL, _errno.E2BIG})


@final
class Seed:
    """A job's process made before its Start: born in the job's cgroups, in its own
    process group, with its stdin/stdout/stderr, blocked until ``go`` gives it a command.

    What a spawn does before the exec then happens ahead of need (off the Start's
    path, in the thread that makes places): the clone, every ``cgroup.procs`` write
    (7.8 ms cold: an RCU grace period), the pipes' setup. ``go`` costs the caller
    a copy of the command into memory the child shares and a one-byte write; the
    child switches user, enters ``cwd``, resets signals and execs. ``report_fd``
    turns readable when ``poll`` has news: EOF (the exec happened) or a failure.

    The child is a ``clone(CLONE_VM)`` without ``CLONE_VFORK`` making raw system
    calls only (see ``_cspawn.c``); if the server dies, EOF on its go pipe ends it.
    An unused seed must be ``kill``ed (blocking: it reaps). x86-64 only:
    ``plant`` raises ``OSError`` (ENOSYS) elsewhere, and where clone3 is refused
    (``SEEDS_REFUSED``).
    """

    __slots__ = ("_c", "_outcome", "pidfd")

    def __init__(self, c: _cspawn.Seed, pidfd: int) -> None:
        self._c = c
        self.pidfd = pidfd
        self._outcome: tuple[int, int, int] | None = None

    @classmethod
    def plant(
        cls,
        cgroup_fds: Sequence[int],
        *,
        stdin: int,
        stdout: int,
        stderr: int,
        nofile_soft: int | None = None,
    ) -> Seed:
        """Clone the seed (it joins the groups of ``cgroup_fds`` as ``spawn``'s child
        does); the caller closes its copies of every fd given. ``OSError`` if not.
        Returns once the seed holds none of this process's other descriptors (it was
        cloned sharing this process's table and made its own with copies of those
        below the births' slots, where its own are: the state directory's lock may be
        among them; see ``release_seed_slots``)."""
        if not getattr(_cspawn, "HAVE_SEED", 0):  # another architecture (or a stale build)
            raise OSError(_errno.ENOSYS, "seeds are not built for this machine")
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        max_fd = 65535 if limit == resource.RLIM_INFINITY else min(limit, 1 << 20)
        c = _cspawn.Seed(
            list(cgroup_fds),
            stdin,
            stdout,
            stderr,
            nofile_soft if nofile_soft is not None else -1,
            max_fd,
        )
        try:
            pidfd = os.pidfd_open(c.pid)
        except BaseException:
            c.kill()
            raise
        return cls(c, pidfd)

    @property
    def pid(self) -> int:
        return self._c.pid

    @property
    def fds(self) -> list[int]:
        """The descriptors this seed holds in the server (its go and report pipes, pidfd)."""
        return [fd for fd in (self._c.go_fd, self._c.report_fd, self.pidfd) if fd >= 0]

    @property
    def report_fd(self) -> int:
        """Readable once ``poll`` may be True (-1 after)."""
        return self._c.report_fd

    def go(
        self,
        command: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        *,
        user: Credentials | None = None,
        pdeathsig: int = 0,
    ) -> None:
        """Run ``command`` (looked up in ``env``'s PATH, as ``spawn``); no wait.

        ``pdeathsig`` fires when the thread that *planted* the seed exits: 0
        unless that is the event loop's. ``OSError`` (ENOMEM) leaves the seed
        waiting, ``BrokenPipeError`` says it died before its command (killed from
        outside: nothing ran); either way it is to be ``kill``ed.
        """
        candidates, envp = _exec_env(command, env)
        self._c.go(
            candidates,
            [os.fsencode(a) for a in argv],
            envp,
            os.fsencode(cwd) if cwd is not None else None,
            user.uid if user is not None else -1,
            user.gid if user is not None else -1,
            user.groups if user is not None else None,
            pdeathsig,
            os.getpid(),
        )

    def poll(self) -> bool:
        """True once the outcome is known (``error`` says it); never blocks."""
        if self._outcome is None:
            self._outcome = self._c.collect()
        return self._outcome is not None

    def stopped(self) -> bool:
        """Whether the seed is stopped now (``kill -STOP`` from outside): it cannot exec
        until continued. One ``waitid`` that consumes nothing (``WNOWAIT``)."""
        if self.pidfd < 0:
            return False
        try:
            info = os.waitid(os.P_PIDFD, self.pidfd, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is not None and info.si_code == os.CLD_STOPPED

    def error(self, command: str, cwd: str | None) -> ChildSetupError | None:
        """None if the command was exec'd, else what failed (after ``poll``)."""
        assert self._outcome is not None
        stage, code, index = self._outcome
        if stage == 0:
            return None
        where = Stage(stage)
        filename = command if where is Stage.EXEC else cwd if where is Stage.CHDIR else None
        return ChildSetupError(where, code or _errno.EIO, index, filename)

    def reap(self) -> int:
        """The exit status of a seed that failed (call when ``pidfd`` is readable)."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pidfd = -1
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        """SIGKILL and reap an unused seed, close its fds (blocking, briefly)."""
        self._c.kill()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the old soft one.

    A stock host gives 1,024, which caps a server at about 340 jobs (two pipes
    and a pidfd each; a log holds its files only while it writes): its hard
    limit, 4,096 by default, lets 1,000 run. Jobs get the old soft limit back
    at spawn (``nofile_soft``): programs that size tables by it, or still use
    ``select``, keep working.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY:
        return soft
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft
