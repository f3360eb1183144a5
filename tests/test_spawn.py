"""The spawn mechanism (``_host._spawn``, ``JobProcess.spawn``) with real processes.

Each promise of a job's start is checked from inside the command: its cgroup
before its first instruction, its process group or session and terminal, its
user and groups, its stdin, its signal dispositions and descriptors; and from
outside: exact exit and signal status, failures in words, death with its parent.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pty
import pwd
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trio_worker._host import _cspawn
from trio_worker._host._cgroups import JobCgroup
from trio_worker._host._spawn import (
    ChildSetupError,
    Credentials,
    Stage,
    Stdin,
    Terminal,
    raise_nofile_limit,
    spawn,
)
from trio_worker._jobs._process import JobProcess, SpawnError, SpawnOptions, StartSpec

from .conftest import process_alive, require_root

REPO = Path(__file__).resolve().parent.parent


def _run(argv: list[str], **kwargs: object) -> tuple[int, bytes]:
    """Spawn ``argv`` with stdout+stderr on one pipe; (exit code, output)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        pid = spawn(
            argv[0],
            argv,
            dict(os.environ),
            None,
            stdin=os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC),
            stdout=write_fd,
            stderr=write_fd,
            **kwargs,  # type: ignore[arg-type]
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output


def _stat_fields(text: bytes) -> list[str]:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, tty_nr..."""
    return text.decode().rsplit(")", 1)[1].split()


def test_exit_code_is_exact() -> None:
    assert _run(["sh", "-c", "exit 3"])[0] == 3
    assert _run(["true"])[0] == 0


def test_death_by_signal_is_reported_as_the_signal() -> None:
    assert _run(["sh", "-c", "kill -TERM $$"])[0] == -signal.SIGTERM
    assert _run(["sh", "-c", "kill -KILL $$"])[0] == -signal.SIGKILL


def test_command_leads_a_process_group_of_its_own_in_the_servers_session() -> None:
    code, out = _run(["cat", "/proc/self/stat"])
    assert code == 0
    fields = _stat_fields(out)
    pid, pgrp, session = int(out.split()[0]), int(fields[2]), int(fields[3])
    assert pgrp == pid
    assert session == os.getsid(0) != pid


def test_missing_command_is_enoent_in_words() -> None:
    with pytest.raises(ChildSetupError) as info:
        _run(["no-such-command-" + secrets.token_hex(4)])
    assert info.value.stage is Stage.EXEC
    assert info.value.errno == errno.ENOENT
    spec = StartSpec("no-such-command-xyz", (), dict(os.environ), None)
    with pytest.raises(SpawnError) as failed:
        JobProcess.spawn(spec)
    assert failed.value.message == "No such file or directory: 'no-such-command-xyz'"
    assert failed.value.errno == errno.ENOENT


def test_not_executable_is_eacces_in_words(tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    spec = StartSpec(str(script), (), dict(os.environ), None)
    with pytest.raises(SpawnError) as failed:
        JobProcess.spawn(spec)
    assert failed.value.message == f"Permission denied: {str(script)!r}"
    assert failed.value.errno == errno.EACCES


def test_path_search_skips_unusable_entries_like_execvp(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    env = {"PATH": f"{tmp_path / 'nope'}:{tmp_path / 'bin'}:/usr/bin:/bin"}
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    pid = spawn("echo", ["echo", "found"], env, None, stdin=0, stdout=write_fd, stderr=2)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        assert pipe.read() == b"found\n"
    os.waitpid(pid, 0)


def test_missing_cwd_fails_in_words(tmp_path: Path) -> None:
    spec = StartSpec("true", (), dict(os.environ), str(tmp_path / "gone"))
    with pytest.raises(SpawnError, match=r"No such file or directory: '.*gone'"):
        JobProcess.spawn(spec)


def test_only_stdin_stdout_stderr_are_inherited() -> None:
    leaked = os.open(os.devnull, os.O_RDONLY)  # inheritable on purpose
    try:
        os.set_inheritable(leaked, True)
        code, out = _run(["ls", "/proc/self/fd"])
    finally:
        os.close(leaked)
    assert code == 0
    assert out.split() == [b"0", b"1", b"2", b"3"]  # 3 is ls's own directory


def test_signal_dispositions_and_mask_are_the_defaults() -> None:
    # The server ignores SIGPIPE (Python does); a job must not inherit that.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    code, out = _run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    assert code == 0
    assert out.split() == [b"SigBlk:", b"0" * 16, b"SigIgn:", b"0" * 16]


def test_job_gets_the_fd_limit_the_server_started_with() -> None:
    code, out = _run(["sh", "-c", "ulimit -Sn"], nofile_soft=321)
    assert code == 0
    assert out == b"321\n"


def test_raise_nofile_limit_reaches_the_hard_limit() -> None:
    script = (
        "import resource\n"
        "from trio_worker._host._spawn import raise_nofile_limit\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 4096))\n"
        "old = raise_nofile_limit()\n"
        "print(old, *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout
    assert out.split() == ["100", "4096", "4096"]
    assert callable(raise_nofile_limit)


# -- stdin -----------------------------------------------------------------------


async def test_stdin_pipe_gives_the_parent_the_write_end() -> None:
    spec = StartSpec("cat", (), dict(os.environ), None)
    process = JobProcess.spawn(spec, options=SpawnOptions(stdin=Stdin.PIPE))
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        os.write(process.stdin, b"hello\n")
        os.close(process.stdin)
        process.stdin = None
        out = b""
        os.set_blocking(process.stdout.fd, True)
        while chunk := os.read(process.stdout.fd, 100):
            out += chunk
        assert out == b"hello\n"
    finally:
        await process.wait_exited()
        code = process.reap()
        process.close_pipes()
    assert code == 0


def test_default_stdin_is_dev_null() -> None:
    code, out = _run(["sh", "-c", "readlink /proc/self/fd/0; cat"])
    assert (code, out) == (0, b"/dev/null\n")


def test_terminal_is_stdio_and_controlling_terminal_in_a_new_session() -> None:
    master, slave = pty.openpty()
    try:
        script = (
            "cat /proc/self/stat; echo; stty size; "
            "test -t 0 && test -t 1 && test -t 2 && echo all-tty; readlink /proc/self/fd/0"
        )
        spec = StartSpec("sh", ("-c", script), dict(os.environ), None)
        process = JobProcess.spawn(
            spec, options=SpawnOptions(stdin=Terminal(slave, rows=40, cols=123))
        )
        os.close(slave)
        slave = -1
        assert process.stdout is None
        assert process.stderr is None
        assert process.stdin is None
        out = b""
        with contextlib.suppress(OSError):  # EIO once the slave side is closed
            while chunk := os.read(master, 4096):
                out += chunk
        _, status = os.waitpid(process.pid, 0)
        process.close_pipes()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert os.waitstatus_to_exitcode(status) == 0
    lines = out.replace(b"\r\n", b"\n").split(b"\n")
    fields = _stat_fields(lines[0])
    pid = int(lines[0].split()[0])
    sh_pid = process.pid
    assert pid != sh_pid
    assert int(fields[3]) == sh_pid  # the job leads a session...
    assert int(fields[2]) == sh_pid  # ...and its group (sh -c does no job control)
    assert int(fields[4]) != 0  # a controlling terminal
    assert b"40 123" in lines
    assert b"all-tty" in lines
    assert any(line.startswith(b"/dev/pts/") for line in lines)


# -- users -------------------------------------------------------------------------


@pytest.fixture
def unix_user() -> Iterator[tuple[str, int, int, int]]:
    """A fresh user and an extra group: (name, uid, gid, extra gid); removed afterwards."""
    require_root("creating users")
    name = "tw" + secrets.token_hex(5)
    extra = name + "x"
    subprocess.run(["groupadd", extra], check=True)
    try:
        subprocess.run(["useradd", "--no-create-home", "-G", extra, name], check=True)
        try:
            entry = pwd.getpwnam(name)
            yield name, entry.pw_uid, entry.pw_gid, grp.getgrnam(extra).gr_gid
        finally:
            subprocess.run(["userdel", name], check=False)
    finally:
        subprocess.run(["groupdel", extra], check=False)


def test_command_runs_as_the_given_user_and_groups(
    unix_user: tuple[str, int, int, int],
) -> None:
    _, uid, gid, extra = unix_user
    code, out = _run(
        ["sh", "-c", "id -u; id -g; id -G; grep -E '^(Uid|Gid)' /proc/self/status"],
        user=Credentials(uid, gid, (gid, extra)),
    )
    assert code == 0, out
    lines = out.decode().splitlines()
    assert lines[0] == str(uid)
    assert lines[1] == str(gid)
    assert sorted(map(int, lines[2].split())) == sorted({gid, extra})
    assert lines[3].split()[1:] == [str(uid)] * 4  # real, effective, saved, fs
    assert lines[4].split()[1:] == [str(gid)] * 4


def test_no_supplementary_groups_of_the_server_leak_to_the_user(
    unix_user: tuple[str, int, int, int],
) -> None:
    _, uid, gid, _ = unix_user
    code, out = _run(["id", "-G"], user=Credentials(uid, gid))
    assert code == 0
    assert out.split() == [str(gid).encode()]


def test_user_keeps_the_parent_death_signal(unix_user: tuple[str, int, int, int]) -> None:
    # setuid clears PR_SET_PDEATHSIG: it has to be armed after the switch.
    _, uid, gid, _ = unix_user
    _check_dies_with_parent(user=(uid, gid))


# -- cgroups, PDEATHSIG ------------------------------------------------------------------


def test_command_is_in_its_cgroup_before_its_first_instruction(
    job_group: tuple[list[int], JobCgroup],
) -> None:
    fds, group = job_group
    # cat's own reading of /proc/self/cgroup is its first act.
    code, out = _run(["cat", "/proc/self/cgroup"], cgroup_fds=fds)
    assert code == 0
    lines = out.decode().splitlines()
    assert group.path is not None
    in_group = [line for line in lines if line.endswith("/" + group.path.name)]
    assert len(in_group) == len(group.dirs), lines


def test_failed_cgroup_join_runs_nothing_and_says_which(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    not_procs = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(ChildSetupError) as info:
            _run(["touch", str(marker)], cgroup_fds=[not_procs])
    finally:
        os.close(not_procs)
    assert info.value.stage is Stage.CGROUP
    assert info.value.index == 0
    assert not marker.exists()


def test_a_directory_clone3_cannot_enter_is_joined_by_its_cgroup_procs(tmp_path: Path) -> None:
    # A v2 group is passed as its directory, for clone3 to put the child in it. Where
    # clone3 refuses (here: no cgroup at all, as on a kernel without CLONE_INTO_CGROUP),
    # the child writes to the directory's cgroup.procs before anything runs, as for v1.
    (tmp_path / "cgroup.procs").write_bytes(b"")
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        code, _ = _run(["true"], cgroup_fds=[directory])
    finally:
        os.close(directory)
    assert code == 0
    assert (tmp_path / "cgroup.procs").read_bytes() == b"0"


def test_child_whose_parent_is_already_gone_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    # As if our parent had died before PR_SET_PDEATHSIG took hold: the
    # expected parent pid does not match.
    pid, stage, code, _ = _cspawn.spawn(
        [b"/usr/bin/touch", b"/bin/touch"],
        [b"touch", os.fsencode(marker)],
        [],
        None,
        0,
        1,
        2,
        [],
        False,
        False,
        -1,
        -1,
        None,
        signal.SIGKILL,
        1,
        -1,
    )
    assert (pid, Stage(stage), code) == (-1, Stage.PARENT_GONE, errno.ESRCH)
    assert not marker.exists()


_PARENT = """
import os, sys, time
from trio_worker._host._spawn import Credentials, spawn
user = Credentials(int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 1 else None
pid = spawn("sleep", ["sleep", "60"], dict(os.environ), None, stdin=0, stdout=2, stderr=2,
            user=user)
print(pid, flush=True)
time.sleep(60)
"""


def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _check_dies_with_parent(user: tuple[int, int] | None = None) -> None:
    argv = [sys.executable, "-c", _PARENT, *(map(str, user) if user else ())]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)
    child = -1
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert process_alive(child)
        parent.kill()  # the "server" crashes
        parent.wait()
        _wait_until(lambda: not process_alive(child))
    finally:
        if child > 0 and process_alive(child):
            os.kill(child, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()


def test_command_dies_with_its_parent() -> None:
    _check_dies_with_parent()


def test_switching_user_in_the_child_leaves_the_servers_threads_alone(
    unix_user: tuple[str, int, int, int],
) -> None:
    # glibc's setuid family broadcasts to every thread of a multi-threaded process;
    # a vfork child shares the server's memory, so it must use the raw system calls.
    _, uid, gid, extra = unix_user
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        code, _ = _run(["true"], user=Credentials(uid, gid, (extra,)))
        assert code == 0
        for task in Path("/proc/self/task").iterdir():
            status = (task / "status").read_text().splitlines()
            uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
            gids = next(line for line in status if line.startswith("Gid:")).split()[1:]
            assert uids == [str(os.getuid())] * 4, (task.name, uids)
            assert gids == [str(os.getgid())] * 4, (task.name, gids)
        assert os.geteuid() == 0
    finally:
        stop.set()
        worker.join()


# -- the GIL while the child is on its way to exec ---------------------------------------

_STUCK_CHILD = """
import fcntl, os, threading
from trio_worker._host._spawn import spawn
# A full pipe stands in for a cgroup.procs file: the child blocks writing "0" to it,
# before its exec, so the spawning thread stays suspended until we drain it.
r, w = os.pipe()
os.set_blocking(w, False)
try:
    while True:
        os.write(w, b"x" * 4096)
except BlockingIOError:
    pass
os.set_blocking(w, True)
result = []
def run():
    result.append(spawn("true", ["true"], dict(os.environ), None,
                        stdin=0, stdout=1, stderr=2, cgroup_fds=[w]))
t = threading.Thread(target=run)
t.start()
# Only this thread can let the child go on: if the spawning thread held the GIL,
# nothing below would ever run.
os.set_blocking(r, False)
while t.is_alive():
    try:
        os.read(r, 1 << 16)
    except BlockingIOError:
        pass
t.join()
os.waitpid(result[0], 0)
print("ok", flush=True)
"""


def test_other_threads_run_while_the_spawning_thread_waits_for_the_child() -> None:
    # The supervisor spawns from a worker thread so the event loop goes on meanwhile:
    # that only helps if the extension lets go of the GIL. (The timeout only guards
    # against the deadlock this test exists to catch.)
    out = subprocess.run(
        [sys.executable, "-c", _STUCK_CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
