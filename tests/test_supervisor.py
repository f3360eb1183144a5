from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import process_alive
from trio_worker import (
    InvalidRequest,
    Isolation,
    JobInfo,
    JobNotFound,
    JobNotRunning,
    JobState,
    JobStillRunning,
    Limits,
    OutputStream,
    ShuttingDown,
    Supervisor,
    Unenforceable,
    open_supervisor,
)
from trio_worker._host._cgroups import NoDriver
from trio_worker._jobs import _launch, _runner
from trio_worker._jobs._output import OpenLogs, OutputLog
from trio_worker._jobs._supervisor import open_supervisor_with_driver, owner_of
from trio_worker._jobs._turns import let_io_first


async def output_of(sup: Supervisor, job_id: str, offset: int = 0) -> bytes:
    return b"".join([c.data async for c in sup.output(job_id, offset)])


async def read_pid_line(sup: Supervisor, job_id: str) -> int:
    """The first line a job prints, as an int (scripts print $$ or $!)."""
    buf = b""
    async for chunk in sup.output(job_id):
        buf += chunk.data
        if b"\n" in buf:
            return int(buf.split(b"\n", 1)[0])
    raise AssertionError("job printed no line")


async def test_exit_code_and_output(state_dir: Path) -> None:
    async with open_supervisor(state_dir) as sup:
        job = await sup.start("sh", ["-c", "printf hi; exit 7"])
        assert job.state is JobState.RUNNING
        assert job.pid is not None
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code, end.signal) == (JobState.EXITED, 7, None)
        assert end.output_bytes == 2
        assert end.ended_at is not None
        assert end.ended_at >= end.started_at
        assert await output_of(sup, job.id) == b"hi"
        assert (state_dir / "jobs" / job.id / "output.log").read_bytes() == b"hi"


async def test_death_by_signal_is_killed_with_signal() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "kill -USR1 $$"])
        end = await sup.wait(job.id)
        assert (end.state, end.signal, end.exit_code) == (JobState.KILLED, signal.SIGUSR1, None)


async def test_streams_are_tagged_and_ordered_within_each_stream() -> None:
    script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done"
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", script])
        per_stream: dict[OutputStream, bytes] = {OutputStream.STDOUT: b"", OutputStream.STDERR: b""}
        position = 0
        async for chunk in sup.output(job.id):
            assert chunk.offset == position
            position = chunk.end
            per_stream[chunk.stream] += chunk.data
        assert per_stream[OutputStream.STDOUT] == b"".join(b"out%d\n" % i for i in range(1, 201))
        assert per_stream[OutputStream.STDERR] == b"".join(b"err%d\n" % i for i in range(1, 201))
        assert position == sup.status(job.id).output_bytes


async def test_50mb_three_readers_one_stalled_job_never_blocked(tmp_path: Path) -> None:
    payload = os.urandom(50 * 1024 * 1024)
    source = tmp_path / "payload"
    source.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    async with open_supervisor(tmp_path / "state", tail_bytes=256 * 1024) as sup:
        job = await sup.start("cat", [str(source)])
        job_ended_while_stalled = trio.Event()
        results: dict[str, str] = {}

        async def reader(name: str, stall: bool) -> None:
            h = hashlib.sha256()
            position = 0
            async for chunk in sup.output(job.id):
                assert chunk.offset == position
                position = chunk.end
                h.update(chunk.data)
                if stall and position >= 1024 * 1024 and not job_ended_while_stalled.is_set():
                    # Stop reading entirely: the job must still run to its end.
                    await sup.wait(job.id)
                    job_ended_while_stalled.set()
            results[name] = h.hexdigest()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, "a", False)
            nursery.start_soon(reader, "b", False)
            nursery.start_soon(reader, "slow", True)
        assert job_ended_while_stalled.is_set()
        assert results == {"a": digest, "b": digest, "slow": digest}
        end = sup.status(job.id)
        assert (end.state, end.exit_code, end.output_bytes) == (JobState.EXITED, 0, len(payload))


async def test_offsets_resume_exactly_and_ended_job_replays() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "seq 1 20000"])
        await sup.wait(job.id)
        full = await output_of(sup, job.id)
        assert full == b"".join(b"%d\n" % i for i in range(1, 20001))
        for offset in (0, 1, 4095, 65536, len(full) - 1, len(full)):
            assert await output_of(sup, job.id, offset) == full[offset:]
        with pytest.raises(InvalidRequest, match="offset"):
            await anext(sup.output(job.id, len(full) + 1))
        with pytest.raises(InvalidRequest, match="offset"):
            sup.output(job.id, -1)


async def test_stop_kills_grandchild_in_process_group() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "sleep 1000 & echo $!; wait"])
        grandchild = await read_pid_line(sup, job.id)
        assert process_alive(grandchild)
        end = await sup.stop(job.id, grace=5)
        assert end.state is JobState.KILLED
        assert end.signal == signal.SIGTERM
        assert not process_alive(grandchild)


async def test_leftovers_in_the_group_die_when_main_process_exits() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "sleep 1000 & echo $!"])
        grandchild = await read_pid_line(sup, job.id)
        end = await sup.wait(job.id)
        assert end.state is JobState.EXITED
        assert not process_alive(grandchild)


async def test_a_group_a_kill_thread_was_sent_to_is_never_recycled() -> None:
    # A kill sends SIGKILL to the job's process group, then, if its group is not empty at
    # once, a worker thread kills by the group (v1: freeze, SIGKILL every pid, thaw). The
    # job can end before that thread runs (its process group's SIGKILL is enough), and its
    # retired group was recycled for a place whose seed the late thread then killed: every
    # later Start of a server ended KILLED (60 of 60 after a `rm -f`, 4 of 20 after a Stop
    # with no grace). Here the thread is certain (an escapee in a session of its own).
    async with open_supervisor() as sup:
        if isinstance(sup.cgroups, NoDriver):
            pytest.skip("needs cgroups")
        # (The escapee says its pid once it is in its own session: ``echo $!`` could come
        # before ``setsid`` ran, and the process group's SIGKILL then took it, so no thread.)
        escape = "setsid sh -c 'echo $$; exec sleep 1000' & exec sleep 1000"
        job = await sup.start("sh", ["-c", escape])
        escapee = await read_pid_line(sup, job.id)
        group = sup._jobs.get(job.id).cgroup
        assert group is not None
        end = await sup.stop(job.id, grace=0)
        assert end.state is JobState.KILLED
        assert not process_alive(escapee)
        launcher = sup._admission.launcher
        await launcher.settled()  # (its group retired: removed, or recycled)
        assert group.killed
        held = [g.dirs for g in launcher.spare_groups()]
        held += [place.group.dirs for place in launcher.ready_places()]
        assert group.dirs not in held
        assert not any(directory.exists() for directory in group.dirs)
        # And the next Starts run as they should.
        for _ in range(5):
            done = await sup.wait((await sup.start("true")).id)
            assert (done.state, done.exit_code) == (JobState.EXITED, 0)


async def test_sigterm_ignoring_job_is_killed_after_grace(autojump_clock: trio.abc.Clock) -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "trap '' TERM; echo $$; while :; do sleep 1; done"])
        await read_pid_line(sup, job.id)  # the trap is in place once it prints
        start = trio.current_time()
        end = await sup.stop(job.id, grace=30)
        assert (end.state, end.signal) == (JobState.KILLED, signal.SIGKILL)
        # The grace was honoured (virtual time), to the float rounding of the clock's jumps: the
        # difference of two readings came out once at 29.999999999999993.
        assert trio.current_time() - start >= 30 - 1e-6


@pytest.mark.parametrize("how", ["leave", "cancel", "error"])
async def test_no_process_outlives_the_supervisor(how: str) -> None:
    pids: list[int] = []

    class Boom(Exception):
        pass

    # (A hang detector: the jobs are up well within it.)
    with trio.move_on_after(10) as scope:
        try:
            async with open_supervisor(shutdown_grace=2) as sup:
                for script in ["sleep 1000", "trap '' TERM; sleep 1000 & echo $!; wait"]:
                    job = await sup.start("sh", ["-c", script])
                    assert job.pid is not None
                    pids.append(job.pid)
                pids.append(await read_pid_line(sup, job.id))
                if how == "cancel":
                    # From outside the supervisor's block, once its jobs run. (A deadline
                    # of 0.5 s came before the third pid in 2 of 7 runs at load 6-9.)
                    scope.cancel()
                    await trio.sleep_forever()
                if how == "error":
                    raise Boom
        except Boom:
            pass
    assert scope.cancelled_caught == (how == "cancel")
    assert len(pids) == 3
    assert not any(process_alive(pid) for pid in pids)


async def test_command_not_found_is_a_failed_job_not_an_exception() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("echi", ["hello"])
        assert job.state is JobState.FAILED
        assert job.error == "No such file or directory: 'echi'"
        assert job.pid is None
        assert sup.list() == [job]
        assert await sup.wait(job.id) == job
        assert await output_of(sup, job.id) == b""


async def test_not_executable_is_failed_with_permission_denied(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    async with open_supervisor() as sup:
        job = await sup.start(str(script))
        assert job.state is JobState.FAILED
        assert job.error.startswith("Permission denied")


async def test_env_extends_and_overrides_and_path_lookup(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "mytool"
    tool.write_text('#!/bin/sh\necho "$FOO $BASE $PWD"\n')
    tool.chmod(0o755)
    base = {"PATH": "/usr/bin:/bin", "BASE": "base", "FOO": "server"}
    async with open_supervisor(env=base) as sup:
        job = await sup.start(
            "mytool", env={"FOO": "job", "PATH": f"{bindir}:/usr/bin:/bin"}, cwd=tmp_path
        )
        await sup.wait(job.id)
        assert await output_of(sup, job.id) == f"job base {tmp_path}\n".encode()


async def test_signal_reaches_the_job() -> None:
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh", ["-c", "trap 'echo got; exit 3' USR1; echo $$; while :; do sleep 0.05; done"]
        )
        await read_pid_line(sup, job.id)
        info = await sup.signal(job.id, signal.SIGUSR1)
        assert info.id == job.id
        end = await sup.wait(job.id)
        assert end.exit_code == 3
        assert b"got" in await output_of(sup, job.id)
        with pytest.raises(JobNotRunning):
            await sup.signal(job.id, signal.SIGUSR1)
        with pytest.raises(JobNotRunning):
            await sup.stop(job.id)


async def test_list_filters_by_owner_oldest_first() -> None:
    async with open_supervisor() as sup:
        a = await sup.start("true", owner="alice")
        b = await sup.start("true", owner="bob")
        c = await sup.start("true", owner="alice")
        assert [j.id for j in sup.list()] == [a.id, b.id, c.id]
        assert [j.id for j in sup.list(owner="alice")] == [a.id, c.id]
        assert sup.list(owner="nobody") == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"command": ""}, "command"),
        ({"command": "ec\0ho"}, "command"),
        ({"command": "echo", "args": ["a\0b"]}, "args[0]"),
        ({"command": "echo", "args": "abc"}, "args"),
        ({"command": "echo", "env": {"A=B": "x"}}, "env"),
        ({"command": "echo", "env": {"": "x"}}, "env"),
        ({"command": "echo", "env": {"A": "x\0y"}}, "env[A]"),
        ({"command": "echo", "cwd": "/does/not/exist"}, "cwd"),
        ({"command": "echo", "cwd": "/etc/passwd"}, "cwd"),
        ({"command": "echo", "limits": Limits(memory_bytes=-1)}, "limits.memory_bytes"),
    ],
)
async def test_bad_input_is_invalid_request_naming_the_field(
    kwargs: dict[str, object], field: str
) -> None:
    async with open_supervisor() as sup:
        with pytest.raises(InvalidRequest) as info:
            await sup.start(**kwargs)  # type: ignore[arg-type]
        assert info.value.field == field
        assert sup.list() == []


async def test_unknown_ids_bad_signals_and_bad_grace() -> None:
    async with open_supervisor() as sup:
        with pytest.raises(JobNotFound):
            sup.status("nope")
        with pytest.raises(JobNotFound):
            await sup.wait("nope")
        with pytest.raises(JobNotFound):  # when iterated, as the remote client's
            await anext(sup.output("nope"))
        job = await sup.start("sleep", ["1000"])
        for bad in (0, -1, 10_000, 1.5, "TERM"):
            with pytest.raises(InvalidRequest, match="signal"):
                await sup.signal(job.id, bad)  # type: ignore[arg-type]
        for grace in (-1, float("inf"), float("nan")):
            with pytest.raises(InvalidRequest, match="grace"):
                await sup.stop(job.id, grace=grace)
        assert sup.status(job.id).state is JobState.RUNNING


async def test_limits_are_refused_rather_than_ignored_without_cgroups() -> None:
    async with open_supervisor_with_driver(NoDriver("not root")) as sup:
        with pytest.raises(Unenforceable, match="memory limit needs a writable memory cgroup"):
            await sup.start("true", limits=Limits(memory_bytes=64 << 20))
        assert sup.list() == []
        # Jobs without limits still run.
        job = await sup.start("true")
        assert (await sup.wait(job.id)).exit_code == 0


async def test_the_cgroup_choice_is_logged_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """Which cgroup hierarchy holds the jobs (v2, v1 with or without the unified mount) or
    that there is none, and what cannot be limited: at DEBUG here (``serve`` says it at
    INFO, or WARNING for none, once it listens: ``tests/test_cli.py``)."""
    with caplog.at_level(logging.DEBUG, logger="trio_worker.supervisor"):
        async with open_supervisor_with_driver(NoDriver("not root")):
            pass
    said = [r.getMessage() for r in caplog.records if "cgroup" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert "no usable cgroups (not root)" in said[0]
    assert "every limit is refused" in said[0]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="trio_worker.supervisor"):
        async with open_supervisor_with_driver(None) as sup:
            driver = sup.cgroups
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cgroups: ")]
    if driver.tracks:
        assert len(said) == 1, [r.getMessage() for r in caplog.records]
        assert said[0].startswith(f"cgroups: {driver.name}, the jobs' groups under ")
        assert str(driver.parent_dirs()[0]) in said[0]


async def test_limits_equal_to_accepted_ones_but_of_a_wrong_type_are_refused() -> None:
    """Values equal to accepted ones (``False == 0``, ``0.0 == 0``) are still refused
    after them, and a refused pair stays refused."""
    async with open_supervisor_with_driver(NoDriver("not root")) as sup:
        for _ in range(2):
            job = await sup.start("true", limits=Limits(), isolation=Isolation())
            assert (await sup.wait(job.id)).exit_code == 0
        for odd, field in [
            (Limits(pids=False), "limits.pids"),  # type: ignore[arg-type]
            (Limits(memory_bytes=0.0), "limits.memory_bytes"),  # type: ignore[arg-type]
        ]:
            assert odd == Limits()
            with pytest.raises(InvalidRequest) as info:
                await sup.start("true", limits=odd)
            assert info.value.field == field
        for _ in range(2):
            with pytest.raises(Unenforceable, match="memory limit"):
                await sup.start("true", limits=Limits(memory_bytes=64 << 20))
        # An isolation flag that is not a bool: answered as before (run, or refused where
        # the host has no namespaces), never a TypeError from hashing it.
        with contextlib.suppress(Unenforceable):
            await sup.start("true", isolation=Isolation(pid=[1]))  # type: ignore[arg-type]


async def test_let_io_first_lets_what_the_next_poll_finds_run_first() -> None:
    """A Start's later pieces of loop work wait for the tasks that the loop's next poll
    wakes (a Status, answered in its connection's reader). With one schedule point
    they would come first half the time (trio runs a batch in either order)."""
    a, b = trio.socket.socketpair()
    order: list[str] = []
    with a, b:

        async def reader() -> None:
            for _ in range(40):
                await trio.lowlevel.wait_readable(a)
                await a.recv(1)
                order.append("io")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for _ in range(40):
                await trio.testing.wait_all_tasks_blocked()
                await b.send(b"x")  # readable at the loop's next poll
                await let_io_first()
                order.append("rest")
    assert order == ["io", "rest"] * 40


async def test_a_jobs_end_lets_what_the_same_poll_found_run_first(state_dir: Path) -> None:
    """The watcher handles a job's end (~0.3 ms of the loop) after the other tasks that
    its wakeup's poll woke (a Status, answered in its connection's reader): 20 jobs
    killed, each end and a socket's byte ready for the same poll; the socket's reader
    always finds the job still running. Without ``let_io_first`` there, half would not."""
    a, b = trio.socket.socketpair()
    seen: list[JobState] = []
    with a, b:
        async with open_supervisor(state_dir) as sup:
            for _ in range(20):
                info = await sup.start("sleep", ["1000"])
                assert info.pid is not None
                pidfd = os.pidfd_open(info.pid)
                try:

                    async def reader(job_id: str = info.id) -> None:
                        await trio.lowlevel.wait_readable(a)
                        seen.append(sup.status(job_id).state)
                        await a.recv(1)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(reader)
                        await trio.testing.wait_all_tasks_blocked()
                        os.kill(info.pid, signal.SIGKILL)
                        select.select([pidfd], [], [])  # (blocking) exited before the poll
                        await b.send(b"x")  # readable at the same poll
                finally:
                    os.close(pidfd)
                assert (await sup.wait(info.id)).state is JobState.KILLED
    assert seen == [JobState.RUNNING] * 20


async def test_start_after_shutdown_began_is_refused() -> None:
    async with open_supervisor() as sup:
        pass
    with pytest.raises(ShuttingDown):
        await sup.start("true")


async def test_a_start_under_way_when_shutdown_begins_is_stopped_too(state_dir: Path) -> None:
    """A Start past the shutting-down check, its place and process still being made in a
    worker thread: ``shutdown`` waits for it and stops its job with the rest (else the
    job would run on after shutdown, unwatched if it came after the job runner)."""
    limiter = trio.to_thread.current_default_thread_limiter()
    seen: dict[str, object] = {}
    async with open_supervisor(state_dir) as sup:
        await trio.testing.wait_all_tasks_blocked()
        borrowers = [object() for _ in range(int(limiter.available_tokens))]
        for borrower in borrowers:  # no worker thread for anyone until they are back
            limiter.acquire_on_behalf_of_nowait(borrower)

        async def start() -> None:
            seen["job"] = await sup.start("sleep", ["1000"])

        async def shutdown() -> None:
            await sup.shutdown(grace=0.5)
            job = seen.get("job")
            seen["after"] = sup.status(job.id).state if isinstance(job, JobInfo) else None

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start)
                await trio.testing.wait_all_tasks_blocked()  # waiting for a thread
                nursery.start_soon(shutdown)
                await trio.testing.wait_all_tasks_blocked()
                for borrower in borrowers:
                    limiter.release_on_behalf_of(borrower)
    assert seen["after"] not in (None, JobState.RUNNING)


async def test_temporary_state_dir_is_removed_unless_kept(tmp_path: Path) -> None:
    async with open_supervisor() as sup:
        temp = sup.state_dir
        assert temp.is_dir()
    assert not temp.exists()
    async with open_supervisor(keep_state=True) as sup:
        kept = sup.state_dir
        job = await sup.start("echo", ["x"])
        await sup.wait(job.id)
    assert (kept / "jobs" / job.id / "output.log").read_bytes() == b"x\n"
    import shutil

    shutil.rmtree(kept)


async def test_remove_deletes_the_record_and_the_output(state_dir: Path) -> None:
    async with open_supervisor(state_dir) as sup:
        job = await sup.start("sh", ["-c", "printf gone"])
        await sup.wait(job.id)
        directory = state_dir / "jobs" / job.id
        assert (directory / "output.log").read_bytes() == b"gone"
        last = await sup.remove(job.id)
        assert (last.id, last.state, last.output_bytes) == (job.id, JobState.EXITED, 4)
        assert not directory.exists()
        assert job.id not in {j.id for j in sup.list()}
        with pytest.raises(JobNotFound):
            sup.status(job.id)
        with pytest.raises(JobNotFound):
            await sup.remove(job.id)
    # ... and the store forgot it: a supervisor on the same state directory never sees it.
    async with open_supervisor(state_dir) as sup:
        assert job.id not in {j.id for j in sup.list()}


async def test_a_replay_under_way_when_its_job_is_removed_ends_with_job_not_found(
    state_dir: Path,
) -> None:
    # Its output is deleted from disk under the reader: "not found", as everywhere after
    # a Remove, not the FileNotFoundError of its next block (an INTERNAL on the wire).
    async with open_supervisor(state_dir, tail_bytes=64 * 1024) as sup:
        job = await sup.start("head", ["-c", str(8 * 1024 * 1024), "/dev/zero"])
        await sup.wait(job.id)
        reader = sup.output(job.id, chunk_size=64 * 1024)
        first = await reader.__anext__()
        assert first.offset == 0
        await sup.remove(job.id)
        with pytest.raises(JobNotFound):
            async for _ in reader:
                pass


async def test_remove_refuses_a_running_job_unless_forced(state_dir: Path) -> None:
    async with open_supervisor(state_dir) as sup:
        # It ignores SIGTERM and leaves a grandchild behind: force kills all of it.
        job = await sup.start("sh", ["-c", "trap '' TERM; sleep 300 & echo $!; wait"])
        grandchild = await read_pid_line(sup, job.id)
        with pytest.raises(JobStillRunning):
            await sup.remove(job.id)
        assert sup.status(job.id).state is JobState.RUNNING
        last = await sup.remove(job.id, force=True)
        assert (last.state, last.signal) == (JobState.KILLED, signal.SIGKILL)
        assert not process_alive(grandchild)
        assert not (state_dir / "jobs" / job.id).exists()
        with pytest.raises(JobNotFound):
            await sup.wait(job.id)


async def test_two_removes_of_one_job_remove_it_once(state_dir: Path) -> None:
    async with open_supervisor(state_dir) as sup:
        job = await sup.start("sleep", ["300"])
        outcomes: list[str] = []

        async def remove() -> None:
            try:
                await sup.remove(job.id, force=True)
                outcomes.append("removed")
            except JobNotFound:
                outcomes.append("not found")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(remove)
            nursery.start_soon(remove)
        assert sorted(outcomes) == ["not found", "removed"]


async def test_a_job_outlives_the_worker_thread_that_spawned_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the reaper watching, jobs are spawned from trio's worker threads, which
    # exit when idle: a PR_SET_PDEATHSIG armed there would kill the job with them.
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.01)
    async with open_supervisor() as sup:
        if isinstance(sup.cgroups, NoDriver):
            pytest.skip("the reaper (and so the threaded spawn) needs cgroups")
        job = await sup.start("sleep", ["60"])
        assert job.pid is not None
        await trio.sleep(0.5)  # idle worker threads have exited by now
        assert process_alive(job.pid)
        assert sup.status(job.id).state is JobState.RUNNING
        await sup.stop(job.id, grace=0)
        assert (await sup.wait(job.id)).state is JobState.KILLED


async def test_without_the_reaper_jobs_spawn_from_the_loop_and_run(tmp_path: Path) -> None:
    async with open_supervisor(tmp_path / "state", reaper=False) as sup:
        job = await sup.start("sh", ["-c", "exit 3"])
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code) == (JobState.EXITED, 3)


async def test_a_sleeping_job_costs_no_task() -> None:
    """Running jobs are watched by one task (their pipes and pidfds in its epoll): a
    job gets a task only while there is work for it (its output to write, its end)."""
    async with open_supervisor() as sup:
        before = trio.lowlevel.current_statistics().tasks_living
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(30)]
        await trio.testing.wait_all_tasks_blocked()
        during = trio.lowlevel.current_statistics().tasks_living
        assert during - before < 5, (before, during)
        assert all(sup.status(j.id).state is JobState.RUNNING for j in jobs)
        async with trio.open_nursery() as nursery:
            for j in jobs:
                nursery.start_soon(sup.stop, j.id, 0)
        assert all(sup.status(j.id).state is JobState.KILLED for j in jobs)


async def test_output_that_outruns_the_disk_waits_and_loses_nothing(tmp_path: Path) -> None:
    """With at most 64 KiB allowed ahead of the disk, every read round of a fast job
    takes its pipes out of the watch until its log is flushed: the job waits on its
    full pipe, and every byte arrives in order, on both streams."""
    payload = os.urandom(4 * 1024 * 1024)
    source = tmp_path / "payload"
    source.write_bytes(payload)
    script = f"cat {source}; cat {source} >&2; cat {source}"
    async with open_supervisor_with_driver(
        NoDriver("test"), tmp_path / "state", max_unflushed=64 * 1024, tail_bytes=64 * 1024
    ) as sup:
        job = await sup.start("sh", ["-c", script])
        per_stream = {OutputStream.STDOUT: bytearray(), OutputStream.STDERR: bytearray()}
        read = bytearray()
        position = 0
        async for chunk in sup.output(job.id):
            assert chunk.offset == position
            position = chunk.end
            per_stream[chunk.stream] += chunk.data
            read += chunk.data
        end = sup.status(job.id)
        assert (end.state, end.exit_code, end.output_bytes) == (
            JobState.EXITED,
            0,
            3 * len(payload),
        )
        assert per_stream[OutputStream.STDOUT] == payload + payload
        assert per_stream[OutputStream.STDERR] == payload
        # How the two streams interleave in the log depends on what each pipe held when
        # it was read (the third cat may write before stderr's pipe is empty); the log
        # is what the reader got, in that order.
        log = (tmp_path / "state" / "jobs" / job.id / "output.log").read_bytes()
        assert log == read


class _SlowDiskLog(OutputLog):
    """An output log on a slow disk: each data write takes a while (in the flusher's
    thread, as a real slow device would)."""

    def _pwritev(self, fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
        time.sleep(0.01)
        return super()._pwritev(fd, buffers, offset)


async def test_a_jobs_last_output_is_not_lost_to_a_slow_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """A job exits with 1 MiB still in its pipe; its log may run 64 KiB ahead of a slow
    disk and a round reads 64 KiB, so its pipes leave the watch after each round until
    the disk catches up. That waiting is not the pipes' drain time (2 s): every byte is
    kept. With virtual time, each disk write (real time, in a thread) lets the clock
    jump past any deadline running meanwhile: a drain timer that counted it would end
    the job after the first write and lose the rest."""
    monkeypatch.setattr(_launch, "OutputLog", _SlowDiskLog)
    monkeypatch.setattr(_runner, "_ROUND_BYTES", 64 * 1024)
    size = 1024 * 1024
    async with open_supervisor_with_driver(
        NoDriver("test"), tmp_path / "state", max_unflushed=64 * 1024, tail_bytes=64 * 1024
    ) as sup:
        job = await sup.start("head", ["-c", str(size), "/dev/zero"])
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code, end.output_bytes) == (JobState.EXITED, 0, size)
        assert await output_of(sup, job.id) == bytes(size)


def _write_fifo(path: Path) -> None:
    """Open a FIFO for writing (waiting for its reader) and say one line."""
    with open(path, "w") as fifo:
        fifo.write("go\n")


async def test_output_written_by_an_escapee_after_the_main_process_exits_is_kept(
    tmp_path: Path,
) -> None:
    """Without a cgroup, a setsid'ed grandchild keeps the pipes past the main process's
    exit: what it writes within the drain time (2 s) is still the job's output."""
    leave, go, pidfile = tmp_path / "leave", tmp_path / "go", tmp_path / "escapee.pid"
    os.mkfifo(leave)
    os.mkfifo(go)
    # The escapee says "early" once it has its own session: the main process's group
    # (killed when the main process exits) no longer holds it.
    script = (
        f"setsid sh -c 'echo $$ > {pidfile}; echo early; read x < {go}; echo late;"
        f" exec sleep 30' </dev/null & read y < {leave}"
    )
    async with open_supervisor_with_driver(NoDriver("test"), tmp_path / "state") as sup:
        job = await sup.start("sh", ["-c", script])
        assert job.pid is not None
        pidfd = os.pidfd_open(job.pid)
        try:
            with trio.fail_after(60):
                chunks = sup.output(job.id)
                first = await chunks.__anext__()
                assert first.data == b"early\n"
                await trio.to_thread.run_sync(_write_fifo, leave, abandon_on_cancel=True)
                await trio.lowlevel.wait_readable(pidfd)  # the main process has exited
                await trio.to_thread.run_sync(_write_fifo, go, abandon_on_cancel=True)
                rest = b"".join([c.data async for c in chunks])
            assert rest == b"late\n"
            assert sup.status(job.id).state is JobState.EXITED
        finally:
            os.close(pidfd)
            if pidfile.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_owner_of_is_the_owner_or_not_found() -> None:
    """The server's visibility check (``owner_of``: no cgroup accounting read)."""
    async with open_supervisor() as sup:
        job = await sup.start("sleep", ["1000"], owner="al")
        assert owner_of(sup, job.id) == "al"
        with pytest.raises(JobNotFound):
            owner_of(sup, "01NOSUCHJOB")
        await sup.stop(job.id, 0)


async def test_a_jobs_changes_are_audited_when_the_audit_log_is_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One JSON line per change of state (made only when someone listens: see ``Job.feed``)."""
    caplog.set_level(logging.INFO, logger="trio_worker.audit")
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "exit 3"], owner="al")
        await sup.wait(job.id)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "trio_worker.audit"]
    changes = [(x["state"], x["exit_code"]) for x in lines if x["job_id"] == job.id]
    assert changes == [("running", None), ("exited", 3)]
    assert {x["owner"] for x in lines} == {"al"}


class _CountingOpenLogs(OpenLogs):
    displaced = 0

    def trim(self) -> list[int]:
        fds = super().trim()
        self.displaced += len(fds)
        return fds


async def test_jobs_output_stays_whole_when_their_logs_take_turns_holding_files(
    tmp_path: Path,
) -> None:
    # Two logs may keep their files open: six jobs printing at once reopen theirs
    # at their flushes, and none loses or misplaces a byte.
    go = tmp_path / "go"
    async with open_supervisor_with_driver(NoDriver("test"), tmp_path / "state") as sup:
        files = sup._admission.launcher.open_logs = _CountingOpenLogs(limit=2)
        script = (
            'echo "$0 out 0"; while [ ! -e "$1" ]; do sleep 0.01; done; '
            'for i in 1 2 3; do echo "$0 out $i"; echo "$0 err $i" >&2; sleep 0.01; done'
        )
        jobs = [await sup.start("sh", ["-c", script, f"job{n}", str(go)]) for n in range(6)]
        for job in jobs:  # every log written once, all of them running
            async for _ in sup.output(job.id):
                break
            log = sup._jobs.get(job.id).log
            assert log is not None
            await log.flush()
        assert len(files) == 2
        assert files.displaced == 2 * 4  # four logs gave up their two fds
        go.touch()
        for job in jobs:
            assert (await sup.wait(job.id)).exit_code == 0
        for n, job in enumerate(jobs):
            chunks = [c async for c in sup.output(job.id)]
            for stream, kind, first in (
                (OutputStream.STDOUT, "out", 0),
                (OutputStream.STDERR, "err", 1),
            ):
                got = b"".join(c.data for c in chunks if c.stream is stream)
                assert got == b"".join(f"job{n} {kind} {i}\n".encode() for i in range(first, 4))


class _Spawned(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_a_jobs_usual_end_takes_no_task_and_a_setsid_escapee_still_dies() -> None:
    """A job whose pipes end with its exit and whose group is then empty ends in the
    watcher's own step (no task, no turn of the loop before Stop and Wait are told);
    one that left a process in its cgroup outside its process group gets the task that
    kills it by the cgroup."""
    async with open_supervisor() as sup:
        job = await sup.start("sleep", ["1000"])
        # (The escapee says its pid once it has its own session: a Stop before that
        # would reach it through the job's process group.)
        escape = "setsid sh -c 'echo $$; exec sleep 1000' & exec sleep 1000"
        left = await sup.start("sh", ["-c", escape])
        escapee = await read_pid_line(sup, left.id)
        await trio.testing.wait_all_tasks_blocked()
        spawned = _Spawned()
        trio.lowlevel.add_instrument(spawned)
        try:
            end = await sup.stop(job.id, grace=5)
            other = await sup.stop(left.id, grace=5)
        finally:
            trio.lowlevel.remove_instrument(spawned)
        assert (end.state, end.signal) == (JobState.KILLED, signal.SIGTERM)
        assert (other.state, other.signal) == (JobState.KILLED, signal.SIGTERM)
        assert not process_alive(escapee)
        jobs = [name for name in spawned.names if name.startswith("job ")]
        if sup.cgroups.tracks:
            assert jobs == [f"job {left.id}"]


def _in_proc(pid: int) -> bool:
    """The process exists, a zombie included (``process_alive`` says no for those)."""
    return os.path.exists(f"/proc/{pid}")


async def test_a_burst_of_stops_leaves_no_zombie_descriptor_or_group(tmp_path: Path) -> None:
    """Ends recorded in the watcher's step, their groups removed after the burst: every
    job is reaped, its pipes and pidfd closed, its groups gone."""
    async with open_supervisor(tmp_path / "state", persist=False) as sup:
        launcher = sup._admission.launcher
        await launcher.settled()
        before = len(os.listdir("/proc/self/fd"))
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(40)]
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(sup.stop, job.id, 5)
        assert {sup.status(j.id).state for j in jobs} == {JobState.KILLED}
        with trio.fail_after(20):
            await launcher.settled()
        kept = [p.group for p in launcher.ready_places()] + launcher.spare_groups()
        recycled = {d for g in kept for d in g.dirs}
        for job in jobs:
            assert job.pid is not None
            assert not _in_proc(job.pid)  # reaped, not a zombie
            group = sup._jobs.get(job.id).cgroup
            assert group is not None
            # Gone, or recycled for the next places (at most the pool's worth).
            assert not any(d.exists() for d in group.dirs if d not in recycled)
        assert len(os.listdir("/proc/self/fd")) <= before


async def test_a_failure_in_the_watchers_end_of_a_job_still_ends_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the end's fast path costs that job its fast path, not its end."""
    from trio_worker._jobs import _runner

    real = _runner.kill_now
    failures = []

    def failing_once(job: object, process: object) -> bool:
        if not failures:
            failures.append(job)
            raise OSError("injected")
        return real(job, process)  # type: ignore[arg-type]

    monkeypatch.setattr(_runner, "kill_now", failing_once)
    async with open_supervisor() as sup:
        # The fast path needs the job's pipes at their end with its exit. A Start before
        # the first places are made spawns on a thread while the refill clones seeds,
        # which hold copies of the job's pipes for a moment: its exit then came before
        # their end (1 run in 40 under load) and took the other path, with no failure.
        await sup._admission.launcher.settled()
        job = await sup.start("sleep", ["1000"])
        with trio.fail_after(20):
            end = await sup.stop(job.id, grace=5)
        assert (end.state, end.signal) == (JobState.KILLED, signal.SIGTERM)
        assert failures
        assert "supervision failed" in caplog.text
