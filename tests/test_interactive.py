"""Interactive jobs in the library: stdin pipes and pseudo-terminals, with real processes."""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import secrets
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import process_alive, require_root
from trio_worker import (
    InvalidRequest,
    Isolation,
    JobNotRunning,
    JobState,
    NoStdin,
    OutputStream,
    Supervisor,
    open_supervisor,
)


def _write_fifo(path: Path) -> None:
    """Open a FIFO for writing (waiting for its reader) and say one line."""
    with open(path, "w") as fifo:
        fifo.write("go\n")


async def output_of(sup: Supervisor, job_id: str) -> bytes:
    return b"".join([c.data async for c in sup.output(job_id)])


async def wait_for_output(sup: Supervisor, job_id: str, needle: bytes) -> bytes:
    """Follow the job's output until ``needle`` appears; everything up to then."""
    seen = b""
    async for chunk in sup.output(job_id):
        seen += chunk.data
        if needle in seen:
            return seen
    raise AssertionError(f"{needle!r} never came; got {seen!r}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


async def test_bytes_written_to_stdin_come_back_through_cat() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("cat", stdin=True)
        assert (job.stdin, job.tty) == (True, False)
        await sup.write_stdin(job.id, b"hello ")
        await sup.write_stdin(job.id, b"world\n")
        await sup.close_stdin(job.id)
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code) == (JobState.EXITED, 0)
        assert await output_of(sup, job.id) == b"hello world\n"


async def test_close_stdin_is_end_of_file_and_closing_twice_is_fine() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "wc -c; echo after-eof"], stdin=True)
        await sup.write_stdin(job.id, b"12345")
        await sup.close_stdin(job.id)
        await sup.close_stdin(job.id)
        with pytest.raises(NoStdin):
            await sup.write_stdin(job.id, b"more")
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        assert (await output_of(sup, job.id)).split() == [b"5", b"after-eof"]


async def test_without_stdin_the_job_reads_dev_null_and_writing_is_refused() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "cat; echo eof"])
        assert job.stdin is False
        end = await sup.wait(job.id)
        assert await output_of(sup, job.id) == b"eof\n"
        with pytest.raises(NoStdin):
            await sup.write_stdin(end.id, b"x")
        running = await sup.start("sleep", ["100"])
        with pytest.raises(NoStdin):
            await sup.write_stdin(running.id, b"x")
        with pytest.raises(NoStdin):
            await sup.resize(running.id, 10, 10)


async def test_a_job_that_never_reads_makes_the_writer_wait_in_bounded_memory() -> None:
    data = bytes(64 * 1024 * 1024)  # allocated before the baseline
    async with open_supervisor() as sup:
        job = await sup.start("sleep", ["1000"], stdin=True)
        before = rss_bytes()
        finished = False

        async def push() -> None:
            nonlocal finished
            # Once the job is gone, what it never read is dropped (as by a pipe) or the
            # writer learns that the job ended.
            with contextlib.suppress(JobNotRunning):
                await sup.write_stdin(job.id, data)
            finished = True

        async with trio.open_nursery() as nursery:
            nursery.start_soon(push)
            await trio.sleep(1.0)
            # Only the pipe's buffer went in; the writer is still waiting, and nothing
            # of the 64 MiB was copied into the server's memory.
            assert not finished
            assert rss_bytes() - before < 8 * 1024 * 1024
            await sup.stop(job.id, grace=0)
        assert finished  # the job's end released the waiting writer


async def test_writes_keep_arrival_order_and_are_not_interleaved() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("cat", stdin=True)
        pieces = [bytes([65 + i]) * 200_000 for i in range(5)]
        async with trio.open_nursery() as nursery:
            for piece in pieces:
                nursery.start_soon(sup.write_stdin, job.id, piece)
                await trio.testing.wait_all_tasks_blocked()
        await sup.close_stdin(job.id)
        await sup.wait(job.id)
        out = await output_of(sup, job.id)
        assert out == b"".join(pieces)


async def test_a_job_that_exits_without_reading_does_not_fail_the_writer(
    tmp_path: Path,
) -> None:
    go = tmp_path / "go"
    os.mkfifo(go)
    async with open_supervisor() as sup:
        # It closes its stdin, says so, and lives until we open the FIFO (no clock: a
        # 'sleep 0.5' could end before a loaded host's test wrote).
        script = f"exec 0<&-; echo closed; read x < {go}"
        job = await sup.start("sh", ["-c", script], stdin=True)
        with trio.fail_after(30):
            async with contextlib.aclosing(sup.output(job.id)) as chunks:
                assert (await anext(chunks)).data == b"closed\n"
            await sup.write_stdin(job.id, b"nobody reads this")  # dropped, as a pipe would
            await trio.to_thread.run_sync(_write_fifo, go, abandon_on_cancel=True)
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        with pytest.raises(JobNotRunning):
            await sup.write_stdin(job.id, b"x")


async def test_tty_job_runs_on_a_pts_of_the_asked_size_in_its_own_session() -> None:
    async with open_supervisor() as sup:
        script = "tty; stty size; ps -o sid= -o pgid= -p $$; echo pid $$; echo err >&2"
        job = await sup.start("sh", ["-c", script], tty=True, terminal_size=(33, 101))
        assert (job.stdin, job.tty) == (False, True)
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        chunks = [c async for c in sup.output(job.id)]
        assert {c.stream for c in chunks} == {OutputStream.STDOUT}
        lines = b"".join(c.data for c in chunks).decode().splitlines()
        assert lines[0].startswith("/dev/pts/")
        assert lines[1] == "33 101"
        sid, pgid = lines[2].split()
        assert sid == pgid == str(end.pid)
        assert lines[3] == f"pid {end.pid}"
        assert lines[4] == "err"


async def test_tty_input_echoes_and_eof_character_ends_input() -> None:
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh", ["-c", "read x; echo got:$x; cat; echo done"], stdin=True, tty=True
        )
        await sup.write_stdin(job.id, b"hello\n")
        await wait_for_output(sup, job.id, b"got:hello")
        await sup.close_stdin(job.id)  # ^D: cat reads end of file
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        out = await output_of(sup, job.id)
        assert out.startswith(b"hello\r\n")  # the terminal echoes what was typed
        assert b"got:hello\r\n" in out
        assert out.endswith(b"done\r\n")


async def test_tty_close_stdin_after_a_partial_line_is_still_end_of_file() -> None:
    # The contract: close_stdin is "end of input: the job reads EOF; on a tty, the
    # terminal's EOF character". One ^D after a line with no newline only hands that
    # line to the reader (read returns "zz", not 0): cat would wait for ever, and so
    # would `printf zz | trio-worker run -it -- cat`. A second ^D is the end of file.
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "cat; echo done"], stdin=True, tty=True)
        await sup.write_stdin(job.id, b"zz")
        await sup.close_stdin(job.id)
        with trio.fail_after(30):
            end = await sup.wait(job.id)
        assert end.exit_code == 0
        out = await output_of(sup, job.id)
        assert out.endswith(b"zzdone\r\n")  # cat's "zz" (echoed too), then its EOF


async def test_tty_close_stdin_in_raw_mode_sends_one_eof_character() -> None:
    # With the terminal out of canonical mode, ^D is a byte like any other: the job gets
    # it once, after the bytes written before it.
    script = (
        "stty -icanon -echo; echo ready; head -c 3 | od -An -c; "
        "stty min 0 time 20; echo rest:$(head -c 1 | od -An -c)"
    )
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", script], stdin=True, tty=True)
        await wait_for_output(sup, job.id, b"ready")
        await sup.write_stdin(job.id, b"ab")
        await sup.close_stdin(job.id)
        with trio.fail_after(30):
            end = await sup.wait(job.id)
        assert end.exit_code == 0
        out = (await output_of(sup, job.id)).split()
        assert out[1:] == [b"a", b"b", b"004", b"rest:"]


async def test_resize_sets_the_size_and_the_job_sees_sigwinch() -> None:
    async with open_supervisor() as sup:
        script = 'trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
        job = await sup.start("sh", ["-c", script], tty=True, terminal_size=(24, 80))
        await wait_for_output(sup, job.id, b"ready")
        await sup.resize(job.id, 50, 132)
        await wait_for_output(sup, job.id, b"50 132")
        with pytest.raises(InvalidRequest):
            await sup.resize(job.id, 0, 80)
        end = await sup.stop(job.id, grace=0)
        assert end.state is JobState.KILLED
        with pytest.raises(JobNotRunning):
            await sup.resize(job.id, 10, 10)


@pytest.mark.root
async def test_stop_of_a_tty_job_leaves_none_of_its_processes() -> None:
    require_root("the cgroup that catches a setsid'ed child")
    async with open_supervisor() as sup:
        # A child in the job's group, one in a new group, one in a new session.
        script = (
            "sleep 1000 & echo $!; "
            "(set -m; sleep 1000 & echo $!; wait) & "
            "setsid sh -c 'echo $$; exec sleep 1000' & "
            "wait"
        )
        job = await sup.start("sh", ["-c", script], tty=True)
        seen = b""
        async for chunk in sup.output(job.id):
            seen += chunk.data
            if seen.count(b"\n") >= 3:
                break
        pids = [int(x) for x in seen.split()]
        assert len(pids) == 3
        assert all(process_alive(p) for p in pids)
        with trio.fail_after(20):
            end = await sup.stop(job.id, grace=1)
        assert end.state in (JobState.KILLED, JobState.EXITED)
        assert not any(process_alive(pid) for pid in pids)


async def test_signal_reaches_a_tty_job() -> None:
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh", ["-c", 'trap "echo usr1; exit 3" USR1; echo ready; read x'], stdin=True, tty=True
        )
        await wait_for_output(sup, job.id, b"ready")
        await sup.signal(job.id, signal.SIGUSR1)
        await sup.write_stdin(job.id, b"\n")  # read returns, the trap runs
        end = await sup.wait(job.id)
        assert end.exit_code == 3


async def test_signal_and_stop_reach_the_terminals_foreground_group() -> None:
    """A shell with job control runs its command in a group of its own, the terminal's
    foreground group: Signal reaches it there, as Ctrl-C on a terminal would."""
    inner = 'trap "echo inner-usr1; exit 0" USR1; echo ready; while :; do sleep 0.05; done'
    script = f"trap 'echo outer-usr1' USR1; set -m; sh -c '{inner}'; echo outer-done"
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", script], tty=True)
        await wait_for_output(sup, job.id, b"ready")
        await sup.signal(job.id, signal.SIGUSR1)
        with trio.move_on_after(20):  # without the foreground group, it never ends
            await sup.wait(job.id)
        end = (
            await sup.stop(job.id, grace=0) if not sup.status(job.id).ended else sup.status(job.id)
        )
        out = await output_of(sup, job.id)
        assert b"inner-usr1" in out
        assert b"outer-done" in out
        assert end.exit_code == 0


@pytest.mark.root
@pytest.mark.parametrize("isolation", [Isolation(network=True), Isolation(mount=True)])
async def test_a_tty_job_keeps_its_terminal_in_namespaces(isolation: Isolation) -> None:
    require_root("namespaces")
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh",
            ["-c", "tty; stty size; read x; echo got:$x"],
            stdin=True,
            tty=True,
            terminal_size=(11, 22),
            isolation=isolation,
        )
        await sup.write_stdin(job.id, b"hey\n")
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        # The terminal echoes "hey" whenever it arrives: before or among the rest.
        lines = [x for x in (await output_of(sup, job.id)).decode().splitlines() if x != "hey"]
        assert lines[0].startswith("/dev/pts/")
        assert lines[1:] == ["11 22", "got:hey"]


async def test_tty_requests_are_checked() -> None:
    async with open_supervisor() as sup:
        with pytest.raises(InvalidRequest, match="terminal_size"):
            await sup.start("true", terminal_size=(24, 80))
        with pytest.raises(InvalidRequest, match="terminal_size"):
            await sup.start("true", tty=True, terminal_size=(0, 80))


# -- a terminal inside a PID namespace ------------------------------------------------

_PID_ISOLATIONS = [Isolation(pid=True), Isolation(pid=True, mount=True, network=True)]
#: pid, process group, session, controlling terminal, its foreground group (/proc/PID/stat).
_SESSION = "cut -d' ' -f1,5,6,7,8 /proc/$$/stat"


def assert_session_leader_on_its_terminal(stat_line: str) -> None:
    pid, pgrp, session, tty_nr, tpgid = (int(x) for x in stat_line.split())
    assert pid == pgrp == session  # a session leader ...
    assert tty_nr != 0  # ... with a controlling terminal ...
    assert tpgid == pid  # ... whose foreground group it is


def processes_with(marker: str) -> list[int]:
    """Host pids whose environment holds ``marker`` (seen from outside the namespace)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if marker.encode() in f.read().split(b"\0"):
                found.append(int(entry))
    return found


@pytest.fixture
def job_user() -> Iterator[str]:
    """A fresh Unix user for one test; removed afterwards."""
    require_root("creating users")
    name = "twtty" + secrets.token_hex(4)
    subprocess.run(["useradd", "--no-create-home", "--user-group", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


@pytest.mark.root
@pytest.mark.parametrize("isolation", _PID_ISOLATIONS)
async def test_a_tty_job_under_pid_isolation_leads_a_session_on_its_terminal(
    isolation: Isolation,
) -> None:
    require_root("namespaces")
    async with open_supervisor() as sup:
        script = f"tty; stty size; {_SESSION}; echo pid $$; read x; echo got:$x; echo err >&2"
        job = await sup.start(
            "sh",
            ["-c", script],
            stdin=True,
            tty=True,
            terminal_size=(33, 101),
            isolation=isolation,
        )
        await sup.write_stdin(job.id, b"hey\n")
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        chunks = [c async for c in sup.output(job.id)]
        assert {c.stream for c in chunks} == {OutputStream.STDOUT}
        text = b"".join(c.data for c in chunks).decode()
        lines = [x for x in text.splitlines() if x != "hey"]  # the terminal's echo
        assert lines[0].startswith("/dev/pts/")
        assert lines[1] == "33 101"
        assert_session_leader_on_its_terminal(lines[2])
        assert lines[3] == "pid 2"  # PID 1 is the namespace's init
        assert lines[4:] == ["got:hey", "err"]


@pytest.mark.root
@pytest.mark.parametrize("isolation", _PID_ISOLATIONS)
async def test_resize_reaches_a_tty_job_under_pid_isolation(isolation: Isolation) -> None:
    require_root("namespaces")
    async with open_supervisor() as sup:
        script = 'trap "stty size" WINCH; echo ready; while :; do sleep 0.05; done'
        job = await sup.start(
            "sh", ["-c", script], tty=True, terminal_size=(24, 80), isolation=isolation
        )
        await wait_for_output(sup, job.id, b"ready")
        await sup.resize(job.id, 50, 132)
        await wait_for_output(sup, job.id, b"50 132")
        end = await sup.stop(job.id, grace=0)
        assert end.state is JobState.KILLED


@pytest.mark.root
async def test_signal_reaches_a_tty_job_under_pid_isolation_and_its_code_is_kept() -> None:
    require_root("namespaces")
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh",
            ["-c", 'trap "echo usr1; exit 3" USR1; echo ready; read x'],
            stdin=True,
            tty=True,
            isolation=Isolation(pid=True),
        )
        await wait_for_output(sup, job.id, b"ready")
        await sup.signal(job.id, signal.SIGUSR1)
        await sup.write_stdin(job.id, b"\n")  # read returns, the trap runs
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code) == (JobState.EXITED, 3)
        killed = await sup.start(
            "sh", ["-c", "kill -TERM $$"], tty=True, isolation=Isolation(pid=True)
        )
        end = await sup.wait(killed.id)
        assert end.signal == signal.SIGTERM


@pytest.mark.root
async def test_ctrl_c_typed_on_the_terminal_interrupts_a_job_under_pid_isolation() -> None:
    require_root("namespaces")
    async with open_supervisor() as sup:
        script = 'trap "echo int; exit 4" INT; echo ready; while :; do sleep 0.05; done'
        job = await sup.start(
            "sh", ["-c", script], stdin=True, tty=True, isolation=Isolation(pid=True)
        )
        await wait_for_output(sup, job.id, b"ready")
        await sup.write_stdin(job.id, b"\x03")  # the terminal's INTR character
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code) == (JobState.EXITED, 4)
        assert b"int" in await output_of(sup, job.id)


@pytest.mark.root
@pytest.mark.parametrize("isolation", _PID_ISOLATIONS)
async def test_stop_of_a_tty_job_under_pid_isolation_leaves_nothing(
    isolation: Isolation,
) -> None:
    require_root("namespaces")
    mark = secrets.token_hex(6)  # in the environment of every process of this job
    script = (
        "sleep 1000 & "
        "(set -m; sh -c 'echo in-group; exec sleep 1000' & wait) & "
        "setsid sh -c 'echo in-session; exec sleep 1000' & "
        "echo ready; wait"
    )
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh", ["-c", script], env={"TW_MARK": mark}, tty=True, isolation=isolation
        )
        seen = b""
        async for chunk in sup.output(job.id):
            seen += chunk.data
            if all(word in seen for word in (b"in-group", b"in-session", b"ready")):
                break
        # The helper, its init, sh, and its three children (the subshell's too).
        assert len(processes_with(f"TW_MARK={mark}")) >= 6
        with trio.fail_after(20):
            end = await sup.stop(job.id, grace=1)
        assert end.state in (JobState.KILLED, JobState.EXITED)
        assert processes_with(f"TW_MARK={mark}") == []


@pytest.mark.root
async def test_a_tty_job_of_another_user_under_all_isolations(job_user: str) -> None:
    require_root("namespaces and users")
    uid = pwd.getpwnam(job_user).pw_uid
    async with open_supervisor() as sup:
        script = f"id -u; stat -c %U $(tty); {_SESSION}; echo pid $$; read x; echo got:$x"
        job = await sup.start(
            "sh",
            ["-c", script],
            stdin=True,
            tty=True,
            isolation=Isolation(pid=True, mount=True, network=True),
            user=job_user,
        )
        await sup.write_stdin(job.id, b"hey\n")
        end = await sup.wait(job.id)
        assert end.exit_code == 0, await output_of(sup, job.id)
        text = (await output_of(sup, job.id)).decode()
        lines = [x for x in text.splitlines() if x != "hey"]
        assert lines[0] == str(uid)
        assert lines[1] == job_user  # the terminal is the user's
        assert_session_leader_on_its_terminal(lines[2])
        assert lines[3:] == ["pid 2", "got:hey"]
