"""Cgroup drivers: selection, limits, whole-tree kill, OOM, usage, cleanup.

The kernel tests run against this machine's real cgroups (v1 controllers plus
a v2 mount at /sys/fs/cgroup/unified); the v2 *limit* files are checked
against a temporary tree laid out like a v2 hierarchy, since no v2 controller
is available here. Every test uses its own parent group name and removes
every group, process and loop device it made, also when it fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_worker._errors import InvalidRequest, Unenforceable
from trio_worker._host._cgroups import (
    CGROUP_ROOT,
    CgroupDriver,
    CgroupError,
    Inotify,
    JobCgroup,
    NoDriver,
    V1Driver,
    V2Driver,
    _read_small,
    _write,
    block_device_for,
    cpu_quota_us,
    detect,
)
from trio_worker._jobs._process import JobProcess, SpawnError, StartSpec
from trio_worker._limits import MIN_CPUS, MIN_MEMORY, LimitPolicy, validate_limits
from trio_worker._model import Limits

from .conftest import cgroup_parent, ext4_on_a_loop_device, joining, process_alive, require_root

UNIFIED = CGROUP_ROOT / "unified"
MiB = 1 << 20

# A job that leaves a daemon behind: fork, setsid, fork again, print the
# grandchild's pid, and exit. The grandchild is in neither the job's process
# group nor its session, so only the cgroup still knows it.
ESCAPEE = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print(os.getpid(), flush=True)
        time.sleep(60)
    os._exit(0)
os.wait()
"""


# -- fixtures ------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed and reaped afterwards whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def drivers() -> Iterator[Callable[..., CgroupDriver]]:
    """``detect`` with a parent group unique to the test; everything removed after."""
    made: list[CgroupDriver] = []

    def make(**kwargs: object) -> CgroupDriver:
        kwargs.setdefault("parent", cgroup_parent())
        driver = detect(**kwargs)  # type: ignore[arg-type]
        made.append(driver)
        return driver

    yield make
    for driver in made:
        driver.cleanup_leftovers()
        driver.close()
        driver.close()
        for parent in driver._parent_dirs():
            assert not parent.exists(), f"{parent} was left behind"


@pytest.fixture
def v1(drivers: Callable[..., CgroupDriver]) -> V1Driver:
    require_root("cgroup v1 tests")
    driver = drivers()
    assert isinstance(driver, V1Driver), f"expected cgroup v1 here, got {driver!r}"
    return driver


def spawn(
    procs: list[subprocess.Popen[bytes]],
    argv: list[str],
    group: object,
    **kwargs: object,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in ``group``, joined before exec."""
    from trio_worker._host._cgroups import JobCgroup

    assert group is None or isinstance(group, JobCgroup)
    proc = subprocess.Popen(  # type: ignore[call-overload]
        argv,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=joining(group),
        **kwargs,
    )
    procs.append(proc)
    return proc  # type: ignore[no-any-return]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- limit validation and policy (no root needed) --------------------------------


@pytest.mark.parametrize(
    ("limits", "field", "bound"),
    [
        (Limits(cpus=0.005), "limits.cpus", "0.01"),
        (Limits(cpus=-1.0), "limits.cpus", ">= 0"),
        (Limits(cpus=float("nan")), "limits.cpus", "finite"),
        (Limits(cpus=1e9), "limits.cpus", "8192"),
        (Limits(memory_bytes=1000), "limits.memory_bytes", str(MIN_MEMORY)),
        (Limits(memory_bytes=-5), "limits.memory_bytes", ">= 0"),
        (Limits(memory_bytes=1 << 63), "limits.memory_bytes", str(1 << 62)),
        (Limits(pids=1 << 30), "limits.pids", "4194304"),
        (Limits(io_write_bps=1 << 64), "limits.io_write_bps", "at most"),
        (Limits(pids=2.5), "limits.pids", "integer"),  # type: ignore[arg-type]
    ],
)
def test_bad_limits_name_field_and_bound(limits: Limits, field: str, bound: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_limits(limits)
    assert info.value.field == field
    assert bound in info.value.message


def test_good_limits_pass() -> None:
    validate_limits(Limits())
    validate_limits(Limits(cpus=MIN_CPUS, memory_bytes=MIN_MEMORY, pids=1, io_read_bps=1))
    validate_limits(Limits(cpus=2.5, memory_bytes=1 << 40, io_write_bps=100 * MiB, pids=10_000))


def test_cpu_quota_is_cpus_times_period() -> None:
    assert cpu_quota_us(0.2) == 20_000
    assert cpu_quota_us(1.5) == 150_000
    assert cpu_quota_us(MIN_CPUS) == 1000


def test_policy_fills_defaults_and_caps() -> None:
    policy = LimitPolicy(
        defaults=Limits(memory_bytes=512 * MiB, pids=100),
        maximums=Limits(cpus=2.0, memory_bytes=4096 * MiB, pids=1000),
    )
    got = policy.apply(Limits(cpus=0.5))
    # cpus as asked; memory and pids defaulted; io has neither default nor maximum.
    assert got == Limits(cpus=0.5, memory_bytes=512 * MiB, pids=100)
    # Unset with a maximum but no default: the maximum, never "unlimited".
    assert LimitPolicy(maximums=Limits(cpus=1.0)).apply(Limits()).cpus == 1.0
    with pytest.raises(InvalidRequest, match=r"limits\.memory_bytes: must be at most 4294967296"):
        policy.apply(Limits(memory_bytes=8192 * MiB))
    with pytest.raises(InvalidRequest, match=r"limits\.cpus: must be at most 2\.0"):
        policy.apply(Limits(cpus=3.0))
    with pytest.raises(ValueError, match="above the maximum"):
        LimitPolicy(defaults=Limits(pids=10), maximums=Limits(pids=5))


_ints = st.integers(min_value=0, max_value=1 << 40)
_limits = st.builds(
    Limits,
    cpus=st.one_of(st.just(0.0), st.floats(min_value=MIN_CPUS, max_value=64.0)),
    memory_bytes=st.one_of(st.just(0), st.integers(min_value=MIN_MEMORY, max_value=1 << 40)),
    io_read_bps=_ints,
    io_write_bps=_ints,
    pids=st.integers(min_value=0, max_value=100_000),
)


@given(requested=_limits, defaults=_limits, maximums=_limits)
def test_policy_properties(requested: Limits, defaults: Limits, maximums: Limits) -> None:
    try:
        policy = LimitPolicy(defaults=defaults, maximums=maximums)
    except ValueError:
        return  # a default above its maximum is a configuration error
    names = ("cpus", "memory_bytes", "io_read_bps", "io_write_bps", "pids")
    above = [
        n for n in names if getattr(maximums, n) and getattr(requested, n) > getattr(maximums, n)
    ]
    if above:
        with pytest.raises(InvalidRequest) as info:
            policy.apply(requested)
        assert info.value.field == f"limits.{above[0]}"
        assert str(getattr(maximums, above[0])) in info.value.message
        return
    got = policy.apply(requested)
    for name in names:
        asked, cap = getattr(requested, name), getattr(maximums, name)
        value = getattr(got, name)
        if asked:
            assert value == asked  # an explicit, allowed request is kept as is
        else:
            assert value == (getattr(defaults, name) or cap)
        if cap:
            assert 0 < value <= cap  # never unlimited, never above the cap
    assert policy.apply(got) == got  # applying twice changes nothing


# -- driver selection ----------------------------------------------------------


def _fake_v2(root: Path, parent: str, controllers: str = "cpu io memory pids") -> Path:
    """A directory tree with the files a v2 hierarchy and our parent group would have."""
    root.mkdir(exist_ok=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text(controllers + "\n")
    (root / "cgroup.procs").write_text("")
    group = root / parent
    group.mkdir()
    for name, text in {
        "cgroup.controllers": controllers,
        "cgroup.subtree_control": controllers,
        "cgroup.procs": "",
        "cgroup.kill": "",
        "memory.swap.max": "max",
        "memory.oom.group": "0",
    }.items():
        (group / name).write_text(text + "\n")
    return group


def test_detect_v1_on_this_machine(v1: V1Driver) -> None:
    assert v1.name == "v1"
    for controller in ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer"):
        assert controller in v1.parents, v1.missing
    assert v1.unified is not None
    assert v1.unified.is_relative_to(UNIFIED)
    v1.check(Limits(cpus=1, memory_bytes=64 * MiB, io_read_bps=MiB, io_write_bps=MiB, pids=5))


@pytest.fixture
def v1_needed(drivers: Callable[..., CgroupDriver]) -> V1Driver:
    """A v1 driver that puts a job only in the hierarchies it needs."""
    require_root("cgroup v1 tests")
    driver = drivers(every_hierarchy=False)
    assert isinstance(driver, V1Driver), f"expected cgroup v1 here, got {driver!r}"
    return driver


def test_v1_job_is_in_the_hierarchies_it_needs_by_default(v1: V1Driver) -> None:
    assert v1.unified is not None
    assert sorted(v1.hierarchies_for(None)) == sorted(v1._homes[c] for c in ("memory", "cpu"))


def test_v1_job_is_in_every_hierarchy_if_asked(drivers: Callable[..., CgroupDriver]) -> None:
    require_root("cgroup v1 tests")
    v1 = drivers(every_hierarchy=True)
    assert isinstance(v1, V1Driver)
    group = v1.create("every", Limits())
    assert {d.parent for d in group.dirs} == {*v1.parents.values(), v1.unified}
    group.remove()


def test_v1_job_is_only_in_the_hierarchies_it_needs(
    v1_needed: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Each hierarchy costs a place a mkdir, an open, a write and an rmdir: a job
    without limits is in memory (peak, OOM), cpu (scheduled apart from the server)
    and the unified mount (tracking, kill, CPU time) only; its usage still has both
    figures. (This is the default.)"""
    v1 = v1_needed
    group = v1.create("plain", Limits())
    assert {d.parent for d in group.dirs} == {v1.parents[c] for c in ("memory", "cpu")} | {
        v1.unified
    }
    for controller in ("cpuacct", "blkio", "pids", "freezer"):
        assert not (v1.parents[controller] / "job-plain").exists()
    busy = "b = b'x' * (32 << 20); sum(range(2_000_000))"
    proc = spawn(procs, [sys.executable, "-c", busy], group)
    assert proc.wait(timeout=20) == 0
    usage = group.usage()
    assert usage is not None
    assert usage.cpu_seconds > 0
    assert usage.memory_peak_bytes >= 32 * MiB
    group.remove()
    assert not any(d.exists() for d in group.dirs)


def test_v1_place_made_ahead_widens_for_its_limits(
    v1_needed: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    """A group made ahead of need (no limits known) gains the hierarchies its
    limits need at ``configure``, and the job's process is in each of them."""
    v1 = v1_needed
    made = v1.make("ahead")
    assert v1.parents["pids"] / "job-ahead" not in made.dirs
    group = v1.configure(made, Limits(cpus=0.5, pids=7))
    assert group is not made
    assert set(made.dirs) < set(group.dirs)
    assert (v1.parents["pids"] / "job-ahead" / "pids.max").read_text().strip() == "7"
    quota = (v1.parents["cpu"] / "job-ahead" / "cpu.cfs_quota_us").read_text().strip()
    assert quota == str(cpu_quota_us(0.5))
    proc = spawn(procs, ["sleep", "30"], group)
    wait_until(lambda: group.pids() == [proc.pid])
    for directory in group.dirs:
        assert str(proc.pid) in (directory / "cgroup.procs").read_text().split()
    group.kill()
    proc.wait(timeout=10)
    group.remove()
    assert not any(d.exists() for d in group.dirs)
    # A group that needs nothing more is used as it is.
    same = v1.make("same")
    assert v1.configure(same, Limits(memory_bytes=64 * MiB)) is same
    same.remove()


def test_v1_without_the_unified_mount_keeps_the_freezer_and_cpuacct(
    drivers: Callable[..., CgroupDriver],
) -> None:
    require_root("cgroup v1 tests")
    driver = drivers(use_unified=False, every_hierarchy=False)
    assert isinstance(driver, V1Driver)
    group = driver.create("legacy", Limits())
    parents = {d.parent for d in group.dirs}
    assert {driver.parents[c] for c in ("memory", "cpuacct", "freezer")} <= parents
    assert driver.parents["pids"] not in parents
    group.remove()


def test_detect_v2_fake_tree_writes_limit_files(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    parent = _fake_v2(root, "tw")
    driver = detect("tw", root=root, base="/")
    assert isinstance(driver, V2Driver)
    assert driver.missing == {}
    limits = Limits(cpus=0.5, memory_bytes=64 * MiB, io_read_bps=MiB, io_write_bps=2 * MiB, pids=10)
    group = driver.create("J1", limits, cwd=tmp_path, extra_tasks=2)
    job = parent / "job-J1"
    assert group.dirs == (job,)
    major, minor = block_device_for(tmp_path)
    files = {p.name: p.read_text() for p in job.iterdir()}
    assert files == {
        "cpu.max": "50000 100000",
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "io.max": f"{major}:{minor} rbps={MiB} wbps={2 * MiB}",
        "pids.max": "12",
    }
    # What the kernel would report, read back through the driver.
    (job / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (job / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    (job / "memory.peak").write_text(f"{60 * MiB}\n")
    (job / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert group.oom_killed()
    usage = group.usage()
    assert usage is not None
    assert (usage.cpu_seconds, usage.memory_peak_bytes) == (1.5, 60 * MiB)
    assert group.is_empty()
    group.kill()
    assert (job / "cgroup.kill").read_text() == "1"
    # Only io limits on one side: the other direction stays "max".
    other = driver.create("J2", Limits(io_write_bps=MiB), cwd=tmp_path)
    assert (other.dirs[0] / "io.max").read_text() == f"{major}:{minor} rbps=max wbps={MiB}"


def test_v2_fake_tree_names_missing_controllers(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _fake_v2(root, "tw", controllers="cpu memory")
    driver = detect("tw", root=root, base="/")
    assert isinstance(driver, V2Driver)
    driver.check(Limits(cpus=1, memory_bytes=64 * MiB))
    with pytest.raises(Unenforceable) as info:
        driver.create("J", Limits(cpus=1, io_write_bps=MiB, pids=3), cwd=tmp_path)
    message = str(info.value)
    assert "io write limit needs a writable io cgroup controller" in message
    assert "pids limit needs a writable pids cgroup controller" in message
    assert "cpu" not in message.split("(")[0]
    assert not (root / "tw" / "job-J").exists()  # refused before anything was made


def test_v2_enables_controllers_down_to_the_parent(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _fake_v2(root, "tw")
    (root / "cgroup.subtree_control").write_text("cpu io memory\n")
    driver = detect("tw", root=root, base="/")
    assert driver.missing == {}
    assert (root / "cgroup.subtree_control").read_text() == "+pids"  # what it wrote


def test_detect_nothing_mounted_is_no_driver(tmp_path: Path) -> None:
    driver = detect("tw", root=tmp_path / "absent")
    assert isinstance(driver, NoDriver)
    assert not driver.tracks
    driver.check(Limits())  # no limits: fine
    group = driver.create("J", Limits())
    assert not group.tracked
    assert group.is_empty()
    assert group.pids() == []
    assert group.usage() is None
    group.kill()
    group.remove()
    with pytest.raises(Unenforceable, match="memory limit needs a writable memory cgroup"):
        driver.create("J", Limits(memory_bytes=64 * MiB))
    assert driver.cleanup_leftovers() == []


def test_detect_read_only_is_no_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cgroup"
    _fake_v2(root, "tw")

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    driver = detect("other", root=root, base="/")
    assert isinstance(driver, NoDriver)
    assert "Read-only file system" in driver.reason
    with pytest.raises(Unenforceable, match=r"cpu limit needs .*Read-only file system"):
        driver.check(Limits(cpus=1))


def test_detect_as_non_root_is_no_driver() -> None:
    """Probe as ``nobody`` in a forked child (the venv's python is not reachable for it)."""
    require_root("switching to an unprivileged user")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            driver = detect("trio-worker-test-nobody")
            try:
                driver.check(Limits(memory_bytes=1 << 30))
                result = f"{driver.name}\nno error"
            except Unenforceable as exc:
                result = f"{driver.name}\n{exc}"
            os.write(write_end, result.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        output = pipe.read()
    os.waitpid(pid, 0)
    name, message = output.split("\n", 1)
    assert name == "none"
    assert message.startswith("memory limit needs a writable memory cgroup controller")
    assert "Permission denied" in message


def test_parent_name_must_be_relative() -> None:
    for bad in ("", "/abs", "../up", "a/../b"):
        with pytest.raises(ValueError, match="relative"):
            detect(bad)


# -- which disk IO limits apply to -----------------------------------------------


def test_block_device_of_a_disk_directory(tmp_path: Path) -> None:
    major, minor = block_device_for(tmp_path)
    assert Path(f"/sys/dev/block/{major}:{minor}").exists()
    assert not Path(f"/sys/dev/block/{major}:{minor}/partition").exists()


def test_block_device_of_tmpfs_is_unenforceable() -> None:
    shm = Path("/dev/shm")
    if os.major(shm.stat().st_dev) != 0:
        pytest.skip("/dev/shm is not a virtual file system here")
    with pytest.raises(Unenforceable, match=r"io limit: /dev/shm is on tmpfs"):
        block_device_for(shm)


def test_block_device_follows_overlay_upperdir(tmp_path: Path) -> None:
    """A major-0 file system found in mountinfo as overlay resolves to its upper dir's disk."""
    shm = Path("/dev/shm")
    dev = shm.stat().st_dev
    if os.major(dev) != 0:
        pytest.skip("/dev/shm is not a virtual file system here")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"99 1 0:{os.minor(dev)} / /dev/shm rw - overlay overlay "
        f"rw,lowerdir=/nowhere,upperdir={tmp_path},workdir=/w\n"
    )
    assert block_device_for(shm, mountinfo=mountinfo) == block_device_for(tmp_path)


def test_block_device_of_a_partition_is_its_disk(tmp_path: Path) -> None:
    """IO limits go to the whole disk: a partition is mapped via /sys/dev/block."""
    major, minor = block_device_for(tmp_path)
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "virtual" / "block" / "sdz"
    part = disk / "sdz1"
    part.mkdir(parents=True)
    (part / "partition").write_text("1\n")
    (disk / "dev").write_text("8:0\n")
    (sysfs / "dev" / "block").mkdir(parents=True)
    (sysfs / "dev" / "block" / f"{major}:{minor}").symlink_to(part)
    assert block_device_for(tmp_path, sysfs=sysfs) == (8, 0)


# -- real cgroups: limits ------------------------------------------------------


def test_memory_limit_oom_kill_is_reported(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = v1.create("oom", Limits(memory_bytes=48 * MiB))
    proc = spawn(procs, [sys.executable, "-c", "b = b'x' * (256 << 20)"], group)
    assert proc.wait(timeout=20) == -signal.SIGKILL
    assert group.oom_killed()
    usage = group.usage()
    assert usage is not None
    assert 20 * MiB < usage.memory_peak_bytes <= 48 * MiB
    group.remove()
    assert not any(d.exists() for d in group.dirs)


def test_no_oom_without_pressure(v1: V1Driver, procs: list[subprocess.Popen[bytes]]) -> None:
    group = v1.create("calm", Limits(memory_bytes=256 * MiB))
    assert spawn(procs, ["true"], group).wait(timeout=10) == 0
    assert not group.oom_killed()
    group.remove()


def test_cpu_limit_caps_a_busy_loop(v1: V1Driver, procs: list[subprocess.Popen[bytes]]) -> None:
    group = v1.create("cpu", Limits(cpus=0.2))
    start = time.monotonic()
    spawn(procs, ["sh", "-c", "while :; do :; done"], group)
    # Run until the loop has had 0.4 CPU-s (2 s at the cap; longer on a loaded host,
    # where the loop may get less than its share), then check it never had more.
    deadline = start + 30
    while True:
        time.sleep(0.25)
        usage = group.usage()
        elapsed = time.monotonic() - start
        assert usage is not None
        if usage.cpu_seconds >= 0.4 or time.monotonic() > deadline:
            break
    share = usage.cpu_seconds / elapsed
    print(f"cpus=0.2: {usage.cpu_seconds:.3f} CPU-s in {elapsed:.3f} s = {share:.1%} of a CPU")
    assert usage.cpu_seconds >= 0.4, "the busy loop did not run"
    assert share <= 0.25
    group.kill()
    group.wait_empty_sync(5)
    procs[0].wait()
    group.remove()


def test_pids_limit_contains_a_fork_loop(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = v1.create("forks", Limits(pids=8))
    loop = """
import os, time
made = failed = 0
for _ in range(200):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        made += 1
    except BlockingIOError:
        failed += 1
print(made, failed, flush=True)
time.sleep(30)
"""
    proc = spawn(procs, [sys.executable, "-c", loop], group, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    made, failed = map(int, proc.stdout.readline().split())
    assert made == 7
    assert failed == 193
    assert len(group.pids()) == 8
    assert (v1.parents["pids"] / "job-forks" / "pids.current").read_text().strip() == "8"
    # The server (this process) is not limited: it can still fork.
    assert subprocess.run(["true"], check=False).returncode == 0
    group.kill()
    group.wait_empty_sync(5)
    proc.wait()
    group.remove()


@pytest.fixture
def loop_mount(tmp_path: Path) -> Iterator[Path]:
    """An ext4 file system on a loop device, mounted at a temporary directory."""
    with ext4_on_a_loop_device(tmp_path, 64 * MiB) as mount_point:
        yield mount_point


def test_io_write_limit_throttles_direct_io(
    v1: V1Driver, loop_mount: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    limit = 4 * MiB
    major, _minor = block_device_for(loop_mount)
    assert major == 7  # the loop device itself: it has no partitions
    dd = ["dd", "if=/dev/zero", "of=data", "bs=64K", "count=128", "oflag=direct"]  # 8 MiB
    timings = {}
    for name, limits in (("free", Limits()), ("limited", Limits(io_write_bps=limit))):
        group = v1.create(f"io-{name}", limits, cwd=loop_mount)
        start = time.monotonic()
        proc = spawn(procs, dd, group, cwd=loop_mount, stderr=subprocess.DEVNULL)
        assert proc.wait(timeout=20) == 0
        timings[name] = time.monotonic() - start
        group.remove()
    rate = 8 * MiB / timings["limited"]
    print(f"dd oflag=direct under io_write_bps=4MiB/s: {rate / MiB:.2f} MiB/s ({timings})")
    assert timings["free"] < 1.0
    assert 0.5 * limit < rate <= 1.25 * limit


# -- real cgroups: tracking, kill, cleanup --------------------------------------


async def _escapee_dies_on_kill(
    driver: CgroupDriver, procs: list[subprocess.Popen[bytes]], job_id: str
) -> None:
    group = driver.create(job_id, Limits())
    proc = spawn(procs, [sys.executable, "-c", ESCAPEE], group, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    escapee = int(proc.stdout.readline())
    assert proc.wait(timeout=10) == 0  # the job's main process is gone...
    assert process_alive(escapee)  # ...its daemon is not, and it left the process group
    assert os.getpgid(escapee) != proc.pid
    assert group.pids() == [escapee]
    assert not group.is_empty()
    group.kill()
    with trio.fail_after(5):
        await group.wait_empty()
    assert group.pids() == []
    wait_until(lambda: not process_alive(escapee))
    group.remove()
    assert not any(d.exists() for d in group.dirs)


async def test_escapee_dies_on_kill_v1_with_unified(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    await _escapee_dies_on_kill(v1, procs, "escape-hybrid")


async def test_escapee_dies_on_kill_v1_freezer_only(
    drivers: Callable[..., CgroupDriver], procs: list[subprocess.Popen[bytes]]
) -> None:
    require_root("cgroup v1 tests")
    driver = drivers(use_unified=False)
    assert isinstance(driver, V1Driver)
    assert driver.unified is None
    await _escapee_dies_on_kill(driver, procs, "escape-freezer")


async def test_v2_driver_on_the_unified_mount_tracks_and_kills(
    drivers: Callable[..., CgroupDriver], procs: list[subprocess.Popen[bytes]]
) -> None:
    require_root("cgroup v2 tests")
    if not (UNIFIED / "cgroup.kill").exists() and not (UNIFIED / "cgroup.controllers").exists():
        pytest.fail(f"no cgroup v2 mount at {UNIFIED}")
    driver = drivers(root=UNIFIED)
    assert isinstance(driver, V2Driver)
    # No controllers are enabled here: tracking works, limits are refused by name.
    with pytest.raises(Unenforceable, match="memory limit needs a writable memory cgroup"):
        driver.check(Limits(memory_bytes=64 * MiB))
    await _escapee_dies_on_kill(driver, procs, "escape-v2")
    group = driver.create("usage", Limits())
    spawn(procs, [sys.executable, "-c", "sum(range(3_000_000))"], group).wait(timeout=10)
    usage = group.usage()
    assert usage is not None
    assert usage.cpu_seconds > 0
    assert not group.oom_killed()
    group.remove()


async def test_wait_empty_wakes_when_the_last_process_exits(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Not before: while the process lives, the waiter stays blocked; then its exit wakes it
    (no clock: the exit is ours to cause)."""
    group = v1.create("wake", Limits())
    proc = spawn(procs, ["sleep", "1000"], group)
    emptied = trio.Event()

    async def waiter() -> None:
        await group.wait_empty()
        emptied.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not emptied.is_set()
        assert proc.poll() is None
        proc.kill()
        with trio.fail_after(5):
            await emptied.wait()
    proc.wait()
    group.remove()


def test_leftovers_from_an_earlier_run_are_killed_and_removed(
    drivers: Callable[..., CgroupDriver], procs: list[subprocess.Popen[bytes]]
) -> None:
    require_root("cgroup v1 tests")
    parent = cgroup_parent()
    first = drivers(parent=parent)
    groups = [first.create(job_id, Limits(pids=5)) for job_id in ("old1", "old2")]
    sleepers = [spawn(procs, ["sleep", "60"], g) for g in groups]
    # "Restart": a new driver on the same parent finds and cleans them.
    second = drivers(parent=parent)
    assert second.cleanup_leftovers() == ["old1", "old2"]
    for proc in sleepers:
        assert proc.wait(timeout=5) == -signal.SIGKILL
    for group in groups:
        assert not any(d.exists() for d in group.dirs)
    assert second.cleanup_leftovers() == []


def test_failed_join_is_reported_not_crashed(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = v1.create("gone", Limits())
    group.remove()  # so joining fails
    spec = StartSpec("true", (), dict(os.environ), None)
    with pytest.raises(SpawnError, match="cannot join the job's cgroup: No such file"):
        JobProcess.spawn(spec, cgroup=group)
    assert procs == []


def test_kernel_rejections_become_cgroup_errors(v1: V1Driver) -> None:
    with pytest.raises(CgroupError, match="Invalid argument") as info:
        _write(v1.parents["cpu"] / "cpu.cfs_quota_us", "not-a-number")
    assert info.value.errno == errno.EINVAL
    group = v1.create("twice", Limits())
    with pytest.raises(CgroupError, match="File exists"):
        v1.create("twice", Limits())
    group.remove()


def test_bad_job_ids_cannot_escape_the_parent(v1: V1Driver) -> None:
    for bad in ("../x", "a/b", "..", ""):
        with pytest.raises(InvalidRequest):
            v1.create(bad, Limits())


def test_a_small_file_is_read_whole_in_one_read_and_a_big_one_still_whole(tmp_path: Path) -> None:
    """The end's counters are read with one read (a short read of a one-record seq_file
    is all of it); a file that fills the read is read to its end as before."""
    small = tmp_path / "small"
    small.write_text("populated 0\nfrozen 0\n")
    assert _read_small(str(small)) == "populated 0\nfrozen 0\n"
    big = tmp_path / "big"
    big.write_text("x" * 10_000)
    assert _read_small(str(big)) == "x" * 10_000
    assert _read_small(str(tmp_path / "gone")) is None
    assert _read_small("/proc/self/cgroup") == Path("/proc/self/cgroup").read_text()


# -- recycling an ended job's group ---------------------------------------------------

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"


def _recycled(driver: CgroupDriver, group: JobCgroup) -> JobCgroup:
    again = driver.recycle([group])[0]
    assert again is not None, f"{group} was not recycled"
    assert again.dirs == group.dirs  # the same directories, for the next job
    return again


def test_v1_a_recycled_group_counts_only_the_next_jobs_usage(
    v1: V1Driver, procs: list[subprocess.Popen[bytes]]
) -> None:
    group = v1.make("first")
    first = [sys.executable, "-c", BURN + "\nb = b'x' * (64 << 20)"]
    assert spawn(procs, first, group).wait(timeout=30) == 0
    before = group.usage()
    assert before is not None
    assert before.cpu_seconds >= 0.3
    assert before.memory_peak_bytes >= 64 * MiB
    # Whatever of the first job's files the page cache still charges to it would keep
    # the group from being recycled (as it should): reclaimed here, for the counters.
    _write(v1.parents["memory"] / group.dirs[0].name / "memory.force_empty", "0")
    again = _recycled(v1, group)
    fresh = again.usage()
    assert fresh is not None
    assert fresh.cpu_seconds < 0.05
    assert fresh.memory_peak_bytes < 8 * MiB
    assert spawn(procs, ["true"], again).wait(timeout=10) == 0
    after = again.usage()
    assert after is not None
    assert after.cpu_seconds < 0.2  # `true`'s, not the first job's 0.3 s and more
    assert after.memory_peak_bytes < 8 * MiB  # not the first job's 64 MiB
    assert not again.oom_killed()
    again.remove()
    assert not any(d.exists() for d in group.dirs)


def test_v2_a_recycled_group_counts_only_the_next_jobs_cpu(
    drivers: Callable[..., CgroupDriver], procs: list[subprocess.Popen[bytes]]
) -> None:
    require_root("cgroup v2 tests")
    driver = drivers(root=UNIFIED)
    assert isinstance(driver, V2Driver)
    group = driver.make("first")
    assert spawn(procs, [sys.executable, "-c", BURN], group).wait(timeout=30) == 0
    before = group.usage()
    assert before is not None
    assert before.cpu_seconds >= 0.3
    again = _recycled(driver, group)
    assert spawn(procs, ["true"], again).wait(timeout=10) == 0
    after = again.usage()
    assert after is not None
    assert after.cpu_seconds < 0.2
    again.remove()
    assert not group.dirs[0].exists()


@pytest.mark.parametrize("hierarchy", ["v1", "v2"])
def test_a_group_that_is_not_as_new_is_not_recycled(
    hierarchy: str,
    drivers: Callable[..., CgroupDriver],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """Only an ended job's group that a new one could not be told from is recycled: not
    one with a process left, a subgroup, limits, a frozen state, an OOM kill or (v1)
    memory still charged to it; those are removed (``remove``) as before."""
    require_root("cgroup tests")
    driver = drivers(root=UNIFIED) if hierarchy == "v2" else drivers()
    clean = driver.make("clean")
    busy = driver.make("busy")
    proc = spawn(procs, ["sleep", "1000"], busy)
    nested = driver.make("nested")
    (nested.dirs[-1] / "sub").mkdir()
    frozen = driver.make("frozen")
    freeze = frozen.dirs[-1] / "cgroup.freeze"
    _write(freeze, "1")
    groups = [clean, busy, nested, frozen]
    if isinstance(driver, V1Driver):
        limited = driver.create("limited", Limits(memory_bytes=256 * MiB))
        # 32 MiB in a tmpfs file: charged to the group after its writer ended.
        charged = driver.make("charged")
        shm = Path("/dev/shm") / f"tw-recycle-{secrets.token_hex(4)}"
        write = ["dd", "if=/dev/zero", f"of={shm}", "bs=1M", "count=32"]
        assert spawn(procs, write, charged, stderr=subprocess.DEVNULL).wait(timeout=30) == 0
        oom = driver.create("oom", Limits(memory_bytes=48 * MiB))
        hog = [sys.executable, "-c", "b = b'x' * (256 << 20)"]
        assert spawn(procs, hog, oom).wait(timeout=30) == -signal.SIGKILL
        oom.limited = False  # (as if its limit were the parent's: the kill is what counts)
        groups += [limited, charged, oom]
    try:
        recycled = driver.recycle(groups)
        assert recycled[0] is not None
        assert recycled[1:] == [None] * (len(groups) - 1)
    finally:
        if isinstance(driver, V1Driver):
            shm.unlink()
        _write(freeze, "0")
        proc.kill()
        proc.wait()
        wait_until(busy.is_empty)
        for group in groups:
            group.remove()


def test_a_watch_on_parents_hears_its_own_childrens_removal_not_others(tmp_path: Path) -> None:
    # The memory caps' watch (``Launcher.watch_memory_caps``) watches the group above
    # the jobs' parent for that parent's removal. That group may hold other servers'
    # parents (tests beside each other, in one group): each came or went woke every
    # server, which read its caps in a thread; at the fd limit that read failed,
    # killed every waiting seed and took a descriptor a Start was counting on.
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    limit = ours / "memory.max"
    limit.write_text("max\n")
    watch = Inotify(limit, parents={tmp_path: ["ours"]})
    try:
        assert watch.drain() is False  # nothing yet
        for _ in range(3):
            theirs.mkdir()
            theirs.rmdir()
        (tmp_path / "other").mkdir()
        (tmp_path / "other").rename(tmp_path / "moved")
        assert watch.drain() is False  # others' groups came and went: no news
        limit.write_text("1048576\n")
        assert watch.drain() is True  # a write to a watched file
        assert watch.drain() is False
        theirs.mkdir()
        theirs.rmdir()
        limit.unlink()
        ours.rmdir()  # (after another's: one read has both)
        assert watch.drain() is True
    finally:
        watch.close()
    # A parent removed (its watch ends: IN_IGNORED) is news, whatever its children were.
    above = tmp_path / "above"
    above.mkdir()
    watch = Inotify(parents={above: ["ours"]})
    try:
        above.rmdir()
        assert watch.drain() is True
    finally:
        watch.close()
