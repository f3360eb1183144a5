"""Places made ahead of need (``_jobs/_launch``): used by Starts, gone with the supervisor."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import cgroup_parent, require_root
from tests.test_cgroups import UNIFIED
from trio_worker import JobState, Limits, open_supervisor
from trio_worker._host._cgroups import V1Driver, V2Driver, detect
from trio_worker._jobs._job import kill
from trio_worker._jobs._launch import RETIRE_AFTER, Launcher
from trio_worker._jobs._supervisor import Supervisor, open_supervisor_with_driver


def groups_of(sup: Supervisor, job_id: str) -> list[Path]:
    """The job's group in every hierarchy, as the driver names it."""
    return list(sup.cgroups.job(job_id).dirs)


def made_groups_of(sup: Supervisor, job_id: str) -> list[Path]:
    """The directories of a plain job's group (no limits: those of a place)."""
    return list(sup.cgroups.planned(job_id).dirs)


def all_exist(paths: list[str]) -> bool:
    return all(Path(p).is_dir() for p in paths)


def none_exist(paths: list[str]) -> bool:
    return not any(Path(p).exists() for p in paths)


def in_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


async def test_a_start_takes_a_ready_place_and_the_rest_go_with_the_supervisor(
    tmp_path: Path,
) -> None:
    require_root("cgroups")
    state = tmp_path / "state"
    parent = cgroup_parent("tw-places")
    async with open_supervisor(state, cgroup_parent=parent) as sup:
        launcher = sup._admission.launcher
        await launcher.settled()
        ready = launcher.ready_places()
        assert len(ready) >= 1
        place = ready[0]
        # No directory made ahead: the job's log makes it at its first output.
        assert place.directory == state / "jobs" / place.job_id
        assert not place.directory.exists()
        assert not (state / "ready").exists()
        assert all(d.is_dir() for d in place.group.dirs)
        assert sup.list() == []  # a place is no job
        # The Start takes the oldest: its id, its group, with the limits written now (and
        # on v1, the pids hierarchy the place was not in).
        job = await sup.start("sleep", ["60"], limits=Limits(pids=7))
        assert job.id == place.job_id
        assert not (state / "jobs" / job.id).exists()  # (it printed nothing)
        assert job.pid is not None
        group = sup._jobs.get(job.id).cgroup
        assert group is not None
        membership = in_cgroups(job.pid)
        name = f"/{group.dirs[0].name}"  # (a recycled group keeps its first job's name)
        joined = [line for line in membership.splitlines() if line.endswith(name)]
        assert len(joined) == len(group.dirs), membership
        pids_max = [d / "pids.max" for d in group.dirs if (d / "pids.max").exists()]
        assert pids_max
        assert {p.read_text().strip() for p in pids_max} == {"7"}
        await sup.stop(job.id, grace=0)
        assert (await sup.wait(job.id)).state is JobState.KILLED
        await launcher.settled()
        left = [p.job_id for p in launcher.ready_places()]
        assert left
        assert job.id not in left
    # Leaving removes the places nobody took: their groups.
    for job_id in left:
        assert not any(d.exists() for d in groups_of(sup, job_id))
    assert list((state / "jobs").iterdir()) == []  # (no job printed anything)


CRASHING = textwrap.dedent(
    """
    import json, sys, trio, trio_worker

    async def main(state, parent):
        async with trio_worker.open_supervisor(state, cgroup_parent=parent) as sup:
            await sup._admission.launcher.settled()
            ready = [p.job_id for p in sup._admission.launcher.ready_places()]
            groups = [str(d) for p in sup._admission.launcher.ready_places() for d in p.group.dirs]
            print(json.dumps({"ready": ready, "groups": groups}), flush=True)
            await trio.sleep_forever()

    trio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def test_places_left_by_a_crash_are_removed_at_the_next_start(tmp_path: Path) -> None:
    require_root("cgroups")
    state = tmp_path / "state"
    parent = cgroup_parent("tw-places")

    def run_and_crash() -> dict[str, list[str]]:
        with subprocess.Popen(
            [sys.executable, "-c", CRASHING, str(state), parent], stdout=subprocess.PIPE, text=True
        ) as server:
            try:
                assert server.stdout is not None
                made: dict[str, list[str]] = json.loads(server.stdout.readline())
                assert all_exist(made["groups"])
            finally:
                server.kill()
        return made

    made = await trio.to_thread.run_sync(run_and_crash)
    assert made["ready"]
    # What an earlier version left: its places had directories (and log files) here.
    old = state / "ready" / "0000-old-place"
    old.mkdir(parents=True)
    (old / "output.log").touch()
    async with open_supervisor(state, cgroup_parent=parent) as sup:
        await sup._admission.launcher.settled()
        now = {p.job_id for p in sup._admission.launcher.ready_places()}
        assert not now & set(made["ready"])
        assert not (state / "ready").exists()
        assert list((state / "jobs").iterdir()) == []  # (a place has no directory)
        assert none_exist(made["groups"])
        assert sup.list() == []  # a place is no job


def job_groups(sup: Supervisor) -> set[Path]:
    """Every job group under the supervisor's parent groups, in every hierarchy."""
    return {d for p in sup.cgroups.parent_dirs() for d in p.iterdir() if d.name.startswith("job-")}


def kept_groups(launcher: Launcher) -> set[Path]:
    """The groups of the ready places and the spare (recycled) groups."""
    groups = [p.group for p in launcher.ready_places()] + launcher.spare_groups()
    return {d for g in groups for d in g.dirs}


def dirs_of(sup: Supervisor, job_id: str) -> list[Path]:
    """The job's group's directories (a recycled group keeps its first job's name)."""
    group = sup._jobs.get(job_id).cgroup
    assert group is not None
    return list(group.dirs)


def no_stray_group(sup: Supervisor) -> bool:
    """Every job group there is belongs to a running job, a ready place or the spares."""
    running = {
        d
        for job in sup._jobs.values()
        if not job.ended.is_set() and job.cgroup is not None
        for d in job.cgroup.dirs
    }
    return job_groups(sup) == kept_groups(sup._admission.launcher) | running


def gone_or_kept(sup: Supervisor, groups: list[str]) -> bool:
    """Each of ``groups`` is gone, or kept (recycled) for a place."""
    kept = kept_groups(sup._admission.launcher)
    return none_exist([g for g in groups if Path(g) not in kept])


async def test_an_ended_jobs_group_is_removed_while_the_supervisor_runs(tmp_path: Path) -> None:
    # Ended jobs' groups go with the next round of place-making (one thread call for both),
    # or are recycled for the next places: no other group stays.
    require_root("cgroups")
    parent = cgroup_parent("tw-places")
    # Without a store, a job's end is recorded (and its group retired) as Wait answers.
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        jobs = [await sup.start("true") for _ in range(3)]
        started = [sup._jobs.get(job.id).cgroup for job in jobs]
        more = [await sup.start("sleep", ["60"]) for _ in range(6)]
        for job in jobs:
            assert (await sup.wait(job.id)).state is JobState.EXITED
        for job in more:
            await sup.stop(job.id, grace=0)
            assert (await sup.wait(job.id)).state is JobState.KILLED
        await launcher.settled()
        ended = {d for g in started + [sup._jobs.get(j.id).cgroup for j in more] for d in g.dirs}
        assert no_stray_group(sup)
        assert len(launcher.spare_groups()) <= len(launcher.ready_places())
        # Of the nine jobs' groups, those not kept for places are gone.
        assert ended - kept_groups(launcher)
        assert none_exist([str(d) for d in ended - kept_groups(launcher)])
    assert not any(p.exists() for p in sup.cgroups.parent_dirs())


@contextlib.contextmanager
def _refill_held() -> Iterator[threading.Event]:
    """The places' refill (``Launcher._tend``) waits in its thread until the yielded gate
    is set; afterwards the refill is itself again (and never left waiting)."""
    gate = threading.Event()
    tend = Launcher._tend

    def held_tend(self: Launcher, retired: Any, ids: Any) -> Any:
        gate.wait(30)
        return tend(self, retired, ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Launcher, "_tend", held_tend)
        try:
            yield gate
        finally:
            gate.set()


async def test_starts_while_places_are_being_made_keep_their_order_in_ids(
    tmp_path: Path,
) -> None:
    """List is newest first by id: a Start that finds no place ready (the refill's thread
    is still making them, with ids minted before) must not sort above the Starts after it,
    which take those places.

    The refill's thread is held (a gate) while Starts make their own places; then let go.
    """
    require_root("cgroups")
    parent = cgroup_parent("tw-order")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent) as sup:
        launcher = sup._admission.launcher
        await launcher.settled()
        ids = []
        with _refill_held() as gate:
            for _ in range(len(launcher.ready_places()) + 3):  # the ready ones, then none
                ids.append((await sup.start("true", [])).id)
            assert launcher.first_making() is not None  # the refill is under way, held
            gate.set()
            await launcher.settled()
        for _ in range(6):  # these take the places minted before the three above
            ids.append((await sup.start("true", [])).id)
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)


def _count_retired(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of retired groups each refill thread call removes, as the calls come."""
    calls: list[int] = []
    tend = Launcher._tend

    def counted(self: Launcher, retired: Any, ids: Any) -> Any:
        calls.append(len(retired))
        return tend(self, retired, ids)

    monkeypatch.setattr(Launcher, "_tend", counted)
    return calls


async def test_a_burst_of_ends_is_removed_in_one_thread_call_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """Ended jobs' groups wait for the ends to stop coming (``RETIRE_AFTER`` of trio's
    clock, which stands still here until the test moves it), then go in one call."""
    require_root("cgroups")
    calls = _count_retired(monkeypatch)
    parent = cgroup_parent("tw-retire")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(10)]
        await launcher.settled()
        calls.clear()
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(sup.stop, job.id, 5)
        groups = [str(d) for job in jobs for d in dirs_of(sup, job.id)]
        await trio.testing.wait_all_tasks_blocked()
        assert calls == []  # no thread call per end
        assert all_exist(groups)
        mock_clock.jump(RETIRE_AFTER)
        await launcher.settled()
        assert calls == [10]
        assert gone_or_kept(sup, groups)
        assert no_stray_group(sup)


async def test_groups_wait_until_no_job_ended_for_retire_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mock_clock: trio.testing.MockClock
) -> None:
    """A later end moves the removal on: the groups go ``RETIRE_AFTER`` after the last
    end, not after the first (trio's clock stands still until the test moves it)."""
    require_root("cgroups")
    calls = _count_retired(monkeypatch)
    parent = cgroup_parent("tw-linger")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        jobs = [await sup.start("sleep", ["1000"]) for _ in range(4)]
        await launcher.settled()
        calls.clear()
        for job in jobs:
            await sup.stop(job.id, 5)
            mock_clock.jump(RETIRE_AFTER * 0.6)
            await trio.testing.wait_all_tasks_blocked()
            assert calls == []  # the last end was less than RETIRE_AFTER ago
        mock_clock.jump(RETIRE_AFTER * 0.5)
        await launcher.settled()
        assert calls == [4]
        assert gone_or_kept(sup, [str(d) for job in jobs for d in dirs_of(sup, job.id)])
        assert no_stray_group(sup)


async def test_an_end_during_a_refill_waits_for_the_next_round_that_makes_places(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A job that ended while the refill's thread was at work cost a thread call of its
    own right after it: one per job in a Start + Wait loop. Its group now waits for the
    next round that makes places, or for ``RETIRE_AFTER`` (the clock stands still here
    until the test moves it)."""
    require_root("cgroups")
    rounds: list[tuple[int, int]] = []
    over: list[trio.Event] = []  # set as each round ends
    round_ = Launcher._round

    async def counted(self: Launcher, retired: list[Any], ids: list[str]) -> int:
        rounds.append((len(retired), len(ids)))
        over.append(trio.Event())
        try:
            return await round_(self, retired, ids)
        finally:
            over[len(rounds) - 1].set()

    parent = cgroup_parent("tw-ride")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Launcher, "_round", counted)
        async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
            launcher = sup._admission.launcher
            await launcher.settled()
            ender = await sup.start("sleep", ["1000"])
            await launcher.settled()
            groups = [str(d) for d in dirs_of(sup, ender.id)]
            rounds.clear()
            over.clear()
            with _refill_held() as gate:
                while launcher.first_making() is None:  # Starts, until a round begins
                    await sup.start("sleep", ["1000"])
                    await trio.testing.wait_all_tasks_blocked()
                assert (await sup.stop(ender.id, 5)).state is JobState.KILLED
                await trio.testing.wait_all_tasks_blocked()
                assert launcher._retired  # its group, retired while the round is held
                gate.set()
                await over[0].wait()
            await trio.testing.wait_all_tasks_blocked()
            assert len(launcher.ready_places()) == launcher._target  # nothing to make
            assert len(rounds) == 1  # and no round for the end alone
            assert rounds[0][0] == 0
            assert all_exist(groups)
            while len(rounds) == 1:  # the next round that makes places takes it along
                await sup.start("sleep", ["1000"])
                await trio.testing.wait_all_tasks_blocked()
            await launcher.settled()
            assert rounds[1][0] == 1
            assert rounds[1][1] > 0
            assert gone_or_kept(sup, groups)
            assert no_stray_group(sup)


async def test_a_rounds_places_come_with_its_result_unless_a_start_waits(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Each hand-over from the refill's thread wakes the loop: a round's places reach the
    pool together, with the round's result, unless a Start waits for one (``take_soon``):
    then each goes as soon as it is made, in order. (The clock stands still: the waiting
    Start's patience does not run out.)"""
    require_root("cgroups")
    handed: list[list[str]] = []
    arrive = Launcher._arrive

    def counted(self: Launcher, places: Any) -> None:
        handed.append([place.job_id for place in places])
        arrive(self, places)

    parent = cgroup_parent("tw-handover")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Launcher, "_arrive", counted)
        async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
            launcher = sup._admission.launcher
            await launcher.settled()
            handed.clear()
            while not handed:  # Starts that find places ready, until a round is done
                await sup.start("sleep", ["1000"])
                await launcher.settled()
            assert len(handed) == 1
            assert len(handed[0]) > 1  # the round's places, together
            ids = [place.job_id for place in launcher.ready_places()]
            assert ids[-len(handed[0]) :] == handed[0]  # in order, after those left

            handed.clear()
            with _refill_held() as gate:
                for _ in range(len(launcher.ready_places())):
                    await sup.start("sleep", ["1000"])
                coming = launcher.first_making()
                assert coming is not None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sup.start, "sleep", ["1000"])
                    await trio.testing.wait_all_tasks_blocked()  # the Start waits
                    gate.set()
            await launcher.settled()
            assert handed[0] == [coming]  # at once, alone
            assert [i for ids in handed for i in ids][: len(handed[0])] == [coming]


async def test_a_start_with_no_place_ready_waits_for_the_one_being_made(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Making a place of its own costs a Start a thread round trip, inodes and groups; the
    refill's next place is usually closer. The clock stands still: the Start's patience
    does not run out while the refill's thread is held, so it must take that place."""
    require_root("cgroups")
    parent = cgroup_parent("tw-patience")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        await launcher.settled()
        started: list[str] = []

        async def start() -> None:
            started.append((await sup.start("true")).id)

        with _refill_held() as gate:
            for _ in range(len(launcher.ready_places())):
                await sup.start("true")
            coming = launcher.first_making()
            assert coming is not None  # the refill is under way, held
            assert launcher.ready_places() == []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(start)
                await trio.testing.wait_all_tasks_blocked()
                assert started == []  # waiting for the place, not making its own
                gate.set()
        assert started == [coming]


BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"


@pytest.mark.parametrize("hierarchy", ["v1", "v2"])
async def test_an_ended_jobs_group_serves_a_later_job_that_sees_only_its_own_usage(
    tmp_path: Path, hierarchy: str
) -> None:
    """An ended job's group is recycled for a later place (no rmdir, no mkdir), and the
    job that gets it is told its own CPU time, not the sum of both: on this host's v1
    hierarchies, and on the unified mount driven as a pure v2 host."""
    require_root("cgroups")
    parent = cgroup_parent("tw-recycle")
    driver = detect(parent, root=UNIFIED) if hierarchy == "v2" else detect(parent)
    assert isinstance(driver, V2Driver if hierarchy == "v2" else V1Driver)
    async with open_supervisor_with_driver(
        driver, tmp_path / "state", cgroup_parent=parent, persist=False
    ) as sup:
        launcher = sup._admission.launcher
        # A v1 group is removed, not recycled, where the kernel still charges it more than
        # a few pages (``_cgroups._residue``: page cache the job read first, kernel objects
        # freed a moment later; ~1 in 6 Python jobs here): a few burners, one recycled.
        for _attempt in range(4):
            burner = await sup.start(sys.executable, ["-c", BURN])
            first = dirs_of(sup, burner.id)
            burnt = await sup.wait(burner.id)
            assert burnt.state is JobState.EXITED
            assert burnt.usage is not None
            assert burnt.usage.cpu_seconds >= 0.3
            for _ in range(4 * launcher._target):
                await launcher.settled()
                job = await sup.start("true")
                end = await sup.wait(job.id)
                assert end.state is JobState.EXITED
                if dirs_of(sup, job.id) == first:
                    break
            else:
                continue
            break
        else:
            pytest.fail("no ended burner's group was ever used again")
        assert job.id != burner.id
        assert end.usage is not None
        assert end.usage.cpu_seconds < 0.2
        await launcher.settled()
        assert no_stray_group(sup)
    assert none_exist([str(d) for d in first])


@pytest.mark.parametrize(
    ("knob", "value"),
    [
        ("memory.limit_in_bytes", "67108864"),
        ("memory.oom_control", "1"),
        ("cpu.cfs_quota_us", "50000"),
        ("cpu.shares", "2"),
    ],
)
async def test_a_group_its_job_wrote_a_limit_to_serves_no_later_job(
    tmp_path: Path, knob: str, value: str
) -> None:
    """A job may write limits to its own group (a root job can: a script that limits
    itself). That group must not be recycled: a later job, of anyone, ran under that
    limit, while its Status said it had none (a 64 MiB cap came back every 4th Start)."""
    require_root("cgroups")
    parent = cgroup_parent("tw-recycle-knob")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        # (It ends on its own: a group a kill was sent to is never recycled anyway.)
        writer = await sup.start("sleep", ["1"])
        first = dirs_of(sup, writer.id)
        (knobs,) = [d for d in first if (d / knob).exists()]
        (knobs / knob).write_text(value)  # (as the job itself would, being root)
        assert (await sup.wait(writer.id)).state is JobState.EXITED
        for _ in range(4 * launcher._target):
            await launcher.settled()
            job = await sup.start("true")
            assert dirs_of(sup, job.id) != first
            assert (await sup.wait(job.id)).state is JobState.EXITED
        await launcher.settled()
        assert none_exist([str(d) for d in first])
        assert no_stray_group(sup)


async def test_a_late_kill_of_an_ended_job_spares_the_job_that_got_its_group(
    tmp_path: Path,
) -> None:
    """A kill that was due for a job (a Stop's deadline, run as a task of its own) may
    run after the job ended and its group went to a later job: it must not kill that."""
    require_root("cgroups")
    parent = cgroup_parent("tw-late-kill")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        first = await sup.start("true")
        assert (await sup.wait(first.id)).state is JobState.EXITED
        old = sup._jobs.get(first.id)
        assert old.process is not None
        for _ in range(4 * launcher._target):
            await launcher.settled()
            job = await sup.start("sleep", ["60"])
            if dirs_of(sup, job.id) == dirs_of(sup, first.id):
                break
            await sup.stop(job.id, grace=0)
        else:
            pytest.fail("the ended job's group was never used again")
        assert await kill(old, old.process)
        await trio.sleep(0.2)
        assert sup.status(job.id).state is JobState.RUNNING
        await sup.stop(job.id, grace=0)


async def test_a_spare_group_that_cannot_be_joined_is_dropped_and_the_pool_refills(
    tmp_path: Path,
) -> None:
    """A recycled group removed from outside while it waited fails the place made in it;
    it goes, and the next rounds make the places (it was kept, and failed every round)."""
    require_root("cgroups")
    parent = cgroup_parent("tw-broken-spare")
    async with open_supervisor(tmp_path / "state", cgroup_parent=parent, persist=False) as sup:
        launcher = sup._admission.launcher
        jobs = [await sup.start("true") for _ in range(launcher._target)]
        for job in jobs:
            await sup.wait(job.id)
        await launcher.settled()
        spares = launcher.spare_groups()
        assert spares
        for directory in spares[0].dirs:
            directory.rmdir()
        for _ in range(3 * launcher._target):
            job = await sup.start("true")
            assert (await sup.wait(job.id)).state is JobState.EXITED
        await launcher.settled()
        assert len(launcher.ready_places()) == launcher._target
        assert all(p.seed is not None for p in launcher.ready_places())
        assert no_stray_group(sup)
