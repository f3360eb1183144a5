"""The exceptions of trio-worker.

Every failure a caller can act on is one of these classes. ``_error_codes`` maps
them to gRPC status codes and ErrorInfo reasons in one table (both directions) and the
CLI maps them to exit codes in another, so adding a class here means a row in each.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConnectionFailed",
    "InvalidRequest",
    "JobNotFound",
    "JobNotRunning",
    "JobStillRunning",
    "NoStdin",
    "PermissionDenied",
    "QuotaExceeded",
    "RemoteError",
    "ResourceExhausted",
    "ShuttingDown",
    "StateDirError",
    "TrioWorkerError",
    "Unenforceable",
]


class TrioWorkerError(Exception):
    """Base class of every error trio-worker raises on purpose."""


class InvalidRequest(TrioWorkerError):
    """The request itself is wrong: fixing the input fixes it.

    ``field`` names the offending part of the request (``"command"``,
    ``"env"``, ``"limits.memory_bytes"``, ...), so clients can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


#: Ids longer than this are described in messages, not quoted (a job id is 26 characters;
#: a client may send megabytes).
_QUOTED_ID_MAX = 64


def describe_id(job_id: str) -> str:
    """``job_id`` quoted, or described when it is too long to quote whole."""
    if len(job_id) <= _QUOTED_ID_MAX:
        return repr(job_id)
    return f"{job_id[:16]!r}... ({len(job_id)} characters)"


class JobNotFound(TrioWorkerError):
    """No job with this id exists, or the caller may not see it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {describe_id(job_id)}")
        self.job_id = job_id


class JobNotRunning(TrioWorkerError):
    """The operation needs a running job, and this one has ended."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} is not running (it is {state})")
        self.job_id = job_id
        self.state = state


class JobStillRunning(TrioWorkerError):
    """The operation needs an ended job (Remove without force), and this one still runs."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {describe_id(job_id)} is still running")
        self.job_id = job_id


class NoStdin(TrioWorkerError):
    """The job takes no input this way: it was started without stdin (or tty, for a
    resize), or its stdin was closed."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"cannot write to job {job_id}: {why}")
        self.job_id = job_id
        self.why = why


class Unenforceable(TrioWorkerError):
    """The job asks for a limit or isolation this host cannot enforce.

    Raised instead of silently running the job unconstrained.
    """


class ResourceExhausted(TrioWorkerError):
    """A server-side cap (jobs, connections, streams) has been reached."""


class QuotaExceeded(ResourceExhausted):
    """The caller is at one of its per-client quotas (running jobs, start rate); the
    message says which."""


class ShuttingDown(TrioWorkerError):
    """The supervisor or server is shutting down and takes no new work."""


class PermissionDenied(TrioWorkerError):
    """The caller's role does not allow this operation, or (``field`` ``"user"``) its
    certificate does not allow the Unix user asked for (``StartRequest.user``)."""

    def __init__(self, message: str = "", *, field: str = "") -> None:
        super().__init__(message)
        #: The part of the request refused, when it is not the call itself: ``"user"``.
        self.field = field


class AuthenticationFailed(TrioWorkerError):
    """The peer's certificate is missing, invalid or carries no usable identity."""


class StateDirError(TrioWorkerError):
    """The state directory cannot be used (permissions, corrupt files, locked)."""


class ConnectionFailed(TrioWorkerError):
    """A client could not reach the server, the TLS handshake failed, or the
    connection was lost mid-call. Retrying later may help; fixing the input won't.
    """


class RemoteError(TrioWorkerError):
    """The server answered with a gRPC status we have no specific class for.

    ``code`` is the numeric gRPC status code, ``message`` the server's text.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"server error {code}: {message}")
        self.code = code
        self.message = message


# Tracebacks and reprs say ``trio_worker.JobNotFound`` however the class was reached: the
# command line and the clients import this module directly, never the package's lazy names
# (whose first use would set it too).
for _name in __all__:
    globals()[_name].__module__ = "trio_worker"
del _name
