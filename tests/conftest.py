"""Shared test helpers.

Tests that need root or kernel features call ``require_root``, and tests that
need an outside program (the Go toolchain) call ``require_program``. Outside CI
they skip when it is missing; with ``TRIO_WORKER_REQUIRE_ROOT=1`` (set by
``.ci/run``, which also installs those programs) a missing privilege or program
is a failure, so CI can never go green by skipping them.
"""

from __future__ import annotations

import compileall
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import trio_worker
from trio_worker import Limits, Supervisor
from trio_worker._host._cgroups import JobCgroup, NoDriver, detect

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
    driver = detect(f"trio-worker-test-{secrets.token_hex(4)}")
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
