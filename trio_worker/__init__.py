"""trio-worker: run and control Linux processes from trio, locally or over gRPC.

The library part is ``open_supervisor``; everything a caller needs to handle
its results and errors is re-exported here.
"""

from ._errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    NoStdin,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    StateDirError,
    TrioWorkerError,
    Unenforceable,
)
from ._host._cgroups import LimitPolicy
from ._jobs._supervisor import Retention, Supervisor, open_supervisor
from ._model import Isolation, JobInfo, JobState, Limits, OutputChunk, OutputStream, Usage

__all__ = [
    "AuthenticationFailed",
    "ConnectionFailed",
    "InvalidRequest",
    "Isolation",
    "JobInfo",
    "JobNotFound",
    "JobNotRunning",
    "JobState",
    "LimitPolicy",
    "Limits",
    "NoStdin",
    "OutputChunk",
    "OutputStream",
    "PermissionDenied",
    "RemoteError",
    "ResourceExhausted",
    "Retention",
    "ShuttingDown",
    "StateDirError",
    "Supervisor",
    "TrioWorkerError",
    "Unenforceable",
    "Usage",
    "open_supervisor",
]

__version__ = "0.1.0"
