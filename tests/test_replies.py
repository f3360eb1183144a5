"""Status replies are made once per job snapshot: always what ``job_to_pb`` makes, bounded."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from trio_worker._convert import job_to_pb
from trio_worker._model import JobInfo, JobState, Usage
from trio_worker.server._replies import MAX_KEPT_REPLIES, MAX_KEPT_REPLY_BYTES, JobReplies


def _info(job_id: str = "01J0000000000000000000000A", **changes: object) -> JobInfo:
    info = JobInfo(
        id=job_id,
        owner="alice",
        command="sleep",
        args=("10",),
        state=JobState.RUNNING,
        pid=4242,
        exit_code=None,
        signal=None,
        error="",
        started_at=datetime(2026, 12, 1, 21, 0, 0, 123456, tzinfo=UTC),
        ended_at=None,
        output_bytes=0,
        usage=Usage(0.5, 4096),
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


def test_an_unchanged_snapshot_gets_the_same_reply() -> None:
    replies = JobReplies()
    first = replies.job(_info())
    assert replies.job(_info()) is first
    assert first == job_to_pb(_info())


def test_a_changed_snapshot_gets_a_new_reply() -> None:
    replies = JobReplies()
    replies.job(_info())
    ended = _info(
        state=JobState.EXITED,
        exit_code=3,
        ended_at=datetime(2026, 12, 1, 21, 0, 5, tzinfo=UTC),
        usage=Usage(0.75, 8192),
    )
    reply = replies.job(ended)
    assert reply.state == job_to_pb(ended).state
    assert reply.exit_code == 3
    assert reply.usage.cpu_seconds == 0.75
    assert reply == job_to_pb(ended)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["01J000000000000000000000A1", "01J000000000000000000000B2"]),
            st.integers(0, 3),  # output_bytes
            st.sampled_from([None, Usage(0.5, 1), Usage(0.5, 2)]),
            st.sampled_from([JobState.RUNNING, JobState.EXITED]),
        ),
        max_size=30,
    )
)
def test_every_reply_is_what_job_to_pb_makes(
    snapshots: list[tuple[str, int, Usage | None, JobState]],
) -> None:
    replies = JobReplies()
    for job_id, output, usage, state in snapshots:
        info = _info(job_id, output_bytes=output, usage=usage, state=state)
        assert replies.job(info) == job_to_pb(info)


def test_kept_replies_are_bounded_in_number_and_size() -> None:
    replies = JobReplies()
    for n in range(MAX_KEPT_REPLIES + 50):
        replies.job(_info(f"01J{n:023d}"))
        assert len(replies) <= MAX_KEPT_REPLIES
    # The most recently asked for stays; the oldest went first.
    last = _info(f"01J{MAX_KEPT_REPLIES + 49:023d}")
    assert replies.job(last) is replies.job(last)
    big = _info("01JBIG00000000000000000000", args=("x" * MAX_KEPT_REPLY_BYTES,))
    assert replies.job(big) is not replies.job(big)  # made each time, never kept
