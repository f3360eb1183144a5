"""The per-test timeout (``_timeouts``): a hung trio test fails, cancelled, with where its
tasks waited, and the tests after it still run; one that cannot be cancelled ends the run.
It runs pytest on a small suite of its own, with a 1 s timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CONFTEST = """
from tests import _timeouts
from tests._timeouts import pytest_runtest_call, pytest_timeout_set_timer

_timeouts.GRACE = 1.0
"""

_INI = """
[pytest]
trio_mode = true
timeout = 1
"""

_HANGS = """
import time
import pytest, trio

@pytest.fixture
async def resource():
    try:
        yield
    finally:
        print("the fixture's teardown ran")

async def test_hangs(resource):
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever, name="the-helper")
        await trio.Event().wait()

async def test_after_it():
    await trio.sleep(0)

def test_plain_hang():
    time.sleep(30)
"""

_SHIELDED = """
import trio

async def test_shielded():
    with trio.CancelScope(shield=True):
        await trio.sleep_forever()

async def test_never_reached():
    pass
"""


def _pytest(directory: Path, tests: str) -> subprocess.Popen[str]:
    """pytest started on ``tests`` (run in their order) in ``directory``, with the timeout."""
    directory.mkdir()
    (directory / "pytest.ini").write_text(_INI)
    (directory / "conftest.py").write_text(_CONFTEST)
    (directory / "test_inner.py").write_text(tests)
    return subprocess.Popen(
        # (In the file's order: not shuffled by pytest-randomly, where it is installed.)
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-v",
            "-rA",
        ],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_hung_test_fails_and_one_that_ignores_its_cancel_ends_the_run(tmp_path: Path) -> None:
    with _pytest(tmp_path / "hangs", _HANGS) as hangs, _pytest(tmp_path / "sh", _SHIELDED) as sh:
        out, _ = hangs.communicate(timeout=300)
        shielded, _ = sh.communicate(timeout=300)
    # A trio test: cancelled, its fixtures torn down, failed with where its tasks waited.
    assert "test_inner.py::test_hangs FAILED" in out
    assert "Timeout (>1.0s) from pytest-timeout: the test was cancelled" in out
    assert "task 'the-helper'" in out
    assert "await trio.Event().wait()" in out  # where the test itself waited
    assert "the fixture's teardown ran" in out
    # ... and the trio run was left clean for the next.
    assert "test_inner.py::test_after_it PASSED" in out
    # A plain test: pytest-timeout's own way.
    assert "FAILED test_inner.py::test_plain_hang - Failed: Timeout (>1.0s)" in out
    assert hangs.returncode == 1, out
    # A trio test that its cancel does not end: the run ends, saying where it waits.
    assert "test_inner.py::test_shielded did not end 1.0s after its cancel" in shielded
    assert "await trio.sleep_forever()" in shielded
    assert "test_never_reached" not in shielded
    assert sh.returncode == 1, shielded
