"""Ends noted on disk until their records commit (``_jobs/_endnotes``)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_worker._jobs._endnotes import SLOTS, EndNotes, read_end_notes
from trio_worker._model import JobInfo, JobState, Usage

_RUNNING = JobInfo(
    id="01M8T6FZR298WVR6YJVT0V76E5",
    owner="al",
    command="sleep",
    args=("60",),
    state=JobState.RUNNING,
    pid=4242,
    exit_code=None,
    signal=None,
    error="",
    started_at=datetime(2026, 12, 2, 1, 0, tzinfo=UTC),
    ended_at=None,
    output_bytes=0,
    user="nobody",
)


def _ended(job_id: str = _RUNNING.id, **changes: Any) -> JobInfo:
    fields: dict[str, Any] = {
        "id": job_id,
        "state": JobState.KILLED,
        "signal": 15,
        "ended_at": datetime(2026, 12, 2, 1, 0, 7, 123456, tzinfo=UTC),
        "usage": Usage(cpu_seconds=0.25, memory_peak_bytes=1 << 20),
        "output_bytes": 12,
    }
    fields.update(changes)
    return replace(_RUNNING, **fields)


@given(
    state=st.sampled_from([JobState.EXITED, JobState.KILLED]),
    code=st.integers(0, 255),
    signal=st.integers(1, 64),
    usage=st.none() | st.builds(Usage, st.floats(0, 1e6), st.integers(0, 2**63 - 1)),
    oom=st.booleans(),
    sizes=st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    dropped=st.integers(0, 2**63 - 1),
    at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)
def test_a_noted_end_reads_back_as_the_end_record(
    tmp_path_factory: pytest.TempPathFactory,
    state: JobState,
    code: int,
    signal: int,
    usage: Usage | None,
    oom: bool,
    sizes: tuple[int, int],
    dropped: int,
    at: datetime,
) -> None:
    path = tmp_path_factory.mktemp("notes") / "ends"
    ended = _ended(
        state=state,
        exit_code=code if state is JobState.EXITED else None,
        signal=signal if state is JobState.KILLED else None,
        usage=usage,
        oom_killed=oom,
        output_bytes=sizes[0],
        output_start=sizes[1],
        ended_at=at,
    )
    notes = EndNotes.create(path)
    notes.note(ended, dropped)
    notes.close()
    note = read_end_notes(path)[ended.id]
    assert note.ended(_RUNNING) == replace(_RUNNING, **{k: getattr(ended, k) for k in _CHANGED})
    assert note.dropped_bytes == dropped


_CHANGED = (
    "state",
    "exit_code",
    "signal",
    "ended_at",
    "usage",
    "oom_killed",
    "output_bytes",
    "output_start",
)


def test_a_committed_end_leaves_no_note_and_its_slot_is_taken_again(tmp_path: Path) -> None:
    path = tmp_path / "ends"
    notes = EndNotes.create(path)
    for i in range(SLOTS):
        notes.note(_ended(f"job{i}"), 0)
    notes.note(_ended("one-too-many"), 0)  # every slot taken: not noted
    assert len(notes) == SLOTS
    notes.release("job7")
    notes.note(_ended("late"), 0)
    assert set(read_end_notes(path)) == {f"job{i}" for i in range(SLOTS) if i != 7} | {"late"}
    notes.close()


def test_a_torn_slot_and_other_states_are_not_ends(tmp_path: Path) -> None:
    path = tmp_path / "ends"
    notes = EndNotes.create(path)
    notes.note(_ended("torn"), 0)
    notes.note(_ended("failed", state=JobState.FAILED, error="no such file"), 0)
    notes.note(_RUNNING, 0)
    notes.close()
    data = bytearray(path.read_bytes())
    data[40] ^= 1  # a byte of the note's body, as if the process died while writing it
    path.write_bytes(bytes(data))
    assert read_end_notes(path) == {}
    assert read_end_notes(tmp_path / "absent") == {}


def test_a_new_run_starts_with_no_notes(tmp_path: Path) -> None:
    path = tmp_path / "ends"
    notes = EndNotes.create(path)
    notes.note(_ended(), 0)
    notes.close()
    assert read_end_notes(path)
    EndNotes.create(path).close()
    assert read_end_notes(path) == {}
    assert path.stat().st_mode & 0o077 == 0
