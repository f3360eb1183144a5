"""The reaper: kills every job of a server that died, even by SIGKILL.

``python -I -S _reaper.py PARENT_DIR...`` — started by the supervisor, with its
stdin a pipe whose only writer is the server. It does nothing but wait on that
pipe:

* ``q`` (the server is shutting down cleanly, its jobs have ended): exit 0.
* end of file (the server is gone, however it died: the kernel closed its end):
  kill every job group ``job-*`` directly under the given parent groups — the
  server's own, one per hierarchy — with ``cgroup.kill``, or by freezing and
  SIGKILLing their processes; remove the emptied groups; exit.

So no job outlives its server, escapees (setsid, double fork) included, without
waiting for a restart. It can only touch the directories it was started with,
which are this server's parents (named after its state directory): never
another server's jobs. It ignores SIGINT, SIGTERM and SIGHUP and runs in a
session of its own, so a terminal's Ctrl-C or a signal to the server's group
cannot disarm it; only ``q`` or its work done ends it.

Standard library only (no package imports, no site): it costs an interpreter's
start-up and a few MiB, once per server. It prints ``ready`` once armed.
"""

from __future__ import annotations

# The C module behind ``signal``: no enum import (see _nsinit).
import _signal as signal  # type: ignore[import-not-found]
import contextlib
import os
import sys
import time

__all__ = ["QUIT", "kill_jobs", "main"]

#: What the server writes to make the reaper exit without killing anything.
QUIT = b"q"
_JOB_PREFIX = "job-"
#: How long to wait for a freeze, and for groups to empty before removing them.
_FREEZE_WAIT = 1.0
_EMPTY_WAIT = 2.0


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        return False
    return True


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _pids(group: str) -> list[int]:
    return [int(p) for p in _read(os.path.join(group, "cgroup.procs")).split()]


def _kill_pids(group: str) -> None:
    for pid in _pids(group):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _frozen(group: str, state: str) -> bool:
    if state.endswith("cgroup.freeze"):
        return "frozen 1" in _read(os.path.join(group, "cgroup.events"))
    return _read(state).strip() == "FROZEN"


def _kill_group(group: str) -> None:
    """Kill every process in ``group`` (and its subgroups) so none can fork meanwhile."""
    if _write(os.path.join(group, "cgroup.kill"), "1"):
        return
    if not _pids(group):
        return
    for name, freeze, thaw in (("cgroup.freeze", "1", "0"), ("freezer.state", "FROZEN", "THAWED")):
        state = os.path.join(group, name)
        if os.path.exists(state) and _write(state, freeze):
            deadline = time.monotonic() + _FREEZE_WAIT
            while not _frozen(group, state) and time.monotonic() < deadline:
                time.sleep(0.002)
            _kill_pids(group)
            _write(state, thaw)  # the SIGKILLs are delivered as they thaw
            return
    for _ in range(20):  # no freezer: kill in rounds, catching what was forked meanwhile
        if not _pids(group):
            return
        _kill_pids(group)
        time.sleep(0.005)


def _job_groups(parent: str) -> list[str]:
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return [
        os.path.join(parent, n)
        for n in names
        if n.startswith(_JOB_PREFIX) and os.path.isdir(os.path.join(parent, n))
    ]


def _remove(group: str) -> None:
    for sub, dirs, _ in os.walk(group, topdown=False):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(sub, name))
    with contextlib.suppress(OSError):
        os.rmdir(group)


def kill_jobs(parents: list[str]) -> int:
    """Kill and remove every job group under ``parents``; return how many there were.

    Groups with ``cgroup.kill`` go first: one write kills a whole job, and
    its other hierarchies' groups (hybrid hosts) then hold only the dying.
    """
    groups = [g for parent in parents for g in _job_groups(parent)]
    groups.sort(key=lambda g: not os.path.exists(os.path.join(g, "cgroup.kill")))
    for group in groups:
        _kill_group(group)
    deadline = time.monotonic() + _EMPTY_WAIT
    for group in groups:
        while _pids(group) and time.monotonic() < deadline:
            time.sleep(0.005)
        _remove(group)
    return len(groups)


def main(argv: list[str]) -> int:
    parents = [os.path.abspath(p) for p in argv]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)
    try:
        os.write(1, b"ready\n")
        os.close(1)
    except OSError:
        pass
    while True:
        try:
            data = os.read(0, 1)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if data == QUIT:
            return 0
        if not data:
            kill_jobs(parents)
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
