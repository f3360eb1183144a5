"""trio-worker: run and control Linux processes from trio, locally or over gRPC.

The library part is ``open_supervisor``; everything a caller needs to handle
its results and errors is re-exported here.

Every public name is imported on first use (module ``__getattr__``), so that ``import
trio_worker.client`` and the command line's client commands load nothing of the supervisor
side (cgroups, the store, namespaces), and ``trio-worker --help`` not even the value types:
every command would otherwise pay for them at start-up.
"""

from __future__ import annotations

import importlib

from ._util import fix_one

TYPE_CHECKING = False  # typing is for mypy only: a short command never imports it
if TYPE_CHECKING:
    from typing import Any

    from ._errors import AuthenticationFailed as AuthenticationFailed
    from ._errors import ConnectionFailed as ConnectionFailed
    from ._errors import InvalidRequest as InvalidRequest
    from ._errors import JobNotFound as JobNotFound
    from ._errors import JobNotRunning as JobNotRunning
    from ._errors import JobStillRunning as JobStillRunning
    from ._errors import NoStdin as NoStdin
    from ._errors import PermissionDenied as PermissionDenied
    from ._errors import QuotaExceeded as QuotaExceeded
    from ._errors import RemoteError as RemoteError
    from ._errors import ResourceExhausted as ResourceExhausted
    from ._errors import ShuttingDown as ShuttingDown
    from ._errors import StateDirError as StateDirError
    from ._errors import TrioWorkerError as TrioWorkerError
    from ._errors import Unenforceable as Unenforceable
    from ._jobs._supervisor import Retention as Retention
    from ._jobs._supervisor import Supervisor as Supervisor
    from ._jobs._supervisor import open_supervisor as open_supervisor
    from ._limits import LimitPolicy as LimitPolicy
    from ._model import Isolation as Isolation
    from ._model import JobInfo as JobInfo
    from ._model import JobState as JobState
    from ._model import Limits as Limits
    from ._model import OutputChunk as OutputChunk
    from ._model import OutputStream as OutputStream
    from ._model import Usage as Usage

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

#: Every public name, by the module it comes from: imported on first access, so that
#: ``import trio_worker.cli`` (``trio-worker --help``) loads none of them, and the client
#: commands none of the server side (cgroups, the store, namespaces).
_LAZY = {
    "AuthenticationFailed": "._errors",
    "ConnectionFailed": "._errors",
    "InvalidRequest": "._errors",
    "Isolation": "._model",
    "JobInfo": "._model",
    "JobNotFound": "._errors",
    "JobNotRunning": "._errors",
    "JobState": "._model",
    "JobStillRunning": "._errors",
    "LimitPolicy": "._limits",
    "Limits": "._model",
    "NoStdin": "._errors",
    "OutputChunk": "._model",
    "OutputStream": "._model",
    "PermissionDenied": "._errors",
    "QuotaExceeded": "._errors",
    "RemoteError": "._errors",
    "ResourceExhausted": "._errors",
    "ShuttingDown": "._errors",
    "StateDirError": "._errors",
    "TrioWorkerError": "._errors",
    "Unenforceable": "._errors",
    "Usage": "._model",
    "Retention": "._jobs._supervisor",
    "Supervisor": "._jobs._supervisor",
    "open_supervisor": "._jobs._supervisor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # A module's names all at once: each says ``trio_worker.X`` from then on.
    for other, where in _LAZY.items():
        if where == module:
            value = getattr(importlib.import_module(where, __name__), other)
            fix_one(__name__, other, value)
            globals()[other] = value  # later lookups do not come back here
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
