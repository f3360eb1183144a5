"""The state directory lock and layout: real directories, real processes."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import process_alive
from trio_worker import StateDirError
from trio_worker._host._pathwatch import PathWatch
from trio_worker._jobs._statedir import StateDir
from trio_worker._jobs._supervisor import watch_state_dir

ROOT = Path(__file__).resolve().parent.parent

_HOLDER = """
import sys, time
from trio_worker._jobs._statedir import StateDir
state = StateDir.open(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""

_CONTENDER = """
import sys
from trio_worker import StateDirError
from trio_worker._jobs._statedir import StateDir
try:
    StateDir.open(sys.argv[1])
except StateDirError as exc:
    print(exc)
    sys.exit(3)
print("acquired")
"""


_FORKING_HOLDER = """
import os, sys
from trio_worker._jobs._statedir import StateDir
state = StateDir.open(sys.argv[1])
if os.fork() == 0:  # a copy of the lock's descriptor, as a seed's before its first run
    sys.stdin.read()
    os._exit(0)
print("locked", flush=True)
os.kill(os.getpid(), 9)
"""


def _python(code: str, *args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        **kw,
    )


def _contend(path: Path) -> tuple[int, str]:
    child = _python(_CONTENDER, str(path), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    return child.returncode, out


def test_open_creates_a_private_directory_and_locks_it(tmp_path: Path) -> None:
    path = tmp_path / "a" / "state"
    with StateDir.open(path) as state:
        assert state.locked
        assert state.path == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert state.lock_path.read_text() == f"{os.getpid()}\n"
        assert stat.S_IMODE(state.lock_path.stat().st_mode) == 0o600
        assert state.db_path == path / "jobs.db"
        assert state.jobs_dir == path / "jobs"
        assert state.job_dir("01ABC") == path / "jobs" / "01ABC"
        assert state.pki_dir == path / "pki"
    assert not state.locked
    assert state.lock_path.exists()  # never unlinked: see the module docstring
    assert state.lock_path.read_text() == ""


def test_an_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(0o755)  # readable by others is the owner's choice: used as it is
    with StateDir.open(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o755


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_a_directory_others_may_write_to_is_refused_untouched(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(mode)
    with pytest.raises(StateDirError, match="writable by") as info:
        StateDir.open(path)
    message = str(info.value)
    assert "\n" not in message
    assert "chmod go-w" in message
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert list(path.iterdir()) == []  # not even the lock file


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, 4242, 4242)
    with pytest.raises(StateDirError, match="belongs to uid 4242"):
        StateDir.open(path)


async def test_every_file_in_the_state_directory_is_private(tmp_path: Path) -> None:
    from trio_worker import open_supervisor

    path = tmp_path / "state"
    old = os.umask(0o022)
    try:
        async with open_supervisor(path) as sup:
            job = await sup.start("sh", ["-c", "echo out; echo err >&2"])
            await sup.wait(job.id)
            await sup.housekeep()
            files = [p for p in path.rglob("*") if p.is_file()]
            names = {p.name for p in files}
            assert {"jobs.db", "jobs.db-wal", "jobs.db-shm", "lock", "output.log"} <= names
            loose = {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
            loose = {k: v for k, v in loose.items() if v != oct(0o600)}
            assert loose == {}
    finally:
        os.umask(old)


def test_a_loose_job_database_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    db = path / "jobs.db"
    db.touch()
    db.chmod(0o644)
    with StateDir.open(path):
        assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with StateDir.open("rel") as state:
        assert state.path == tmp_path / "rel"


def test_a_file_is_not_a_state_directory(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StateDirError, match=str(path)):
        StateDir.open(path)


def test_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with StateDir.open(tmp_path) as state:
        with pytest.raises(StateDirError) as caught:
            StateDir.open(tmp_path)
        message = str(caught.value)
        assert str(tmp_path) in message
        assert f"pid {os.getpid()}" in message
        assert state.lock_path.read_text() == f"{os.getpid()}\n"  # the refusal changed nothing
    with StateDir.open(tmp_path) as again:  # released: free again
        assert again.locked


def test_second_server_in_another_process_is_refused(tmp_path: Path) -> None:
    with StateDir.open(tmp_path):
        code, out = _contend(tmp_path)
        assert code == 3
        assert str(tmp_path) in out
        assert f"pid {os.getpid()}" in out
    assert _contend(tmp_path) == (0, "acquired\n")


def test_lock_dies_with_a_sigkilled_holder(tmp_path: Path) -> None:
    holder = _python(_HOLDER, str(tmp_path), stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(StateDirError, match=f"pid {holder.pid}"):
            StateDir.open(tmp_path)
        code, out = _contend(tmp_path)
        assert code == 3
        assert f"pid {holder.pid}" in out
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    assert not process_alive(holder.pid)
    # The stale pid is still in the file, but the lock is gone with its process.
    assert (tmp_path / "lock").read_text() == f"{holder.pid}\n"
    with StateDir.open(tmp_path) as state:
        assert state.lock_path.read_text() == f"{os.getpid()}\n"


async def test_a_dead_holders_lock_left_to_its_child_is_waited_for(tmp_path: Path) -> None:
    # A server SIGKILLed right after cloning a seed: the seed holds the lock until
    # it first runs. A restart at once (systemd's Restart=) waits for it, not fails.
    holder = _python(_FORKING_HOLDER, str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        assert holder.wait(timeout=30) == -signal.SIGKILL
        probe = os.open(tmp_path / "lock", os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the child holds it
        finally:
            os.close(probe)
        opened: list[StateDir] = []

        async def open_it() -> None:
            opened.append(await trio.to_thread.run_sync(StateDir.open, tmp_path))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_it)
            await trio.sleep(0.1)
            holder.stdin.close()  # the child closes its copy: it exits
    finally:
        holder.stdin.close()
        holder.stdout.close()
    with opened[0] as state:
        assert state.lock_path.read_text() == f"{os.getpid()}\n"


def test_the_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    with StateDir.open(tmp_path) as state:
        assert state._fd is not None
        assert fcntl.fcntl(state._fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        # A job spawned while we hold it (close_fds=False: even then) must not
        # keep the directory locked after the server is gone.
        child = subprocess.Popen(["sleep", "30"], close_fds=False)
    try:
        with StateDir.open(tmp_path):
            pass
    finally:
        child.kill()
        child.wait()


def test_release_is_idempotent_and_garbage_collection_releases(tmp_path: Path) -> None:
    state = StateDir.open(tmp_path)
    state.release()
    state.release()
    StateDir.open(tmp_path)  # dropped at once: __del__ releases it
    with StateDir.open(tmp_path):
        pass


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "lock").symlink_to(target)
    with pytest.raises(StateDirError, match="lock"):
        StateDir.open(state)


_FORKER = """
import os, sys
from trio_worker._jobs._statedir import StateDir
state = StateDir.open(sys.argv[1])
child = os.fork()
if child == 0:
    state.release()  # e.g. a finalizer in a forked child
    os._exit(0)
os.waitpid(child, 0)
print(state.lock_path.read_text().strip() == str(os.getpid()), state.locked)
"""


def test_a_forked_child_releasing_leaves_the_parent_locked(tmp_path: Path) -> None:
    child = _python(_FORKER, str(tmp_path), stdout=subprocess.PIPE)
    out, _ = child.communicate(timeout=30)
    assert out == "True True\n"


def test_missing_says_what_became_of_the_directory(tmp_path: Path) -> None:
    """What the server's watch (``watch_state_dir``) reports: nothing while the directory
    is there, and whether it was deleted, moved away or replaced."""
    path = tmp_path / "state"
    with StateDir.open(path) as state:
        assert state.missing() is None
        path.rename(tmp_path / "moved")
        assert state.missing() == "was moved or deleted"
        path.mkdir(mode=0o700)
        assert state.missing() == "was replaced by another directory"
        path.rmdir()
        (tmp_path / "moved").rename(path)
        assert state.missing() is None  # back
        shutil.rmtree(path)
        assert state.missing() == "was deleted"
        path.mkdir(mode=0o700)
        (path / "lock").touch()  # a new directory, even with a lock file of the same name
        assert state.missing() == "was deleted"
    assert state.missing() is None  # released: none of its business


def test_serve_warns_when_its_state_directory_is_deleted(tmp_path: Path) -> None:
    """A server whose state directory is deleted goes on (its files are open), but nothing
    it writes will be found by a restart, and nothing said so: one warning in its log."""
    from tests.test_cli import ServerProcess, clean_env, own_cgroup

    state = tmp_path / "state"
    env = clean_env(tmp_path)
    server = ServerProcess.start(
        ["--listen", "127.0.0.1:0", "--state-dir", state, *own_cgroup(tmp_path)], env
    )
    try:
        server.port()
        assert not any("state directory" in line for line in server.stderr)
        shutil.rmtree(state)
        line = server.wait_for(
            rf"WARNING .*state directory {re.escape(str(state))} was deleted.*"
        ).group(0)
        assert "a restart will not find this server's jobs" in line
    finally:
        assert server.stop() == 0, server.stderr
    assert sum("state directory" in line for line in server.stderr) == 1, server.stderr


async def test_a_path_watch_hears_the_directory_go_and_come_back_and_nothing_else(
    tmp_path: Path,
) -> None:
    """``PathWatch`` (what ``watch_state_dir`` waits on): the directory moved away, back,
    its lock file unlinked, the directory removed; not a sibling made or removed in the
    same parent."""
    path = tmp_path / "state"
    with StateDir.open(path) as state, PathWatch(path, state.lock_path) as watch:
        assert not watch.news()
        (tmp_path / "sibling").mkdir()
        (tmp_path / "sibling").rmdir()
        (path / "jobs.db-wal").touch()  # (inside: the server's own writes are no news)
        assert not watch.news()
        path.rename(tmp_path / "moved")
        with trio.fail_after(5):
            await watch.wait()
        (tmp_path / "moved").rename(path)
        with trio.fail_after(5):
            await watch.wait()
        assert not watch.news()
        shutil.rmtree(path)
        with trio.fail_after(5):
            await watch.wait()


class _Said(logging.Handler):
    """What ``watch_state_dir`` says, and an event for each new line."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.new = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.new.set()

    async def next(self) -> str:
        with trio.fail_after(5):
            await self.new.wait()
        self.new = trio.Event()
        return self.messages[-1]


async def test_watch_state_dir_warns_once_when_it_goes_and_says_when_it_is_back(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state"
    said = _Said()
    logger = logging.getLogger("trio_worker.supervisor")
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        with StateDir.open(path) as state:
            async with trio.open_nursery() as nursery:
                await nursery.start(watch_state_dir, state)
                assert said.messages == []
                path.rename(tmp_path / "moved")
                assert re.fullmatch(
                    rf"state directory {re.escape(str(path))} was moved or deleted while the "
                    r"server runs: .*restart will not find this server's jobs.*",
                    await said.next(),
                )
                (tmp_path / "sibling").mkdir()  # no news
                (tmp_path / "moved").rename(path)
                assert await said.next() == f"state directory {path} is back"
                shutil.rmtree(path)
                assert "was deleted while the server runs" in await said.next()
                nursery.cancel_scope.cancel()
        assert len(said.messages) == 3, said.messages
    finally:
        logger.removeHandler(said)
        logger.setLevel(logging.NOTSET)
