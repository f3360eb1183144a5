"""Namespaces through the ``_nsinit`` helper, and PR_SET_PDEATHSIG.

Jobs are started under ``helper_argv(...)`` in a new process group; tests
that need the parent-death signal spawn the way the supervisor does
(``_host._spawn``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trio_worker._errors import Unenforceable
from trio_worker._host import _isolation
from trio_worker._host._cgroups import detect
from trio_worker._host._enforce import check_enforceable
from trio_worker._host._isolation import (
    EXIT_EXEC_FAILED,
    EXIT_NOT_FOUND,
    EXIT_SETUP_FAILED,
    HELPER_PATH,
    HelperFailure,
    helper_argv,
    helper_tasks,
    isolation_problems,
    read_report,
    resolve_command,
)
from trio_worker._model import Isolation, Limits

from .conftest import cgroup_parent, joining, process_alive, require_root

REPO = Path(__file__).resolve().parent.parent

ISOLATIONS = [
    pytest.param(Isolation(pid=True), id="pid"),
    pytest.param(Isolation(mount=True), id="mount"),
    pytest.param(Isolation(network=True), id="network"),
    pytest.param(Isolation(pid=True, mount=True, network=True), id="all"),
]


@pytest.fixture
def run() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start a command under the helper; every process is killed and reaped afterwards."""
    require_root("namespaces")
    started: list[subprocess.Popen[bytes]] = []

    def start(
        isolation: Isolation, command: str, *args: str, report: Path | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            helper_argv(isolation, command, args, report=report),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            process_group=0,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def finish(proc: subprocess.Popen[bytes], timeout: float = 10) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- unit: argv, reports, command lookup, capability check ---------------------


def test_helper_argv_runs_the_script_isolated() -> None:
    argv = helper_argv(Isolation(pid=True, network=True), "ls", ["-l", "--"], report="/r")
    assert argv == [
        sys.executable,
        "-I",
        "-S",
        HELPER_PATH,
        "--pid",
        "--network",
        "--report",
        "/r",
        "--",
        "ls",
        "-l",
        "--",
    ]
    assert Path(HELPER_PATH).name == "_nsinit.py"
    assert helper_tasks(Isolation(pid=True)) == 2
    assert helper_tasks(Isolation(mount=True, network=True)) == 0


def test_read_report(tmp_path: Path) -> None:
    assert read_report(tmp_path / "none") is None
    (tmp_path / "r").write_text("exec\t2\tcannot execute 'x': No such file or directory\n")
    assert read_report(tmp_path / "r") == HelperFailure(
        "exec", errno.ENOENT, "cannot execute 'x': No such file or directory"
    )


def test_resolve_command(tmp_path: Path) -> None:
    (tmp_path / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "tool").chmod(0o755)
    (tmp_path / "data").write_text("")
    assert resolve_command("tool", f"/nonexistent:{tmp_path}") == str(tmp_path / "tool")
    assert resolve_command("./tool", None, str(tmp_path)) == "./tool"
    with pytest.raises(FileNotFoundError):
        resolve_command("no-such-tool-here", str(tmp_path))
    with pytest.raises(PermissionError):
        resolve_command("data", str(tmp_path))
    with pytest.raises(PermissionError):
        resolve_command(str(tmp_path), None)


def test_isolation_without_privilege_is_unenforceable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isolation_problems(Isolation()) == []
    monkeypatch.setattr(_isolation, "_has_cap_sys_admin", lambda: False)
    assert isolation_problems(Isolation()) == []  # nothing asked, nothing missing
    assert isolation_problems(Isolation(pid=True, network=True)) == [
        "pid isolation needs CAP_SYS_ADMIN (run the server as root)",
        "network isolation needs CAP_SYS_ADMIN (run the server as root)",
    ]
    no_cgroups = detect(root=Path("/nonexistent"))
    with pytest.raises(Unenforceable) as info:
        check_enforceable(no_cgroups, Limits(pids=3), Isolation(mount=True))
    # One answer names every reason: the limits' and the namespaces'.
    assert "pids limit" in str(info.value)
    assert "mount isolation needs CAP_SYS_ADMIN" in str(info.value)


def test_isolation_as_root_is_enforceable() -> None:
    require_root("namespaces")
    assert isolation_problems(Isolation(pid=True, mount=True, network=True)) == []


# -- namespaces --------------------------------------------------------------


def test_pid_namespace_command_is_pid_2_with_a_private_proc(
    run: Callable[..., subprocess.Popen[bytes]],
) -> None:
    code, out, err = finish(
        run(Isolation(pid=True), "sh", "-c", "echo $$; cat /proc/1/cmdline; echo; ls /proc")
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2"  # PID 1 is the helper's init
    assert "_nsinit" in lines[1]
    pids = {int(name) for name in lines[2:] if name.isdigit()}
    # init, sh, then cat and ls (3, 4) have run: nothing of the host is visible.
    assert {1, 2} <= pids <= {1, 2, 3, 4}, pids
    assert Path(f"/proc/{os.getpid()}").exists()  # the host's /proc is untouched


def test_pid_namespace_init_reaps_orphans(run: Callable[..., subprocess.Popen[bytes]]) -> None:
    script = "(sleep 0.1 &); sleep 0.5; cat /proc/[0-9]*/stat"
    code, out, err = finish(run(Isolation(pid=True), "sh", "-c", script))
    assert code == 0, err
    states = [line.rsplit(")", 1)[1].split()[0] for line in out.splitlines()]
    assert states
    assert "Z" not in states


def test_network_namespace_has_only_lo_and_it_is_up(
    run: Callable[..., subprocess.Popen[bytes]],
) -> None:
    probe = textwrap.dedent(
        """
        import fcntl, socket, struct
        print(open("/proc/net/dev").read().split("\\n", 2)[2].split())
        print(sorted(name for _, name in socket.if_nameindex()))
        with socket.socket() as s:
            req = fcntl.ioctl(s, 0x8913, struct.pack("16sH22x", b"lo", 0))
            print("up" if struct.unpack("16sH22x", req)[1] & 1 else "down")
        with socket.create_server(("127.0.0.1", 0)) as server:
            socket.create_connection(server.getsockname()).close()
            print("loopback works")
        """
    )
    code, out, err = finish(run(Isolation(network=True), sys.executable, "-I", "-c", probe))
    assert code == 0, err
    devices, names, state, works = out.splitlines()
    assert devices.startswith("['lo:'")
    assert devices.count(":") == 1
    assert names == "['lo']"
    assert state == "up"
    assert works == "loopback works"


@pytest.mark.parametrize(
    "isolation",
    [pytest.param(Isolation(mount=True), id="mount"), pytest.param(Isolation(pid=True), id="pid")],
)
def test_mount_namespace_leaves_host_mounts_untouched(
    run: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, isolation: Isolation
) -> None:
    def host_mounts() -> set[str]:
        # Only what this test could disturb: other sessions may mount elsewhere.
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return {line for line in lines if line.split()[4] in ("/", "/proc", str(target))}

    target = tmp_path / "inner"
    target.mkdir()
    before = host_mounts()
    script = f"mount -t tmpfs tmpfs {target} && grep -c ' {target} ' /proc/self/mountinfo"
    code, out, err = finish(run(isolation, "sh", "-c", script))
    assert code == 0, err
    assert out.strip() == "1"  # the job saw its mount...
    assert host_mounts() == before  # ...the host did not, and its /proc is the same


# -- exit status and signals ---------------------------------------------------


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize(
    ("script", "returncode"),
    [
        ("exit 0", 0),
        ("exit 7", 7),
        ("exit 255", 255),
        ("kill -KILL $$", -signal.SIGKILL),
        ("kill -TERM $$", -signal.SIGTERM),
        ("kill -SEGV $$", -signal.SIGSEGV),
    ],
)
def test_exit_status_is_mirrored(
    run: Callable[..., subprocess.Popen[bytes]],
    isolation: Isolation,
    script: str,
    returncode: int,
) -> None:
    code, _, err = finish(run(isolation, "sh", "-c", script))
    assert code == returncode, err


@pytest.mark.parametrize("to_group", [False, True], ids=["helper", "group"])
def test_signals_reach_the_command_once(
    run: Callable[..., subprocess.Popen[bytes]], to_group: bool
) -> None:
    script = (
        "trap 'echo term' TERM; trap 'echo hup' HUP; trap 'exit 5' USR1; "
        "echo ready; while :; do sleep 0.05; done"
    )
    proc = run(Isolation(pid=True, mount=True, network=True), "sh", "-c", script)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    send = os.killpg if to_group else os.kill  # Stop signals the group; Signal may too
    # Each trap's line is awaited before the next signal: two signals pending together
    # would run their traps in signal-number order, not in the order they were sent.
    send(proc.pid, signal.SIGTERM)
    assert proc.stdout.readline() == b"term\n"
    send(proc.pid, signal.SIGHUP)
    assert proc.stdout.readline() == b"hup\n"
    send(proc.pid, signal.SIGUSR1)
    code, out, err = finish(proc)
    assert (code, out) == (5, ""), err


def test_sigkill_of_the_helper_kills_the_namespace(
    run: Callable[..., subprocess.Popen[bytes]],
) -> None:
    proc = run(Isolation(pid=True), "sh", "-c", "echo ready; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    init = _children(proc.pid)
    assert len(init) == 1
    inside = [init[0], *_children(init[0])]
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=5) == -signal.SIGKILL
    _wait_until(lambda: not any(process_alive(pid) for pid in inside))


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_command_not_found_uses_the_reserved_code(
    run: Callable[..., subprocess.Popen[bytes]], tmp_path: Path, isolation: Isolation
) -> None:
    report = tmp_path / "report"
    code, out, err = finish(run(isolation, "no-such-command-xyz", "arg", report=report))
    assert code == EXIT_NOT_FOUND == 127
    assert out == ""
    assert err == "trio-worker: cannot execute 'no-such-command-xyz': No such file or directory\n"
    assert read_report(report) == HelperFailure(
        "exec", errno.ENOENT, "cannot execute 'no-such-command-xyz': No such file or directory"
    )


def test_command_not_executable_uses_the_other_code(
    run: Callable[..., subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.write_text("not a program")
    report = tmp_path / "report"
    code, _, err = finish(run(Isolation(pid=True), str(data), report=report))
    assert code == EXIT_EXEC_FAILED == 126
    assert "Permission denied" in err
    failure = read_report(report)
    assert failure is not None
    assert failure.errno == errno.EACCES


def test_bad_helper_usage_is_a_setup_failure(tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-I", "-S", HELPER_PATH, "--report", str(report), "--bogus", "--", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == EXIT_SETUP_FAILED == 125
    assert "unknown option '--bogus'" in proc.stderr
    failure = read_report(report)
    assert failure is not None
    assert failure.stage == "usage"


def test_runs_as_module_too() -> None:
    require_root("namespaces")
    proc = subprocess.run(
        [sys.executable, "-m", "trio_worker._host._nsinit", "--pid", "--", "sh", "-c", "echo $$"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert (proc.returncode, proc.stdout) == (0, "2\n"), proc.stderr


def test_namespaced_job_is_tracked_and_killed_by_its_cgroup(
    run: Callable[..., subprocess.Popen[bytes]],
) -> None:
    driver = detect(cgroup_parent())
    proc = None
    try:
        isolation = Isolation(pid=True)
        group = driver.create(
            "ns", Limits(pids=4), extra_tasks=helper_tasks(isolation)
        )  # the job itself may have 4 tasks
        proc = subprocess.Popen(
            helper_argv(isolation, "sh", ["-c", "sleep 60 & sleep 60 & echo ready; wait"]),
            stdout=subprocess.PIPE,
            process_group=0,
            preexec_fn=joining(group),
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        assert len(group.pids()) == 5  # helper, init, sh and two sleeps
        group.kill()
        assert group.wait_empty_sync(5)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        group.remove()
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        driver.cleanup_leftovers()
        driver.close()


# -- PR_SET_PDEATHSIG ------------------------------------------------------------

_PARENT = """
import os, sys, time
from trio_worker._host._isolation import helper_argv
from trio_worker._host._spawn import spawn
from trio_worker._model import Isolation
argv = sys.argv[1:]
if argv[0] == "--pid":
    argv = helper_argv(Isolation(pid=True), argv[1], argv[2:])
pid = spawn(argv[0], argv, dict(os.environ), None, stdin=0, stdout=2, stderr=2)
print(pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("via_helper", [False, True], ids=["plain", "pid-namespace"])
def test_job_dies_with_its_parent(via_helper: bool) -> None:
    if via_helper:
        require_root("namespaces")
    argv = [sys.executable, "-c", _PARENT, *(["--pid"] if via_helper else []), "sleep", "60"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=REPO)
    tree: list[int] = []
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        tree = [child]
        if via_helper:  # helper -> init -> sleep
            _wait_until(
                lambda: len(_children(child)) == 1 and len(_children(_children(child)[0])) == 1
            )
            init = _children(child)[0]
            tree += [init, *_children(init)]
        assert all(process_alive(pid) for pid in tree)
        parent.kill()  # the "server" crashes
        parent.wait()
        _wait_until(lambda: not any(process_alive(pid) for pid in tree))
    finally:
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        assert parent.stdout is not None
        parent.stdout.close()
