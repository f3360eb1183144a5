"""The per-test timeout (``pytest-timeout``, ``timeout`` in pyproject.toml), made safe for trio.

pytest-timeout's ``signal`` method raises its failure from SIGALRM's handler, wherever the
main thread is. Inside a trio run that is trio's own loop: the run is left half torn down,
and every later trio test in the session fails with "Attempted to call run() from inside a
run()". Its ``thread`` method ends the whole session instead (``os._exit``), and its stack
dump shows the loop idle in ``epoll``, not which task waits.

So a test that times out inside a trio run is failed in trio's way: on the loop, every
task's stack is written down, then the test's tasks are cancelled, so that its fixtures
and nurseries unwind and close what they opened, and the test fails with those stacks.
If it has not ended ``GRACE`` seconds later (a shielded wait, a thread that cannot be
abandoned), pytest-timeout's ``thread`` way ends the session with every thread's stack.
Outside a trio run (a plain test) pytest-timeout's own ``signal`` way is used.
"""

from __future__ import annotations

import signal
import textwrap
import threading
import traceback
from collections.abc import Generator, Iterator
from types import FrameType
from typing import Any, NoReturn

import pytest
import trio

try:
    import pytest_timeout
except ModuleNotFoundError:  # (a venv made before it was a test dependency)
    raise ImportError("the tests need pytest-timeout: pip install -e '.[test]'") from None

#: Seconds a timed-out trio test has to unwind once cancelled, before the session ends.
GRACE = 60.0

_STACKS = pytest.StashKey[str]()
_TIMEOUT = pytest.StashKey[float]()


def _tasks(task: trio.lowlevel.Task, depth: int = 0) -> Iterator[str]:
    """``task`` and its children, each with where it waits (innermost last; trio's own
    frames left out)."""
    frames = [
        (frame.f_code.co_filename, lineno, frame.f_code.co_name, None)
        for frame, lineno in task.iter_await_frames()
        if "/trio/_core/" not in frame.f_code.co_filename
    ]
    indent = "  " * depth
    where = textwrap.indent("".join(traceback.format_list(frames)), indent)
    yield f"{indent}task {task.name!r}:\n{where}"
    for nursery in task.child_nurseries:
        for child in nursery.child_tasks:
            yield from _tasks(child, depth + 1)


def _cancel_the_test(item: pytest.Item) -> None:
    """On the loop: write down every task's stack, then cancel the nurseries of the tasks
    under the root (the main task's: the test and its fixtures), not the root's own
    (trio's, which must keep delivering threads' results while the test unwinds)."""
    root = trio.lowlevel.current_root_task()
    item.stash[_STACKS] = "\n".join(_tasks(root))
    for nursery in root.child_nurseries:
        for task in nursery.child_tasks:
            for inner in task.child_nurseries:
                inner.cancel_scope.cancel()


def _end_the_session(item: pytest.Item, settings: Any) -> NoReturn:
    """In SIGALRM's handler, in a trio run: say where its tasks wait now, then
    pytest-timeout's ``thread`` way (the output, the other threads' stacks, ``os._exit``)."""
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(item)
    terminal = item.config.get_terminal_writer()
    terminal.sep("+", title=f"Timeout: {item.nodeid} did not end {GRACE}s after its cancel")
    try:  # (read only, from the loop's own thread, between two of its bytecodes)
        terminal.write("\n".join(_tasks(trio.lowlevel.current_root_task())))
    except Exception:
        terminal.write(traceback.format_exc())
    pytest_timeout.timeout_timer(item, settings)
    raise AssertionError("unreachable: timeout_timer ends the process")


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own (``thread``)

    def handler(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        if _STACKS in item.stash:  # cancelled GRACE seconds ago, and still running
            _end_the_session(item, settings)
        elif trio.lowlevel.in_trio_run():
            item.stash[_STACKS] = "(the loop did not run the cancellation)"
            item.stash[_TIMEOUT] = settings.timeout
            trio.lowlevel.current_trio_token().run_sync_soon(_cancel_the_test, item)
            signal.setitimer(signal.ITIMER_REAL, GRACE)
        else:
            pytest_timeout.timeout_sigalrm(item, settings)  # (raises the failure here)

    def cancel() -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # (pytest-timeout's cancel)
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A trio test cancelled by its timeout fails, whatever the cancellation left."""
    try:
        yield
    finally:
        stacks = item.stash.get(_STACKS, None)
        if stacks is not None:
            message = (
                f"Timeout (>{item.stash[_TIMEOUT]}s) from pytest-timeout: the test was "
                f"cancelled; its trio tasks were then:\n{stacks}"
            )
            raise pytest.fail.Exception(message, pytrace=False) from None
