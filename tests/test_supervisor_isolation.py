"""The supervisor with the host's cgroups and namespaces (root, real kernel)."""

from __future__ import annotations

import signal

import pytest
import trio

from tests.conftest import process_alive, require_root
from trio_worker import (
    InvalidRequest,
    Isolation,
    JobState,
    LimitPolicy,
    Limits,
    Supervisor,
    open_supervisor,
)


@pytest.fixture(autouse=True)
def _root() -> None:
    require_root("cgroup and namespace tests")


async def output_of(sup: Supervisor, job_id: str) -> bytes:
    return b"".join([c.data async for c in sup.output(job_id)])


async def first_line(sup: Supervisor, job_id: str) -> bytes:
    buf = b""
    async for chunk in sup.output(job_id):
        buf += chunk.data
        if b"\n" in buf:
            break
    return buf.split(b"\n", 1)[0]


ESCAPE = "setsid sh -c 'sleep 1000 & echo $!' ; sleep 1000"


async def test_memory_limit_kills_and_reports_oom() -> None:
    async with open_supervisor() as sup:
        job = await sup.start(
            "python3",
            ["-c", "b = []\nwhile True: b.append(bytearray(1 << 20))"],
            limits=Limits(memory_bytes=32 << 20),
        )
        end = await sup.wait(job.id)
        assert end.state is JobState.KILLED
        assert end.signal == signal.SIGKILL
        assert end.oom_killed
        assert end.usage is not None
        assert end.usage.memory_peak_bytes <= 33 << 20


async def test_escaped_grandchild_dies_on_stop() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", ESCAPE])
        escapee = int(await first_line(sup, job.id))
        assert process_alive(escapee)
        await sup.stop(job.id, grace=1)
        assert not process_alive(escapee)


async def test_escaped_grandchild_dies_when_main_process_exits() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "setsid sh -c 'sleep 1000 & echo $!'"])
        escapee = int(await first_line(sup, job.id))
        end = await sup.wait(job.id)
        assert end.state is JobState.EXITED
        assert not process_alive(escapee)


async def test_escaped_grandchild_dies_on_supervisor_exit() -> None:
    async with open_supervisor(shutdown_grace=1) as sup:
        job = await sup.start("sh", ["-c", ESCAPE])
        escapee = int(await first_line(sup, job.id))
        own = sup._jobs.get(job.id).cgroup
        group = own.path if own is not None else None
    assert not process_alive(escapee)
    assert group is None or not group.exists()


async def test_job_cgroup_exists_while_running_and_is_removed_after() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sleep", ["1000"], limits=Limits(pids=16))
        group = sup._jobs.get(job.id).cgroup  # the hierarchies the job is in
        assert group is not None
        path = group.path
        assert path is not None
        assert path.is_dir()
        assert job.pid is not None
        assert str(job.pid) in (path / "cgroup.procs").read_text().split()
        running = sup.status(job.id)
        assert running.usage is not None
        await sup.stop(job.id, grace=0)
    # Removed after the job's end was answered, before the supervisor is gone.
    assert not path.exists()


async def test_policy_maximum_and_absurd_limits_are_invalid() -> None:
    policy = LimitPolicy(maximums=Limits(memory_bytes=256 << 20))
    async with open_supervisor(limit_policy=policy) as sup:
        with pytest.raises(InvalidRequest, match="at most 268435456"):
            await sup.start("true", limits=Limits(memory_bytes=1 << 30))
        with pytest.raises(InvalidRequest, match=r"0\.01"):
            await sup.start("true", limits=Limits(cpus=0.001))
        with pytest.raises(InvalidRequest, match="1 MiB"):
            await sup.start("true", limits=Limits(memory_bytes=1000))
        # Unset fields get the maximum: never unlimited on a capped server. No limits
        # at all (the policy's, applied once) and limits of zeros come out the same.
        job = await sup.start("true")
        assert job.limits.memory_bytes == 256 << 20
        assert (await sup.start("true", limits=Limits())).limits == job.limits


async def test_pid_namespace_command_sees_itself_as_pid_2_and_private_proc() -> None:
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh",
            ["-c", "echo $$; ls /proc | grep -c '^[0-9]'"],
            isolation=Isolation(pid=True),
        )
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        pid, count = (await output_of(sup, job.id)).split()
        assert pid in (b"1", b"2")
        assert int(count) <= 4  # init, sh, ls, grep: not the host's processes


async def test_network_namespace_has_only_loopback_up() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("cat", ["/proc/net/dev"], isolation=Isolation(network=True))
        await sup.wait(job.id)
        lines = (await output_of(sup, job.id)).decode().splitlines()[2:]
        assert [line.split(":")[0].strip() for line in lines] == ["lo"]


async def test_mount_namespace_leaves_host_mounts_untouched() -> None:
    mountinfo = trio.Path("/proc/self/mountinfo")
    before = await mountinfo.read_text()
    async with open_supervisor() as sup:
        job = await sup.start(
            "sh",
            ["-c", "mount -t tmpfs none /mnt && echo mounted"],
            isolation=Isolation(mount=True),
        )
        end = await sup.wait(job.id)
        assert end.exit_code == 0
        assert await output_of(sup, job.id) == b"mounted\n"
    assert await mountinfo.read_text() == before


@pytest.mark.parametrize("isolation", [Isolation(pid=True), Isolation(pid=True, network=True)])
async def test_exit_codes_signals_and_stop_through_the_helper(isolation: Isolation) -> None:
    async with open_supervisor() as sup:
        job = await sup.start("sh", ["-c", "exit 7"], isolation=isolation)
        assert (await sup.wait(job.id)).exit_code == 7
        job = await sup.start("sh", ["-c", "kill -USR1 $$"], isolation=isolation)
        end = await sup.wait(job.id)
        assert (end.state, end.signal) == (JobState.KILLED, signal.SIGUSR1)
        # SIGTERM from Stop reaches the command, which exits cleanly within the grace.
        script = "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 0.05; done"
        job = await sup.start("sh", ["-c", script], isolation=isolation)
        assert await first_line(sup, job.id) == b"ready"
        end = await sup.stop(job.id, grace=10)
        assert (end.state, end.exit_code) == (JobState.EXITED, 0)
        assert b"bye\n" in await output_of(sup, job.id)


async def test_missing_command_under_isolation_fails_like_without() -> None:
    async with open_supervisor() as sup:
        job = await sup.start("echi", isolation=Isolation(pid=True))
        assert job.state is JobState.FAILED
        assert job.error == "No such file or directory: 'echi'"
        assert job.spawn_errno == 2


async def test_fork_bomb_under_pids_limit_does_not_hurt_the_supervisor() -> None:
    async with open_supervisor() as sup:
        # The job's own shell forks once, before the bomb, then execs: a shell whose
        # fork fails exits (dash: "Cannot fork"), which would end the job (its
        # group removed) once the bomb fills the limit before its `sleep`.
        bomb = await sup.start(
            "sh", ["-c", "b() { b | b & }; b; exec sleep 1000"], limits=Limits(pids=32)
        )
        await trio.sleep(1)
        own = sup._jobs.get(bomb.id).cgroup
        assert own is not None
        path = own.path
        assert path is not None
        assert len((path / "cgroup.procs").read_text().split()) <= 32
        assert sup.status(bomb.id).state is JobState.RUNNING
        # The supervisor still starts and runs other jobs meanwhile.
        other = await sup.start("echo", ["alive"])
        await sup.wait(other.id)
        assert await output_of(sup, other.id) == b"alive\n"
        await sup.stop(bomb.id, grace=0)
    assert not path.exists()
