"""A place made in one call (``_host._place.make_place``, with its seed:
``make_seeded_place``) and groups removed together (``_host._cgroups.remove_groups``):
what they make, and that a failure at any step leaves nothing behind, checked with real
failures: a tmpfs out of inodes or blocks, a lowered RLIMIT_NOFILE, a removed parent
group, a group still holding a process or a subgroup. Real cgroups (v1 and the unified
mount as v2) where the kernel's part matters; plain directories where only the clean-up
does.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import select
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from trio_worker._host import _cplace, _cspawn
from trio_worker._host._cgroups import (
    CgroupDriver,
    CgroupError,
    JobCgroup,
    NoDriver,
    V1Driver,
    V2Driver,
    remove_groups,
)
from trio_worker._host._place import PlaceError, Sown, Step, make_place, make_seeded_place
from trio_worker._host._spawn import Seed
from trio_worker._jobs._process import PIPE_SIZES, output_pipe
from trio_worker._jobs._store import process_start_time

from .conftest import require_root
from .test_cgroups import UNIFIED, drivers, procs, spawn
from .test_faults import fill, small_tmpfs

__all__ = ["drivers", "procs"]  # fixtures of test_cgroups

#: Files a place may be made with (each with its first bytes, or None: empty). The
#: launcher's places have none (a log's files come with its first write), but the call
#: still makes what it is given, and removes it on failure.
FILES: list[tuple[str, bytes | None]] = [
    ("output.log", None),
    ("output.idx", None),
    ("output.start", bytes(16)),
]


def open_fds() -> set[int]:
    """This process's descriptors, but those seeds' births keep (``release_seed_slots``)."""
    return {int(fd) for fd in os.listdir("/proc/self/fd")} - set(_cspawn.seed_slots())


def test_a_place_has_its_directory_files_groups_and_their_fds(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    require_root("cgroups")
    driver = drivers()
    assert isinstance(driver, V1Driver)
    group = driver.planned("p1")
    assert not any(d.exists() for d in group.dirs)  # planned, not made
    # V1's joins and texts (made without a Path per hierarchy) say what the generic ones do.
    assert group.joins() == JobCgroup.joins(group)
    assert group.texts() == [str(d) for d in group.dirs]
    directory = tmp_path / "p1"
    fds = make_place(directory, FILES, group)
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert sorted(p.name for p in directory.iterdir()) == sorted(n for n, _ in FILES)
        assert (directory / "output.start").read_bytes() == bytes(16)
        assert (directory / "output.log").read_bytes() == b""
        assert stat.S_IMODE((directory / "output.log").stat().st_mode) == 0o600
        assert all(d.is_dir() for d in group.dirs)
        # One fd per hierarchy, as open_join gives: cgroup.procs, the unified group's dir.
        opened = [os.readlink(f"/proc/self/fd/{fd}") for fd in fds]
        expected = [d if not procs else f"{d}/cgroup.procs" for d, procs in group.joins()]
        assert opened == expected
        assert all(os.get_inheritable(fd) is False for fd in fds)
    finally:
        for fd in fds:
            os.close(fd)
        assert remove_groups([group]) == []
    assert not any(d.exists() for d in group.dirs)


def test_a_place_without_a_directory_is_its_groups(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """The launcher's places have no directory (a job's comes with its first output):
    only the groups and their fds are made."""
    require_root("cgroups")
    group = drivers().planned("p5")
    fds = make_place(None, (), group)
    try:
        assert all(d.is_dir() for d in group.dirs)
        assert len(fds) == len(group.dirs)
    finally:
        for fd in fds:
            os.close(fd)
        assert remove_groups([group]) == []
    with pytest.raises(ValueError, match="directory"):
        _cplace.make_place(b"", [b"output.log"], [None], [], [])


def test_a_parent_group_named_in_bytes_that_are_not_utf8_is_made_and_removed(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    # A name from the command line keeps its bytes as surrogate escapes (os.fsencode):
    # the removal's one call encoded the paths as UTF-8 and raised, in the refill's
    # thread, at the first ended job's group: the supervisor ended.
    require_root("cgroups")
    driver = drivers(parent=f"trio-worker-test-\udcff{os.getpid()}")
    group = driver.planned("p3")
    for fd in make_place(tmp_path / "p3", FILES, group):
        os.close(fd)
    assert all(d.is_dir() for d in group.dirs)
    assert remove_groups([group]) == []
    assert not any(d.exists() for d in group.dirs)


def test_a_v2_place_is_joined_by_its_directory(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """On a pure v2 host (here the unified mount, driven as one) the group is one
    directory, opened as such: the seed is cloned into it."""
    require_root("cgroups")
    driver = drivers(root=UNIFIED)
    assert isinstance(driver, V2Driver)
    group = driver.planned("p2")
    [fd] = make_place(tmp_path / "p2", FILES, group)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(group.dirs[0])
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    assert remove_groups([group]) == []
    assert not group.dirs[0].exists()


def test_no_inode_left_leaves_nothing(tmp_path: Path) -> None:
    """ENOSPC creating a log file (a tmpfs with 3 inodes: its root, the directory and
    one file): the file made and the directory are removed, no fd is left open."""
    with small_tmpfs(tmp_path / "disk", "size=1m,nr_inodes=3") as disk:
        groups = [tmp_path / "g1"]
        before = open_fds()
        made = _cplace.make_place(
            os.fsencode(disk / "p"),
            [os.fsencode(n) for n, _ in FILES],
            [c for _, c in FILES],
            [os.fsencode(g) for g in groups],
            [False],
        )
        assert isinstance(made, tuple)
        step, code, path = made
        assert (Step(step), code) == (Step.FILE, errno.ENOSPC)
        assert path == os.fsencode(disk / "p" / "output.idx")
        assert list(disk.iterdir()) == []
        assert not groups[0].exists()  # never made: the files come first
        assert open_fds() == before


def test_a_full_disk_still_gives_the_files(tmp_path: Path) -> None:
    """No block left for ``output.start``'s bytes: its write fails, the place is made
    all the same (a full disk must not stop the job; retention needs the file)."""
    with small_tmpfs(tmp_path / "disk", "size=1m") as disk:
        fill(disk)
        group_dir = tmp_path / "g1"
        [fd] = _cplace.make_place(
            os.fsencode(disk / "p"),
            [os.fsencode(n) for n, _ in FILES],
            [c for _, c in FILES],
            [os.fsencode(group_dir)],
            [False],
        )
        os.close(fd)
        assert sorted(p.name for p in (disk / "p").iterdir()) == sorted(n for n, _ in FILES)
        assert (disk / "p" / "output.start").stat().st_size == 0  # not written
        assert group_dir.is_dir()


def test_a_read_only_disk_is_said_and_leaves_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", "size=1m,ro") as disk:
        with pytest.raises(PlaceError) as caught:
            make_place(disk / "p", FILES, NoDriver("none here").planned("p"))
        assert caught.value.step is Step.DIRECTORY
        assert caught.value.errno == errno.EROFS
        assert caught.value.filename == str(disk / "p")
        assert list(disk.iterdir()) == []


def test_a_group_not_joinable_leaves_nothing(tmp_path: Path) -> None:
    """A "group" without ``cgroup.procs`` (a plain directory): ENOENT at the join, and
    the groups made, the files and the directory all go."""
    groups = [tmp_path / "g1", tmp_path / "g2"]
    before = open_fds()
    made = _cplace.make_place(
        os.fsencode(tmp_path / "p"),
        [os.fsencode(n) for n, _ in FILES],
        [c for _, c in FILES],
        [os.fsencode(g) for g in groups],
        [False, True],  # the first opened as a directory (fine), the second by cgroup.procs
    )
    assert isinstance(made, tuple)
    assert made == (Step.JOIN, errno.ENOENT, os.fsencode(groups[1] / "cgroup.procs"))
    assert sorted(tmp_path.iterdir()) == []
    assert open_fds() == before


def test_a_recycled_groups_place_makes_no_group_and_a_failure_leaves_them(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """A place in recycled groups (``CgroupDriver.recycle``'s) opens what it is joined by
    and makes no directory; a failure at the join leaves the groups as they were (they
    are not the call's to remove)."""
    require_root("cgroups")
    driver = drivers()
    group = driver.make("r1")
    before = open_fds()
    fds = make_place(None, (), group, recycled=True)
    assert len(fds) == len(group.dirs)
    for fd in fds:
        os.close(fd)
    assert open_fds() == before
    # A plain directory as the last "group": ENOENT at its join, the others stay.
    plain = tmp_path / "g"
    plain.mkdir()
    joins = [*group.texts(), str(plain)]
    made = _cplace.make_place(
        b"",
        [],
        [],
        [os.fsencode(d) for d in joins],
        [True] * len(joins),
        None,
        True,
    )
    assert made == (Step.JOIN, errno.ENOENT, os.fsencode(plain / "cgroup.procs"))
    assert all(d.is_dir() for d in group.dirs)
    assert plain.is_dir()
    assert open_fds() == before
    assert remove_groups([group]) == []


def test_a_removed_parent_group_fails_the_place_and_leaves_nothing(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """One hierarchy's parent group removed under the driver (a real cgroupfs): the
    place fails there, as ``CgroupError`` says, and the other hierarchies' groups it
    made, its files and its directory are removed."""
    require_root("cgroups")
    driver = drivers()
    assert isinstance(driver, V1Driver)
    group = driver.planned("p3")
    dirs = group.dirs
    assert len(dirs) >= 2
    gone = dirs[1].parent
    os.rmdir(gone)
    try:
        before = open_fds()
        with pytest.raises(PlaceError) as caught:
            make_place(tmp_path / "p3", FILES, group)
        assert caught.value.step is Step.CGROUP
        assert caught.value.errno == errno.ENOENT
        assert caught.value.filename == str(dirs[1])
        error = caught.value.cgroup_error()
        assert isinstance(error, CgroupError)
        assert error.errno == errno.ENOENT
        assert str(error) == f"cannot create cgroup {dirs[1]}: No such file or directory"
        assert not any(d.exists() for d in dirs)
        assert not (tmp_path / "p3").exists()
        assert open_fds() == before
    finally:
        gone.mkdir()  # for the fixture's clean-up


def test_out_of_descriptors_at_the_join_leaves_nothing(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """EMFILE opening the groups' fds (a real, lowered RLIMIT_NOFILE, in a child
    process): the fds opened are closed, every group and file removed."""
    require_root("cgroups")
    driver = drivers()
    group = driver.planned("p4")
    dirs = [str(d) for d in group.dirs]
    assert len(dirs) >= 3
    script = f"""
import errno, os, resource, sys
sys.path[:0] = {sys.path!r}
from trio_worker._host import _cplace
files = {FILES!r}
groups = {dirs!r}
before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# 2 fds to spare: the highest listed was the listing's own, closed since.
resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 2, hard))
made = _cplace.make_place(
    {os.fsencode(tmp_path / "p4")!r}, [n.encode() for n, _ in files], [c for _, c in files],
    [g.encode() for g in groups], [True] * (len(groups) - 1) + [False],
)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert made[:2] == (4, errno.EMFILE), made
assert sorted(int(fd) for fd in os.listdir("/proc/self/fd")) == before
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "ok\n", done.stderr
    assert not any(Path(d).exists() for d in dirs)
    assert not (tmp_path / "p4").exists()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)  # (this process untouched)


seeds_only = pytest.mark.skipif(not _cspawn.HAVE_SEED, reason="seeds are x86-64 only")
_F_GETPIPE_SZ = 1032


def _run_seed(seed: Seed, argv: list[str], stdout: int, stderr: int) -> tuple[int, str, str]:
    """Run ``argv`` in ``seed``: (exit code, stdout, stderr)."""
    seed.go(argv[0], argv, dict(os.environ), None)
    outs = {stdout: b"", stderr: b""}
    open_ = [stdout, stderr]
    while open_:
        for fd in select.select(open_, [], [], 30)[0]:
            chunk = os.read(fd, 65536)
            outs[fd] += chunk
            if not chunk:
                os.close(fd)
                open_.remove(fd)
    while not seed.poll():
        select.select([seed.report_fd], [], [], 30)
    assert seed.error(argv[0], None) is None
    _, status = os.waitpid(seed.pid, 0)
    os.close(seed.pidfd)
    return os.waitstatus_to_exitcode(status), outs[stdout].decode(), outs[stderr].decode()


def _seeds_of_mine() -> list[int]:
    """Children of this process still waiting as seeds (named so)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") :]
            if comm == "tw-seed" and int(rest.split()[2]) == os.getpid():
                found.append(int(entry))
    return found


@seeds_only
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_a_seeded_place_has_its_seed_in_its_groups_and_nothing_more_open(
    tmp_path: Path, drivers: Callable[..., CgroupDriver], v2: bool
) -> None:
    """The place and its seed in one call: no group fd left (the seed joined them: the
    v2 group by its clone), the seed's stdout and stderr pipes at the first size the
    kernel takes, its stdin /dev/null, its start time as /proc says it."""
    require_root("cgroups")
    driver = drivers(root=UNIFIED) if v2 else drivers()
    group = driver.planned("s1")
    before = open_fds()
    fds, sown = make_seeded_place(
        tmp_path / "s1", FILES, group, nofile_soft=None, pipe_sizes=PIPE_SIZES
    )
    assert fds == []
    assert isinstance(sown, Sown), sown
    seed = sown.seed
    assert open_fds() - before == {*seed.fds, sown.stdout, sown.stderr}
    assert before - open_fds() == set()
    assert sown.start_time == process_start_time(seed.pid)
    assert _cspawn.proc_start_time(seed.pid) == sown.start_time
    # The size the thread's way gives (the big one with CAP_SYS_RESOURCE, else the other).
    read_end, write_end = output_pipe()
    size = fcntl.fcntl(read_end, _F_GETPIPE_SZ)
    os.close(read_end)
    os.close(write_end)
    assert size in PIPE_SIZES
    assert (
        fcntl.fcntl(sown.stdout, _F_GETPIPE_SZ) == fcntl.fcntl(sown.stderr, _F_GETPIPE_SZ) == size
    )
    assert sorted(p.name for p in (tmp_path / "s1").iterdir()) == sorted(n for n, _ in FILES)
    code, out, err = _run_seed(
        seed,
        ["sh", "-c", "readlink /proc/self/fd/0; cat /proc/self/cgroup; echo said >&2"],
        sown.stdout,
        sown.stderr,
    )
    assert (code, err) == (0, "said\n")
    lines = out.splitlines()
    assert lines[0] == "/dev/null"
    joined = [line for line in lines[1:] if line.endswith("/" + group.dirs[0].name)]
    assert len(joined) == len(group.dirs), out
    assert remove_groups([group]) == []
    assert open_fds() == before


@seeds_only
def test_seeds_start_times_are_those_proc_gives(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """A seed's start time comes from the clock around its clone when both ends fall in
    one clock tick, else from /proc in C: either way what ``process_start_time`` reads
    (recovery compares them to tell a job from a process that reused its pid)."""
    require_root("cgroups")
    driver = drivers()
    assert _cspawn.proc_start_time(os.getpid()) == process_start_time(os.getpid())
    assert _cspawn.proc_start_time(2**22 + 1) is None  # (above pid_max: no such process)
    groups = []
    for i in range(40):
        group = driver.planned(f"t{i}")
        fds, sown = make_seeded_place(
            tmp_path / f"t{i}", FILES, group, nofile_soft=None, pipe_sizes=PIPE_SIZES
        )
        assert isinstance(sown, Sown), sown
        assert sown.start_time == process_start_time(sown.seed.pid)
        sown.seed.kill()
        for fd in (*fds, sown.stdout, sown.stderr):
            os.close(fd)
        groups.append(group)
    assert remove_groups(groups) == []


@seeds_only
def test_a_failed_seeded_place_leaves_nothing_and_no_seed(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """A place that fails (here its parent group removed: ENOENT at the groups) plants
    no seed, and leaves nothing as ``make_place`` leaves nothing."""
    require_root("cgroups")
    driver = drivers()
    group = driver.planned("f1")
    for parent in driver._parent_dirs():
        parent.rmdir()
    before = open_fds()
    with pytest.raises(PlaceError) as caught:
        make_seeded_place(tmp_path / "f1", FILES, group, nofile_soft=None, pipe_sizes=PIPE_SIZES)
    assert (caught.value.step, caught.value.errno) == (Step.CGROUP, errno.ENOENT)
    assert not (tmp_path / "f1").exists()
    assert open_fds() == before
    assert _seeds_of_mine() == []


@seeds_only
def test_a_seed_that_cannot_be_planted_leaves_the_place_with_its_fds(
    tmp_path: Path, drivers: Callable[..., CgroupDriver]
) -> None:
    """Out of descriptors once the place is made (a real, lowered RLIMIT_NOFILE, in a
    child process): the place stays, with its groups' fds, and the OSError names the
    step (the seed's first pipe); nothing of the seed is left open, and no seed runs."""
    require_root("cgroups")
    driver = drivers()
    group = driver.planned("e1")
    dirs = [str(d) for d in group.dirs]
    script = f"""
import errno, os, resource, sys
sys.path[:0] = {sys.path!r}
from pathlib import Path
from trio_worker._host._cgroups import detect
from trio_worker._host._place import make_seeded_place
from trio_worker._jobs._process import PIPE_SIZES, output_pipe
driver = detect(parent={driver.parent_dirs()[0].name!r})
group = driver.planned("e1")
before = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
# Room for the groups' fds and one more (the listing's own, closed since): not for a pipe.
resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + {len(dirs)} + 1, hard))
fds, sown = make_seeded_place(
    Path({str(tmp_path / "e1")!r}), {FILES!r}, group, nofile_soft=None,
    pipe_sizes=PIPE_SIZES,
)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert isinstance(sown, OSError), sown
assert (sown.errno, sown.filename) == (errno.EMFILE, "pipe2"), sown
opened = [os.readlink(f"/proc/self/fd/{{fd}}") for fd in fds]
assert opened == [d if not procs else f"{{d}}/cgroup.procs" for d, procs in group.joins()]
after = [int(fd) for fd in os.listdir("/proc/self/fd")]  # (each listing has its own fd)
assert len(after) == len(before) + len(fds) and set(fds) <= set(after), (before, fds, after)
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    pass  # no child: no seed was cloned
else:
    raise AssertionError("a child process")
for fd in fds:
    os.close(fd)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "ok\n", done.stderr
    assert all(Path(d).is_dir() for d in dirs)  # the place stays, for the thread's way
    assert (tmp_path / "e1" / "output.log").is_file()
    assert remove_groups([group]) == []


def test_groups_still_in_use_are_left_for_the_slow_way(
    tmp_path: Path,
    drivers: Callable[..., CgroupDriver],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    """``remove_groups``: an empty group goes; one with a process in it (EBUSY) or a
    subgroup (the job made one) is handed back, whole, for ``JobCgroup.remove``."""
    require_root("cgroups")
    driver = drivers()
    empty, busy, nested = (driver.make(name) for name in ("empty", "busy", "nested"))
    proc = spawn(procs, ["sleep", "60"], busy)
    (nested.dirs[-1] / "sub").mkdir()
    assert remove_groups([empty, busy, nested]) == [busy, nested]
    assert not any(d.exists() for d in empty.dirs)
    assert all(d.exists() for d in busy.dirs)
    assert nested.dirs[-1].exists()
    nested.remove()  # subgroups first
    assert not any(d.exists() for d in nested.dirs)
    busy.kill()
    proc.wait(timeout=10)
    busy.wait_empty_sync(5)
    assert remove_groups([busy]) == []
    assert not any(d.exists() for d in busy.dirs)
    assert remove_groups([busy]) == []  # gone already: nothing to say


def test_bad_arguments_are_refused_before_any_system_call(tmp_path: Path) -> None:
    target = os.fsencode(tmp_path / "p")
    with pytest.raises(ValueError, match="one content per file"):
        _cplace.make_place(target, [b"a"], [], [], [])
    with pytest.raises(ValueError, match="one procs flag per group"):
        _cplace.make_place(target, [], [], [b"/nonexistent"], [])
    with pytest.raises(ValueError, match="embedded null"):
        _cplace.make_place(target, [b"a\0b"], [None], [], [])
    with pytest.raises(TypeError):
        _cplace.remove_dirs(["not bytes"])  # type: ignore[list-item]
    assert not (tmp_path / "p").exists()
