"""The job lifecycle as a pure state machine: no I/O, no trio, no processes.

In the spirit of h11's ``_state.py``: the supervisor feeds events in, the
machine decides whether they are legal and what the resulting record holds.
Keeping this apart means every rule about *what* a job's end records is tested
without spawning anything, and the supervisor only decides *when*.

    (new) --Spawned--> RUNNING --Exited(code>=0)--> EXITED
      |                   |------Exited(code<0)---> KILLED
      |                   '------Lost-------------> LOST
      '----SpawnFailed------------------------------> FAILED
      |                   '------SpawnFailed------> FAILED (a namespace helper
      |                                                  could not exec the command)
    (new) --Lost--> LOST   (recovered records whose spawn never completed)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .._errors import TrioWorkerError
from .._model import JobState

__all__ = [
    "Event",
    "Exited",
    "IllegalTransition",
    "Lost",
    "Record",
    "SpawnFailed",
    "Spawned",
    "apply",
]


class IllegalTransition(TrioWorkerError):
    """An event arrived that the job's current state does not allow.

    Always a bug in the caller, never a user error: the supervisor must not
    feed a second end to an ended job.
    """


@dataclass(frozen=True, slots=True)
class Record:
    """The lifecycle-owned part of a job: what its state machine decides."""

    state: JobState | None = None  # None: not yet spawned
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    error: str = ""
    spawn_errno: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    oom_killed: bool = False


@dataclass(frozen=True, slots=True)
class Spawned:
    pid: int
    at: datetime


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    error: str
    at: datetime
    errno: int | None = None


@dataclass(frozen=True, slots=True)
class Exited:
    """The main process ended; ``returncode`` as subprocess reports it.

    A negative return code is death by signal ``-returncode``.
    """

    returncode: int
    at: datetime
    oom_killed: bool = False


@dataclass(frozen=True, slots=True)
class Lost:
    error: str
    at: datetime


Event = Spawned | SpawnFailed | Exited | Lost


def apply(record: Record, event: Event) -> Record:
    """Return the record after ``event``, or raise ``IllegalTransition``.

    Each new record is made whole, not by ``dataclasses.replace`` (which looks the
    fields up on every call: ~12 against ~3 us, twice per job on the loop); what an
    event does not name is kept (tested against ``replace``)."""
    state = record.state
    if state is None:
        if isinstance(event, Spawned):
            return Record(
                JobState.RUNNING,
                event.pid,
                record.exit_code,
                record.signal,
                record.error,
                record.spawn_errno,
                event.at,
                record.ended_at,
                record.oom_killed,
            )
        if isinstance(event, SpawnFailed):
            return Record(
                JobState.FAILED,
                record.pid,
                record.exit_code,
                record.signal,
                event.error,
                event.errno,
                event.at,
                event.at,
                record.oom_killed,
            )
        if isinstance(event, Lost):
            return Record(
                JobState.LOST,
                record.pid,
                record.exit_code,
                record.signal,
                event.error,
                record.spawn_errno,
                event.at,
                event.at,
                record.oom_killed,
            )
    elif state is JobState.RUNNING:
        if isinstance(event, Exited):
            if event.returncode >= 0:
                return Record(
                    JobState.EXITED,
                    record.pid,
                    event.returncode,
                    record.signal,
                    record.error,
                    record.spawn_errno,
                    record.started_at,
                    event.at,
                    event.oom_killed,
                )
            return Record(
                JobState.KILLED,
                record.pid,
                record.exit_code,
                -event.returncode,
                record.error,
                record.spawn_errno,
                record.started_at,
                event.at,
                event.oom_killed,
            )
        if isinstance(event, Lost):
            return Record(
                JobState.LOST,
                record.pid,
                record.exit_code,
                record.signal,
                event.error,
                record.spawn_errno,
                record.started_at,
                event.at,
                record.oom_killed,
            )
        if isinstance(event, SpawnFailed):
            return Record(
                JobState.FAILED,
                record.pid,
                record.exit_code,
                record.signal,
                event.error,
                event.errno,
                record.started_at,
                event.at,
                record.oom_killed,
            )
    current = "new" if state is None else state.value
    raise IllegalTransition(f"{type(event).__name__} is not allowed in state {current}")
