"""Per-client quotas on Start: how many jobs may run, and how fast they may be started.

Sans-I/O: the clock is passed in, the running count is asked of a callable. A client
is its identity (the certificate's CN). The rate is a token bucket per client holding
up to ``max(rate, 1)`` starts (a burst of ``rate``), refilled at ``rate`` per second.
Starts still in flight count as running, so concurrent Starts cannot slip past the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .._errors import InvalidRequest, QuotaExceeded

__all__ = ["QuotaPolicy", "Quotas"]

#: Buckets kept at most; beyond it, full ones (which are as good as none) are dropped.
_MAX_BUCKETS = 4096


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    """``serve --max-running N --start-rate R``; None: no limit."""

    max_running: int | None = None
    start_rate: float | None = None

    def __post_init__(self) -> None:
        if self.max_running is not None and not (
            isinstance(self.max_running, int) and self.max_running >= 1
        ):
            raise InvalidRequest("max_running", f"must be at least 1, not {self.max_running!r}")
        rate = self.start_rate
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise InvalidRequest("start_rate", f"must be a positive number, not {rate!r}")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Quotas:
    """Admission for Start, per client."""

    def __init__(
        self,
        policy: QuotaPolicy,
        *,
        clock: Callable[[], float],
        running: Callable[[str], int],
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._running = running
        self._starting: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    @contextmanager
    def admit(self, client: str) -> Iterator[None]:
        """Raise :class:`QuotaExceeded` if ``client`` may not start a job now; else hold
        its place among the running for the ``with`` block (the start itself)."""
        self._check_running(client)
        self._take_token(client)
        self._starting[client] = self._starting.get(client, 0) + 1
        try:
            yield
        finally:
            left = self._starting[client] - 1
            if left:
                self._starting[client] = left
            else:
                del self._starting[client]

    def _check_running(self, client: str) -> None:
        cap = self.policy.max_running
        if cap is None:
            return
        if self._running(client) + self._starting.get(client, 0) >= cap:
            raise QuotaExceeded(
                f"quota exceeded: at most {cap} running job{'s' if cap != 1 else ''} per "
                "client (--max-running)"
            )

    def _take_token(self, client: str) -> None:
        rate = self.policy.start_rate
        if rate is None:
            return
        capacity = max(rate, 1.0)
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full(now, rate, capacity)
            bucket = self._buckets[client] = _Bucket(capacity, now)
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise QuotaExceeded(
                f"quota exceeded: at most {rate:g} job starts per second per client "
                f"(--start-rate); try again in {wait:.2g} s"
            )
        bucket.tokens -= 1.0

    def _forget_full(self, now: float, rate: float, capacity: float) -> None:
        full = [c for c, b in self._buckets.items() if b.tokens + (now - b.at) * rate >= capacity]
        for client in full:
            del self._buckets[client]
