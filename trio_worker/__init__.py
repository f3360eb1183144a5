"""trio-worker: run and control Linux processes from trio, locally or over gRPC.

The library part is ``open_supervisor``; everything a caller needs to handle
its results and errors is re-exported here.

The supervisor side (cgroups, the store, namespaces) is imported on first use of its names
(module ``__getattr__``), so that ``import trio_worker.client`` and the command line's client
commands load none of it: every ``trio-worker list`` would otherwise pay for it at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AuthenticationFailed,
    ConnectionFailed,
    InvalidRequest,
    JobNotFound,
    JobNotRunning,
    JobStillRunning,
    NoStdin,
    PermissionDenied,
    QuotaExceeded,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    StateDirError,
    TrioWorkerError,
    Unenforceable,
)
from ._model import Isolation, JobInfo, JobState, Limits, OutputChunk, OutputStream, Usage

if TYPE_CHECKING:
    from ._host._cgroups import LimitPolicy as LimitPolicy
    from ._jobs._supervisor import Retention as Retention
    from ._jobs._supervisor import Supervisor as Supervisor
    from ._jobs._supervisor import open_supervisor as open_supervisor

__all__ = [
    "AuthenticationFailed",
    "ConnectionFailed",
    "InvalidRequest",
    "Isolation",
    "JobInfo",
    "JobNotFound",
    "JobNotRunning",
    "JobState",
    "JobStillRunning",
    "LimitPolicy",
    "Limits",
    "NoStdin",
    "OutputChunk",
    "OutputStream",
    "PermissionDenied",
    "QuotaExceeded",
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

#: Public names whose modules are imported on first access: the server side.
_LAZY = {
    "LimitPolicy": "._host._cgroups",
    "Retention": "._jobs._supervisor",
    "Supervisor": "._jobs._supervisor",
    "open_supervisor": "._jobs._supervisor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
