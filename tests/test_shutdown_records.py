"""The last try for pending records on the way out comes after every job's end was tried.

A Wait returns once the job's end is known, before its record is written (the runner's
end of the job writes it next, shielded). A store that fails that write (a full disk)
leaves the record pending; the supervisor's way out tries pending records once more. If
that try runs while the end's write is still under way, it finds nothing pending yet, and
the record the end then leaves pending is never written: the job is gone after a restart
(its directory too, as one with no record). ``tests/test_faults.py`` met it as a flake
under load; here the store's thread is slow on purpose.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import trio

from trio_worker import JobState, open_supervisor
from trio_worker._jobs._supervisor import Retention

_MANUAL = Retention(interval=3600.0, keep_ended=None, max_ended_age=timedelta(days=1))


def _recorded(db: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT id, state FROM jobs").fetchall())
    finally:
        conn.close()


async def test_an_end_whose_write_fails_during_the_way_out_is_written_on_it(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    async with open_supervisor(state, retention=_MANUAL) as sup:
        store = sup._store
        assert store is not None
        store._conn.execute("PRAGMA query_only = 1")  # every write fails, as on a full disk
        execute = store._execute
        failures: list[float] = []

        def slow(*args: Any) -> bool:
            # A transaction fails at once; the thread hands its outcome back late.
            committed = execute(*args)
            if not committed:
                failures.append(time.monotonic())
                time.sleep(0.5)
            return committed

        store._execute = slow  # type: ignore[method-assign]
        job = await sup.start("sleep", ["1"])  # its queued record fails first
        with trio.fail_after(30):
            assert (await sup.wait(job.id)).state is JobState.EXITED
            while len(failures) < 2:  # noqa: ASYNC110 (the store's thread says nothing)
                await trio.sleep(0.01)
        # The end's write has failed, its outcome is on its way back: the disk has room
        # again, and the supervisor is left at once.
        store._conn.execute("PRAGMA query_only = 0")
    assert _recorded(state / "jobs.db") == {job.id: "exited"}
