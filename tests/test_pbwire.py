"""The blocking client's messages written and read by hand (``_pbwire``, ``_views``) against
protobuf: the same requests, the same refusals, the same jobs read, and hostile bytes
refused as ``Malformed`` only."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_worker import _pbwire, _requests, _views
from trio_worker._convert import STATE_TO_PB, chunk_from_pb, job_from_pb
from trio_worker._errors import InvalidRequest, RemoteError
from trio_worker._model import JobState
from trio_worker._pb import worker_pb2 as pb
from trio_worker._wire._status import StatusCode
from trio_worker.cli import _render
from trio_worker.cli._errors import describe

u32 = st.integers(0, 2**32 - 1)
u64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 127, 128, 2**63]))
i32 = st.integers(-(2**31), 2**31 - 1)
text = st.text(max_size=20)
ids = st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ", max_size=26)
floats = st.floats(min_value=0, max_value=1e6) | st.just(-0.0)


def test_the_state_numbers_are_worker_protos() -> None:
    assert {s: int(v) for s, v in STATE_TO_PB.items()} == _views.STATE_TO_PB
    assert set(_views.STATE_TO_PB) == set(JobState)


# --- requests ------------------------------------------------------------------------


@given(
    command=text,
    args=st.lists(text, max_size=4),
    env=st.dictionaries(text, text, max_size=3),
    cwd=st.none() | text,
    limits=st.none()
    | st.fixed_dictionaries(
        {"cpus": floats, "memory_bytes": u64, "io_read_bps": u64, "io_write_bps": u64, "pids": u32}
    ),
    isolation=st.none() | st.frozensets(st.sampled_from(["pid", "mount", "network"])),
    user=st.none() | text,
    stdin=st.booleans(),
    tty=st.booleans(),
    size=st.none() | st.tuples(u32, u32),
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_start_request_is_protobufs(
    command: str,
    args: list[str],
    env: dict[str, str],
    cwd: str | None,
    limits: dict[str, Any] | None,
    isolation: frozenset[str] | None,
    user: str | None,
    stdin: bool,
    tty: bool,
    size: tuple[int, int] | None,
) -> None:
    common: dict[str, Any] = {"env": env, "cwd": cwd, "user": user, "stdin": stdin, "tty": tty}
    ours = _pbwire.start_request(
        command, args, limits=limits, isolation=isolation, terminal_size=size, **common
    )
    theirs = _requests.start_request(
        command,
        args,
        limits=None if limits is None else pb.Limits(**limits),
        isolation=None if isolation is None else pb.Isolation(**dict.fromkeys(isolation, True)),
        terminal_size=size,
        **common,
    )
    assert pb.StartRequest.FromString(ours) == theirs
    # Presence too: a given limits or isolation is sent, even empty.
    parsed = pb.StartRequest.FromString(ours)
    assert parsed.HasField("limits") == (limits is not None)
    assert parsed.HasField("isolation") == (isolation is not None)


@given(ids, st.floats(min_value=0, max_value=1e9) | st.integers(0, 10**9))
@example("x", 1e-7)
@example("x", 86399.9999999)
def test_a_stop_request_is_protobufs(job_id: str, grace: float) -> None:
    theirs = _requests.stop_request(job_id, grace)
    assert pb.StopRequest.FromString(_pbwire.stop_request(job_id, grace)) == theirs
    assert pb.StopRequest.FromString(_pbwire.stop_request(job_id, grace)).HasField("grace")


@given(ids, i32, st.booleans(), u64, u32, text, st.lists(st.sampled_from(list(JobState))))
def test_the_other_requests_are_protobufs(
    job_id: str,
    signum: int,
    flag: bool,
    offset: int,
    page_size: int,
    owner: str,
    states: list[JobState],
) -> None:
    assert pb.SignalRequest.FromString(
        _pbwire.signal_request(job_id, signum)
    ) == _requests.signal_request(job_id, signum)
    for kind in (pb.StatusRequest, pb.WaitRequest):
        assert kind.FromString(_pbwire.id_request(job_id)) == _requests.id_request(kind, job_id)
    assert pb.RemoveRequest.FromString(
        _pbwire.remove_request(job_id, flag)
    ) == _requests.remove_request(job_id, flag)
    assert pb.OutputRequest.FromString(
        _pbwire.output_request(job_id, offset, flag)
    ) == _requests.output_request(job_id, offset, flag)
    numbers = [_views.STATE_TO_PB[s] for s in states]
    theirs = _requests.list_request(states, owner, page_size)
    theirs.page_token = job_id
    assert (
        pb.ListRequest.FromString(_pbwire.list_request(numbers, owner, page_size, job_id)) == theirs
    )


REFUSED: list[tuple[Callable[[], object], Callable[[], object], str]] = [
    (
        lambda: _pbwire.stop_request("x", -1),
        lambda: _requests.stop_request("x", -1),
        "grace",
    ),
    (
        lambda: _pbwire.stop_request("x", math.inf),
        lambda: _requests.stop_request("x", math.inf),
        "grace",
    ),
    (
        lambda: _pbwire.stop_request("x", 1e300),
        lambda: _requests.stop_request("x", 1e300),
        "grace",
    ),
    (
        lambda: _pbwire.stop_request("x", True),
        lambda: _requests.stop_request("x", True),
        "grace",
    ),
    (
        lambda: _pbwire.signal_request("x", 2**31),
        lambda: _requests.signal_request("x", 2**31),
        "signal",
    ),
    (
        lambda: _pbwire.output_request("x", -1, True),
        lambda: _requests.output_request("x", -1, True),
        "offset",
    ),
    (
        lambda: _pbwire.output_request("x", 2**64, True),
        lambda: _requests.output_request("x", 2**64, True),
        "offset",
    ),
    (lambda: _pbwire.id_request(7), lambda: _requests.id_request(pb.StatusRequest, 7), "id"),
    (
        lambda: _pbwire.id_request("\ud800"),
        lambda: _requests.id_request(pb.StatusRequest, "\ud800"),
        "id",
    ),
]


def _start(library: bool, **changes: Any) -> Callable[[], object]:
    arguments: dict[str, Any] = {"command": "true", "args": None, "env": None, "cwd": None}
    arguments.update(limits=None, isolation=None, user=None, stdin=False, tty=False)
    arguments.update(terminal_size=None)
    arguments.update(changes)
    build: Callable[..., object] = _requests.start_request if library else _pbwire.start_request
    return lambda: build(**arguments)


for _changes, _field in (
    ({"command": b"\xff"}, "command"),
    ({"command": None}, "command"),
    ({"args": "a b"}, "args"),
    ({"args": ["a", 1]}, "args"),
    ({"env": {"A": 1}}, "env"),
    ({"user": 5}, "user"),
    ({"terminal_size": (-1, 80)}, "terminal_size"),
    ({"terminal_size": (24, 2**32)}, "terminal_size"),
):
    REFUSED.append((_start(False, **_changes), _start(True, **_changes), _field))


@pytest.mark.parametrize(("ours", "theirs", "field"), REFUSED)
def test_what_the_library_refuses_is_refused_with_its_field(
    ours: Callable[[], object], theirs: Callable[[], object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as by_library:
        theirs()
    with pytest.raises(InvalidRequest) as by_hand:
        ours()
    assert by_hand.value.field == by_library.value.field == field


def test_limits_out_of_range_are_refused() -> None:
    for limits in ({"memory_bytes": -1}, {"pids": 2**32}, {"cpus": "1"}):
        with pytest.raises(InvalidRequest) as bad:
            _start(False, limits=limits)()
        assert bad.value.field == "limits"


# --- answers -------------------------------------------------------------------------

timestamps = st.builds(
    lambda s, n: pb.Job().started_at.__class__(seconds=s, nanos=n),
    st.integers(-62135596800, 253402300799),
    st.integers(0, 999_999_999),
)
jobs = st.builds(
    pb.Job,
    id=text,
    owner=text,
    command=text,
    args=st.lists(text, max_size=3),
    state=st.integers(0, 7),
    pid=i32,
    exit_code=st.none() | i32,
    signal=st.none() | i32,
    error=text,
    started_at=st.none() | timestamps,
    ended_at=st.none() | timestamps,
    output_bytes=u64,
    limits=st.none()
    | st.builds(
        pb.Limits,
        cpus=st.floats(allow_nan=False),
        memory_bytes=u64,
        io_read_bps=u64,
        io_write_bps=u64,
        pids=u32,
    ),
    isolation=st.none()
    | st.builds(pb.Isolation, pid=st.booleans(), mount=st.booleans(), network=st.booleans()),
    oom_killed=st.booleans(),
    output_start=u64,
    usage=st.none()
    | st.builds(pb.Usage, cpu_seconds=st.floats(allow_nan=False), memory_peak_bytes=u64),
    spawn_error=st.integers(0, 4),
    stdin=st.booleans(),
    tty=st.booleans(),
    user=text,
)


def _as_seen(job: Any) -> dict[str, Any]:
    """A job's attributes, its limits, isolation and usage as dicts."""
    names = [f.name for f in dataclasses.fields(job_from_pb(pb.Job()))]
    seen = {name: getattr(job, name) for name in names}
    for name, fields in (
        ("limits", ("cpus", "memory_bytes", "io_read_bps", "io_write_bps", "pids")),
        ("isolation", ("pid", "mount", "network")),
        ("usage", ("cpu_seconds", "memory_peak_bytes")),
    ):
        if seen[name] is not None:
            # (floats by their bits: a NaN the bytes make equals itself)
            seen[name] = {
                field: struct.pack("<d", value) if isinstance(value, float) else value
                for field in fields
                for value in [getattr(seen[name], field)]
            }
    return seen


@given(jobs)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_job_reads_as_job_from_pb_reads_it(job: pb.Job) -> None:
    data = job.SerializeToString()
    assert _as_seen(_views.read_job(data)) == _as_seen(job_from_pb(job))


@given(st.lists(jobs, max_size=3), text)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_list_page_reads_as_protobuf_reads_it(page: list[pb.Job], token: str) -> None:
    data = pb.ListResponse(jobs=page, next_page_token=token).SerializeToString()
    read, next_token = _views.read_list(data)
    assert next_token == token
    assert [_as_seen(j) for j in read] == [_as_seen(job_from_pb(j)) for j in page]


@given(st.binary(max_size=100), u64, st.integers(0, 5))
def test_an_output_chunk_reads_as_protobuf_reads_it(data: bytes, offset: int, stream: int) -> None:
    message = pb.OutputChunk(data=data, offset=offset, stream=stream)  # type: ignore[arg-type]
    ours = _views.read_chunk(message.SerializeToString())
    theirs = chunk_from_pb(message)
    assert (ours.data, ours.offset, ours.stream, ours.end) == (
        theirs.data,
        theirs.offset,
        theirs.stream,
        theirs.end,
    )


def test_a_nan_double_reads_as_protobuf_reads_it() -> None:
    # (A flipped byte in a double makes NaN: the hostile-bytes test met it, 1 run in ~5.)
    data = pb.Job(limits=pb.Limits(cpus=math.nan), usage=pb.Usage(cpu_seconds=math.nan))
    wire = data.SerializeToString()
    assert _as_seen(_views.read_job(wire)) == _as_seen(job_from_pb(pb.Job.FromString(wire)))


def test_repeated_message_fields_merge_and_scalars_take_the_last() -> None:
    first = pb.Job(id="a", limits=pb.Limits(cpus=1.5), started_at={"seconds": 5})
    second = pb.Job(id="b", limits=pb.Limits(pids=3), started_at={"nanos": 7000})
    data = first.SerializeToString() + second.SerializeToString()
    merged = pb.Job.FromString(data)
    assert _as_seen(_views.read_job(data)) == _as_seen(job_from_pb(merged))


@given(jobs, st.data())
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
def test_hostile_bytes_are_malformed_or_what_protobuf_reads(
    job: pb.Job, data: st.DataObject
) -> None:
    """A valid job cut short, bytes changed, or garbage: our reader raises Malformed only,
    and what it reads is what protobuf reads (it may refuse a bit more: groups)."""
    wire = bytearray(job.SerializeToString())
    mutation = data.draw(st.sampled_from(["cut", "flip", "garbage", "append"]))
    if mutation == "cut" and wire:
        del wire[data.draw(st.integers(0, len(wire) - 1)) :]
    elif mutation == "flip" and wire:
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    elif mutation == "garbage":
        wire = bytearray(data.draw(st.binary(max_size=60)))
    else:
        wire += data.draw(st.binary(max_size=20))
    try:
        ours = _views.read_job(bytes(wire))
    except _pbwire.Malformed:
        return
    try:
        theirs = job_from_pb(pb.Job.FromString(bytes(wire)))
    except (DecodeError, ValueError, OverflowError):
        pytest.fail("read what protobuf refuses")
    assert _as_seen(ours) == _as_seen(theirs)


@pytest.mark.parametrize(
    "wire",
    [
        b"\x0a\x05abc",  # a string cut short
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x30" + b"\xff" * 10 + b"\x01",  # a varint over ten bytes
        b"\x0b",  # a group
        b"\x00\x01",  # field number 0
        b"\x52\x07\x08\x80\x80\x80\x80\x80\x20",  # started 2**40 s after 1970: out of range
    ],
)
def test_malformed_jobs(wire: bytes) -> None:
    with pytest.raises(_pbwire.Malformed):
        _views.read_job(wire)


# --- what a hostile server's job does to the command line's output ------------------

hostile_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=["Cc", "Lu", "Zs", "Cf"]), max_size=8
)
any_floats = st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
extreme_times = st.builds(
    lambda s, n: pb.Job().started_at.__class__(seconds=s, nanos=n),
    st.sampled_from([-62135596800, 253402300799, 0]) | st.integers(-62135596800, 253402300799),
    st.integers(0, 999_999_999),
)
hostile_jobs = st.builds(
    pb.Job,
    id=hostile_text,
    owner=hostile_text,
    command=hostile_text,
    args=st.lists(hostile_text, max_size=2),
    state=st.integers(0, 7),
    pid=i32,
    exit_code=st.none() | i32,
    signal=st.none() | i32,
    error=hostile_text,
    started_at=extreme_times,
    ended_at=st.none() | extreme_times,
    output_bytes=u64,
    limits=st.builds(pb.Limits, cpus=any_floats, memory_bytes=u64, pids=u32),
    oom_killed=st.booleans(),
    output_start=u64,
    usage=st.none() | st.builds(pb.Usage, cpu_seconds=any_floats, memory_peak_bytes=u64),
    spawn_error=st.integers(0, 4),
    user=hostile_text,
)


def _control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("zone", ["UTC", "Asia/Tokyo", "America/Los_Angeles"])
@given(page=st.lists(hostile_jobs, min_size=1, max_size=3))
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=150)
def test_any_job_a_server_sends_is_shown_without_error_or_terminal_escapes(
    zone: str, page: list[pb.Job]
) -> None:
    # What protobuf reads (NaN and infinite doubles, years 1 and 9999, control characters
    # in every string) the command line shows: one line per thing, nothing a terminal
    # would take as an escape sequence, JSON that is JSON. (NaN CPU time was a
    # ValueError; year 9999 east of UTC an OverflowError; ESC went to the terminal.)
    before = os.environ.get("TZ")
    os.environ["TZ"] = zone
    time.tzset()
    try:
        jobs = [_views.read_job(job.SerializeToString()) for job in page]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _render.print_jobs(jobs)
            for job in jobs:
                _render.print_job(job)
                _render.dump_json(_render.job_json(job))
        lines = [_render.describe_state(job) for job in jobs]
        lines += [note for job in jobs if (note := _render.job_exit(job)[1]) is not None]
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()
    shown = out.getvalue()
    for text in [shown, *lines]:
        assert not any(_control(c) for c in text.replace("\n", ""))
    assert all("\n" not in line for line in lines)
    decoder = json.JSONDecoder()
    rest = shown[shown.index("{") :]
    for _ in jobs:
        value, end = decoder.raw_decode(rest)
        _strict_json(json.dumps(value))
        rest = rest[end:].lstrip()
        rest = rest[rest.find("{") :] if "{" in rest else rest


def test_a_servers_error_message_is_one_line_without_escapes() -> None:
    failure = describe(RemoteError(StatusCode.INTERNAL, "bad\x1b]52;c;aGk=\x07\nthing\x9b2J"))
    assert not any(_control(c) for c in failure.message)
    assert "\\x1b]52;c;aGk=\\x07 thing\\x9b2J" in failure.message
