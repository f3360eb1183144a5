"""Shared test helpers.

Tests that need root or kernel features call ``require_root``, and tests that
need an outside program (the Go toolchain) call ``require_program``. Outside CI
they skip when it is missing; with ``TRIO_WORKER_REQUIRE_ROOT=1`` (set by
``.ci/run``, which also installs those programs) a missing privilege or program
is a failure, so CI can never go green by skipping them.
"""

from __future__ import annotations

import compileall
import contextlib
import errno
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import trio_worker
from trio_worker import Limits, Supervisor
from trio_worker._host._cgroups import CGROUP_ROOT, JobCgroup, NoDriver, _own_cgroups, detect
from trio_worker._jobs._supervisor import _cgroup_parent_for

# The per-test timeout's hooks, safe inside trio runs (see ``_timeouts``).
from ._timeouts import pytest_runtest_call, pytest_timeout_set_timer  # noqa: F401


def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile the package once, as ``pip install`` leaves an installed copy. Under
    ``PYTHONDONTWRITEBYTECODE=1`` (CI's environment here) an editable checkout is otherwise
    compiled from source by every process the suite starts: each CLI call, each server,
    each script (test_cli_jobs: 18.6 -> 13.5 s of CPU). A no-op when up to date; where the
    package is read-only, it stays as it is."""
    compileall.compile_dir(Path(trio_worker.__file__).parent, quiet=2)


def require_root(what: str = "this test") -> None:
    if os.geteuid() == 0:
        return
    message = f"{what} needs root"
    if os.environ.get("TRIO_WORKER_REQUIRE_ROOT") == "1":
        pytest.fail(f"{message}, and TRIO_WORKER_REQUIRE_ROOT=1 forbids skipping")
    pytest.skip(message)


@contextlib.contextmanager
def ext4_on_a_loop_device(tmp_path: Path, size: int) -> Iterator[Path]:
    """An ext4 file system of ``size`` bytes on a loop device, mounted under ``tmp_path``:
    a real disk (``O_DIRECT``, a block device for io limits) whatever file system the
    tests' temporary directory is on. Unmounted lazily (a failed test may leave files
    open), the device then let go."""
    require_root("setting up a loop device")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        require_program(tool, "a loop device")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(size)
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = False
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mount_point)], check=True)
        mounted = True
        yield mount_point
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)
        subprocess.run(["losetup", "-d", device], check=False)


def require_program(name: str, what: str = "this test") -> str:
    """The path of program ``name``; skips without it, or fails in CI (which installs it)."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{what} needs {name!r} on PATH"
    if os.environ.get("TRIO_WORKER_REQUIRE_ROOT") == "1":
        pytest.fail(
            f"{message}, and TRIO_WORKER_REQUIRE_ROOT=1 forbids skipping (.ci/run installs it)"
        )
    pytest.skip(message)


#: The parent groups the tests of this process named (``cgroup_parent``), until the
#: fixture after each test removes them.
_PARENTS: list[str] = []

#: How long (s) the removal waits for a group's processes to go: the reapers of a server
#: a test SIGKILLed kill its jobs and remove their groups on their own.
_PARENT_GONE_WAIT = 10.0


def cgroup_parent(prefix: str = "trio-worker-test") -> str:
    """A name for a server's parent group no other test (of any process) uses: its
    groups, in every hierarchy, are removed after the test, with any job groups left
    in them. A server that stops cleanly removes its parent itself; a SIGKILLed one (or
    a test that failed half-way) left it behind, empty: ~1,200 of them in a session."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    _PARENTS.append(name)
    return name


def named_parent(name: str) -> str:
    """``name`` as a parent group its test's servers share (a restart finds the
    leftovers of the server before it), removed after the test as ``cgroup_parent``'s."""
    if name not in _PARENTS:
        _PARENTS.append(name)
    return name


def parent_group_dirs(name: str) -> list[Path]:
    """The directories a parent group ``name`` has (or would have) in this host's
    hierarchies: under this process's own group, as ``detect`` makes it, and at the
    top (``base="/"``); each v1 hierarchy, the unified one, or a pure v2 host's root."""
    mounts: dict[str, Path] = {}
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        mounts = {"unified": CGROUP_ROOT}
    else:
        with contextlib.suppress(OSError):
            mounts = {m.name: m for m in CGROUP_ROOT.iterdir() if (m / "cgroup.procs").exists()}
    own = _own_cgroups()
    found: list[Path] = []
    for key, mount in mounts.items():
        for base in {own.get(key, "/").strip("/"), ""}:
            found.append((mount / base if base else mount) / name)
    return found


def remove_parent_groups(name: str, wait: float = _PARENT_GONE_WAIT) -> list[Path]:
    """rmdir the parent group ``name`` in every hierarchy, and the groups under it,
    deepest first; return those still there after ``wait`` seconds (they hold
    processes: a job outlived its test)."""
    deadline = time.monotonic() + wait
    while True:
        left = [d for d in parent_group_dirs(name) if not _rmdir_tree(d)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)  # (a killed server's reapers are still killing its jobs)


def _rmdir_tree(directory: Path) -> bool:
    """Remove the cgroup ``directory`` and its subgroups; False if some hold processes."""
    for sub, names, _ in os.walk(directory, topdown=False):
        for one in names:
            with contextlib.suppress(FileNotFoundError):
                try:
                    os.rmdir(os.path.join(sub, one))
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        raise
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise
        return False
    return True


@pytest.fixture(autouse=True, scope="session")
def _remove_the_sessions_parent_groups() -> Iterator[None]:
    """The parent groups named by fixtures wider than a test (a module's server), once
    they are done."""
    yield
    while _PARENTS:
        remove_parent_groups(_PARENTS.pop())


@pytest.fixture(autouse=True)
def _remove_the_tests_parent_groups(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test (and its other fixtures), the parent groups it named are
    removed (``cgroup_parent``), and those of the state directories it made in its
    ``tmp_path`` (a supervisor's default parent, ``trio-worker-<hash of the path>``).
    Not those named before it, by a wider fixture (set up first): its server runs on."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    wider = len(_PARENTS)
    yield
    if tmp is not None:
        _PARENTS.extend(_default_parents(tmp))
    while len(_PARENTS) > wider:
        remove_parent_groups(_PARENTS.pop())


#: Directories ``_default_parents`` does not look into: a state directory's own.
_NOT_STATE = frozenset({"jobs", "pki", "ca", "certs"})


def _default_parents(tmp: Path, depth: int = 6) -> list[str]:
    """The default parent group names (``_cgroup_parent_for``) of the directories
    under ``tmp`` that have one in some hierarchy: state directories of its test."""
    names: list[str] = []
    level = [tmp]
    for _ in range(depth):
        below: list[Path] = []
        for directory in level:
            with contextlib.suppress(OSError), os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name not in _NOT_STATE and entry.is_dir(follow_symlinks=False):
                        below.append(Path(entry.path))
        names += [_cgroup_parent_for(d) for d in below]
        level = below
    return [n for n in names if any(d.exists() for d in parent_group_dirs(n))]


async def job_dirs(sup: Supervisor) -> set[str]:
    """The names of the directories under the state's ``jobs/`` (once the refill has
    settled): the jobs' that wrote output (a place has none, nor a silent job)."""
    await sup._admission.launcher.settled()
    return {p.name for p in (sup.state_dir / "jobs").iterdir()}


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (ESRCH: reaped between open and read)
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def joining(group: object) -> Callable[[], None]:
    """A ``preexec_fn`` that moves the child into ``group`` (a JobCgroup, or None).

    For tests that need a ``subprocess.Popen`` in a job's cgroup; the
    supervisor itself joins through ``_host._spawn`` (vfork, no Python).
    """
    dirs = getattr(group, "dirs", ())
    paths = [os.fsencode(Path(d) / "cgroup.procs") for d in dirs]

    def preexec() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    return preexec


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def job_group() -> Iterator[tuple[list[int], JobCgroup]]:
    """A job's group (every hierarchy, under a parent of its own) and the fds a child
    writes to join it; the group is killed and removed afterwards."""
    require_root("cgroups")
    driver = detect(cgroup_parent())
    try:
        if isinstance(driver, NoDriver):
            pytest.skip(f"no usable cgroups: {driver.reason}")
        group = driver.create("job1", Limits())
        fds = group.open_join()
        try:
            yield fds, group
        finally:
            for fd in fds:
                os.close(fd)
            group.kill()
            group.remove()
    finally:
        driver.cleanup_leftovers()
        driver.close()
