"""Namespaces and the parent-death signal, as the supervisor uses them.

The namespaces themselves are set up by a re-exec'd helper (``_nsinit``); this
module builds its command line, reads its failure report, and says what the
host lacks to isolate a job (``isolation_problems``).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._model import Isolation
from . import _nsinit
from ._spawn import Credentials

__all__ = [
    "EXIT_EXEC_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_SETUP_FAILED",
    "HELPER_PATH",
    "HelperFailure",
    "helper_argv",
    "helper_tasks",
    "isolation_problems",
    "read_report",
    "resolve_command",
]

EXIT_NOT_FOUND = _nsinit.EXIT_NOT_FOUND
EXIT_EXEC_FAILED = _nsinit.EXIT_EXEC_FAILED
EXIT_SETUP_FAILED = _nsinit.EXIT_SETUP_FAILED

#: The helper as a file: run as a script (not ``-m``) so that starting it does
#: not import the ``trio_worker`` package (and trio) — 20 ms instead of 200 ms.
HELPER_PATH = str(Path(_nsinit.__file__).resolve())

_CAP_SYS_ADMIN = 21


def helper_argv(
    isolation: Isolation,
    command: str,
    args: Sequence[str],
    *,
    report: str | os.PathLike[str] | None = None,
    user: Credentials | None = None,
    cwd: str | None = None,
    tty: bool = False,
) -> list[str]:
    """The argv that runs ``command args`` inside the namespaces ``isolation`` asks for.

    ``-I`` keeps the job's PYTHON* variables and the working directory away from
    the helper; ``-S`` skips site-packages (it needs only the standard library).
    With ``report``, a failed exec or setup is also written to that file (see
    ``read_report``), so a job that could not start is told apart from one
    that exited 126/127 on its own. With ``user``, the helper (started as root, to
    unshare) drops to those credentials right before it execs the command, and only
    then enters ``cwd`` (with the user's rights). ``tty``: stdin is the job's
    terminal, which the command must keep as its controlling terminal (with ``pid``,
    PID 1's own session would take it away).
    """
    argv = [sys.executable, "-I", "-S", HELPER_PATH]
    if isolation.pid:
        argv.append("--pid")
    if isolation.mount:
        argv.append("--mount")
    if isolation.network:
        argv.append("--network")
    if tty and isolation.pid:
        argv.append("--tty")
    if report is not None:
        argv += ["--report", os.fspath(report)]
    if user is not None:
        groups = ",".join(str(g) for g in user.groups)
        argv += ["--user", f"{user.uid}:{user.gid}:{groups}"]
        if cwd is not None:
            argv += ["--cwd", cwd]
    return [*argv, "--", command, *args]


def helper_tasks(isolation: Isolation) -> int:
    """Tasks the helper keeps alive in the job's cgroup (for ``pids`` accounting).

    With ``pid`` isolation the outer helper and PID 1 stay; otherwise the
    helper execs the command in place and costs nothing.
    """
    return 2 if isolation.pid else 0


@dataclass(frozen=True, slots=True)
class HelperFailure:
    """Why the helper could not run the command."""

    stage: str  # "exec", "setup" or "usage"
    errno: int
    message: str


def read_report(path: str | os.PathLike[str]) -> HelperFailure | None:
    """The failure the helper wrote to ``--report`` ``path``, or None if it wrote none."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return None
    if not text.strip():  # opened ahead (before dropping to a user), never written
        return None
    stage, _, rest = text.rstrip("\n").partition("\t")
    code, _, message = rest.partition("\t")
    try:
        number = int(code)
    except ValueError:
        number = 0
    return HelperFailure(stage, number, message or text.strip())


def _has_cap_sys_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def isolation_problems(isolation: Isolation) -> list[str]:
    """Why this host cannot give a job the namespaces ``isolation`` asks for, one line each."""
    if not isolation.any:
        return []
    wanted = [
        (name, ns)
        for name, ns, on in (
            ("pid", "pid", isolation.pid),
            ("mount", "mnt", isolation.mount),
            ("network", "net", isolation.network),
        )
        if on
    ]
    problems = []
    privileged = _has_cap_sys_admin()
    for name, ns in wanted:
        if not privileged:
            problems.append(f"{name} isolation needs CAP_SYS_ADMIN (run the server as root)")
        elif not os.path.exists(f"/proc/self/ns/{ns}"):
            problems.append(f"{name} isolation needs a kernel with {ns} namespaces")
    return problems


def resolve_command(command: str, path: str | None, cwd: str | None = None) -> str:
    """Find ``command`` as ``execvp`` would, raising the OSError exec would.

    With the helper in between, a missing command is only noticed after the
    helper started; resolving first lets the supervisor fail the start the
    same way as without isolation (FileNotFoundError, PermissionError, ...).
    """

    def check(candidate: str) -> str:
        full = os.path.join(cwd, candidate) if cwd and not os.path.isabs(candidate) else candidate
        st = os.stat(full)
        if stat.S_ISDIR(st.st_mode):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), candidate)
        if not os.access(full, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), candidate)
        return candidate

    if "/" in command:
        return check(command)
    saved: OSError | None = None
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", command)
        try:
            return check(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            saved = saved or exc
    if saved is not None:
        raise saved
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command)
