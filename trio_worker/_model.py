"""Value types shared by every layer: frozen, comparable, cheap to copy.

Nothing here does I/O; a ``JobInfo`` is a snapshot, so handing one to a caller
can never let it change the supervisor's view of a job.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime

from ._states import DEFAULT_STOP_GRACE, JobState, OutputStream
from ._util import final

__all__ = [
    "DEFAULT_STOP_GRACE",
    "Isolation",
    "JobIdGenerator",
    "JobInfo",
    "JobState",
    "Limits",
    "OutputChunk",
    "OutputStream",
    "Usage",
]


@final
@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits of one job; 0 means "no limit" for every field.

    ``cpus`` is a number of CPUs (0.5 = half of one CPU), the IO limits are bytes
    per second, ``pids`` caps the number of tasks in the job's cgroup.
    """

    cpus: float = 0.0
    memory_bytes: int = 0
    io_read_bps: int = 0
    io_write_bps: int = 0
    pids: int = 0

    @property
    def any(self) -> bool:
        return bool(
            self.cpus or self.memory_bytes or self.io_read_bps or self.io_write_bps or self.pids
        )

    def validate(self) -> None:
        """Raise ``InvalidRequest`` for values no kernel would accept."""
        from ._errors import InvalidRequest

        if not math.isfinite(self.cpus) or self.cpus < 0:
            raise InvalidRequest("limits.cpus", f"must be a finite number >= 0, got {self.cpus}")
        for name in ("memory_bytes", "io_read_bps", "io_write_bps", "pids"):
            value = getattr(self, name)
            if value < 0:
                raise InvalidRequest(f"limits.{name}", f"must be >= 0, got {value}")


@final
@dataclass(frozen=True, slots=True)
class Isolation:
    """Which namespaces a job gets of its own."""

    pid: bool = False
    mount: bool = False
    network: bool = False

    @property
    def any(self) -> bool:
        return self.pid or self.mount or self.network


@final
@dataclass(frozen=True, slots=True)
class Usage:
    """Resources a job consumed, as far as the host can tell."""

    cpu_seconds: float = 0.0
    memory_peak_bytes: int = 0


@final
@dataclass(frozen=True, slots=True)
class JobInfo:
    """An immutable snapshot of one job."""

    id: str
    owner: str
    command: str
    args: tuple[str, ...]
    state: JobState
    pid: int | None
    exit_code: int | None
    signal: int | None
    error: str
    started_at: datetime
    ended_at: datetime | None
    output_bytes: int
    limits: Limits = field(default_factory=Limits)
    isolation: Isolation = field(default_factory=Isolation)
    oom_killed: bool = False
    #: The errno of a failed spawn (ENOENT, EACCES, ...), so clients can tell
    #: "command not found" from "cannot execute" without parsing ``error``.
    spawn_errno: int | None = None
    #: The first byte offset still retained in the log (0 unless trimmed).
    output_start: int = 0
    usage: Usage | None = None
    #: Started with stdin open for writing (Attach, ``write_stdin``).
    stdin: bool = False
    #: Runs on a pseudo-terminal (its output is all STDOUT).
    tty: bool = False
    #: The Unix user the job runs as: its name, or the uid in decimal without one.
    user: str = ""

    @property
    def ended(self) -> bool:
        return self.state.ended


@final
@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Bytes from one stream, at ``offset`` in the job's combined log."""

    data: bytes
    offset: int
    stream: OutputStream

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class JobIdGenerator:
    """Makes ULID-style ids: 48-bit milliseconds then 80 random bits, base32.

    Ids sort by creation time across restarts (the clock leads), cannot be
    guessed (80 bits from ``secrets``), and are strictly increasing within one
    generator even when several are made in the same millisecond.
    """

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> str:
        import secrets  # the server's, not every client command's (hmac, hashlib)

        value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
        if value <= self._last:
            # Same millisecond (or the clock stepped back): keep the order by stepping
            # forward a random amount, so the next id stays unguessable, and a large one,
            # so that ids made together (a batch of places) differ from their 12th-13th
            # character on, not the 19th: a short prefix names one (`status 01M8SN3Z2AW0`).
            # 2^72 leaves room for ~500 ids a millisecond before the time part runs ahead.
            value = self._last + 1 + secrets.randbits(72)
        self._last = value
        return _encode_id(value)

    def before(self, last: str | None, bound: str) -> str | None:
        """An id above ``last`` (the newest one handed out) and below ``bound``, or None.

        For a Start while places made ahead are still being made: their ids were minted
        first, and a fresh one would sort the next Starts' jobs (which take those places)
        as older than this one: List, newest first, must show Starts in their order.
        Without ``last`` (nothing handed out yet in this run), anything from ``bound``'s
        own millisecond: older runs' ids have earlier milliseconds.
        """
        import secrets

        high = _decode_id(bound)
        low = (high >> 80 << 80) - 1 if last is None else _decode_id(last)
        if high - low < 2:
            return None
        # A step of at most 1/1024 of the room: many such Starts fit in a row, and the
        # next id stays unguessable while the room lasts.
        return _encode_id(low + 1 + secrets.randbelow(max(1, min(high - low - 1, 1 << 72) >> 10)))


#: Two characters for each 10 bits: an id is 13 look-ups (a 26-step loop was 3x the CPU,
#: ~11 against ~3 us, on the loop for every place and Start).
_CROCKFORD_PAIRS = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_PAIR_SHIFTS = tuple(range(120, -1, -10))


def _encode_id(value: int) -> str:
    """The 26 characters of the low 130 bits of ``value``, most significant first."""
    pairs = _CROCKFORD_PAIRS
    return "".join([pairs[value >> shift & 1023] for shift in _PAIR_SHIFTS])


def _decode_id(job_id: str) -> int:
    value = 0
    for char in job_id:
        value = value << 5 | _CROCKFORD.index(char)
    return value
