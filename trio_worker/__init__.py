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
from ._limits import LimitPolicy as LimitPolicy
from ._model import Isolation as Isolation
from ._model import JobInfo as JobInfo
from ._model import JobState as JobState
from ._model import Limits as Limits
from ._model import OutputChunk as OutputChunk
from ._model import OutputStream as OutputStream
from ._model import Usage as Usage
from ._util import fix_one, fixup_module_metadata

if TYPE_CHECKING:
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

fixup_module_metadata(__name__, globals())

#: Public names whose modules are imported on first access: the server side.
_LAZY = {
    "Retention": "._jobs._supervisor",
    "Supervisor": "._jobs._supervisor",
    "open_supervisor": "._jobs._supervisor",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    fix_one(__name__, name, value)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
