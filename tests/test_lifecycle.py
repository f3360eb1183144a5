from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_worker import JobState
from trio_worker._jobs._lifecycle import (
    Exited,
    IllegalTransition,
    Lost,
    Record,
    Spawned,
    SpawnFailed,
    apply,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)


def running() -> Record:
    return apply(Record(), Spawned(pid=42, at=T0))


def test_spawned_is_running_with_pid() -> None:
    r = running()
    assert r.state is JobState.RUNNING
    assert r.pid == 42
    assert r.started_at == T0
    assert r.ended_at is None


def test_exit_code_records_exited() -> None:
    r = apply(running(), Exited(7, T1))
    assert (r.state, r.exit_code, r.signal, r.ended_at) == (JobState.EXITED, 7, None, T1)


def test_negative_returncode_records_killed_with_signal() -> None:
    r = apply(running(), Exited(-9, T1, oom_killed=True))
    assert (r.state, r.exit_code, r.signal, r.oom_killed) == (JobState.KILLED, None, 9, True)


def test_spawn_failure_records_error_and_errno() -> None:
    r = apply(Record(), SpawnFailed("No such file or directory: 'echi'", T0, errno=2))
    assert r.state is JobState.FAILED
    assert r.error == "No such file or directory: 'echi'"
    assert r.spawn_errno == 2
    assert r.ended_at == T0


def test_lost_from_running_keeps_pid() -> None:
    r = apply(running(), Lost("the server stopped while it ran", T1))
    assert (r.state, r.pid, r.ended_at) == (JobState.LOST, 42, T1)


EVENTS = st.sampled_from(
    [Spawned(1, T0), SpawnFailed("x", T0), Exited(0, T1), Exited(-15, T1), Lost("gone", T1)]
)


@given(st.lists(EVENTS, max_size=6))
def test_end_states_are_final_and_only_legal_paths_pass(events: list[object]) -> None:
    record = Record()
    for event in events:
        before = record
        try:
            record = apply(record, event)  # type: ignore[arg-type]
        except IllegalTransition:
            assert record is before
            continue
        # Every accepted event either starts a job or ends a running one.
        if before.state is None:
            assert isinstance(event, Spawned | SpawnFailed | Lost)
        else:
            assert before.state is JobState.RUNNING
            assert record.state is not None
            assert record.state.ended
    if record.state is not None and record.state.ended:
        for event in [Spawned(1, T0), Exited(0, T1), Lost("x", T1), SpawnFailed("x", T0)]:
            with pytest.raises(IllegalTransition):
                apply(record, event)


def test_exit_before_spawn_is_illegal() -> None:
    with pytest.raises(IllegalTransition, match="Exited is not allowed in state new"):
        apply(Record(), Exited(0, T1))


_WHAT_EACH_EVENT_SETS = {
    (None, Spawned): lambda e: {"state": JobState.RUNNING, "pid": e.pid, "started_at": e.at},
    (None, SpawnFailed): lambda e: {
        "state": JobState.FAILED,
        "error": e.error,
        "spawn_errno": e.errno,
        "started_at": e.at,
        "ended_at": e.at,
    },
    (None, Lost): lambda e: {
        "state": JobState.LOST,
        "error": e.error,
        "started_at": e.at,
        "ended_at": e.at,
    },
    (JobState.RUNNING, Lost): lambda e: {
        "state": JobState.LOST,
        "error": e.error,
        "ended_at": e.at,
    },
    (JobState.RUNNING, SpawnFailed): lambda e: {
        "state": JobState.FAILED,
        "error": e.error,
        "spawn_errno": e.errno,
        "ended_at": e.at,
    },
}

_TIMES = st.none() | st.datetimes(timezones=st.just(UTC))
_INTS = st.none() | st.integers(-(2**31), 2**31)
_RECORDS = st.builds(
    Record,
    state=st.sampled_from([None, JobState.RUNNING]),
    pid=_INTS,
    exit_code=_INTS,
    signal=_INTS,
    error=st.text(max_size=5),
    spawn_errno=_INTS,
    started_at=_TIMES,
    ended_at=_TIMES,
    oom_killed=st.booleans(),
)
_ANY_EVENT = st.one_of(
    st.builds(Spawned, pid=st.integers(1, 2**22), at=st.datetimes(timezones=st.just(UTC))),
    st.builds(
        SpawnFailed,
        error=st.text(max_size=5),
        at=st.datetimes(timezones=st.just(UTC)),
        errno=_INTS,
    ),
    st.builds(
        Exited,
        returncode=st.integers(-64, 255),
        at=st.datetimes(timezones=st.just(UTC)),
        oom_killed=st.booleans(),
    ),
    st.builds(Lost, error=st.text(max_size=5), at=st.datetimes(timezones=st.just(UTC))),
)


@given(_RECORDS, _ANY_EVENT)
def test_an_event_changes_only_what_it_names(record: Record, event: object) -> None:
    # ``apply`` makes each record whole (not by ``dataclasses.replace``): every field the
    # transition does not name is kept as it was.
    key = (record.state, type(event))
    if isinstance(event, Exited) and record.state is JobState.RUNNING:
        code = event.returncode
        changes: dict[str, object] = {
            "state": JobState.EXITED if code >= 0 else JobState.KILLED,
            "exit_code" if code >= 0 else "signal": code if code >= 0 else -code,
            "ended_at": event.at,
            "oom_killed": event.oom_killed,
        }
    elif key in _WHAT_EACH_EVENT_SETS:
        changes = _WHAT_EACH_EVENT_SETS[key](event)  # type: ignore[no-untyped-call]
    else:
        with pytest.raises(IllegalTransition):
            apply(record, event)  # type: ignore[arg-type]
        return
    assert apply(record, event) == dataclasses.replace(record, **changes)  # type: ignore[arg-type]
