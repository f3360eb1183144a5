"""Running out of descriptors during Start: an answer, never a leak (issue 10, step 2).

A supervisor runs in a subprocess whose soft RLIMIT_NOFILE is lowered to just
above what it uses, so that each Start fails at a different point (log files,
pipes, cgroup files, pidfd) as the margin grows. After every attempt the
process must hold the same descriptors, job directories and cgroups as before
a failed Start, and List/Status must keep working for every job.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cgroup_parent, require_root

REPO = Path(__file__).resolve().parent.parent

_SCRIPT = r"""
import json, os, resource, secrets, sys
from pathlib import Path
import trio
from trio_worker import JobState, ResourceExhausted, open_supervisor

PERSIST = sys.argv[2] == "persist"

def fds():
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))

def limit_leaving(free, closed=()):
    # The soft limit under which exactly `free` descriptor numbers are unused once
    # the descriptors `closed` are.
    used = set(fds()) - set(closed)
    limit = 0
    while limit - len([fd for fd in used if fd < limit]) < free or limit in used:
        limit += 1
    return limit

def cgroups(sup):
    parents = {d.parent for d in sup.cgroups.job("probe").dirs}
    return sorted(str(p / n) for p in parents if p.exists() for n in os.listdir(p)
                  if n.startswith("job-"))

async def holdings(sup, jobs_dir):
    # Descriptors, job directories, cgroups and jobs, apart from the places made
    # ahead of need (taken stock of once their refill is done): a refused Start
    # may use one up, and the next is made with another id. Ended jobs' groups are
    # left out too: they go once their end is recorded, whenever that is.
    launcher = sup._admission.launcher
    await launcher.settled()
    places = {place.job_id for place in launcher.ready_places()}
    # (A recycled group keeps the name of the job it was made for: places and spare
    # groups are known by their groups' names too.)
    kept = [place.group for place in launcher.ready_places()] + launcher.spare_groups()
    ended = [sup._jobs.get(info.id).cgroup for info in sup.list() if info.ended]
    names = {d.name.removeprefix("job-") for g in kept + ended if g is not None for d in g.dirs}
    ready = places | {info.id for info in sup.list() if info.ended} | names
    seeds = {fd for place in sup._admission.launcher.ready_places() if place.seed
             for fd in place.seed.fds}
    def left_out(fd):  # a place's, or gone
        if fd in seeds:
            return True
        try:
            return any(i in os.readlink(f"/proc/self/fd/{fd}") for i in ready)
        except FileNotFoundError:
            return True  # the listing's own descriptor, at whatever number was free
    return (
        [fd for fd in fds() if not left_out(fd)],
        sorted(n for n in os.listdir(jobs_dir) if n not in places),  # (places: in jobs/)
        [g for g in cgroups(sup) if g.rsplit("job-", 1)[1] not in ready],
        len(sup.list()),
    )

async def records(sup):
    # The job records as committed (the store commits each before Start returns),
    # read on the store's own connection: a second one in this process would
    # keep a descriptor (SQLite defers closing it while another holds locks).
    if not PERSIST:
        return None
    return sorted((r.info.id, r.info.state.value) for r in await sup._store.load_all())

async def main():
    report = {"refused": 0, "started": 0, "messages": set(), "steps": [], "seeds": []}
    parent = sys.argv[3]
    async with open_supervisor(sys.argv[1], cgroup_parent=parent, persist=PERSIST) as sup:
        jobs_dir = Path(sys.argv[1]) / "jobs"
        keeper = await sup.start("sleep", ["60"])  # one running job throughout
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for margin in range(0, 28):
            before = await holdings(sup, jobs_dir)
            before_records = await records(sup)
            # The Start takes the first ready place, and closes its seed's descriptors
            # before it opens any (the seed cannot feed stdin): wherever their numbers
            # are, below the limit or above it, `margin` are free for the Start.
            place = sup._admission.launcher.ready_places()[0]
            seed = place.seed.fds if place.seed is not None else []
            report["seeds"].append(bool(seed))
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(margin, seed), hard))
            try:
                # With stdin: no seed can run it, the place is claimed in a thread
                # and every descriptor of the job is made during the Start.
                job = await sup.start("true", stdin=True)
            except ResourceExhausted as exc:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                report["refused"] += 1
                report["messages"].add(str(exc))
                report["steps"].append(str(exc).rpartition("(")[2].rstrip(")"))
                after = await holdings(sup, jobs_dir)
                assert after == before, (margin, before, after)
                assert await records(sup) == before_records, margin
            else:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                report["started"] += 1
                report["steps"].append("started")
                end = await sup.wait(job.id)
                assert end.state is JobState.EXITED, end
                assert end.exit_code == 0, end
            # Every job, old and new, is still listed and has a status.
            for info in sup.list():
                assert sup.status(info.id).id == info.id
            assert sup.status(keeper.id).state is JobState.RUNNING
        # A plain Start runs its place's seed: every descriptor it needs was made
        # with the place, so no margin is too small, and none is left behind.
        report["seeded"] = 0
        for margin in range(0, 6):
            before = (await holdings(sup, jobs_dir))[0]
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(margin), hard))
            try:
                job = await sup.start("true")
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            end = await sup.wait(job.id)
            assert end.state is JobState.EXITED, end
            report["seeded"] += 1
            # Its end is recorded, then its group recycled or removed by a refill (which
            # makes the place it took): what that thread holds meanwhile is no leak.
            await sup._admission.launcher.settled()
            after = (await holdings(sup, jobs_dir))[0]
            assert after == before, (margin, sorted(set(after) ^ set(before)))
        await sup.stop(keeper.id, grace=0)
    report["messages"] = sorted(report["messages"])
    print(json.dumps(report))

trio.run(main)
"""


@pytest.mark.parametrize("store", ["memory", "persist"])
def test_start_without_descriptors_is_refused_and_leaks_nothing(tmp_path: Path, store: str) -> None:
    # With a store, the job's record is written while it is spawned: a refused
    # Start must take it back too.
    require_root("cgroups")
    state = tmp_path / "state"
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(state), store, cgroup_parent("tw-emfile")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    # The smaller margins are too small for a Start, the larger ones are enough.
    steps = report["steps"]
    refused = steps[: report["refused"]]
    assert report["refused"] >= 3, report
    assert report["started"] >= 1, report
    assert steps == refused + ["started"] * report["started"], report
    assert report["seeded"] == 6, report
    # Each place a Start takes descriptors is met in its turn as the margin grows (a
    # job's log files are opened by its first flush, not by the Start): the place's
    # groups, opened again once its seed is gone (with a seed); the pipes; the pidfd,
    # for one margin (one descriptor).
    turns = [step for i, step in enumerate(refused) if i == 0 or refused[i - 1] != step]
    expected = ["creating its pipes", "watching its process"]
    if report["seeds"][0]:
        expected.insert(0, "opening its cgroup")
    assert turns == expected, report
    assert refused.count("watching its process") == 1, report
    for message in report["messages"]:
        assert "too many open files" in message.lower(), message


_THOUSAND = r"""
import json, os, resource, secrets, sys
import trio
from trio_worker import JobState, open_supervisor

N = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))  # a stock host's limits

def fds(launcher):
    # The server's fds but its ready places' (how many places are ready depends on
    # when the last refill ran: up to its target, down to half of it).
    places = launcher.ready_places()
    held = sum(len(p.procs) + (len(p.seed.fds) if p.seed else 0) for p in places)
    return len(os.listdir("/proc/self/fd")) - held

async def main():
    parent = sys.argv[3]
    async with open_supervisor(sys.argv[1], cgroup_parent=parent, persist=False) as sup:
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        jobs = [await sup.start("sleep", ["600"])]
        # Counted with the ready places made (each holds its seed's descriptors): not
        # while the refill's thread is making some.
        launcher = sup._admission.launcher
        await launcher.settled()
        before = fds(launcher)
        jobs += [await sup.start("sleep", ["600"]) for _ in range(N - 1)]
        await launcher.settled()
        per_job = (fds(launcher) - before) / (N - 1)
        running = sum(sup.status(j.id).state is JobState.RUNNING for j in jobs)
        probe = await sup.start("sh", ["-c", "ulimit -Sn"])
        await sup.wait(probe.id)
        job_limit = b"".join([c.data async for c in sup.output(probe.id)]).decode().strip()
        report = {"raised": raised, "running": running, "job_soft_limit": job_limit}
        print(json.dumps(report | {"fds_per_job": per_job}))
        sys.stdout.flush()
        await sup.shutdown(grace=0)

trio.run(main)
"""


def test_a_thousand_sleeping_jobs_with_a_stock_fd_limit(tmp_path: Path) -> None:
    n = 1000
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _THOUSAND,
            str(tmp_path / "state"),
            str(n),
            cgroup_parent("tw-many"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["raised"] == 4096  # the soft limit went up to the hard one
    assert report["running"] == n
    # Two pipes and a pidfd: a quiet job holds none of its log files open.
    assert report["fds_per_job"] <= 3.01, report
    assert report["job_soft_limit"] == "1024"  # jobs still see the stock limit


_NO_PROCESSES = r"""
import json, os, sys
from pathlib import Path
import trio
from trio_worker import JobState, ResourceExhausted
from trio_worker._host._cgroups import NoDriver
from trio_worker._jobs._supervisor import open_supervisor_with_driver

group = Path(sys.argv[2])
(group / "cgroup.procs").write_text(str(os.getpid()))

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def job_dirs(sup, jobs_dir):  # (a job's comes with its first output; a place has none)
    return sorted(os.listdir(jobs_dir))

async def main():
    async with open_supervisor_with_driver(NoDriver("test"), sys.argv[1], persist=False) as sup:
        jobs_dir = Path(sys.argv[1]) / "jobs"
        keeper = await sup.start("sleep", ["60"])  # also leaves a worker thread cached
        await sup._admission.launcher.settled()  # no place being made meanwhile
        before = (fds(), job_dirs(sup, jobs_dir), len(sup.list()))
        (group / "pids.max").write_text((group / "pids.current").read_text())
        try:
            await sup.start("true")
        except ResourceExhausted as exc:
            refused = str(exc)
        else:
            refused = ""
        await sup._admission.launcher.settled()
        after = (fds(), job_dirs(sup, jobs_dir), len(sup.list()))
        (group / "pids.max").write_text("max")
        assert after == before, (before, after)
        assert sup.status(keeper.id).state is JobState.RUNNING
        again = await sup.start("true")
        end = await sup.wait(again.id)
        print(json.dumps({"refused": refused, "then": end.state.value}))
        await sup.stop(keeper.id, grace=0)

trio.run(main)
"""


def _pids_group(name: str) -> Path | None:
    """A fresh pids cgroup (v1 pids hierarchy, or the v2 root's), or None."""
    v1 = Path("/sys/fs/cgroup/pids")
    if (v1 / "cgroup.procs").exists():
        return v1 / name
    root = Path("/sys/fs/cgroup")
    try:
        if "pids" in (root / "cgroup.subtree_control").read_text().split():
            return root / name
    except OSError:
        pass
    return None


def test_start_without_processes_is_refused_and_leaks_nothing(tmp_path: Path) -> None:
    require_root("cgroups")
    group = _pids_group(f"tw-eagain-{os.getpid()}-{secrets.token_hex(3)}")
    if group is None:
        pytest.skip("no pids cgroup controller to run out of processes with")
    group.mkdir()
    try:
        result = subprocess.run(
            [sys.executable, "-c", _NO_PROCESSES, str(tmp_path / "state"), str(group)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        group.rmdir()
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert "cannot start the job" in report["refused"], report
    assert report["then"] == "exited"


_END_WITHOUT_FDS = r"""
import json, os, resource, secrets, sys
import trio
from trio_worker import open_supervisor

def lowest_free():
    used = {int(n) for n in os.listdir("/proc/self/fd")}
    fd = 0
    while fd in used:
        fd += 1
    return fd

async def main():
    parent = sys.argv[2]
    async with open_supervisor(sys.argv[1], cgroup_parent=parent, persist=False) as sup:
        await sup._admission.launcher.settled()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        job = await sup.start("sleep", ["0.5"])  # a seed's: the Start needs no descriptor
        # Not one descriptor to spare when it ends: its end cannot read its group.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free() + 64, hard))
        held = []

        def fill():
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                pass

        fill()
        try:
            with trio.fail_after(30):  # a hang detector
                # Seeded Starts need none either (and free two: the seed's pipes); the
                # refill they wake cannot read the jobs' memory limits, which decide
                # whether it plants seeds.
                more = []
                for _ in range(3):
                    more.append(await sup.start("true"))
                    fill()
                await sup._admission.launcher.settled()
                end = await sup.wait(job.id)
                ends = [(await sup.wait(j.id)).exit_code for j in more]
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        after = await sup.start("true")
        with trio.fail_after(30):
            after = await sup.wait(after.id)
        print(json.dumps({"end": [end.state.name, end.exit_code], "more": ends,
                          "after": [after.state.name, after.exit_code]}), flush=True)

trio.run(main)
"""


def test_a_job_ending_without_a_descriptor_to_spare_ends_and_the_server_goes_on(
    tmp_path: Path,
) -> None:
    # A job's end reads its group (cgroup.events) and writes cgroup.kill: with no
    # descriptor to spare, that CgroupError escaped the end's last resort (_finish)
    # and ended the supervisor, whose shutdown then waited for that job forever.
    require_root("cgroups")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _END_WITHOUT_FDS,
            str(tmp_path / "state"),
            cgroup_parent("tw-endfd"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"end": ["EXITED", 0], "more": [0, 0, 0], "after": ["EXITED", 0]}, report
    # What it could not do is one line each (its group could not be killed), never a
    # traceback: the end's wait for its group to empty logged "supervision failed" with
    # one, though the end was recorded.
    lines = result.stderr.splitlines()
    assert "Traceback (most recent call last):" not in lines, result.stderr[-3000:]
    assert all(line.startswith("job ") for line in lines), result.stderr[-3000:]
