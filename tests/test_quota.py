"""Per-client quotas on Start: running jobs and start rate (a token bucket).

The core is tested without sockets on a hand-driven clock (with Hypothesis for the
bucket's promise); then end to end through the server, on a trio MockClock that only
moves when the test jumps it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_worker import InvalidRequest, QuotaExceeded, ResourceExhausted, pki
from trio_worker._error_codes import status_of
from trio_worker._identity import Role
from trio_worker._wire._status import StatusCode, decode_details
from trio_worker.client import connect
from trio_worker.server._quota import QuotaPolicy, Quotas
from trio_worker.server._run import ServerSettings, run_server


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def quotas(policy: QuotaPolicy, running: dict[str, int] | None = None) -> tuple[Quotas, Clock]:
    clock = Clock()
    counts = running if running is not None else {}
    return Quotas(policy, clock=clock, running=lambda c: counts.get(c, 0)), clock


def admitted(q: Quotas, client: str) -> bool:
    try:
        with q.admit(client):
            return True
    except QuotaExceeded:
        return False


def refusal(q: Quotas, client: str) -> str:
    """The message ``q`` refuses ``client`` with (fails if it admits it)."""
    with pytest.raises(QuotaExceeded) as info, q.admit(client):
        pass
    return str(info.value)


def test_max_running_counts_running_and_starting_jobs() -> None:
    running = {"alice": 1}
    q, _ = quotas(QuotaPolicy(max_running=2), running)
    with q.admit("alice"):  # 1 running + this one starting
        assert refusal(q, "alice") == (
            "quota exceeded: at most 2 running jobs per client (--max-running)"
        )
        assert admitted(q, "bob")  # another client is unaffected
    running["alice"] = 2
    assert not admitted(q, "alice")
    running["alice"] = 1  # one ended
    assert admitted(q, "alice")


def test_a_refused_start_holds_no_place() -> None:
    q, _ = quotas(QuotaPolicy(max_running=1))
    with pytest.raises(RuntimeError), q.admit("alice"):
        raise RuntimeError("the start failed")
    assert admitted(q, "alice")


def test_start_rate_allows_a_burst_then_refills() -> None:
    q, clock = quotas(QuotaPolicy(start_rate=2))
    assert [admitted(q, "alice") for _ in range(3)] == [True, True, False]
    assert refusal(q, "alice").startswith(
        "quota exceeded: at most 2 job starts per second per client (--start-rate); try again in"
    )
    assert admitted(q, "bob")
    assert admitted(q, "bob")
    clock.now += 0.49
    assert not admitted(q, "alice")
    clock.now += 0.02
    assert admitted(q, "alice")
    assert not admitted(q, "alice")
    clock.now += 60  # refills to the burst, not beyond
    assert [admitted(q, "alice") for _ in range(3)] == [True, True, False]


def test_a_slow_rate_allows_one_start() -> None:
    q, clock = quotas(QuotaPolicy(start_rate=0.5))
    assert [admitted(q, "alice") for _ in range(2)] == [True, False]
    clock.now += 1.9
    assert not admitted(q, "alice")
    clock.now += 0.2
    assert admitted(q, "alice")


def test_both_quotas_at_once() -> None:
    running = {"alice": 0}
    q, _ = quotas(QuotaPolicy(max_running=1, start_rate=10), running)
    assert admitted(q, "alice")
    running["alice"] = 1
    assert "--max-running" in refusal(q, "alice")
    running["alice"] = 0
    assert admitted(q, "alice")


@settings(database=None, max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([0.5, 1.0, 3.0, 10.0]),
    gaps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=60),
)
def test_never_more_than_burst_plus_rate_times_time(rate: float, gaps: list[float]) -> None:
    q, clock = quotas(QuotaPolicy(start_rate=rate))
    times = []
    for gap in gaps:
        clock.now += gap
        if admitted(q, "alice"):
            times.append(clock.now)
    burst = max(rate, 1.0)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            assert j - i + 1 <= burst + rate * (times[j] - start) + 1e-9
    assert times  # the first start is always allowed


def test_buckets_are_bounded() -> None:
    q, clock = quotas(QuotaPolicy(start_rate=1000))
    for i in range(5000):
        clock.now += 0.01  # every earlier bucket is full again
        assert admitted(q, f"client-{i}")
    assert len(q._buckets) <= 4097


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_running": 0}, "max_running"),
        ({"start_rate": 0.0}, "start_rate"),
        ({"start_rate": float("inf")}, "start_rate"),
        ({"start_rate": float("nan")}, "start_rate"),
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        QuotaPolicy(**kwargs)
    assert info.value.field == field


def test_quota_exceeded_is_resource_exhausted_with_its_reason() -> None:
    wire = status_of(QuotaExceeded("quota exceeded: at most 2 running jobs"))
    assert wire.code is StatusCode.RESOURCE_EXHAUSTED
    info = decode_details(wire.details)
    assert info is not None
    assert info.reason == "QUOTA_EXCEEDED"
    assert issubclass(QuotaExceeded, ResourceExhausted)


# --- through the server -------------------------------------------------------------------


@dataclass
class Served:
    port: int
    pki_dir: Path

    def connect(self, name: str) -> Any:
        d = self.pki_dir
        return connect(
            f"127.0.0.1:{self.port}",
            ca=d / "ca.pem",
            cert=d / f"{name}.pem",
            key=d / f"{name}.key",
            server_hostname="localhost",
        )


async def _serve(tmp_path: Path, policy: QuotaPolicy) -> AsyncIterator[Served]:
    d = tmp_path / "pki"
    pki.init_ca(d)
    pki.issue_server(d, ["localhost"])
    for name in ("alice", "bob"):
        pki.issue_client(d, name, Role.FULL)
    settings_ = ServerSettings(
        ca=d / "ca.pem",
        cert=d / "server.pem",
        key=d / "server.key",
        state_dir=tmp_path / "state",
        port=0,
        quotas=policy,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: run_server(settings_, handle_signals=False, task_status=task_status)
        )
        yield Served(port, d)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def max_two(tmp_path: Path) -> AsyncIterator[Served]:
    async for served in _serve(tmp_path, QuotaPolicy(max_running=2)):
        yield served


@pytest.fixture
async def rate_two(tmp_path: Path, mock_clock: trio.testing.MockClock) -> AsyncIterator[Served]:
    async for served in _serve(tmp_path, QuotaPolicy(start_rate=2)):
        yield served


async def test_max_running_through_the_server(max_two: Served) -> None:
    async with max_two.connect("alice") as alice, max_two.connect("bob") as bob:
        first = await alice.start("sleep", ["60"])
        await alice.start("sleep", ["60"])
        with pytest.raises(QuotaExceeded, match="--max-running"):
            await alice.start("echo", ["must not run"])
        assert len(await alice.list()) == 2  # nothing ran
        await bob.start("true")  # another identity is unaffected
        await alice.stop(first.id, grace=0)
        await alice.start("true")


async def test_start_rate_through_the_server(
    rate_two: Served, mock_clock: trio.testing.MockClock
) -> None:
    async with rate_two.connect("alice") as alice, rate_two.connect("bob") as bob:
        await alice.start("true")
        await alice.start("true")
        with pytest.raises(QuotaExceeded, match="--start-rate"):
            await alice.start("echo", ["must not run"])
        assert len(await alice.list()) == 2
        await bob.start("true")
        await bob.start("true")
        mock_clock.jump(0.5)
        await alice.start("true")
        with pytest.raises(QuotaExceeded):
            await alice.start("true")
