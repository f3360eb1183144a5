"""List pages and oversized requests: the paging core alone (pure, Hypothesis),
then end to end through grpcio (whose default limit on a received message is
4 MiB: a bigger page would fail there) against a real server."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

from tests.test_service import Caller, Cluster, cluster
from trio_worker import InvalidRequest, JobInfo, JobState, open_supervisor
from trio_worker._identity import Identity, Role
from trio_worker._jobs._exec_limit import (
    MAX_RECORDED_ARGS,
    check_exec_size,
    exec_limit,
    exec_size,
)
from trio_worker._jobs._store import SqliteJobStore
from trio_worker._model import JobIdGenerator
from trio_worker._net._transport import CallContext
from trio_worker._pb import worker_pb2 as pb
from trio_worker.server._paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_BYTES,
    MAX_PAGE_SIZE,
    decode_token,
    encode_token,
    fill_page,
    page_size,
)
from trio_worker.server._service import _LIST_SLICE, WorkerService

from .conftest import cgroup_parent, job_dirs, require_root

__all__ = ["cluster"]  # the fixture, shared with test_service

_ARG = 120 * 1024  # under the kernel's 128 KiB per string


# -- the pure core ---------------------------------------------------------------


def test_tokens_round_trip_and_page_sizes() -> None:
    job_id = JobIdGenerator()()
    assert decode_token(encode_token(job_id)) == job_id
    assert decode_token("") is None
    assert [page_size(n) for n in (0, 1, 999, 1000, 1001, 2**32 - 1)] == [
        DEFAULT_PAGE_SIZE,
        1,
        999,
        1000,
        MAX_PAGE_SIZE,
        MAX_PAGE_SIZE,
    ]


@given(st.text(max_size=80) | st.binary(max_size=60).map(lambda b: b.hex()))
def test_any_other_token_is_invalid_argument(token: str) -> None:
    error: InvalidRequest | None = None
    try:
        job_id = decode_token(token)
    except InvalidRequest as exc:
        error = exc
    if error is not None:
        assert error.field == "page_token"
        assert token not in str(error) or len(token) < 3  # never echoed
    else:
        assert job_id is None or decode_token(encode_token(job_id)) == job_id


@given(
    st.lists(st.integers(min_value=0, max_value=3 * 1024 * 1024), max_size=40),
    st.integers(min_value=1, max_value=50),
)
def test_a_page_fits_its_budget_and_keeps_order(costs: list[int], size: int) -> None:
    budget = 4 * 1024 * 1024
    page, more = fill_page(iter(costs), size, lambda c: c, budget=budget)
    assert page == costs[: len(page)]
    assert len(page) <= size
    assert more == (len(page) < len(costs))
    if costs:
        assert page  # one item always goes
    if len(page) > 1:
        assert sum(c + 6 for c in page) <= budget


# -- exec limit ----------------------------------------------------------------------


#: Text as ``os.fsdecode`` makes it: lone surrogates stand for undecodable bytes.
_FS_TEXT = st.text(
    st.characters(exclude_categories=["Cs"])
    | st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"])
)


@given(
    st.lists(_FS_TEXT, min_size=1, max_size=4),
    st.dictionaries(_FS_TEXT.filter(bool), _FS_TEXT, max_size=4),
)
def test_exec_size_counts_the_bytes_execve_gets(argv: list[str], env: dict[str, str]) -> None:
    """ASCII strings are counted by their length, without encoding: the same bytes
    as the file system's encoding gives (lone surrogates included)."""
    strings = [os.fsencode(a) for a in argv] + [
        os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()
    ]
    expected = sum(len(s) + 1 for s in strings) + 8 * len(strings) + 8 * 1024
    assert exec_size(argv, env) == expected


async def test_what_check_exec_size_accepts_the_kernel_runs() -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    limit = exec_limit()
    # Grow the last argument to the largest size the check accepts.
    args = ["x" * _ARG] * ((limit - 64 * 1024) // (_ARG + 9))
    lo, hi = 0, 128 * 1024
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            check_exec_size(("true", *args, "y" * mid), env)
            lo = mid
        except InvalidRequest:
            hi = mid
    async with open_supervisor(env=env) as sup:
        job = await sup.start("true", [*args, "y" * lo])
        end = await sup.wait(job.id)
        assert (end.state, end.exit_code, end.error) == (JobState.EXITED, 0, "")
        with pytest.raises(InvalidRequest) as info:
            await sup.start("true", [*args, "y" * hi])
        assert info.value.field == "args"
        assert "ARG_MAX" in str(info.value)
        assert len(str(info.value)) < 200


async def test_oversized_start_is_refused_and_nothing_is_stored(state_dir: Path) -> None:
    async with open_supervisor(state_dir) as sup:
        too_many = ["x" * _ARG] * (exec_limit() // _ARG + 1)
        with pytest.raises(InvalidRequest, match="ARG_MAX"):
            await sup.start("true", too_many)
        with pytest.raises(InvalidRequest) as info:
            await sup.start("true", ["x" * (200 * 1024)])  # one string over 32 pages
        assert info.value.field == "args[0]"
        with pytest.raises(InvalidRequest) as info:
            await sup.start("true", env={"BIG": "x" * (200 * 1024)})
        assert info.value.field == "env"
        with pytest.raises(InvalidRequest) as info:
            await sup.start("true", env={f"K{i}": "x" * _ARG for i in range(40)})
        assert info.value.field == "env"
        assert sup.list() == []
        assert await job_dirs(sup) == set()
        store = sup._store
        assert store is not None
        assert await store.load_all() == []
    assert MAX_RECORDED_ARGS < MAX_PAGE_BYTES


# -- List end to end -------------------------------------------------------------------


async def walk(call: Caller, request: pb.ListRequest) -> list[pb.ListResponse]:
    pages = [await call("List", request)]
    while pages[-1].next_page_token:
        request.page_token = pages[-1].next_page_token
        pages.append(await call("List", request))
    return pages


async def test_pages_are_newest_first_and_filtered(cluster: Cluster) -> None:
    alice, bob = Caller(cluster.channel("alice")), Caller(cluster.channel("bob"))
    reader = Caller(cluster.channel("reader"))
    started = []
    for i in range(12):
        who = alice if i % 3 else bob
        started.append((await who("Start", pb.StartRequest(command="true"))).id)
    sleeper = (await alice("Start", pb.StartRequest(command="sleep", args=["600"]))).id
    for job_id in started:
        await reader("Wait", pb.WaitRequest(id=job_id))

    pages = await walk(reader, pb.ListRequest(page_size=5))
    assert [len(p.jobs) for p in pages] == [5, 5, 3]
    ids = [j.id for p in pages for j in p.jobs]
    assert ids == sorted([*started, sleeper], reverse=True)
    assert pages[-1].next_page_token == ""

    running = await walk(reader, pb.ListRequest(states=[pb.JOB_STATE_RUNNING]))
    assert [j.id for p in running for j in p.jobs] == [sleeper]
    ended = await walk(reader, pb.ListRequest(states=[pb.JOB_STATE_EXITED], page_size=4))
    assert sorted(j.id for p in ended for j in p.jobs) == sorted(started)

    bobs = await walk(reader, pb.ListRequest(owner="bob", page_size=2))
    assert {j.owner for p in bobs for j in p.jobs} == {"bob"}
    assert len([j for p in bobs for j in p.jobs]) == 4
    # A full caller sees only its own, whatever it filters on.
    assert (await alice("List", pb.ListRequest(owner="bob"))).jobs == []
    assert {j.owner for j in (await alice("List", pb.ListRequest())).jobs} == {"alice"}
    await alice("Stop", pb.StopRequest(id=sleeper))


async def test_bad_tokens_and_states_are_invalid_argument(cluster: Cluster) -> None:
    call = Caller(cluster.channel("reader"))

    async def field_of(request: pb.ListRequest) -> str:
        with pytest.raises(grpc.RpcError) as info:
            await call("List", request)
        error: Any = info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = status_pb2.Status.FromString(
            dict(error.trailing_metadata())["grpc-status-details-bin"]
        )
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                return str(bad.field_violations[0].field)
        raise AssertionError("no BadRequest")

    assert await field_of(pb.ListRequest(page_token="garbage")) == "page_token"
    assert await field_of(pb.ListRequest(page_token=encode_token("x" * 26))) == "page_token"
    assert await field_of(pb.ListRequest(states=[pb.JOB_STATE_UNSPECIFIED])) == "states"
    assert await field_of(pb.ListRequest(states=[99])) == "states"


async def test_every_page_fits_in_4_mib_and_oversized_starts_store_nothing(
    cluster: Cluster,
) -> None:
    call = Caller(cluster.channel("root"))
    big = ["x" * _ARG] * 12  # 1.4 MiB of arguments: allowed, and kept with the job
    ids = [(await call("Start", pb.StartRequest(command="true", args=big))).id for _ in range(6)]
    too_big = ["x" * _ARG] * (exec_limit() // _ARG + 1)
    code = await call.code("Start", pb.StartRequest(command="true", args=too_big))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    pages = await walk(call, pb.ListRequest(page_size=1000))
    assert len(pages) >= 3  # 8.6 MiB of jobs: several pages
    for page in pages:
        assert page.ByteSize() < MAX_PAGE_BYTES
    listed = [j.id for p in pages for j in p.jobs]
    assert listed == sorted(ids, reverse=True)  # and nothing of the refused one
    assert all(list(j.args) == big for p in pages for j in p.jobs)


async def test_the_client_walks_the_pages(cluster: Cluster, tmp_path: Path) -> None:
    from trio_worker.client import connect

    files = cluster.clients["alice"]
    async with connect(
        f"127.0.0.1:{cluster.port}",
        ca=cluster.ca,
        cert=files.cert,
        key=files.key,
        server_hostname="localhost",
    ) as client:
        jobs = [await client.start("true") for _ in range(5)]
        sleeper = await client.start("sleep", ["600"])
        for job in jobs:
            await client.wait(job.id)
        listed = await client.list(page_size=2)
        assert [j.id for j in listed] == sorted([sleeper.id, *(j.id for j in jobs)], reverse=True)
        running = await client.list(states=[JobState.RUNNING], page_size=1)
        assert [j.id for j in running] == [sleeper.id]
        assert await client.list(owner="bob") == []
        await client.stop(sleeper.id, grace=0)
    await trio.lowlevel.checkpoint()


# -- a List page never holds the loop ----------------------------------------------------

_ADMIN = CallContext(Identity("root", Role.ADMIN), "/trioworker.v1.Worker/List", "test", None)


async def _recorded_ended_jobs(state: Path, count: int) -> list[str]:
    """``count`` jobs that ran ``true`` and exited 0, as an earlier run left them in the
    state directory; their ids, oldest first. A List sees the same ended jobs as if this
    run had started them, without spawning a thousand processes first (9 s of a 10 s
    test, 26 s under load)."""
    await trio.Path(state).mkdir(parents=True)
    new_id = JobIdGenerator()
    now = datetime.now(UTC)
    ids = []
    async with await SqliteJobStore.open(state / "jobs.db") as store:
        for pid in range(1000, 1000 + count):
            info = JobInfo(
                id=new_id(),
                owner="",
                command="true",
                args=(),
                state=JobState.EXITED,
                pid=pid,
                exit_code=0,
                signal=None,
                error="",
                started_at=now,
                ended_at=now,
                output_bytes=0,
            )
            await store.record_start(info, env_keys=(), cwd=None, pid_start_time=None)
            ids.append(info.id)
    return ids


async def test_a_page_of_1000_jobs_is_built_in_slices_the_loop_runs_between(
    tmp_path: Path,
) -> None:
    """Another task on the loop gets a turn at least once per slice of the page, however
    many jobs it holds (a page built at once gives it none); running jobs' usage is
    read (off the loop); the page is what a page was: newest first, 1,000 jobs."""
    require_root("cgroups (running jobs' usage)")
    running = 40
    ids = await _recorded_ended_jobs(tmp_path / "state", MAX_PAGE_SIZE)
    async with open_supervisor(tmp_path / "state", cgroup_parent=cgroup_parent("tw-list")) as sup:
        ids += [(await sup.start("sleep", ["600"])).id for _ in range(running)]
        service = WorkerService(sup)
        turns = 0
        listing = True

        async def other_task() -> None:
            nonlocal turns
            while listing:
                await trio.lowlevel.checkpoint()
                turns += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.lowlevel.checkpoint()  # it has run
            turns = 0
            # Ended jobs only: no thread to wait for, so every turn is a slice's checkpoint.
            ended = await service.list(pb.ListRequest(states=[pb.JOB_STATE_EXITED]), _ADMIN)
            listing = False
        assert len(ended.jobs) == MAX_PAGE_SIZE
        assert turns >= MAX_PAGE_SIZE // _LIST_SLICE - 2

        page = await service.list(pb.ListRequest(), _ADMIN)
        assert [j.id for j in page.jobs] == sorted(ids, reverse=True)[:MAX_PAGE_SIZE]
        assert page.next_page_token == encode_token(page.jobs[-1].id)
        sleepers = [j for j in page.jobs if j.state == pb.JOB_STATE_RUNNING]
        assert len(sleepers) == running
        assert all(j.HasField("usage") and j.usage.memory_peak_bytes > 0 for j in sleepers)


async def test_jobs_started_and_removed_while_pages_are_built_never_repeat_or_skip_one(
    tmp_path: Path,
) -> None:
    """Between the slices of a page (and between pages), another task removes every
    seventh job and starts new ones: every job that was there throughout is listed once,
    newest first, and nothing is listed twice."""
    ids = await _recorded_ended_jobs(tmp_path / "state", 300)
    async with open_supervisor(tmp_path / "state") as sup:
        service = WorkerService(sup)
        victims = ids[::7]
        walking = True

        async def churn() -> None:
            for victim in victims:
                if not walking:
                    return
                await sup.remove(victim)
                await sup.start("true")

        pages: list[pb.ListResponse] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            request = pb.ListRequest(page_size=40)
            while not pages or pages[-1].next_page_token:
                request.page_token = pages[-1].next_page_token if pages else ""
                pages.append(await service.list(request, _ADMIN))
            walking = False
        listed = [j.id for p in pages for j in p.jobs]
        assert listed == sorted(set(listed), reverse=True)  # newest first, none twice
        survivors = set(ids) - set(victims)
        assert survivors <= set(listed)
        assert len(pages) > 2
