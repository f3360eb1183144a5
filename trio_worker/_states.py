"""The value types that are plain enums: a job's state, an output chunk's stream.

Apart from ``_model`` (whose dataclasses are public) so that the command line's client
commands, which read jobs straight from the wire (``_views``), can name them without
importing ``dataclasses`` (and ``inspect`` with it) and defining the public classes: that
was a tenth of a ``trio-worker list``. ``_model`` re-exports them; they are the same
objects.
"""

from __future__ import annotations

import enum

__all__ = ["DEFAULT_STOP_GRACE", "JobState", "OutputStream"]

#: Stop's grace when none is given: SIGTERM, then SIGKILL this many seconds later (contract).
DEFAULT_STOP_GRACE = 5.0


class JobState(enum.Enum):
    """Where a job is in its life; every state but RUNNING is final."""

    RUNNING = "running"
    EXITED = "exited"  # ended on its own: exit_code is set
    KILLED = "killed"  # ended by a signal: signal is set
    FAILED = "failed"  # could not be started: error is set
    LOST = "lost"  # the server went away while it ran: error is set

    @property
    def ended(self) -> bool:
        return self is not JobState.RUNNING


class OutputStream(enum.Enum):
    """Which pipe a chunk of output came from."""

    STDOUT = 1
    STDERR = 2
